"""masqd-cidr-files against masqd, through masqd's own test fixtures."""

from __future__ import annotations

import ipaddress
import json
import os

import anyio
import pytest

from masqd.config import AgentOptions
from masqd_cidr_files import CidrFiles


def ranges_document(*entries) -> str:
    return json.dumps({"syncToken": "1", "prefixes": list(entries)})


def test_directory_files_are_added_in_name_order(tmp_path, masqd_dry_run):
    (tmp_path / "b-partners").write_text("198.51.100.0/24   # partner VPN\n\n# nothing here\n")
    (tmp_path / "a-onprem").write_text("192.0.2.0/25 192.0.2.128/25\n")
    (tmp_path / ".hidden").write_text("203.0.113.0/24\n")
    (tmp_path / "..data").mkdir()  # what a ConfigMap mount holds besides the keys
    result = masqd_dry_run(CidrFiles(tmp_path)).apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert result.error is None
    assert result.contributions == {"cidr-files": ["192.0.2.0/25", "192.0.2.128/25", "198.51.100.0/24"]}
    assert result.nonmasq[4] == ["169.254.0.0/16", "10.0.0.0/8", "192.0.2.0/25", "192.0.2.128/25", "198.51.100.0/24"]


def test_published_ranges_ipv6_only_with_ipv6_enabled(tmp_path, masqd_dry_run):
    doc = tmp_path / "cloud.json"
    doc.write_text(ranges_document({"ipv4Prefix": "203.0.113.0/24", "service": "x"}, {"ipv6Prefix": "2001:db8::/32"}))
    v4_only = masqd_dry_run(CidrFiles(documents=[doc])).apply(None)
    assert v4_only.contributions == {"cidr-files": ["203.0.113.0/24"]}
    dual = masqd_dry_run(CidrFiles(documents=[doc]), options=AgentOptions(enable_ipv6=True)).apply(None)
    assert dual.contributions == {"cidr-files": ["203.0.113.0/24", "2001:db8::/32"]}
    assert dual.nonmasq[6] == ["fe80::/10", "2001:db8::/32"]


@pytest.mark.parametrize(("content", "message"), [
    pytest.param("192.0.2.0/24\n10.0.0.1/8\n", "a-list:2: '10.0.0.1/8': not aligned", id="misaligned-line"),
    pytest.param("192.0.2.0/24 and more\n", "a-list:1: 'and'", id="words"),
])
def test_a_bad_line_keeps_the_last_good_rules_and_names_file_and_line(tmp_path, masqd_dry_run, content, message):
    listing = tmp_path / "a-list"
    listing.write_text("192.0.2.0/24\n")
    agent = masqd_dry_run(CidrFiles(tmp_path))
    assert agent.apply(None).error is None
    listing.write_text(content)
    result = agent.apply(None)
    assert result.error is not None and message in str(result.error)
    assert "cidr-files.nonmasq_cidrs" in str(result.error)
    assert result.nonmasq[4][-1] == "192.0.2.0/24"


@pytest.mark.parametrize(("document", "message"), [
    pytest.param("{not json", "not valid JSON", id="not-json"),
    pytest.param(json.dumps({"prefixes": {}}), "'prefixes' list", id="prefixes-not-a-list"),
    pytest.param(ranges_document({"ip_prefix": "192.0.2.0/24"}), "prefixes[0]: expected an object with ipv4Prefix",
                 id="other-provider-shape"),
    pytest.param(ranges_document({"ipv4Prefix": "192.0.2.1/24"}), "prefixes[0]: '192.0.2.1/24': not aligned",
                 id="misaligned"),
])
def test_a_bad_ranges_document_is_reported(tmp_path, masqd_dry_run, document, message):
    doc = tmp_path / "ranges.json"
    doc.write_text(document)
    result = masqd_dry_run(CidrFiles(documents=[doc])).apply(None)
    assert result.error is not None and message in str(result.error)


def test_files_are_read_again_only_when_they_changed(tmp_path):
    listing = tmp_path / "list"
    listing.write_text("192.0.2.0/24\n")
    reads = []

    class Counting(CidrFiles):
        def _read(self, path, ipv6):
            reads.append(path.name)
            return super()._read(path, ipv6)

    masquerading = tmp_path / "masquerade" / "hole"
    masquerading.parent.mkdir()
    masquerading.write_text("192.0.2.128/25\n")
    plugin = Counting(tmp_path, masquerade_directory=masquerading.parent)
    options = AgentOptions()
    assert plugin.nonmasq_cidrs(options) == ["192.0.2.0/24"]
    assert plugin.nonmasq_cidrs(options) == ["192.0.2.0/24"]
    assert reads == ["list"]  # the second call read nothing
    listing.write_text("198.51.100.0/24\n")
    assert plugin.nonmasq_cidrs(options) == ["198.51.100.0/24"]
    assert reads == ["list", "list"]
    assert plugin.masquerade_cidrs(options) == plugin.masquerade_cidrs(options) == ["192.0.2.128/25"]
    assert plugin.nonmasq_cidrs(options) == ["198.51.100.0/24"]
    assert reads == ["list", "list", "hole"]  # each directory is read on its own


