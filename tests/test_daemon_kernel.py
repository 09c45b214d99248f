"""The daemon against a real kernel: ``masqd run`` inside a throw-away namespace, real iptables.

Resync heals drift made by someone else (a flushed chain, a deleted or duplicated jump, a rule
changed by hand); an unchanged kernel sees no writes however often the resync runs; a config edit
reaches the kernel without waiting for the resync.
"""

from __future__ import annotations

import os
import sys

import pytest

from masqd.http import DEFAULT_ADDRESS
from masqd.testing import netns
from masqd.testing.netns import CHAIN, chain_lines, jumps

pytestmark = pytest.mark.netns


def is_tick(event: dict) -> bool:
    return event.get("trigger") == "timer" and event.get("event") in ("in sync", "rules restored after outside change")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(["iptables", "-t", "nat", "-F", CHAIN], id="chain-flushed"),
        pytest.param(["iptables", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment",
                      f"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {CHAIN} chain",
                      "-m", "addrtype", "!", "--dst-type", "LOCAL", "-j", CHAIN], id="jump-deleted"),
        pytest.param(["iptables", "-t", "nat", "-I", CHAIN, "1", "-j", "RETURN"], id="rule-inserted"),
        pytest.param(["iptables", "-t", "nat", "-D", CHAIN, "2"], id="rule-deleted"),
    ],
)
def test_resync_restores_rules_changed_by_someone_else(node_ns, daemon, damage):
    d = daemon("resyncInterval: 200ms\nnonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n")
    good_chain, good_jumps = chain_lines(node_ns), jumps(node_ns)
    assert good_jumps == 1 and len(good_chain) == 4
    netns.run(node_ns, *damage)  # checked: fails the test if iptables refused it
    # the restore is logged only when the read-back differed, i.e. the damage was seen
    restored = d.next_event(lambda e: e.get("event") == "rules restored after outside change")
    assert restored["trigger"] == "timer"
    assert chain_lines(node_ns) == good_chain and jumps(node_ns) == 1


def test_unchanged_kernel_sees_no_writes(node_ns, daemon):
    d = daemon("resyncInterval: 100ms\n")
    listing = netns.run(node_ns, "nft", "-a", "list", "table", "ip", "nat").stdout
    for _ in range(10):  # ten resync ticks, each one reading the kernel back
        d.next_event(is_tick)
    assert [e for e in d.writes() if e.get("trigger") == "timer"] == []
    # nft rule handles change on any rewrite: identical handles prove nothing was written
    assert netns.run(node_ns, "nft", "-a", "list", "table", "ip", "nat").stdout == listing


def test_config_edit_reaches_the_kernel_without_waiting_for_resync(node_ns, daemon, tmp_path):
    d = daemon("resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8]\n")
    staged = tmp_path / "staged"
    staged.write_text("resyncInterval: 1h\nnonMasqueradeCIDRs: [203.0.113.0/24]\n")
    os.replace(staged, tmp_path / "config")
    update = d.next_event(lambda e: e.get("event") == "rules updated")
    assert update["trigger"] == "file"
    assert update["cidrs_added"] == ["203.0.113.0/24"] and update["cidrs_removed"] == ["10.0.0.0/8"]
    assert [line.split()[3] for line in chain_lines(node_ns)[:-1]] == ["169.254.0.0/16", "203.0.113.0/24"]


