"""``masqd explain``: for each address, the verdict and where every matching CIDR came from; with
``--live``, the kernel's verdict and every difference from the desired state.

Most tests run ``masqd.cli.main`` in process (only the dry-run backend, nothing touches the
kernel). Policies come from the in-process API server of ``tests/kubeapi.py``; plugins are real
plugin objects or the installed example plugin. The ``--live`` drift tests run the real ``masqd``
inside a network namespace they create (``node_ns``): ``run --once`` applies, the rules are changed
by hand, and ``explain --live`` must name the change.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

import masqd
from masqd.testing import netns
from kubeapi import FakeKubeAPI

from masqd.backends import iptables as ipt
from masqd.backends import nftables as nft
from masqd.backends.base import LiveFamily, LiveRules
from masqd.backends.dryrun import DryRunBackend
from masqd.cli import main
from masqd.config import AgentOptions, merge_configs, parse_config
from masqd.explain import as_json, explain, explain_kernel, format_text
from masqd.provenance import cidr_origins
from masqd.reconcile import plan_rules
from masqd.ruleset import compute_ruleset

MASQD = Path(sys.executable).parent / "masqd"
GOLDEN_NFT = Path(__file__).parent / "golden" / "nftables"
KEEP = "keeps the pod source address (not masqueraded)"
MASQ = "masqueraded to the node's address"
LOCAL = "  note: unless it is an address of this node: traffic to the node's own addresses is never masqueraded"
NO_MATCH = "  no non-masquerade CIDR matches it"
DEFAULTS = "default list (RFC 1918; no config source sets nonMasqueradeCIDRs)"


def explained(capsys, *argv: str) -> tuple[int, str, str]:
    """``masqd explain ARGV`` in process: (exit code, stdout, stderr)."""
    try:
        code = main(["explain", "--backend", "dry-run", *argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path):
    """``files(name=text, ...)``: writes each config file, returns their paths by name."""
    def write(**texts: str) -> dict[str, str]:
        paths = {}
        for name, text in texts.items():
            path = tmp_path / name.replace("_", ".")
            path.write_text(text)
            paths[name] = str(path)
        return paths
    return write


# --- every kind of origin, through the command line --------------------------------------------------

YAML = "# peered networks\nnonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 10.1.0.0/16   # this cluster's pods\n"
JSON = '{\n  "nonMasqueradeCIDRs": [\n    "10.0.0.0/8",\n    "2001:db8::/32"\n  ]\n}\n'
SECOND = "nonMasqueradeCIDRs: [198.51.100.0/24, 10.0.0.0/8]\n"

CASES = [
    pytest.param({"a_yaml": YAML}, [], ["10.1.2.3"], """\
        10.1.2.3: {KEEP}
          matched 10.1.0.0/16 from {a_yaml} line 4
          matched 10.0.0.0/8 from {a_yaml} line 3
        """, id="yaml-file-and-line-most-specific-first"),
    pytest.param({"b_json": JSON}, ["--enable-ipv6"], ["10.9.9.9", "2001:db8::1"], """\
        10.9.9.9: {KEEP}
          matched 10.0.0.0/8 from {b_json} line 3
        2001:db8::1: {KEEP}
          matched 2001:db8::/32 from {b_json} line 4
        """, id="json-file-and-line"),
    pytest.param({"a_yaml": YAML, "c_yaml": SECOND}, [], ["10.200.0.1", "198.51.100.7"], """\
        10.200.0.1: {KEEP}
          matched 10.0.0.0/8 from {a_yaml} line 3, {c_yaml} line 1
        198.51.100.7: {KEEP}
          matched 198.51.100.0/24 from {c_yaml} line 1
        """, id="two-config-sources-list-the-same-cidr"),
    pytest.param({}, [], ["172.20.0.1"], """\
        172.20.0.1: {KEEP}
          matched 172.16.0.0/12 from {DEFAULTS}
        """, id="defaults"),
    pytest.param({}, ["--nomasq-all-reserved-ranges"], ["192.0.2.1", "192.168.4.4"], """\
        192.0.2.1: {KEEP}
          matched 192.0.2.0/24 from --nomasq-all-reserved-ranges
        192.168.4.4: {KEEP}
          matched 192.168.0.0/16 from {DEFAULTS}
        """, id="reserved-ranges-flag"),
    pytest.param({"a_yaml": YAML}, [], ["169.254.169.254"], """\
        169.254.169.254: {KEEP}
          matched 169.254.0.0/16 from link-local default (masqLinkLocal: false)
        """, id="link-local-default"),
    pytest.param({"a_yaml": YAML + "masqLinkLocal: true\n"}, [], ["169.254.169.254"], """\
        169.254.169.254: {MASQ}
          169.254.0.0/16 is masqueraded because the config sets masqLinkLocal: true
          {LOCAL}
        """, id="masq-link-local-true"),
    pytest.param({"b_json": JSON}, ["--enable-ipv6"], ["fe80::1"], """\
        fe80::1: {KEEP}
          matched fe80::/10 from link-local default (masqLinkLocalIPv6: false)
        """, id="ipv6-link-local-default"),
    pytest.param({"a_yaml": YAML}, [], ["203.0.113.9"], """\
        203.0.113.9: {MASQ}
          {NO_MATCH}
          {LOCAL}
        """, id="nothing-matches"),
    pytest.param({"a_yaml": YAML}, [], ["2001:db8::1"], """\
        2001:db8::1: not masqueraded by masqd
          IPv6 is not managed by masqd (it runs without --enable-ipv6): it writes no IPv6 rules, so masqd does not masquerade it
        """, id="ipv6-without-enable-ipv6"),
    pytest.param({"b_json": JSON}, ["--enable-ipv6"], ["2001:db9::1"], """\
        2001:db9::1: {MASQ}
          {NO_MATCH}
          {LOCAL}
        """, id="ipv6-nothing-matches"),
    pytest.param({"d_yaml": "nonMasqueradeCIDRs: [0.0.0.0/0]\n"}, [], ["203.0.113.9"], """\
        203.0.113.9: {KEEP}
          matched 0.0.0.0/0 from {d_yaml} line 1
        """, id="everything-kept"),
]


@pytest.mark.parametrize(("configs", "flags", "addresses", "expected"), CASES)
def test_explain(capsys, files, tmp_path, configs, flags, addresses, expected):
    paths = files(**configs)
    config_flags = [arg for path in paths.values() for arg in ("--config", path)] or ["--config", str(tmp_path / "absent")]
    code, out, err = explained(capsys, *config_flags, *flags, *addresses)
    missing = "" if paths else (f"warning: {tmp_path / 'absent'}: no such file; the defaults apply (a missing config "
                                "file is allowed, as for an optional ConfigMap)\n")
    assert (code, err) == (0, missing)
    constants = {"KEEP": KEEP, "MASQ": MASQ, "LOCAL": LOCAL.strip(), "NO_MATCH": NO_MATCH.strip(), "DEFAULTS": DEFAULTS}
    assert out == textwrap.dedent(expected).format(**paths, **constants)


def test_config_dir_and_reserved_ranges_flag_together(capsys, tmp_path):
    directory = tmp_path / "mounted"
    directory.mkdir()
    (directory / "ip-masq-agent").write_text("nonMasqueradeCIDRs:\n- 192.0.2.0/24\n")
    code, out, _ = explained(capsys, "--config", str(tmp_path / "absent"), "--config-dir", str(directory),
                             "--nomasq-all-reserved-ranges", "192.0.2.1", "198.51.100.1")
    assert code == 0
    # a source is present and lists its CIDRs, so the default (and reserved) list does not apply
    assert out.splitlines() == [f"192.0.2.1: {KEEP}", f"  matched 192.0.2.0/24 from {directory / 'ip-masq-agent'} line 2",
                                f"198.51.100.1: {MASQ}", NO_MATCH, LOCAL]


@pytest.mark.parametrize(("argv", "named"), [
    pytest.param(["10.0.0.256"], "'10.0.0.256': not an IPv4 or IPv6 address", id="octet-too-big"),
    pytest.param(["10.1.2.3", "pods"], "'pods': not an IPv4 or IPv6 address", id="second-is-a-word"),
    pytest.param(["10.0.0.0/8"], "give one address of the network", id="a-cidr"),
    pytest.param([], "the following arguments are required: ADDRESS", id="none"),
])
def test_an_invalid_address_is_a_usage_error_naming_it(capsys, argv, named):
    code, out, err = explained(capsys, "--config", "/nonexistent", *argv)
    assert code == 2 and out == ""
    assert named in err


def test_invalid_config_exits_1_and_explains_nothing(capsys, files):
    paths = files(bad_yaml="nonMasqueradeCIDRs: [10.0.0.1/8]\n")
    code, out, err = explained(capsys, "--config", paths["bad_yaml"], "10.1.2.3")
    assert code == 1 and out == ""
    assert "did you mean '10.0.0.0/8'" in err


def test_json_output(capsys, files):
    paths = files(a_yaml=YAML)
    code, out, _ = explained(capsys, "--config", paths["a_yaml"], "--output", "json", "10.1.2.3", "203.0.113.9",
                             "2001:db8::1")
    assert code == 0
    assert json.loads(out) == [
        {"address": "10.1.2.3", "family": 4, "verdict": "keep", "reason": None, "matches": [
            {"cidr": "10.1.0.0/16", "origins": [{"kind": "config", "name": paths["a_yaml"], "line": 4, "detail": None,
                                                 "text": f"{paths['a_yaml']} line 4"}]},
            {"cidr": "10.0.0.0/8", "origins": [{"kind": "config", "name": paths["a_yaml"], "line": 3, "detail": None,
                                                "text": f"{paths['a_yaml']} line 3"}]},
        ]},
        {"address": "203.0.113.9", "family": 4, "verdict": "masquerade", "reason": None, "matches": []},
        {"address": "2001:db8::1", "family": 6, "verdict": "unmanaged", "matches": [],
         "reason": "IPv6 is not managed by masqd (it runs without --enable-ipv6): it writes no IPv6 rules, "
                   "so masqd does not masquerade it"},
    ]


# --- plugins and policies ----------------------------------------------------------------------------


class Partners:
    """A real plugin object: contributes CIDRs and says which file line listed each one."""

    name = "partners"

    def __init__(self, fail: bool = False):
        self.fail = fail

    @masqd.hookimpl
    def nonmasq_cidrs(self):
        return ["198.51.100.0/24", "10.0.0.0/8"]

    @masqd.hookimpl
    def describe_cidrs(self, cidrs):
        if self.fail:
            raise OSError("partners database unreachable")
        return {"198.51.100.0/24": "file /etc/partners line 7"}


def pipeline(plugins, config_text: str, addresses, options=AgentOptions()) -> tuple[str, list]:
    """What ``masqd explain`` does between loading and printing, with ``plugins``."""
    merged = merge_configs([("cfg.yaml", parse_config(config_text, options, "cfg.yaml").config)], options)
    ruleset, contributions = anyio.run(plan_rules, merged.config, options, plugins)
    descriptions, problems = anyio.run(plugins.describe_cidrs, contributions)
    origins = cidr_origins(ruleset, merged, contributions, options, {"cfg.yaml": config_text}, descriptions=descriptions)
    report = explain([ipaddress.ip_address(a) for a in addresses], ruleset, origins)
    return format_text(report), problems


@pytest.mark.parametrize(("fail", "partners_line", "problems"), [
    pytest.param(False, "198.51.100.0/24 from plugin partners (file /etc/partners line 7)", [], id="described"),
    pytest.param(True, "198.51.100.0/24 from plugin partners",
                 ["partners.describe_cidrs: raised OSError('partners database unreachable')"], id="describe-fails"),
])
def test_plugin_cidrs_name_the_plugin_and_what_it_said(masqd_plugins, fail, partners_line, problems):
    text, found = pipeline(masqd_plugins(Partners(fail)), "nonMasqueradeCIDRs: [10.0.0.0/8]\n", ["198.51.100.7", "10.3.3.3"])
    assert text.splitlines() == [
        f"198.51.100.7: {KEEP}", f"  matched {partners_line}",
        f"10.3.3.3: {KEEP}", "  matched 10.0.0.0/8 from cfg.yaml line 1, plugin partners",
    ]
    assert [str(problem) for problem in found] == problems


def test_installed_cidr_files_plugin_names_file_and_line(tmp_path):
    """The example plugin from ``plugins/``, installed, through the real command."""
    cidrs = tmp_path / "cidrs"
    cidrs.mkdir()
    (cidrs / "partners").write_text("# partner VPNs\n198.51.100.0/24\n")
    env = {**os.environ, "MASQD_PLUGINS": "cidr-files", "MASQD_CIDR_FILES_DIR": str(cidrs)}
    result = subprocess.run([str(MASQD), "explain", "--backend", "dry-run", "--config", str(tmp_path / "absent"),
                             "198.51.100.7"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"198.51.100.7: {KEEP}", f"  matched 198.51.100.0/24 from plugin cidr-files (file {cidrs / 'partners'} line 2)",
    ]


def configmap(text: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ip-masq-agent", "namespace": "kube-system"},
            "data": {"config": text}}


def policy(name: str, action: str, *cidrs: str) -> dict:
    return {"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy", "metadata": {"name": name},
            "spec": {"action": action, "destinations": [{"cidr": c} for c in cidrs]}}


def test_policy_and_configmap_origins_through_the_api(capsys, tmp_path):
    with FakeKubeAPI() as api:
        api.bookmark_interval = None
        api.put(configmap("# from the API\nnonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 203.0.113.0/24\n"))
        api.put(policy("on-prem", "NoSNAT", "192.0.2.0/24", "203.0.113.0/24"))
        api.put(policy("partners", "NoSNAT", "192.0.2.0/24"))
        api.put(policy("egress-gw", "SNAT", "198.51.100.0/24"))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, out, err = explained(capsys, "--config", str(tmp_path / "absent"), "--kube-configmap",
                                   "kube-system/ip-masq-agent", "--egress-nat-policies", "--kubeconfig", str(kubeconfig),
                                   "192.0.2.1", "203.0.113.5", "10.0.0.1", "198.51.100.1")
    assert code == 0, err
    assert out.splitlines() == [
        f"192.0.2.1: {KEEP}", "  matched 192.0.2.0/24 from EgressNATPolicy on-prem, EgressNATPolicy partners",
        f"203.0.113.5: {KEEP}",
        "  matched 203.0.113.0/24 from configmap kube-system/ip-masq-agent line 4, EgressNATPolicy on-prem",
        f"10.0.0.1: {KEEP}", "  matched 10.0.0.0/8 from configmap kube-system/ip-masq-agent line 3",
        f"198.51.100.1: {MASQ}", NO_MATCH, LOCAL,
    ]


# --- --live without a kernel: the dry-run backend and a backend that cannot read back -------------------


def test_live_on_a_fresh_dry_run_backend_reports_nothing_applied_and_exits_5(capsys, files):
    paths = files(a_yaml=YAML)
    code, out, _ = explained(capsys, "--config", paths["a_yaml"], "--live", "10.1.2.3", "203.0.113.9")
    assert code == 5
    assert out.splitlines() == [
        "explained from the rules the kernel holds (dry-run backend, dry-run rule set), compared with the desired state",
        "10.1.2.3: not masqueraded by masqd", "  masqd's dry-run rule set is not in the kernel",
        "203.0.113.9: not masqueraded by masqd", "  masqd's dry-run rule set is not in the kernel",
        "  DRIFT: the kernel does not masquerade it; the desired state masquerades it",
        "the kernel differs from the desired state (dry-run backend, dry-run rule set):",
        "  ipv4: dry-run rule set is not in the kernel: nothing masqd writes is there, so masqd masquerades nothing",
        "  ipv4: a sync would rewrite it (nothing applied)",
    ]


def _ruleset(text: str, options=AgentOptions()):
    return compute_ruleset(parse_config(text, options).config, options)


def test_live_drift_against_what_the_dry_run_backend_applied():
    applied = _ruleset("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n")
    desired_text = "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n"
    desired = _ruleset(desired_text)
    backend = DryRunBackend()
    anyio.run(backend.sync, applied)
    live = anyio.run(backend.read_back, desired)
    merged = merge_configs([("cfg", parse_config(desired_text, AgentOptions()).config)], AgentOptions())
    origins = cidr_origins(desired, merged, (), AgentOptions(), {"cfg": desired_text})
    report = explain([ipaddress.ip_address(a) for a in ("10.1.1.1", "192.0.2.9", "203.0.113.9")], desired, origins, live)
    assert [e.drift for e in report.explanations] == [False, True, True]
    assert report.drift
    assert format_text(report).splitlines()[1:] == [
        f"10.1.1.1: {KEEP}", "  matched 10.0.0.0/8 from cfg line 1",
        f"192.0.2.9: {KEEP}", "  matched 192.0.2.0/24: not in the desired state (added outside masqd?)",
        "  DRIFT: the kernel does not masquerade it; the desired state masquerades it",
        f"203.0.113.9: {MASQ}", "  no non-masquerade CIDR in the kernel matches it", LOCAL,
        "  DRIFT: the kernel masquerades it; the desired state keeps the pod address (203.0.113.0/24 from cfg line 1)",
        "the kernel differs from the desired state (dry-run backend, dry-run rule set):",
        "  ipv4: missing from the kernel: 203.0.113.0/24 (from cfg line 1)",
        "  ipv4: in the kernel, not in the desired state: 192.0.2.0/24",
        "  ipv4: a sync would rewrite it (non-masquerade CIDRs differ)",
    ]
    in_sync = anyio.run(backend.read_back, applied)
    assert in_sync.in_sync and not explain([ipaddress.ip_address("192.0.2.9")], applied, {}, in_sync).drift


def _live(*cidrs: str, **overrides) -> LiveRules:
    values = dict(present=True, hooked=True, local_exempt=True, masquerade=True,
                  nonmasq=tuple(map(ipaddress.ip_network, cidrs)))
    return LiveRules("test", "chain X", (LiveFamily(4, **{**values, **overrides}),))


@pytest.mark.parametrize(("desired", "kernel", "differences"), [
    pytest.param("10.0.0.0/9, 10.128.0.0/9", ("10.0.0.0/8",), (), id="merged-by-the-kernel-is-no-difference"),
    pytest.param("10.0.0.0/8, 10.1.0.0/16", ("10.0.0.0/8",), (), id="covered-by-a-larger-one"),
    pytest.param("10.0.0.0/9", ("10.0.0.0/8",), ("in the kernel, not in the desired state: 10.0.0.0/8",),
                 id="kernel-holds-more"),
    pytest.param("10.0.0.0/8", ("10.0.0.0/9", "10.192.0.0/10"),
                 ("missing from the kernel: 10.0.0.0/8 (from cfg line 1)",), id="kernel-holds-less"),
])
def test_kernel_and_desired_cidrs_are_compared_by_the_addresses_they_cover(desired, kernel, differences):
    text = f"nonMasqueradeCIDRs: [{desired}]\nmasqLinkLocal: true\n"
    ruleset = _ruleset(text)
    merged = merge_configs([("cfg", parse_config(text, AgentOptions()).config)], AgentOptions())
    origins = cidr_origins(ruleset, merged, (), AgentOptions(), {"cfg": text})
    report = explain([ipaddress.ip_address("10.1.2.3")], ruleset, origins, _live(*kernel))
    assert report.differences == {4: differences}
    assert report.drift == bool(differences)


@pytest.mark.parametrize(("overrides", "differences"), [
    pytest.param(dict(local_exempt=False), ("destinations local to the node are not exempted (the LOCAL exemption is "
                                            "missing), so traffic to the node's own addresses is masqueraded too",),
                 id="local-exemption-missing"),
    pytest.param(dict(local_exempt=False, masquerade=False),
                 ("the final masquerade rule is missing: traffic no CIDR keeps is not masqueraded",),
                 id="nothing-masqueraded-so-no-exemption-needed"),
    pytest.param(dict(unexpected=("rule masqd does not write: -A X -j DROP",)),
                 ("unexpected: rule masqd does not write: -A X -j DROP",), id="unexpected-rule"),
    pytest.param(dict(drift="chain X differs"), ("a sync would rewrite it (chain X differs)",), id="backend-says-it-differs"),
])
def test_each_difference_in_the_rules_is_named(overrides, differences):
    ruleset = _ruleset("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    report = explain([ipaddress.ip_address("10.1.2.3")], ruleset, {}, _live("169.254.0.0/16", "10.0.0.0/8", **overrides))
    assert report.differences == {4: differences}
    assert report.drift


def test_a_block_the_kernel_merged_names_the_desired_cidrs_behind_it():
    text = "nonMasqueradeCIDRs: [10.0.0.0/9, 10.128.0.0/9]\n"
    ruleset = _ruleset(text)
    merged = merge_configs([("cfg", parse_config(text, AgentOptions()).config)], AgentOptions())
    origins = cidr_origins(ruleset, merged, (), AgentOptions(), {"cfg": text})
    report = explain([ipaddress.ip_address("10.200.0.1")], ruleset, origins, _live("169.254.0.0/16", "10.0.0.0/8"))
    assert format_text(report).splitlines()[1:3] == [
        f"10.200.0.1: {KEEP}", "  matched 10.0.0.0/8 (the kernel's merge of 10.128.0.0/9) from cfg line 1"]


THIRD_PARTY = '''
import masqd
from masqd.backends.base import SyncResult


class NoReadBack:
    name = "no-read-back"

    def __init__(self, settings):
        self.settings = settings

    async def probe(self):
        pass

    def render(self, ruleset):
        return "# nothing\\n"

    async def sync(self, ruleset):
        raise AssertionError("explain never writes")

    async def cleanup(self, chain):
        return ()


@masqd.hookimpl
def register_backends(register):
    register("no-read-back", NoReadBack)
'''


def test_live_with_a_backend_that_cannot_read_back_is_a_clear_usage_error(capsys, install_plugin):
    """A third-party backend, installed as a package with a ``masqd`` entry point (no read_back)."""
    install_plugin("masqd_test_no_read_back", THIRD_PARTY, "no-read-back")
    argv = ["explain", "--config", "/nonexistent", "--backend", "no-read-back", "10.1.2.3"]
    assert main(argv) == 0  # without --live the backend is not needed
    assert capsys.readouterr().out.startswith(f"10.1.2.3: {KEEP}")
    assert main([*argv, "--live"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("warning: /nonexistent: no such file; the defaults apply (a missing config file is allowed, as "
                   "for an optional ConfigMap)\n"
                   "error: --backend=no-read-back: this backend cannot read its rules back (it has no read_back "
                   "method), which explain --live needs; run explain without --live\n")


# --- reading back is pure: the tools' output -> LiveFamily --------------------------------------------

CHAIN = "IP-MASQ-AGENT"
KEEP_COMMENT = '-m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE"'
MASQ_RULE = f'-A {CHAIN} -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE --random-fully'


def save(*rules: str, jumps: int = 1, extra: tuple[str, ...] = ()) -> str:
    lines = ["*filter", f"-A FORWARD -d 192.0.2.0/24 -j {CHAIN}", "COMMIT", "*nat", ":POSTROUTING ACCEPT [0:0]",
             f":{CHAIN} - [0:0]", *[ipt.jump_rule(CHAIN)] * jumps, *extra, *rules, "COMMIT"]
    return "\n".join(lines) + "\n"


DESIRED_IPT = (f"-A {CHAIN} -d 169.254.0.0/16 {KEEP_COMMENT} -j RETURN", f"-A {CHAIN} -d 10.0.0.0/8 {KEEP_COMMENT} -j RETURN",
               MASQ_RULE)
OTHER_JUMP = f"-A POSTROUTING -j {CHAIN}"


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(save(*DESIRED_IPT), dict(hooked=True, local_exempt=True, masquerade=True,
                                          nonmasq=("169.254.0.0/16", "10.0.0.0/8"), unexpected=(), drift=None),
                 id="in-sync"),
    pytest.param(save(DESIRED_IPT[0], f"-A {CHAIN} -d 192.0.2.0/24 -j RETURN", f"-A {CHAIN} {KEEP_COMMENT} -j RETURN",
                      MASQ_RULE),
                 dict(nonmasq=("169.254.0.0/16", "192.0.2.0/24", "0.0.0.0/0"), masquerade=True, unexpected=(),
                      drift="chain IP-MASQ-AGENT differs"), id="returns-without-comment-and-for-everything"),
    pytest.param(save(*DESIRED_IPT, f"-A {CHAIN} -d 192.0.2.0/24 -j RETURN"),
                 dict(nonmasq=("169.254.0.0/16", "10.0.0.0/8"), masquerade=True,
                      unexpected=(f"after the final MASQUERADE, never reached: -A {CHAIN} -d 192.0.2.0/24 -j RETURN",)),
                 id="rule-after-the-masquerade"),
    pytest.param(save(DESIRED_IPT[0], f"-A {CHAIN} ! -d 10.0.0.0/8 -j RETURN", MASQ_RULE),
                 dict(nonmasq=("169.254.0.0/16",), unexpected=(f"rule masqd does not write: -A {CHAIN} ! -d 10.0.0.0/8 -j RETURN",)),
                 id="negated-match"),
    pytest.param(save(*DESIRED_IPT[:2]), dict(masquerade=False, nonmasq=("169.254.0.0/16", "10.0.0.0/8")),
                 id="masquerade-rule-deleted"),
    pytest.param(save(*DESIRED_IPT, jumps=0), dict(hooked=False, local_exempt=False,
                                                   drift="POSTROUTING jump count 0, want 1"), id="jump-deleted"),
    pytest.param(save(*DESIRED_IPT, jumps=2), dict(hooked=True, unexpected=("POSTROUTING jump to IP-MASQ-AGENT present 2 times",)),
                 id="jump-twice"),
    pytest.param(save(*DESIRED_IPT, jumps=0, extra=(OTHER_JUMP,)),
                 dict(hooked=True, local_exempt=False,
                      unexpected=(f"POSTROUTING rule masqd does not write sends traffic to {CHAIN}: {OTHER_JUMP}",)),
                 id="jump-replaced-by-one-without-the-local-exemption"),
    pytest.param("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n",
                 dict(present=False, hooked=False, drift="chain IP-MASQ-AGENT missing; POSTROUTING jump count 0, want 1"),
                 id="no-chain"),
])
def test_iptables_read_back(text, expected):
    family = ipt.live_family(ipt.parse_nat_state(text, CHAIN), 4, DESIRED_IPT, CHAIN)
    got = {key: getattr(family, key) for key in expected}
    if "nonmasq" in got:
        got["nonmasq"] = tuple(map(str, got["nonmasq"]))
    assert got == expected
    assert family.present == expected.get("present", True)


DEFAULT_RULESET = compute_ruleset(parse_config(None, AgentOptions()).config, AgentOptions())
DEFAULT_NFT = nft.desired_state(DEFAULT_RULESET.ipv4, DEFAULT_RULESET.masquerade)
NFT_DEFAULTS = ("10.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")


@pytest.mark.parametrize(("fixture", "expected"), [
    pytest.param("defaults_ip", dict(hooked=True, local_exempt=True, masquerade=True, nonmasq=NFT_DEFAULTS,
                                     unexpected=(), drift=None), id="in-sync"),
    pytest.param("drift_element_deleted_ip", dict(nonmasq=("10.0.0.0/8", "169.254.0.0/16", "192.168.0.0/16"),
                                                  unexpected=(), drift="table ip masqd: set elements differ"),
                 id="element-deleted"),
    pytest.param("drift_range_element_added_ip",
                 dict(nonmasq=("10.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.2.5/32", "192.0.2.6/31",
                               "192.0.2.8/31", "192.168.0.0/16")), id="range-element-added"),
    pytest.param("drift_set_flushed_ip", dict(nonmasq=(), masquerade=True), id="set-flushed"),
    pytest.param("drift_chain_flushed_ip", dict(nonmasq=(), masquerade=False, local_exempt=False, hooked=True),
                 id="chain-flushed"),
    pytest.param("drift_counter_rule_added_ip", dict(masquerade=True, unexpected=(
        'after the final masquerade, never reached: [{"counter": {"bytes": 0, "packets": 0}}]',)), id="rule-after-masquerade"),
    pytest.param("drift_foreign_rule_inserted_ip", dict(masquerade=True, nonmasq=NFT_DEFAULTS, unexpected=(
        'rule masqd does not write: [{"match": {"left": {"payload": {"field": "saddr", "protocol": "ip"}}, "op": "==", '
        '"right": {"prefix": {"addr": "10.244.9.0", "len": 24}}}}, {"accept": null}]',)), id="foreign-rule"),
    pytest.param("drift_policy_drop_ip", dict(hooked=True, unexpected=(
        "chain nat policy drop: traffic no rule returns or masquerades is droped",)), id="policy-drop"),
    pytest.param("drift_chain_priority_ip", dict(hooked=True, unexpected=(
        "chain nat at priority 99, masqd writes srcnat + 10 (110)",)), id="priority"),
    pytest.param("drift_table_dormant_ip", dict(hooked=False, unexpected=(
        "table flags masqd does not set (table flags ip; a dormant table does nothing)",)), id="dormant"),
    pytest.param("drift_extra_chain_ip", dict(hooked=True, unexpected=("object masqd does not write: chain sneaky",)),
                 id="extra-chain"),
])
def test_nftables_read_back(fixture, expected):
    family = nft.live_family(nft.parse_listing((GOLDEN_NFT / f"listing_{fixture}.json").read_text(), 4), DEFAULT_NFT)
    got = {key: getattr(family, key) for key in expected}
    if "nonmasq" in got:
        got["nonmasq"] = tuple(map(str, got["nonmasq"]))
    assert got == expected
    assert family.present and (family.drift is None) == (fixture == "defaults_ip")


def test_nftables_read_back_without_a_table():
    family = nft.live_family(None, DEFAULT_NFT)
    assert (family.present, family.hooked, family.nonmasq, family.drift) == (False, False, (), "table ip masqd missing")


# --- --live against a real kernel, in a network namespace --------------------------------------------

LIVE_CONFIG = "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 198.51.100.0/24\n  - 203.0.113.0/24\n  - 2001:db8:1::/64\n"
ADDRESSES = ("10.1.2.3", "203.0.113.9", "192.0.2.1", "2001:db8:1::5", "2001:db8:2::5")


def _iptables(*commands: list[str]):
    def damage(ns: str) -> None:
        for command in commands:
            netns.run(ns, *command)
    return damage


def _keep_rule(cidr: str) -> list[str]:
    return ["-d", cidr, "-m", "comment", "--comment", "ip-masq-agent: local traffic is not subject to MASQUERADE",
            "-j", "RETURN"]


JUMP = ["-m", "comment", "--comment", ipt.JUMP_COMMENT.format(chain=CHAIN), "-m", "addrtype", "!", "--dst-type", "LOCAL",
        "-j", CHAIN]


def _nft(*commands: str):
    def damage(ns: str) -> None:
        for command in commands:
            netns.run(ns, "nft", command)
    return damage


def _no_damage(ns: str) -> None:
    pass


# (backend, damage, exit code, addresses that drift, lines the report must hold)
LIVE = [
    pytest.param("iptables", _no_damage, 0, [], [
        "the kernel holds the desired state (iptables backend, chain IP-MASQ-AGENT: ipv4, ipv6)"], id="iptables-in-sync"),
    pytest.param("iptables", _iptables(["iptables", "-t", "nat", "-D", CHAIN, *_keep_rule("203.0.113.0/24")]), 5,
                 ["203.0.113.9"], [
                     "  DRIFT: the kernel masquerades it; the desired state keeps the pod address "
                     "(203.0.113.0/24 from {config} line 4)",
                     "  ipv4: missing from the kernel: 203.0.113.0/24 (from {config} line 4)",
                     "  ipv4: a sync would rewrite it (chain IP-MASQ-AGENT differs)"], id="iptables-return-deleted"),
    pytest.param("iptables", _iptables(["iptables", "-t", "nat", "-I", CHAIN, "2", "-d", "192.0.2.0/24", "-j", "RETURN"]), 5,
                 ["192.0.2.1"], [
                     "  matched 192.0.2.0/24: not in the desired state (added outside masqd?)",
                     "  DRIFT: the kernel does not masquerade it; the desired state masquerades it",
                     "  ipv4: in the kernel, not in the desired state: 192.0.2.0/24"], id="iptables-return-added"),
    pytest.param("iptables", _iptables(["iptables", "-t", "nat", "-F", CHAIN]), 5, ["192.0.2.1"], [
        "  masqd's chain IP-MASQ-AGENT has no final masquerade rule",
        "  ipv4: the final masquerade rule is missing: traffic no CIDR keeps is not masqueraded"], id="iptables-chain-flushed"),
    pytest.param("iptables", _iptables(["iptables", "-t", "nat", "-D", "POSTROUTING", *JUMP]), 5, ["192.0.2.1"], [
        "  ipv4: chain IP-MASQ-AGENT is there, but traffic does not reach it (not hooked into nat POSTROUTING)"],
                 id="iptables-jump-deleted"),
    pytest.param("iptables", _iptables(["iptables", "-t", "nat", "-D", "POSTROUTING", *JUMP],
                                       ["iptables", "-t", "nat", "-F", CHAIN], ["iptables", "-t", "nat", "-X", CHAIN]),
                 5, ["192.0.2.1"], [
                     "  masqd's chain IP-MASQ-AGENT is not in the kernel",
                     "  ipv4: chain IP-MASQ-AGENT is not in the kernel: nothing masqd writes is there, so masqd "
                     "masquerades nothing"], id="iptables-chain-and-jump-deleted"),
    pytest.param("iptables", _iptables(["ip6tables", "-t", "nat", "-D", CHAIN, *_keep_rule("2001:db8:1::/64")]), 5,
                 ["2001:db8:1::5"], ["  ipv6: missing from the kernel: 2001:db8:1::/64 (from {config} line 5)"],
                 id="iptables-ipv6-return-deleted"),
    pytest.param("nftables", _no_damage, 0, [], [
        "the kernel holds the desired state (nftables backend, table masqd: ipv4, ipv6)"], id="nftables-in-sync"),
    pytest.param("nftables", _nft("delete element ip masqd nonmasq4 { 203.0.113.0/24 }"), 5, ["203.0.113.9"], [
        "  ipv4: missing from the kernel: 203.0.113.0/24 (from {config} line 4)",
        "  ipv4: a sync would rewrite it (table ip masqd: set elements differ)"], id="nftables-element-deleted"),
    pytest.param("nftables", _nft("add element ip masqd nonmasq4 { 192.0.2.0/25 }"), 5, ["192.0.2.1"], [
        "  matched 192.0.2.0/25: not in the desired state (added outside masqd?)",
        "  ipv4: in the kernel, not in the desired state: 192.0.2.0/25"], id="nftables-element-added"),
    pytest.param("nftables", _nft("flush set ip masqd nonmasq4"), 5, ["10.1.2.3", "203.0.113.9"], [
        "  ipv4: missing from the kernel: 169.254.0.0/16 (from link-local default (masqLinkLocal: false)), "
        "10.0.0.0/8 (from {config} line 2), 198.51.100.0/24 (from {config} line 3), 203.0.113.0/24 (from {config} line 4)"],
                 id="nftables-set-flushed"),
    pytest.param("nftables", _nft("flush chain ip masqd nat"), 5, ["192.0.2.1"], [
        "  ipv4: the final masquerade rule is missing: traffic no CIDR keeps is not masqueraded"], id="nftables-chain-flushed"),
    pytest.param("nftables", _nft("add table ip masqd { flags dormant ; }"), 5, ["192.0.2.1"], [
        "  ipv4: table masqd is there, but traffic does not reach it (not hooked into nat POSTROUTING)"],
                 id="nftables-table-dormant"),
    pytest.param("nftables", _nft("delete table ip masqd"), 5, ["192.0.2.1"], [
        "  ipv4: table masqd is not in the kernel: nothing masqd writes is there, so masqd masquerades nothing",
        "  ipv4: a sync would rewrite it (table ip masqd missing)"], id="nftables-table-deleted"),
    pytest.param("nftables", _nft("delete element ip6 masqd nonmasq6 { 2001:db8:1::/64 }"), 5, ["2001:db8:1::5"], [
        "  ipv6: missing from the kernel: 2001:db8:1::/64 (from {config} line 5)"], id="nftables-ipv6-element-deleted"),
    # rules masqd does not write: outside its chain or table, and inside it
    pytest.param("iptables", _iptables(["iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-d", "10.0.0.0/8", "-j",
                                        "MASQUERADE"]), 5, ["10.1.2.3"], [
        "10.1.2.3: masqueraded to the node's address",
        "  masqueraded by a rule masqd does not write, ahead of its chain: -A POSTROUTING -d 10.0.0.0/8 -j MASQUERADE",
        "  DRIFT: the kernel masquerades it; the desired state keeps the pod address (10.0.0.0/8 from {config} line 2)",
        "masqd's rules in the kernel are the desired ones (iptables backend, chain IP-MASQ-AGENT: ipv4, ipv6), but rules "
        "masqd does not write decide otherwise for 10.1.2.3"], id="iptables-masquerade-ahead-of-the-jump"),
    pytest.param("iptables", _iptables(["iptables", "-t", "nat", "-I", CHAIN, "1", "-d", "192.0.2.0/24", "-j", "ACCEPT"]),
                 5, ["192.0.2.1"], [
        "192.0.2.1: keeps the pod source address (not masqueraded)",
        "  kept by a rule masqd does not write, in its chain: -A IP-MASQ-AGENT -d 192.0.2.0/24 -j ACCEPT",
        "  DRIFT: the kernel does not masquerade it; the desired state masquerades it",
        "  ipv4: unexpected: rule masqd does not write: -A IP-MASQ-AGENT -d 192.0.2.0/24 -j ACCEPT"],
                 id="iptables-accept-inside-the-chain"),
    pytest.param("iptables", _iptables(["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "vdst", "-j", "MASQUERADE"],
                                       ["iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-j", "LOG"]),
                 0, [], [
        "10.1.2.3: uncertain: rules masqd does not write may decide",
        "  masqd's rules: keeps the pod source address (not masqueraded)",
        "  may act after masqd's chain: -A POSTROUTING -o vdst -j MASQUERADE (it may masquerade)",
        "masqd's rules in the kernel are the desired ones (iptables backend, chain IP-MASQ-AGENT: ipv4, ipv6), but rules "
        "masqd does not write may decide otherwise for 10.1.2.3, 203.0.113.9 (matches explain does not evaluate: "
        "check them)"],
                 id="iptables-conditional-masquerade-after-the-jump-is-uncertain-not-drift"),
    pytest.param("iptables", _iptables(["ip6tables", "-t", "nat", "-I", "POSTROUTING", "1", "-d", "2001:db8:1::/64", "-j",
                                        "MASQUERADE"]), 5, ["2001:db8:1::5"], [
        "  masqueraded by a rule masqd does not write, ahead of its chain: -A POSTROUTING -d 2001:db8:1::/64 -j MASQUERADE"],
                 id="ip6tables-masquerade-ahead-of-the-jump"),
    pytest.param("nftables", _nft("add table ip other", "add chain ip other post { type nat hook postrouting priority 50; }",
                                  "add rule ip other post ip daddr 10.0.0.0/8 masquerade"), 0, [], [
        "  may also act (table ip other chain post priority 50): it may masquerade",
        "masqd's rules in the kernel are the desired ones (nftables backend, table masqd: ipv4, ipv6), but rules masqd "
        "does not write may decide otherwise for 10.1.2.3, 203.0.113.9 (matches explain does not evaluate: check "
        "them)"], id="nftables-another-nat-chain-is-uncertain-not-drift"),
    pytest.param("nftables", _nft("add table inet counts", "add chain inet counts post { type nat hook postrouting priority 300; }",
                                  "add rule inet counts post counter accept"), 0, [], [
        "the kernel holds the desired state (nftables backend, table masqd: ipv4, ipv6)"],
                 id="nftables-a-nat-chain-that-cannot-masquerade-is-not-mentioned"),
    pytest.param("nftables", _nft("insert rule ip masqd nat ip daddr 192.0.2.0/24 accept"), 5, ["192.0.2.1"], [
        "192.0.2.1: keeps the pod source address (not masqueraded)",
        "  DRIFT: the kernel does not masquerade it; the desired state masquerades it"], id="nftables-accept-inside-the-chain"),
]


@pytest.mark.netns
@pytest.mark.parametrize(("backend", "damage", "code", "drifting", "lines"), LIVE)
def test_live_reports_what_was_changed_in_the_kernel(node_ns, masqd, backend, damage, code, drifting, lines):
    masqd.ok(node_ns, "--enable-ipv6", config=LIVE_CONFIG, backend=backend)
    damage(node_ns)
    before = _kernel(node_ns)
    argv = [str(MASQD), "explain", "--live", "--backend", backend, "--config", str(masqd.config_path), "--enable-ipv6"]
    result = netns.run(node_ns, *argv, *ADDRESSES, check=False, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    out = result.stdout.splitlines()
    for line in lines:
        assert line.format(config=masqd.config_path) in out, result.stdout
    blocks = _blocks(out)
    assert sorted(address for address, block in blocks.items() if any("DRIFT" in line for line in block)) == sorted(drifting)
    assert _kernel(node_ns) == before  # explain only reads
    as_json = json.loads(netns.run(node_ns, *argv, "--output", "json", *ADDRESSES, check=False, timeout=60).stdout)
    assert sorted(item["address"] for item in as_json if item["live"]["drift"]) == sorted(drifting)


def _blocks(lines: list[str]) -> dict[str, list[str]]:
    """Each address's block of the text report."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in lines:
        head = line.split(": ", 1)[0]
        if head in ADDRESSES:
            current = blocks.setdefault(head, [])
        elif not line.startswith("  ") or line.startswith("  ipv"):
            current = None
        if current is not None:
            current.append(line)
    return blocks