def test_environment_configures_the_plugin(tmp_path):
    plugin = CidrFiles.from_environment({"MASQD_CIDR_FILES_DIR": str(tmp_path),
                                         "MASQD_CIDR_FILES_RANGES": f"{tmp_path}/a.json, {tmp_path}/b.json",
                                         "MASQD_CIDR_FILES_MASQUERADE_DIR": str(tmp_path / "masquerade")})
    assert plugin.directory == tmp_path and [p.name for p in plugin.documents] == ["a.json", "b.json"]
    assert plugin.masquerade_directory == tmp_path / "masquerade"
    assert CidrFiles.from_environment({}).masquerade_directory is None


@pytest.mark.parametrize("masquerade", [pytest.param(False, id="keep-directory"),
                                        pytest.param(True, id="masquerade-directory")])
async def test_its_source_asks_for_a_reconcile_when_a_file_changes(tmp_path, masquerade):
    (tmp_path / "list").write_text("192.0.2.0/24\n")
    registered = []
    plugin = CidrFiles(masquerade_directory=tmp_path) if masquerade else CidrFiles(tmp_path)
    plugin.register_sources(registered.append)
    (source,) = registered
    reasons = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(source.run, reasons.append)
        await anyio.sleep(0.2)  # let the watch start
        (tmp_path / "list").write_text("198.51.100.0/24\n")
        with anyio.fail_after(10):
            while not reasons:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert reasons[0] == "files changed"


