"""Several config sources: files (``--config`` may repeat), a directory of ``ip-masq*`` files
(``--config-dir``) and the API ConfigMap merge into one config.

Rules a user relies on: an absent source contributes nothing; the defaults apply only when no
source is present; CIDR lists are unioned, ``masqLinkLocal*`` OR'ed, the smallest
``resyncInterval`` wins, ``cidrLimit`` applies per source, a key no present source sets keeps its
default; an invalid source keeps the last good rules; render shows where each CIDR came from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from masqd.cli import main
from masqd.config import AgentOptions, MasqConfig, merge_configs, parse_config
from masqd.cidrs import parse_cidr
from masqd.errors import ConfigError
from masqd.inputs import ConfigLoader, DirectoryInput, FileInput, ConfigText
from masqd.reconcile import Reconciler
from masqd.backends.dryrun import DryRunBackend

V4 = AgentOptions()
V6 = AgentOptions(enable_ipv6=True)
RFC1918 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")


def nets(*cidrs: str) -> tuple:
    return tuple(parse_cidr(c) for c in cidrs)


def parsed(text: str, options: AgentOptions = V4) -> MasqConfig:
    return parse_config(text, options).config


# --- merge_configs (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "cidrs", "link_local", "resync_s"),
    [
        pytest.param([], RFC1918, False, 60, id="no-source-defaults"),
        pytest.param(["masqLinkLocal: true"], RFC1918, True, 60, id="one-source-without-cidrs-keeps-default-cidrs"),
        pytest.param(["nonMasqueradeCIDRs: [10.0.0.0/8]"], ("10.0.0.0/8",), False, 60,
                     id="one-source-list-means-exactly-that"),
        pytest.param(["nonMasqueradeCIDRs: [10.0.0.0/8]", "nonMasqueradeCIDRs: [192.0.2.0/24, 10.0.0.0/8]"],
                     ("10.0.0.0/8", "192.0.2.0/24"), False, 60, id="lists-unioned-first-listing-wins-order"),
        pytest.param(["nonMasqueradeCIDRs: [10.0.0.0/8]", "masqLinkLocal: true"], ("10.0.0.0/8",), True, 60,
                     id="cidr-key-set-by-one-source-only"),
        pytest.param(["resyncInterval: 5m", "resyncInterval: 30s", "masqLinkLocal: false"], RFC1918, False, 30,
                     id="smallest-resync-wins"),
        pytest.param(["masqLinkLocal: false", "masqLinkLocal: true"], RFC1918, True, 60, id="link-local-ored"),
        pytest.param(["nonMasqueradeCIDRs: []", "masqLinkLocal: true"], (), True, 60,
                     id="empty-list-is-a-list"),
        pytest.param(["", "nonMasqueradeCIDRs: [198.51.100.0/24]"], ("198.51.100.0/24",), False, 60,
                     id="empty-file-is-present-but-sets-nothing"),
    ],
)
def test_merge(texts, cidrs, link_local, resync_s):
    merged = merge_configs([(f"s{i}", parsed(t)) for i, t in enumerate(texts)], V4)
    assert merged.config.non_masquerade_cidrs == nets(*cidrs)
    assert merged.config.masq_link_local is link_local
    assert merged.config.resync_interval == resync_s
    assert merged.sources == tuple(f"s{i}" for i in range(len(texts)))


def test_merge_records_which_sources_list_each_cidr():
    merged = merge_configs([("file", parsed("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]")),
                            ("configmap", parsed("nonMasqueradeCIDRs: [10.0.0.0/8]"))], V4)
    assert merged.origins == {parse_cidr("10.0.0.0/8"): ("file", "configmap"),
                              parse_cidr("192.0.2.0/24"): ("file",)}
    assert set(merge_configs([], V4).origins.values()) == {("defaults",)}


def test_origins_read_as_a_mapping_of_each_listed_cidr_in_first_listed_order():
    merged = merge_configs([("a", parsed("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24, 10.0.0.0/8, 'fd00::/8']", V6)),
                            ("b", parsed("nonMasqueradeCIDRs: ['::/0', 0.0.0.0/0, 10.0.0.0/8]", V6))], V6)
    expected = dict(zip(nets("10.0.0.0/8", "192.0.2.0/24", "fd00::/8", "::/0", "0.0.0.0/0"),
                        [("a", "b"), ("a",), ("a",), ("b",), ("b",)]))
    origins = merged.origins
    assert origins == expected and dict(origins) == expected and len(origins) == 5
    assert list(origins) == list(expected) and list(origins.items()) == list(expected.items())
    assert list(origins.values()) == list(expected.values()) and ("b",) in origins.values()
    assert merged.config.non_masquerade_cidrs == tuple(expected)
    assert parse_cidr("::/0") in origins and origins[parse_cidr("0.0.0.0/0")] == ("b",)  # same int, other family
    assert "10.0.0.0/8" not in origins and None not in origins and origins.get(parse_cidr("10.0.0.0/16")) is None
    with pytest.raises(KeyError):
        origins[parse_cidr("198.51.100.0/24")]
    with pytest.raises(TypeError):
        origins[parse_cidr("10.0.0.0/8")] = ("c",)  # read-only
    single = merge_configs([("only", parsed("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24, 10.0.0.0/8]"))], V4)
    assert dict(single.origins) == dict(zip(nets("10.0.0.0/8", "192.0.2.0/24"), [("only",), ("only",)]))


def test_merge_ipv6_link_local_ored_and_reserved_defaults_follow_the_flag():
    reserved = AgentOptions(nomasq_all_reserved_ranges=True)
    merged = merge_configs([("a", parsed("masqLinkLocalIPv6: true", reserved)),
                            ("b", parsed("masqLinkLocal: false", reserved))], reserved)
    assert merged.config.masq_link_local_ipv6 is True
    assert len(merged.config.non_masquerade_cidrs) == 11  # RFC 1918 + the 8 reserved ranges


def test_a_single_source_is_used_exactly_including_its_cidr_limit():
    one = parsed("nonMasqueradeCIDRs: [10.0.0.0/8]\ncidrLimit: 3")
    merged = merge_configs([("only", one)], V4)
    assert merged.config is one and merged.config.cidr_limit_set
    two = merge_configs([("a", one), ("b", parsed("cidrLimit: 5"))], V4)
    assert not two.config.cidr_limit_set  # per source: plugin CIDRs are not counted against either


def test_cidr_limit_applies_per_source(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.write_text("cidrLimit: 2\nnonMasqueradeCIDRs: [10.1.0.0/16, 10.2.0.0/16]\n")
    b.write_text("cidrLimit: 2\nnonMasqueradeCIDRs: [10.3.0.0/16, 10.4.0.0/16]\n")
    loaded = ConfigLoader([FileInput(a), FileInput(b)], V4).load()
    assert len(loaded.config.non_masquerade_cidrs) == 4  # each source within its own limit
    b.write_text("cidrLimit: 2\nnonMasqueradeCIDRs: [10.3.0.0/16, 10.4.0.0/16, 10.5.0.0/16]\n")
    with pytest.raises(ConfigError) as caught:
        ConfigLoader([FileInput(a), FileInput(b)], V4).load()
    assert caught.value.source == str(b) and "cidrLimit=2" in str(caught.value)


# --- inputs and the loader ------------------------------------------------------------------------


def test_an_edited_text_keeps_the_networks_of_its_unchanged_lines(tmp_path):
    """After a one-line edit of a big list only the new line is parsed: the other CIDRs are the
    very networks of the previous version (so the old and new rules compare by identity); the
    result is exactly a fresh parse of the new text."""
    cidrs = [f"10.{i // 256}.{i % 256}.0/24" for i in range(2000)]
    config = tmp_path / "ip-masq-agent"
    config.write_text("cidrLimit: 5000\nnonMasqueradeCIDRs:\n" + "".join(f"  - {c}\n" for c in cidrs))
    loader = ConfigLoader([FileInput(config)], V4)
    before = loader.load().config.non_masquerade_cidrs
    edited = cidrs[:1000] + ["192.0.2.0/24", "10.0.0.0/08"] + cidrs[1001:] + [cidrs[5]]
    text = "cidrLimit: 5000\nnonMasqueradeCIDRs:\n" + "".join(f"  - {c}\n" for c in edited)
    config.write_text(text)
    loaded = loader.load()
    after = loaded.config.non_masquerade_cidrs
    assert after == parse_config(text, V4).config.non_masquerade_cidrs and len(after) == 2002
    assert all(a is b for a, b in zip(after[:1000], before)) and after[-1] is before[5]
    assert all(a is b for a, b in zip(after[1002:-1], before[1001:]))
    assert [w.value for _, w in loaded.warnings] == [cidrs[5]]  # the repeated line is still found
    config.write_text("nonMasqueradeCIDRs: [10.0.0.1/8]\n")
    with pytest.raises(ConfigError):
        loader.load()  # a bad version in between: the next good one is parsed in full
    config.write_text(text)
    assert loader.load().config.non_masquerade_cidrs == after


def test_a_missing_file_contributes_nothing_even_next_to_another_source(tmp_path):
    present = tmp_path / "present"
    present.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    loaded = ConfigLoader([FileInput(tmp_path / "absent"), FileInput(present)], V4).load()
    assert loaded.config.non_masquerade_cidrs == nets("10.0.0.0/8")
    assert loaded.merged.sources == (str(present),)


def test_directory_reads_only_ip_masq_files_in_name_order_and_skips_hidden(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "ip-masq-agent-user").write_text("nonMasqueradeCIDRs: [192.0.2.0/24]\n")
    (conf / "ip-masq-agent").write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    (conf / "other").write_text("nonMasqueradeCIDRs: [203.0.113.0/24]\n")
    (conf / "..data").mkdir()
    (conf / "ip-masq-dir").mkdir()  # a directory is not a config file
    loaded = ConfigLoader([DirectoryInput(conf)], V4).load()
    assert loaded.merged.sources == (str(conf / "ip-masq-agent"), str(conf / "ip-masq-agent-user"))
    assert loaded.config.non_masquerade_cidrs == nets("10.0.0.0/8", "192.0.2.0/24")


def test_configmap_mount_layout_symlinks_are_followed_and_a_file_is_read_once(tmp_path):
    """A ConfigMap volume: KEY -> ..data/KEY, ..data -> ..TIMESTAMP. With --config pointing at the
    key and --config-dir at the mount, the file is one source, not two."""
    mount = tmp_path / "config"
    (mount / "..2026_11_25").mkdir(parents=True)
    (mount / "..2026_11_25" / "ip-masq-agent").write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    os.symlink("..2026_11_25", mount / "..data")
    os.symlink("..data/ip-masq-agent", mount / "ip-masq-agent")
    loader = ConfigLoader([FileInput(mount / "ip-masq-agent"), DirectoryInput(mount)], V4)
    assert loader.load().merged.sources == (str(mount / "ip-masq-agent"),)


def test_a_missing_directory_holds_no_source(tmp_path):
    assert ConfigLoader([DirectoryInput(tmp_path / "nope")], V4).load().merged.sources == ()


def test_every_invalid_source_is_named_and_nothing_is_used(tmp_path):
    a, b, good = tmp_path / "a", tmp_path / "b", tmp_path / "good"
    a.write_text("nonMasqueradeCIDRs: [10.0.0.1/8]\n")
    b.write_text("masqLinkLocal: maybe\n")
    good.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    with pytest.raises(ConfigError) as caught:
        ConfigLoader([FileInput(a), FileInput(good), FileInput(b)], V4).load()
    keys = [p.key for p in caught.value.problems]
    assert keys == [f"{a}: nonMasqueradeCIDRs[0]", f"{b}: masqLinkLocal"]
    assert "10.0.0.0/8" in str(caught.value)  # the alignment hint survives


class _FakeInput:
    """A config input whose sources the test sets (as the API ConfigMap input holds them)."""

    def __init__(self, name: str):
        self.name = name
        self.text: str | None = None

    def read(self):
        return [] if self.text is None else [ConfigText(self.name, self.text)]

    def watcher(self):
        return None


def test_unchanged_text_is_not_parsed_again(tmp_path, monkeypatch):
    source = _FakeInput("configmap kube-system/ip-masq-agent")
    source.text = "nonMasqueradeCIDRs: [10.0.0.0/8]\n"
    loader = ConfigLoader([source], V4)
    calls = []
    import masqd.inputs

    real = masqd.inputs.parse_config
    monkeypatch.setattr(masqd.inputs, "parse_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = loader.load()
    assert loader.load().config == first.config and calls == [1]
    source.text = "nonMasqueradeCIDRs: [192.0.2.0/24]\n"
    assert loader.load().config.non_masquerade_cidrs == nets("192.0.2.0/24") and calls == [1, 1]


async def test_reconciler_keeps_the_last_good_rules_when_one_source_turns_invalid(tmp_path):
    configmap = _FakeInput("configmap kube-system/ip-masq-agent")
    file = tmp_path / "ip-masq-agent"
    file.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    reconciler = Reconciler(DryRunBackend(), V4, ConfigLoader([FileInput(file), configmap], V4))
    link_local = parse_cidr("169.254.0.0/16")

    async def applied() -> set:
        return set(reconciler.status.applied.cidrs()) - {link_local}

    await reconciler.reconcile()
    assert await applied() == set(nets("10.0.0.0/8"))
    configmap.text = "nonMasqueradeCIDRs: [192.0.2.0/24]\n"
    await reconciler.reconcile()
    assert await applied() == set(nets("10.0.0.0/8", "192.0.2.0/24"))
    assert reconciler.origins[parse_cidr("192.0.2.0/24")] == ("configmap kube-system/ip-masq-agent",)
    configmap.text = "nonMasqueradeCIDRs: [192.0.2.1/24]\n"
    with pytest.raises(ConfigError, match="configmap kube-system/ip-masq-agent"):
        await reconciler.reconcile()
    assert await applied() == set(nets("10.0.0.0/8", "192.0.2.0/24"))
    configmap.text = None  # deleted: the file alone
    await reconciler.reconcile()
    assert await applied() == set(nets("10.0.0.0/8"))
    file.unlink()  # nothing left: defaults
    await reconciler.reconcile()
    assert await applied() == set(nets(*RFC1918))


# --- the command line -----------------------------------------------------------------------------


def test_cli_config_repeats_and_config_dir(tmp_path, capsys):
    a = tmp_path / "a.yaml"
    a.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 2m\n")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "ip-masq-provider").write_text("nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\nresyncInterval: 30s\n")
    argv = ["--config", str(a), "--config", str(tmp_path / "absent"), "--config-dir", str(conf), "--backend", "dry-run"]
    assert main(["validate", *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {a}, {conf / 'ip-masq-provider'}: 2 non-masquerade CIDRs, resyncInterval 30s")
    assert main(["render", *argv]) == 0
    out, err = capsys.readouterr()
    assert "-A IP-MASQ-AGENT -d 198.51.100.0/24" in out
    assert f"10.0.0.0/8: from {a}, {conf / 'ip-masq-provider'}" in err.splitlines()
    assert f"198.51.100.0/24: from {conf / 'ip-masq-provider'}" in err.splitlines()


def test_cli_validate_names_the_invalid_source(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    bad.write_text("nonMasqueradeCIDRs: [10.0.0.0/33]\n")
    assert main(["validate", "--config", str(good), "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"error: {bad}: nonMasqueradeCIDRs[0]" in err and str(good) not in err


def test_cli_no_source_present_says_defaults(tmp_path, capsys):
    assert main(["validate", "--config", str(tmp_path / "absent"), "--config-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("ok: defaults (no config source present): 3 non-masquerade CIDRs")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("ip-masq-agent", "expected NAMESPACE/NAME", id="no-slash"),
        pytest.param("Kube-System/x", "namespace 'Kube-System'", id="bad-namespace"),
        pytest.param("kube-system/", "name ''", id="empty-name"),
        pytest.param("kube-system/a_b", "name 'a_b'", id="bad-name"),
    ],
)
def test_cli_kube_configmap_flag_is_checked(value, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["validate", "--kube-configmap", value])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_run_without_kube_credentials_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    code = main(["run", "--backend", "dry-run", "--config", str(tmp_path / "c"), "--kube-configmap", "kube-system/x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no usable Kubernetes credentials" in err and "--kubeconfig" in err


def test_cli_explicit_kubeconfig_that_is_missing_is_named(tmp_path, capsys):
    missing = tmp_path / "kc"
    assert main(["validate", "--egress-nat-policies", "--kubeconfig", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_example_path_unchanged_single_file_behaviour(capsys):
    example = Path(__file__).resolve().parent.parent / "examples" / "config.yaml"
    assert main(["validate", "--config", str(example)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {example}:")