def _kernel(ns: str) -> tuple[str, str, str]:
    return (netns.iptables_save(ns, 4), netns.iptables_save(ns, 6), netns.run(ns, "nft", "-a", "list", "ruleset").stdout)


# --- rules masqd does not write: parsed from the tools' output (pure) ------------------------------------

from masqd.backends.base import ForeignRule  # noqa: E402

MASQD_JUMP = ipt.jump_rule(CHAIN)


def nat(*lines: str) -> str:
    """iptables-save text of a nat table holding ``lines`` (``:CHAIN`` lines declare chains)."""
    return "\n".join(["*filter", "-A FORWARD -j ACCEPT", "COMMIT", "*nat", ":POSTROUTING ACCEPT [0:0]",
                      f":{CHAIN} - [0:0]", *lines, "COMMIT"]) + "\n"


def net(text: str):
    return ipaddress.ip_network(text)


KUBE = ":KUBE-POSTROUTING - [0:0]"
KUBE_RULES = ("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
              "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0", "-A KUBE-POSTROUTING -j MASQUERADE --random-fully")
KUBE_JUMP = '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'


@pytest.mark.parametrize(("lines", "family", "expected"), [
    pytest.param(("-A POSTROUTING -d 10.0.0.0/8 -j MASQUERADE", MASQD_JUMP, *DESIRED_IPT), 4,
                 [ForeignRule("-A POSTROUTING -d 10.0.0.0/8 -j MASQUERADE", "before", "masquerade", net("10.0.0.0/8"),
                              certain=True)], id="masquerade-before-the-jump"),
    pytest.param((MASQD_JUMP, "-A POSTROUTING -o eth0 -j MASQUERADE", *DESIRED_IPT), 4,
                 [ForeignRule("-A POSTROUTING -o eth0 -j MASQUERADE", "after", "masquerade")],
                 id="conditional-masquerade-after-the-jump"),
    pytest.param(("-A POSTROUTING ! -d 10.0.0.0/8 -j SNAT --to-source 192.0.2.1", "-A POSTROUTING -j ACCEPT",
                  "-A POSTROUTING -d 198.51.100.0/24 -j RETURN", MASQD_JUMP, *DESIRED_IPT), 4,
                 [ForeignRule("-A POSTROUTING ! -d 10.0.0.0/8 -j SNAT --to-source 192.0.2.1", "before", "masquerade",
                              net("10.0.0.0/8"), negated=True, certain=True),
                  ForeignRule("-A POSTROUTING -j ACCEPT", "before", "keep", certain=True),
                  ForeignRule("-A POSTROUTING -d 198.51.100.0/24 -j RETURN", "before", "keep", net("198.51.100.0/24"),
                              certain=True)], id="negated-snat-accept-and-return-in-postrouting"),
    pytest.param(("-A POSTROUTING -j LOG", "-A POSTROUTING -j MARK --set-xmark 0x1/0xffffffff",
                  "-A POSTROUTING -d 10.0.0.0/8", MASQD_JUMP, *DESIRED_IPT), 4, [], id="rules-that-cannot-decide"),
    pytest.param((KUBE, ":ONLY-LOGS - [0:0]", KUBE_JUMP, "-A POSTROUTING -j ONLY-LOGS", MASQD_JUMP, *KUBE_RULES,
                  "-A ONLY-LOGS -j LOG", "-A ONLY-LOGS -d 10.0.0.0/8 -j RETURN", *DESIRED_IPT), 4,
                 [ForeignRule(KUBE_JUMP, "before", "masquerade", mark="0x4000/0x4000")],
                 id="kube-proxy-chain-masquerades-marked-traffic"),
    pytest.param((":ONLY-MASQ - [0:0]", "-A POSTROUTING -d 10.0.0.0/8 -g ONLY-MASQ", "-A POSTROUTING -j NOT-A-CHAIN",
                  MASQD_JUMP, "-A ONLY-MASQ -o eth0 -j MASQUERADE", *DESIRED_IPT), 4,
                 [ForeignRule("-A POSTROUTING -d 10.0.0.0/8 -g ONLY-MASQ", "before", "either", net("10.0.0.0/8")),
                  ForeignRule("-A POSTROUTING -j NOT-A-CHAIN", "before", "either")],
                 id="goto-and-unknown-target-may-do-either"),
    pytest.param((":A - [0:0]", ":B - [0:0]", "-A POSTROUTING -j A", MASQD_JUMP, "-A A -j B", "-A B -j A",
                  "-A B -j ACCEPT", *DESIRED_IPT), 4, [ForeignRule("-A POSTROUTING -j A", "before", "either")],
                 id="chains-that-loop-may-do-anything"),
    pytest.param(('-A POSTROUTING -m comment --comment "not \\"-j ACCEPT\\" -d 10.0.0.0/8" -j MASQUERADE', MASQD_JUMP,
                  *DESIRED_IPT), 4,
                 [ForeignRule('-A POSTROUTING -m comment --comment "not \\"-j ACCEPT\\" -d 10.0.0.0/8" -j MASQUERADE',
                              "before", "masquerade", certain=True)], id="a-comment-is-not-a-match"),
    pytest.param((MASQD_JUMP, DESIRED_IPT[0], f"-A {CHAIN} -d 192.0.2.0/24 -j ACCEPT", DESIRED_IPT[1],
                  f"-A {CHAIN} -s 10.244.0.0/16 -j RETURN", f"-A {CHAIN} -d 10.1.0.0/16 -j SNAT --to-source 192.0.2.1",
                  DESIRED_IPT[2]), 4,
                 [ForeignRule(f"-A {CHAIN} -d 192.0.2.0/24 -j ACCEPT", "inside", "keep", net("192.0.2.0/24"), certain=True,
                              position=1),
                  ForeignRule(f"-A {CHAIN} -s 10.244.0.0/16 -j RETURN", "inside", "keep", position=2),
                  ForeignRule(f"-A {CHAIN} -d 10.1.0.0/16 -j SNAT --to-source 192.0.2.1", "inside", "masquerade",
                              net("10.1.0.0/16"), certain=True, position=2)], id="inside-masqds-chain"),
    pytest.param(("-A POSTROUTING -j MASQUERADE", *DESIRED_IPT), 4,
                 [ForeignRule("-A POSTROUTING -j MASQUERADE", "before", "masquerade", certain=True)],
                 id="no-jump-every-postrouting-rule-acts-first"),
    pytest.param(("-A POSTROUTING -d 2001:db8:1::/64 -j MASQUERADE", MASQD_JUMP), 6,
                 [ForeignRule("-A POSTROUTING -d 2001:db8:1::/64 -j MASQUERADE", "before", "masquerade",
                              net("2001:db8:1::/64"), certain=True)], id="ipv6"),
])
def test_iptables_rules_masqd_does_not_write(lines, family, expected):
    text = nat(*lines)
    live = ipt.live_family(ipt.parse_nat_state(text, CHAIN), family, DESIRED_IPT, CHAIN, ipt.parse_nat_chains(text))
    assert list(live.foreign) == expected