def test_bad_config_keeps_kernel_rules_and_still_heals_drift(node_ns, daemon, tmp_path):
    d = daemon("resyncInterval: 100ms\nnonMasqueradeCIDRs: [10.0.0.0/8]\n")
    before = netns.iptables_save(node_ns)
    (tmp_path / "config").write_text("resyncInterval: 100ms\nnonMasqueradeCIDRs: [10.0.0.0/8, 300.0.0.0/8]\n")
    rejected = d.next_event(lambda e: e.get("event") == "config rejected; keeping the rules last applied")
    assert any("300.0.0.0/8" in p for p in rejected["problems"])
    for _ in range(3):  # the resync keeps checking the last good rules
        d.next_event(is_tick)
    assert netns.iptables_save(node_ns) == before
    # drift while the config is still bad: the last good rules are put back, not dropped
    netns.run(node_ns, "iptables", "-t", "nat", "-F", CHAIN)
    d.next_event(lambda e: e.get("event") == "rules restored after outside change")
    assert netns.iptables_save(node_ns) == before
    assert d.proc.poll() is None  # still running
    assert d.stop() == 0


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_snat_to_an_address_not_on_the_node_waits_for_it_and_keeps_the_rules_when_it_leaves(node_ns, tmp_path,
                                                                                           backend):
    from masqd_proc import DaemonProcess

    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\nsnatToAddress: 192.0.2.77\n")
    d = DaemonProcess(node_ns, config, backend=backend)
    try:
        refused = d.next_event(lambda e: e.get("event") == "SNAT address not on this node, new state refused; keeping the rules last applied")
        assert refused["problems"] == ["snatToAddress: '192.0.2.77': not assigned to any interface in masqd's network "
                                       "namespace; the rules last applied stay, and the state is applied once the "
                                       "address is here (the daemon checks again when an address changes, and at each "
                                       "resync)"]
        assert _snat_rules(node_ns, backend) == []  # nothing written
        netns.run(node_ns, "ip", "addr", "add", "192.0.2.99/32", "dev", "lo")  # another address: no pass
        netns.run(node_ns, "ip", "addr", "add", "192.0.2.77/32", "dev", "lo")  # a VIP arriving
        applied = d.next_event(lambda e: e.get("event") == "rules applied")
        assert applied["trigger"] == "addresses"
        assert _snat_rules(node_ns, backend) != []
        netns.run(node_ns, "ip", "addr", "del", "192.0.2.77/32", "dev", "lo")  # and leaving again
        d.next_event(lambda e: e.get("event") == "SNAT address not on this node, new state refused; keeping the rules last applied")
        assert _snat_rules(node_ns, backend) != []  # the rules last applied stay
        readyz = _get(node_ns, "/readyz")  # the rules still SNAT to an address gone elsewhere: not ready
        assert readyz.startswith("not ready: the rules applied SNAT to 192.0.2.77, no longer assigned"), readyz
        assert "snatToAddress: '192.0.2.77': not assigned to any interface" in readyz, readyz
    finally:
        d.kill()


def _get(ns: str, path: str) -> str:
    """The body of the daemon's endpoint at ``path`` (its default address), read inside ``ns``."""
    script = ("import urllib.request, urllib.error, sys\n"
              "try: print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
              "except urllib.error.HTTPError as e: print(e.read().decode())")
    return netns.run(ns, sys.executable, "-c", script, f"http://127.0.0.1:{DEFAULT_ADDRESS.rsplit(':', 1)[1]}{path}").stdout


def _snat_rules(ns: str, backend: str) -> list[str]:
    if backend == "iptables":
        return [line for line in chain_lines(ns) if "SNAT --to-source 192.0.2.77" in line]
    listing = netns.run(ns, "nft", "list", "table", "ip", "masqd", check=False).stdout
    return [line.strip() for line in listing.splitlines() if "snat to 192.0.2.77" in line]


DECISIONS = ("resyncInterval: 200ms\nnonMasqueradeCIDRs: [10.0.0.0/8]\nmasqueradeCIDRs: [10.99.0.0/16]\n"
             "nonMasqueradeSourceCIDRs: [10.244.9.0/24]\nmasqueradeSourceCIDRs: [10.244.0.0/16]\n"
             "outputInterfaces: [vdst, eth+]\n")


@pytest.mark.parametrize("damage", [
    pytest.param(["iptables", "-t", "nat", "-D", CHAIN, "1"], id="source-rule-deleted"),
    pytest.param(["iptables", "-t", "nat", "-R", CHAIN, "-1"], id="last-rule-replaced"),  # replaced below
])
def test_resync_restores_the_decision_models_rules(node_ns, daemon, damage):
    d = daemon(DECISIONS)
    good = chain_lines(node_ns)
    assert good[0].startswith(f"-A {CHAIN} -s 10.244.9.0/24 ") and good[-1].startswith(f"-A {CHAIN} -s 10.244.0.0/16 -o eth+ ")
    if damage[-1] == "-1":  # the last masquerade rule loses its interface match
        damage = damage[:-1] + [str(len(good)), "-s", "10.244.0.0/16", "-j", "MASQUERADE"]
    netns.run(node_ns, *damage)
    assert chain_lines(node_ns) != good
    d.next_event(lambda e: e.get("event") == "rules restored after outside change")
    assert chain_lines(node_ns) == good