def test_installed_entry_point_is_listed_by_masqd(capsys):
    from masqd.cli import main

    assert main(["plugins"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cidr-files"))
    assert "(masqd-cidr-files 0.1.0)" in line and "nonmasq_cidrs" in line and "register_sources" in line
    assert "masquerade_cidrs" in line


def test_masqd_render_names_the_plugin_and_writes_its_cidrs(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    cidrs = tmp_path / "cidrs"
    cidrs.mkdir()
    (cidrs / "partners").write_text("192.0.2.0/24\n")
    env = {**os.environ, "MASQD_PLUGINS": "cidr-files", "MASQD_CIDR_FILES_DIR": str(cidrs)}
    result = subprocess.run([str(Path(sys.executable).with_name("masqd")), "render", "--backend", "dry-run",
                             "--config", str(tmp_path / "absent")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "plugin cidr-files: 1 non-masquerade CIDRs: 192.0.2.0/24" in result.stderr
    assert "-A IP-MASQ-AGENT -d 192.0.2.0/24 -m comment" in result.stdout
    assert "plugin cidr-files" not in result.stdout  # stdout stays exactly the script


def test_explain_names_the_file_and_line_of_each_cidr(tmp_path, masqd_plugins):
    """``describe_cidrs``: what ``masqd explain`` shows after the plugin's name."""
    listing = tmp_path / "cidrs" / "partners"
    listing.parent.mkdir()
    listing.write_text("# partners\n198.51.100.0/24\n192.0.2.0/25 192.0.2.128/25  # two halves\n")
    doc = tmp_path / "cloud.json"
    doc.write_text(ranges_document({"ipv4Prefix": "203.0.113.0/24"}, {"ipv4Prefix": "198.51.100.0/24"}))
    plugins = masqd_plugins(CidrFiles(listing.parent, documents=[doc]))

    async def describe():
        contributions = await plugins.contributions(None, AgentOptions())
        return await plugins.describe_cidrs(contributions)

    (described, problems) = anyio.run(describe)
    assert problems == []
    texts = {str(net): [origin.detail for origin in origins] for net, origins in described["cidr-files"].items()}
    assert texts == {
        "198.51.100.0/24": [f"file {listing} line 2", f"{doc}: prefixes[1].ipv4Prefix"],
        "192.0.2.0/25": [f"file {listing} line 3"],
        "192.0.2.128/25": [f"file {listing} line 3"],
        "203.0.113.0/24": [f"{doc}: prefixes[0].ipv4Prefix"],
    }


# --- masquerade entries (MASQD_CIDR_FILES_MASQUERADE_DIR, the masquerade_cidrs hook) -------------


def _directories(tmp_path, keep: str | None, masquerade: str | None):
    """A keep and a masquerade directory, each holding one file ``list`` with that text (``None``:
    no such directory)."""
    found = []
    for name, text in (("keep", keep), ("masquerade", masquerade)):
        if text is None:
            found.append(None)
            continue
        (tmp_path / name).mkdir()
        (tmp_path / name / "list").write_text(text)
        found.append(tmp_path / name)
    return found


def _kept(result, address: str) -> bool:
    """What the dry-run rules decide for a destination: some RETURN rule holds it."""
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(net) for net in result.nonmasq[4])


@pytest.mark.parametrize(("config", "keep", "masquerade", "nonmasq", "masqueraded", "still_kept"), [
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "192.0.2.0/24\n", "192.0.2.128/25  # the partner's NAT pool\n",
                 ["169.254.0.0/16", "10.0.0.0/8", "192.0.2.0/25"], ["192.0.2.128", "192.0.2.255"], ["192.0.2.127"],
                 id="a-hole-in-a-range-of-the-keep-directory"),
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\n", None, "169.254.169.254/32  # the metadata server\n",
                 None, ["169.254.169.254"], ["169.254.169.253", "169.254.169.255", "169.254.0.1", "10.1.2.3"],
                 id="the-metadata-server-inside-link-local"),
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8, 10.99.0.0/24]\n", None, "10.99.0.0/16\n",
                 None, ["10.99.1.1", "10.99.255.255"], ["10.99.0.7", "10.98.255.255", "10.100.0.0"],
                 id="a-longer-kept-prefix-inside-the-masquerade-entry-still-keeps"),
])
def test_a_masquerade_file_cuts_a_hole_into_a_kept_range_in_the_dry_run_rules(
        tmp_path, masqd_dry_run, config, keep, masquerade, nonmasq, masqueraded, still_kept):
    keep_dir, masquerade_dir = _directories(tmp_path, keep, masquerade)
    result = masqd_dry_run(CidrFiles(keep_dir, masquerade_directory=masquerade_dir)).apply(config)
    assert result.error is None, result.error
    assert result.overrides == {"cidr-files": [masquerade.split()[0]]}
    if nonmasq is not None:
        assert result.nonmasq[4] == nonmasq
    for address in masqueraded:
        assert not _kept(result, address), address
    for address in still_kept:
        assert _kept(result, address), address
    returns = [line for line in result.rules.splitlines() if line.endswith("-j RETURN")]
    assert [line.split()[3] for line in returns] == result.nonmasq[4]  # each flattened range is one RETURN rule
    assert ('-A IP-MASQ-AGENT -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be '
            'last in chain)" -j MASQUERADE --random-fully') in result.rules  # no source or interface scope: upstream's


def test_the_metadata_hole_is_written_as_the_neighbouring_blocks(tmp_path, masqd_dry_run):
    _, masquerade_dir = _directories(tmp_path, None, "169.254.169.254/32\n")
    result = masqd_dry_run(CidrFiles(masquerade_directory=masquerade_dir)).apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert '-A IP-MASQ-AGENT -d 169.254.169.252/31 -m comment --comment "ip-masq-agent: local traffic is not subject ' \
           'to MASQUERADE" -j RETURN' in result.rules
    assert "-d 169.254.169.255/32 " in result.rules and "-d 169.254.0.0/16 " not in result.rules
    assert "-d 10.0.0.0/8 " in result.rules  # untouched: no masquerade entry inside it


def test_removing_the_masquerade_file_closes_the_hole(tmp_path, masqd_dry_run):
    keep_dir, masquerade_dir = _directories(tmp_path, "192.0.2.0/24\n", "192.0.2.128/25\n")
    agent = masqd_dry_run(CidrFiles(keep_dir, masquerade_directory=masquerade_dir))
    assert agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n").nonmasq[4][-1] == "192.0.2.0/25"
    (masquerade_dir / "list").unlink()
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert result.error is None and result.overrides == {"cidr-files": []}
    assert result.nonmasq[4] == ["169.254.0.0/16", "10.0.0.0/8", "192.0.2.0/24"]  # as listed again: upstream's rules