def test_iptables_nat_chains_are_read_from_the_nat_table_only():
    text = nat(KUBE, KUBE_JUMP, *KUBE_RULES) + "*mangle\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n"
    assert ipt.parse_nat_chains(text) == {"POSTROUTING": (KUBE_JUMP,), CHAIN: (), "KUBE-POSTROUTING": KUBE_RULES}


def _nft_structure(*objects: dict) -> str:
    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *objects]})


def _table(family: str, name: str, **extra) -> dict:
    return {"table": {"family": family, "name": name, "handle": 1, **extra}}


def _chain(family: str, table: str, name: str, prio: int | None = None, hook: str = "postrouting", kind: str = "nat") -> dict:
    base = {} if prio is None else {"type": kind, "hook": hook, "prio": prio, "policy": "accept"}
    return {"chain": {"family": family, "table": table, "name": name, "handle": 1, **base}}


def _rule(family: str, table: str, chain: str, *expr: dict) -> dict:
    return {"rule": {"family": family, "table": table, "chain": chain, "handle": 2, "expr": list(expr)}}


DADDR_10 = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                      "right": {"prefix": {"addr": "10.0.0.0", "len": 8}}}}
STRUCTURE = _nft_structure(
    _table("ip", "nat"), _chain("ip", "nat", "POSTROUTING", 100),  # iptables-nft's, MASQUERADE as an xt target
    _rule("ip", "nat", "POSTROUTING", {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "MASQUERADE"}}),
    _table("inet", "early"), _chain("inet", "early", "post", -50), _chain("inet", "early", "sub"),
    _rule("inet", "early", "post", DADDR_10, {"jump": {"target": "sub"}}),
    _rule("inet", "early", "sub", {"snat": {"addr": "192.0.2.1"}}),
    _table("ip", "counts"), _chain("ip", "counts", "post", 300), _rule("ip", "counts", "post", {"counter": None}, {"accept": None}),
    _table("ip", "late"), _chain("ip", "late", "post", 300), _rule("ip", "late", "post", {"masquerade": None}),
    _table("ip", "asleep", flags=["dormant"]), _chain("ip", "asleep", "post", 0), _rule("ip", "asleep", "post", {"masquerade": None}),
    _table("ip", "filtering"), _chain("ip", "filtering", "post", 0, kind="filter"),
    _rule("ip", "filtering", "post", {"masquerade": None}),
    _table("ip", "masqd"), _chain("ip", "masqd", "nat", 100), _rule("ip", "masqd", "nat", {"masquerade": None}),
    _table("ip6", "six"), _chain("ip6", "six", "post", 100), _rule("ip6", "six", "post", {"masquerade": None}),
)


