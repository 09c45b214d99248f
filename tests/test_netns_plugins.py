"""Installed example plugins change what the kernel does, in throw-away network namespaces.

The packages under ``plugins/`` are installed next to masqd (``.ci/run`` and the README's set-up
command do it) and loaded through their entry points, exactly as on a node: nothing is registered
by hand here. The destination namespace reports the source address it sees.
"""

from __future__ import annotations

import json

import pytest

from masqd.testing import topology as layout
from masqd_proc import DaemonProcess

PACKET_BACKENDS = [pytest.param("iptables", id="iptables"), pytest.param("nftables", id="nftables")]


@pytest.mark.parametrize("backend", PACKET_BACKENDS)
def test_cidr_files_plugin_keeps_the_pod_address_for_its_ranges(topology, masqd, tmp_path, backend):
    cidrs = tmp_path / "cidrs"
    cidrs.mkdir()
    (cidrs / "partners").write_text("192.0.2.0/24  # partner network, reached without NAT\n")
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps({"prefixes": [{"ipv4Prefix": "203.0.113.0/24"}]}))
    env = {"MASQD_PLUGINS": "cidr-files", "MASQD_CIDR_FILES_DIR": str(cidrs), "MASQD_CIDR_FILES_RANGES": str(ranges)}
    masqd.ok(topology.node, config="nonMasqueradeCIDRs: [10.0.0.0/8]\n", backend=backend, env=env)
    assert topology.source_seen("192.0.2.2") == layout.POD_V4
    assert topology.source_seen("203.0.113.2") == layout.POD_V4
    assert topology.source_seen("198.51.100.2") == layout.NODE_V4  # in no list: masqueraded


@pytest.mark.parametrize("backend", PACKET_BACKENDS)
def test_policy_guard_veto_leaves_the_kernel_untouched(topology, masqd, tmp_path, backend):
    policy = tmp_path / "policy.yaml"
    policy.write_text("alwaysMasquerade: [192.0.2.0/24]\n")
    env = {"MASQD_PLUGINS": "policy-guard", "MASQD_POLICY_GUARD": str(policy)}
    masqd.ok(topology.node, config="nonMasqueradeCIDRs: [10.0.0.0/8]\n", backend=backend, env=env)
    assert topology.source_seen("192.0.2.2") == layout.NODE_V4
    vetoed = masqd(topology.node, config="nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n", backend=backend, env=env)
    assert vetoed.returncode == 1
    assert "policy-guard.validate_config: 192.0.2.0/24 overlaps 192.0.2.0/24" in vetoed.stderr
    assert topology.source_seen("192.0.2.2") == layout.NODE_V4  # the vetoed list never reached the kernel


def test_cidr_files_source_applies_a_file_change_in_the_running_daemon(topology, tmp_path):
    cidrs = tmp_path / "cidrs"
    cidrs.mkdir()
    config = tmp_path / "config"
    config.write_text("resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8]\n")
    env = {"MASQD_PLUGINS": "cidr-files,audit-log", "MASQD_CIDR_FILES_DIR": str(cidrs),
           "MASQD_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    process = DaemonProcess(topology.node, config, backend="nftables", env=env)
    try:
        process.next_event(lambda e: e.get("event") == "rules applied")
        assert topology.source_seen("198.51.100.2") == layout.NODE_V4
        (cidrs / "more").write_text("198.51.100.0/24\n")
        updated = process.next_event(lambda e: e.get("event") == "rules updated")
        assert updated["trigger"] == "cidr-files" and updated["cidrs_added"] == ["198.51.100.0/24"]
        assert updated["cidrs_from_plugins"] == {"cidr-files": 1}
        assert topology.source_seen("198.51.100.2") == layout.POD_V4
    finally:
        process.proc.terminate()
        process.proc.wait(timeout=10)
        process.lines.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    # (the pass once the kernel monitor listens compares and finds nothing to write: "unchanged")
    records = [r for r in records if r["result"] != "unchanged"]
    assert [(r["trigger"], r["result"]) for r in records][:2] == [("startup", "applied"), ("cidr-files", "applied")]
    assert records[1]["added"] == {"ipv4": ["198.51.100.0/24"]}