def test_the_same_prefix_in_both_directories_is_refused_naming_both(tmp_path, masqd_dry_run):
    keep_dir, masquerade_dir = _directories(tmp_path, "192.0.2.0/24\n", "192.0.2.0/24\n")
    result = masqd_dry_run(CidrFiles(keep_dir, masquerade_directory=masquerade_dir)).apply(None)
    assert "masqueradeCIDRs: '192.0.2.0/24': masqueraded by plugin cidr-files and kept by plugin cidr-files" in str(result.error)
    assert result.rules is None  # nothing applied


def test_a_masquerade_entry_kept_by_the_config_too_is_refused(tmp_path, masqd_dry_run):
    _, masquerade_dir = _directories(tmp_path, None, "10.0.0.0/8\n")
    result = masqd_dry_run(CidrFiles(masquerade_directory=masquerade_dir)).apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert "masqueradeCIDRs: '10.0.0.0/8': masqueraded by plugin cidr-files and kept by " in str(result.error)
    assert "(nonMasqueradeCIDRs)" in str(result.error)


def test_a_bad_masquerade_line_keeps_the_last_good_rules_and_names_file_and_line(tmp_path, masqd_dry_run):
    _, masquerade_dir = _directories(tmp_path, None, "169.254.169.254/32\n")
    agent = masqd_dry_run(CidrFiles(masquerade_directory=masquerade_dir))
    good = agent.apply(None)
    assert good.error is None
    (masquerade_dir / "list").write_text("169.254.169.254/32\n169.254.169.1/24\n")
    result = agent.apply(None)
    assert "cidr-files.masquerade_cidrs" in str(result.error)
    assert "list:2: '169.254.169.1/24': not aligned" in str(result.error)
    assert (result.rules, result.overrides) == (good.rules, {"cidr-files": ["169.254.169.254/32"]})


def test_a_missing_masquerade_directory_is_named_by_its_variable(tmp_path, masqd_dry_run):
    result = masqd_dry_run(CidrFiles(masquerade_directory=tmp_path / "absent")).apply(None)
    assert f"MASQD_CIDR_FILES_MASQUERADE_DIR {tmp_path / 'absent'}: not a directory" in str(result.error)


def test_explain_names_the_file_and_line_of_each_masquerade_entry(tmp_path, masqd_plugins):
    _, masquerade_dir = _directories(tmp_path, None, "# cloud metadata\n169.254.169.254/32\n10.99.0.0/16 10.98.0.0/16\n")
    plugins = masqd_plugins(CidrFiles(masquerade_directory=masquerade_dir))

    async def describe():
        return await plugins.describe_cidrs(await plugins.contributions(None, AgentOptions(), masquerade=True))

    (described, problems) = anyio.run(describe)
    assert problems == []
    listing = masquerade_dir / "list"
    assert {str(net): [origin.detail for origin in origins] for net, origins in described["cidr-files"].items()} == {
        "169.254.169.254/32": [f"file {listing} line 2"],
        "10.99.0.0/16": [f"file {listing} line 3"],
        "10.98.0.0/16": [f"file {listing} line 3"],
    }


def test_explain_names_kept_and_masquerade_entries_of_one_plugin(tmp_path, masqd_plugins):
    keep_dir, masquerade_dir = _directories(tmp_path, "192.0.2.0/24\n", "192.0.2.128/25\n")
    plugins = masqd_plugins(CidrFiles(keep_dir, masquerade_directory=masquerade_dir))

    async def describe():
        contributions = await plugins.contributions(None, AgentOptions())
        contributions += await plugins.contributions(None, AgentOptions(), masquerade=True)
        return await plugins.describe_cidrs(contributions)

    (described, problems) = anyio.run(describe)
    assert problems == []
    assert {str(net): [origin.detail for origin in origins] for net, origins in described["cidr-files"].items()} == {
        "192.0.2.0/24": [f"file {keep_dir / 'list'} line 1"],
        "192.0.2.128/25": [f"file {masquerade_dir / 'list'} line 1"],
    }


def test_masqd_render_writes_the_hole_a_masquerade_file_cuts(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    keep_dir, masquerade_dir = _directories(tmp_path, "192.0.2.0/24\n", "192.0.2.128/25\n")
    env = {**os.environ, "MASQD_PLUGINS": "cidr-files", "MASQD_CIDR_FILES_DIR": str(keep_dir),
           "MASQD_CIDR_FILES_MASQUERADE_DIR": str(masquerade_dir)}
    result = subprocess.run([str(Path(sys.executable).with_name("masqd")), "render", "--backend", "dry-run",
                             "--config", str(tmp_path / "absent")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "-A IP-MASQ-AGENT -d 192.0.2.0/25 -m comment" in result.stdout
    assert "192.0.2.0/24" not in result.stdout and "192.0.2.128" not in result.stdout