@pytest.mark.parametrize(("family", "expected"), [
    pytest.param(4, [("table inet early chain post priority -50", "before"), ("table ip nat chain POSTROUTING priority 100", "before"),
                     ("table ip late chain post priority 300", "after")], id="ipv4"),
    pytest.param(6, [("table inet early chain post priority -50", "before"), ("table ip6 six chain post priority 100", "before")],
                 id="ipv6"),
])
def test_nftables_other_nat_postrouting_chains_that_may_masquerade(family, expected):
    found = nft.other_nat_chains(STRUCTURE, family)
    assert [(rule.text, rule.stage) for rule in found] == expected
    assert {(rule.kind, rule.effect, rule.certain, rule.destination) for rule in found} == {("chain", "masquerade", False, None)}


def _masqd_table(*rules: list[dict]) -> str:
    """``nft --json list table ip masqd`` holding the desired table with ``rules`` as its chain's."""
    listing = json.loads((GOLDEN_NFT / "listing_defaults_ip.json").read_text())
    kept = [item for item in listing["nftables"] if "rule" not in item]
    return json.dumps({"nftables": kept + [_rule("ip", "masqd", "nat", *expr) for expr in rules]})


LOCAL_RETURN = [{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
                {"return": None}]
SET_RETURN = [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@nonmasq4"}},
              {"return": None}]
FINAL_MASQ = [{"masquerade": {"flags": "fully-random"}}]
DADDR_192 = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": {"prefix": {"addr": "192.0.2.0", "len": 24}}}}
NOT_DADDR_ONE = {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "203.0.113.1"}}


@pytest.mark.parametrize(("rules", "expected"), [
    pytest.param([LOCAL_RETURN, [DADDR_192, {"counter": None}, {"accept": None}], SET_RETURN, FINAL_MASQ],
                 [("inside", "keep", "192.0.2.0/24", False, True, 0)], id="accept-before-the-set-lookup"),
    pytest.param([LOCAL_RETURN, SET_RETURN, [NOT_DADDR_ONE, {"snat": {"addr": "192.0.2.1"}}], FINAL_MASQ],
                 [("inside", "masquerade", "203.0.113.1/32", True, True, 4)], id="negated-snat-after-the-lookup"),
    pytest.param([LOCAL_RETURN, SET_RETURN, [DADDR_192, {"meta": {"key": "mark"}}, {"jump": {"target": "x"}}], FINAL_MASQ],
                 [("inside", "either", "192.0.2.0/24", False, False, 4)], id="conditional-jump"),
    pytest.param([LOCAL_RETURN, [{"counter": None}], [{"log": None}], SET_RETURN, FINAL_MASQ], [],
                 id="counters-and-logs-decide-nothing"),
])
def test_nftables_rules_inside_masqds_chain(rules, expected):
    live = nft.live_family(nft.parse_listing(_masqd_table(*rules), 4), DEFAULT_NFT)
    assert [(r.stage, r.effect, str(r.destination), r.negated, r.certain, r.position) for r in live.foreign] == expected


def test_nftables_read_back_lists_other_tables_chains(tmp_path):
    class Executor:
        async def list_table(self, family):
            return (GOLDEN_NFT / "listing_defaults_ip.json").read_text() if family == 4 else None

        async def list_structure(self):
            return STRUCTURE

    live = anyio.run(nft.NftablesBackend(Executor()).read_back, DEFAULT_RULESET)
    assert [rule.text for rule in live.family(4).foreign] == [
        "table inet early chain post priority -50", "table ip nat chain POSTROUTING priority 100",
        "table ip late chain post priority 300"]


# --- rules masqd does not write: how they change each address's verdict (pure) ---------------------------

def _rule_of(stage: str, effect: str, destination: str | None = None, *, certain: bool = False, negated: bool = False,
             position: int = 0, kind: str = "rule", text: str = "RULE") -> ForeignRule:
    return ForeignRule(text, stage, effect, None if destination is None else net(destination), negated, certain,
                       position, kind)


FOREIGN_CONFIG = "nonMasqueradeCIDRs: [10.0.0.0/8]\n"


@pytest.mark.parametrize(("foreign", "address", "overrides", "action", "drift", "lines"), [
    pytest.param([_rule_of("before", "masquerade", "10.0.0.0/8", certain=True)], "10.1.2.3", {}, "masquerade", True,
                 ["  masqueraded by a rule masqd does not write, ahead of its chain: RULE", LOCAL,
                  "  DRIFT: the kernel masquerades it; the desired state keeps the pod address (10.0.0.0/8 from cfg line 1)"],
                 id="masquerade-ahead-of-the-chain-decides"),
    pytest.param([_rule_of("before", "masquerade", "192.0.2.0/24", certain=True)], "192.0.2.5", {}, "masquerade", False,
                 ["  masqueraded by a rule masqd does not write, ahead of its chain: RULE", LOCAL],
                 id="deciding-as-masqd-would-is-no-drift"),
    pytest.param([_rule_of("before", "masquerade", "10.0.0.0/8", certain=True, negated=True)], "10.1.2.3", {}, "keep",
                 False, ["  matched 10.0.0.0/8 from cfg line 1"], id="negated-destination-does-not-match"),
    pytest.param([_rule_of("inside", "keep", "192.0.2.0/24", certain=True)], "192.0.2.5", {}, "keep", True,
                 ["  kept by a rule masqd does not write, in its chain: RULE",
                  "  DRIFT: the kernel does not masquerade it; the desired state masquerades it"],
                 id="accept-inside-the-chain-decides"),
    pytest.param([_rule_of("inside", "masquerade", "10.1.0.0/16", certain=True, position=2)], "10.1.2.3", {}, "keep",
                 False, ["  matched 10.0.0.0/8 from cfg line 1"], id="inside-after-the-cidr-that-keeps-it"),
    pytest.param([_rule_of("inside", "masquerade", "10.1.0.0/16", certain=True, position=1)], "10.1.2.3", {},
                 "masquerade", True, ["  masqueraded by a rule masqd does not write, in its chain: RULE"],
                 id="inside-before-the-cidr-that-keeps-it"),
    pytest.param([_rule_of("before", "masquerade")], "10.1.2.3", {}, "uncertain", False,
                 ["10.1.2.3: uncertain: rules masqd does not write may decide",
                  f"  masqd's rules: {KEEP}", "  matched 10.0.0.0/8 from cfg line 1",
                  "  may act first: RULE (it may masquerade)"],
                 id="conditional-masquerade-makes-a-kept-address-uncertain-not-drift"),
    pytest.param([_rule_of("before", "masquerade")], "192.0.2.5", {}, "masquerade", False,
                 [f"192.0.2.5: {MASQ}", NO_MATCH.replace("CIDR", "CIDR in the kernel"),
                  "  may act first: RULE (it may masquerade)", LOCAL], id="conditional-masquerade-of-a-masqueraded-one"),
    pytest.param([_rule_of("after", "masquerade")], "10.1.2.3", {}, "uncertain", False,
                 ["  may act after masqd's chain: RULE (it may masquerade)"], id="after-a-kept-address"),
    pytest.param([_rule_of("after", "masquerade", certain=True)], "192.0.2.5", {}, "masquerade", False,
                 [f"192.0.2.5: {MASQ}"], id="after-is-never-reached-by-a-masqueraded-address"),
    pytest.param([_rule_of("inside", "keep", "192.0.2.0/24", certain=True), _rule_of("after", "masquerade", text="LATER"),
                  _rule_of("after", "masquerade", kind="chain", text="table ip t chain c priority 300")],
                 "192.0.2.5", {}, "uncertain", False,
                 ["  may also act (table ip t chain c priority 300): it may masquerade"],
                 id="an-accept-ends-iptables-processing-but-not-other-nft-chains"),
    pytest.param([_rule_of("before", "keep", kind="chain", text="table ip t chain c priority 0"),
                  _rule_of("before", "either")], "192.0.2.5", {}, "uncertain", False,
                 ["  may act first: RULE (it may masquerade or end nat processing)"], id="either"),
    pytest.param([_rule_of("before", "masquerade", certain=True)], "192.0.2.5", dict(hooked=False), "masquerade", False,
                 ["  masqueraded by a rule masqd does not write, ahead of its chain: RULE"],
                 id="masqd-not-hooked-but-another-rule-masquerades"),
    pytest.param([_rule_of("inside", "masquerade", certain=True)], "10.1.2.3", dict(hooked=False), "unmanaged", False,
                 ["  masqd's chain X is in the kernel, but traffic does not reach it (not hooked into nat POSTROUTING)"],
                 id="rules-inside-an-unhooked-chain-do-nothing"),
])
def test_rules_masqd_does_not_write_decide_or_qualify_the_verdict(foreign, address, overrides, action, drift, lines):
    ruleset = _ruleset(FOREIGN_CONFIG)
    merged = merge_configs([("cfg", parse_config(FOREIGN_CONFIG, AgentOptions()).config)], AgentOptions())
    origins = cidr_origins(ruleset, merged, (), AgentOptions(), {"cfg": FOREIGN_CONFIG})
    live = _live("169.254.0.0/16", "10.0.0.0/8", foreign=tuple(foreign), **overrides)
    report = explain([ipaddress.ip_address(address)], ruleset, origins, live)
    [explanation] = report.explanations
    assert (explanation.live.action, explanation.drift) == (action, drift)
    text = format_text(report).splitlines()
    for line in lines:
        assert line in text, "\n".join(text)


def test_the_summary_does_not_claim_the_desired_state_when_other_rules_decide():
    ruleset = _ruleset(FOREIGN_CONFIG)
    live = _live("169.254.0.0/16", "10.0.0.0/8", foreign=(_rule_of("before", "masquerade", "10.0.0.0/8", certain=True),))
    report = explain([ipaddress.ip_address(a) for a in ("10.1.2.3", "10.9.9.9", "192.0.2.5")], ruleset, {}, live)
    assert report.differences == {4: ()} and report.drift
    assert format_text(report).splitlines()[-1] == (
        "masqd's rules in the kernel are the desired ones (test backend, chain X: ipv4), but rules masqd does not "
        "write decide otherwise for 10.1.2.3, 10.9.9.9")
    [first, *_] = as_json(report)
    assert first["live"]["masqd_verdict"] == "keep" and first["live"]["verdict"] == "masquerade"
    assert first["live"]["foreign_rules"] == [
        {"rule": "RULE", "kind": "rule", "stage": "before", "effect": "masquerade", "decides": True, "mark": None}]


# --- IPv4-mapped IPv6 addresses ------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [pytest.param([], id="without-enable-ipv6"), pytest.param(["--enable-ipv6"], id="with-enable-ipv6")])
def test_an_ipv4_mapped_address_is_explained_as_its_ipv4_address(capsys, files, flags):
    paths = files(a_yaml="nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    code, out, err = explained(capsys, "--config", paths["a_yaml"], *flags, "::ffff:10.1.1.1", "::ffff:cb00:7109")
    assert (code, err) == (0, "")
    note = "  note: an IPv4-mapped IPv6 address: traffic to it leaves as IPv4, so it is explained as {}"
    assert out.splitlines() == [
        f"::ffff:10.1.1.1: {KEEP}", note.format("10.1.1.1"), f"  matched 10.0.0.0/8 from {paths['a_yaml']} line 1",
        f"::ffff:203.0.113.9: {MASQ}", note.format("203.0.113.9"), NO_MATCH, LOCAL,
    ]
    code, out, _ = explained(capsys, "--config", paths["a_yaml"], *flags, "--output", "json", "::ffff:10.1.1.1")
    [item] = json.loads(out)
    assert (item["address"], item["explained_as"], item["family"], item["verdict"]) == ("::ffff:10.1.1.1", "10.1.1.1", 4, "keep")


def test_an_ipv4_mapped_address_is_explained_from_the_kernels_ipv4_rules(capsys, files):
    ruleset = _ruleset(FOREIGN_CONFIG)
    live = LiveRules("test", "chain X", (LiveFamily(4, present=True, hooked=True, local_exempt=True, masquerade=True,
                                                    nonmasq=(net("10.0.0.0/8"),)), LiveFamily(6, present=False)))
    report = explain([ipaddress.ip_address("::ffff:10.1.1.1")], ruleset, {}, live)
    [explanation] = report.explanations
    assert (explanation.family, explanation.live.action, explanation.drift) == (4, "keep", False)


# --- an invalid config with --live: the kernel alone ----------------------------------------------------


def test_invalid_config_with_live_explains_from_the_kernel_alone(capsys, files):
    paths = files(bad_yaml="nonMasqueradeCIDRs: [10.0.0.1/8]\n")
    code, out, err = explained(capsys, "--config", paths["bad_yaml"], "--live", "10.1.2.3", "2001:db8::1")
    assert code == 1
    assert "did you mean '10.0.0.0/8'" in err
    assert out.splitlines() == [
        "explained from the rules the kernel holds alone (dry-run backend, dry-run rule set): no desired state to "
        "compare with: the config is invalid",
        "10.1.2.3: not masqueraded by masqd", "  masqd's dry-run rule set is not in the kernel",
        "2001:db8::1: not masqueraded by masqd",
        "  IPv6 is not managed by masqd (it runs without --enable-ipv6): it writes no IPv6 rules, so masqd does not "
        "masquerade it",
    ]
    code, out, _ = explained(capsys, "--config", paths["bad_yaml"], "--live", "--output", "json", "10.1.2.3")
    [item] = json.loads(out)
    assert code == 1
    assert (item["verdict"], item["live"]["verdict"], item["live"]["drift"]) == (None, "unmanaged", None)


def test_explain_kernel_names_the_kernels_cidrs_without_origins():
    live = _live("169.254.0.0/16", "10.0.0.0/8")
    report = explain_kernel([ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("192.0.2.5")], live)
    assert not report.drift
    assert format_text(report).splitlines()[1:] == [f"10.1.2.3: {KEEP}", "  matched 10.0.0.0/8",
                                                    f"192.0.2.5: {MASQ}", "  no non-masquerade CIDR in the kernel matches it",
                                                    LOCAL]


@pytest.mark.netns
@pytest.mark.parametrize(("backend", "where"), [pytest.param("iptables", "chain IP-MASQ-AGENT", id="iptables"),
                                               pytest.param("nftables", "table masqd", id="nftables")])
def test_live_mapped_addresses_and_an_invalid_config_against_a_real_kernel(node_ns, masqd, backend, where):
    masqd.ok(node_ns, "--enable-ipv6", config=LIVE_CONFIG, backend=backend)
    argv = [str(MASQD), "explain", "--live", "--backend", backend, "--config", str(masqd.config_path), "--enable-ipv6"]
    note = "  note: an IPv4-mapped IPv6 address: traffic to it leaves as IPv4, so it is explained as {}"
    result = netns.run(node_ns, *argv, "::ffff:10.1.2.3", check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1:3] == [f"::ffff:10.1.2.3: {KEEP}", note.format("10.1.2.3")]
    before = _kernel(node_ns)
    masqd.config_path.write_text("nonMasqueradeCIDRs: [10.0.0.1/8]\n")  # the agent keeps the last good rules
    result = netns.run(node_ns, *argv, "10.1.2.3", "192.0.2.1", "::ffff:203.0.113.9", check=False, timeout=60)
    assert result.returncode == 1
    assert "did you mean '10.0.0.0/8'" in result.stderr
    assert result.stdout.splitlines() == [
        f"explained from the rules the kernel holds alone ({backend} backend, {where}): no desired state to compare "
        "with: the config is invalid",
        f"10.1.2.3: {KEEP}", "  matched 10.0.0.0/8",
        f"192.0.2.1: {MASQ}", "  no non-masquerade CIDR in the kernel matches it", LOCAL,
        f"::ffff:203.0.113.9: {KEEP}", note.format("203.0.113.9"), "  matched 203.0.113.0/24",
    ]
    assert _kernel(node_ns) == before
    without_live = netns.run(node_ns, *[arg for arg in argv if arg != "--live"], "10.1.2.3", check=False, timeout=60)
    assert (without_live.returncode, without_live.stdout) == (1, "")
