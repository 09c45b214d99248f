"""masqd's iptables backend against the real kernel, inside throw-away network namespaces.

Every test runs ``masqd run --once --backend iptables`` inside a node namespace (see
``masqd.testing.netns`` for the pod -> node -> dest topology) and checks what the kernel then does:
the source address a destination sees, and what ``iptables-save`` shows. Expected rule texts are
written out here from the compatibility contract in the design (the upstream agent's rules), not
taken from masqd's renderer.

The packet tests run against both backends with the same expectations: the same config must
give the same per-destination decision on iptables and on nftables, packet for packet.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from masqd_proc import writes_logged
from support import write_atomically

from masqd.testing import netns
from masqd.testing import topology as layout
from masqd.testing.netns import CHAIN, jump_rule, masqd_lines

pytestmark = pytest.mark.netns

JUMP_COMMENT = "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {chain} chain"
KEEP_COMMENT = "ip-masq-agent: local traffic is not subject to MASQUERADE"
MASQ_COMMENT = "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)"
BUILTIN_NAT_CHAINS = (":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]")

RFC1918 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
RESERVED = ("100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
            "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4")
LINK_LOCAL = {4: "169.254.0.0/16", 6: "fe80::/10"}

#: Backends whose packet decisions must be identical (the packet tests run against each).
PACKET_BACKENDS = [pytest.param("iptables", id="iptables"), pytest.param("nftables", id="nftables")]

POD = {4: layout.POD_V4, 6: layout.POD_V6}
NODE = {4: layout.NODE_V4, 6: layout.NODE_V6}


# --- expected rule texts, as `iptables-save -t nat` prints them ---------------------------------------


def jump_args(chain: str = CHAIN) -> list[str]:
    """The jump as iptables command-line arguments (for adding/deleting copies by hand)."""
    return ["-m", "comment", "--comment", JUMP_COMMENT.format(chain=chain), "-m", "addrtype", "!", "--dst-type", "LOCAL",
            "-j", chain]


def keep(cidr: str, chain: str = CHAIN) -> str:
    return f'-A {chain} -d {cidr} -m comment --comment "{KEEP_COMMENT}" -j RETURN'


def masq(chain: str = CHAIN, random_fully: bool = True) -> str:
    return f'-A {chain} -m comment --comment "{MASQ_COMMENT}" -j MASQUERADE' + (" --random-fully" if random_fully else "")


def port_masq(protocol: str, ports: str, probability: str | None = None, chain: str = CHAIN,
              random_fully: bool = True) -> str:
    statistic = f" -m statistic --mode random --probability {probability}" if probability else ""
    return (f'-A {chain} -p {protocol} -m comment --comment "{MASQ_COMMENT}"{statistic} -j MASQUERADE --to-ports {ports}'
            + (" --random-fully" if random_fully else ""))


def nat_table(rules: list[str], chain: str = CHAIN) -> str:
    """The whole nat table of a namespace holding nothing but masqd's chain and jump."""
    lines = ["*nat", *BUILTIN_NAT_CHAINS, f":{chain} - [0:0]", jump_rule(chain), *rules, "COMMIT"]
    return "".join(line + "\n" for line in lines)


def foreign(save_text: str, chain: str = CHAIN) -> list[str]:
    """Every line of ``save_text`` that is not masqd's."""
    mine = set(masqd_lines(save_text, chain))
    return [line for line in save_text.splitlines() if line not in mine]


def nft_nat(ns: str, family: int) -> str:
    """``nft -a list table ip|ip6 nat``: rule handles change whenever a rule is rewritten, so an
    unchanged listing proves masqd wrote nothing (iptables-save cannot tell a rewrite apart)."""
    return netns.run(ns, "nft", "-a", "list", "table", "ip" if family == 4 else "ip6", "nat").stdout


def family_flags(family: int) -> list[str]:
    return ["--enable-ipv6"] if family == 6 else []


def iptables(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


# --- packets: which source address does the destination see? --------------------------------------


def test_without_masqd_the_pod_address_is_kept(topology):
    """The topology itself does no NAT: what the later tests observe is masqd's doing."""
    for dest in layout.DEST_V4 + layout.DEST_V6:
        assert topology.source_seen(dest) == POD[6 if ":" in dest else 4], dest


@pytest.mark.parametrize(
    "config, flags, expected",
    [
        pytest.param(None, [], {"10.99.0.2": "pod", "192.0.2.2": "node", "198.51.100.2": "node"},
                     id="defaults-rfc1918-kept-rest-masqueraded"),
        pytest.param("nonMasqueradeCIDRs: [198.51.100.0/24]\n", [],
                     {"198.51.100.2": "pod", "192.0.2.2": "node", "203.0.113.2": "node", "10.99.0.2": "node"},
                     id="custom-list-replaces-defaults"),
        pytest.param("nonMasqueradeCIDRs: [0.0.0.0/0]\n", [],
                     {"192.0.2.2": "pod", "198.51.100.2": "pod", "203.0.113.2": "pod", "10.99.0.2": "pod"},
                     id="everything-kept"),
        pytest.param('{"nonMasqueradeCIDRs": []}', [],
                     {"10.99.0.2": "node", "192.0.2.2": "node"},
                     id="empty-list-json-masquerades-everything"),
        pytest.param(None, ["--nomasq-all-reserved-ranges"],
                     {"192.0.2.2": "pod", "198.51.100.2": "pod", "203.0.113.2": "pod", "10.99.0.2": "pod"},
                     id="nomasq-all-reserved-ranges"),
        pytest.param("nonMasqueradeCIDRs: [2001:db8:1::/64]\n", ["--enable-ipv6"],
                     {"2001:db8:1::2": "pod", "2001:db8:2::2": "node", "192.0.2.2": "node", "10.99.0.2": "node"},
                     id="ipv6-custom-list"),
        pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8, 2001:db8:2::/64]\n", ["--enable-ipv6"],
                     {"2001:db8:1::2": "node", "2001:db8:2::2": "pod", "10.99.0.2": "pod", "192.0.2.2": "node"},
                     id="ipv6-mixed-list"),
        pytest.param(None, ["--enable-ipv6"], {"2001:db8:1::2": "node", "2001:db8:2::2": "node"},
                     id="ipv6-defaults-masquerade-all-but-link-local"),
        pytest.param(None, [], {"2001:db8:1::2": "pod", "192.0.2.2": "node"},
                     id="ipv6-untouched-without-enable-ipv6"),
    ],
)
@pytest.mark.parametrize("backend", PACKET_BACKENDS)
def test_source_address_seen_by_destination(topology, masqd, backend, config, flags, expected):
    masqd.ok(topology.node, *flags, config=config, backend=backend)
    seen = {dest: topology.source_seen(dest) for dest in expected}
    want = {dest: (POD if who == "pod" else NODE)[6 if ":" in dest else 4] for dest, who in expected.items()}
    assert seen == want


@pytest.mark.parametrize(
    "to_ports, intervals",
    [
        pytest.param("2000-2099", [(2000, 2099)], id="one-interval"),
        pytest.param("2000-2009,3000-3009", [(2000, 2009), (3000, 3009)], id="two-intervals"),
    ],
)
@pytest.mark.parametrize("backend", PACKET_BACKENDS)
def test_to_ports_maps_the_source_port(topology, masqd, backend, to_ports, intervals):
    masqd.ok(topology.node, "--to-ports", to_ports, backend=backend)
    for _ in range(3):  # fresh flows, so a split over intervals is exercised more than once
        source, port = topology.datagram_seen("192.0.2.2")
        assert source == layout.NODE_V4
        assert any(first <= port <= last for first, last in intervals), port
    assert topology.source_seen("10.99.0.2") == layout.POD_V4  # exempt destinations are still not NATed at all


LINK_LOCAL_DEST = "169.254.9.2"  # owned by the dest namespace in the test below


@pytest.mark.parametrize("backend", PACKET_BACKENDS)
@pytest.mark.parametrize(
    "config, flags, exempt",
    [
        pytest.param(None, [], True, id="default-exempt"),
        pytest.param("masqLinkLocal: false\n", [], True, id="masqLinkLocal-false"),
        pytest.param("masqLinkLocal: true\n", [], False, id="masqLinkLocal-true"),
        pytest.param("masqLinkLocal: true\nnonMasqueradeCIDRs: [169.254.9.0/24]\n", [], True,
                     id="masqLinkLocal-true-but-listed"),
        pytest.param("masqLinkLocalIPv6: true\n", ["--enable-ipv6"], True, id="masqLinkLocalIPv6-does-not-affect-v4"),
    ],
)
def test_link_local_destination_packets(topology, masqd, backend, config, flags, exempt):
    """A datagram to a 169.254.0.0/16 address routed through the node keeps the pod address
    unless masqLinkLocal is true (the IPv6 counterpart, fe80::/10, is never forwarded by a router,
    so it is checked on the rules instead)."""
    topology.add_destination(LINK_LOCAL_DEST, "169.254.9.0/24")
    assert topology.source_seen(LINK_LOCAL_DEST) == layout.POD_V4  # routed, and no NAT without masqd
    masqd.ok(topology.node, *flags, config=config, backend=backend)
    assert topology.source_seen(LINK_LOCAL_DEST) == (layout.POD_V4 if exempt else layout.NODE_V4)
    assert topology.source_seen("192.0.2.2") == layout.NODE_V4  # and everything else is still masqueraded


@pytest.mark.parametrize(
    "config, flags, family, exempt",
    [
        pytest.param(None, [], 4, True, id="v4-default-169.254-exempt"),
        pytest.param("masqLinkLocal: false\n", [], 4, True, id="v4-masqLinkLocal-false"),
        pytest.param("masqLinkLocal: true\n", [], 4, False, id="v4-masqLinkLocal-true"),
        pytest.param(None, ["--enable-ipv6"], 6, True, id="v6-default-fe80-exempt"),
        pytest.param("masqLinkLocalIPv6: false\n", ["--enable-ipv6"], 6, True, id="v6-masqLinkLocalIPv6-false"),
        pytest.param("masqLinkLocalIPv6: true\n", ["--enable-ipv6"], 6, False, id="v6-masqLinkLocalIPv6-true"),
        pytest.param("masqLinkLocal: true\n", ["--enable-ipv6"], 6, True, id="v6-unaffected-by-masqLinkLocal"),
    ],
)
def test_link_local_exemption(node_ns, masqd, config, flags, family, exempt):
    masqd.ok(node_ns, *flags, config=config)
    rules = [line for line in masqd_lines(netns.iptables_save(node_ns, family)) if line.startswith(f"-A {CHAIN} ")]
    if exempt:
        assert rules[0] == keep(LINK_LOCAL[family])  # first, before any configured CIDR
    else:
        assert not any(LINK_LOCAL[family] in rule for rule in rules)


# --- the kernel holds exactly the upstream agent's rules --------------------------------------------

TO_PORTS_TWO = [
    port_masq(protocol, ports, probability)
    for protocol in ("tcp", "udp", "sctp")
    # 1024-29999 is 28976 ports of 61744: P = 28976/61744, stored by the kernel as round(P * 2**31)
    # and printed by iptables-save as that / 2**31 to 11 decimals.
    for ports, probability in (("1024-29999", "0.46929256292"), ("32768-65535", None))
]
TO_PORTS_THREE = [
    port_masq(protocol, ports, probability, random_fully=False)
    for protocol in ("tcp", "udp", "sctp")
    for ports, probability in (("1000-1999", "0.33333333349"), ("3000-3999", "0.50000000000"), ("5000-5999", None))
]


@pytest.mark.parametrize(
    "config, flags, chain, expected",
    [
        pytest.param(None, [], CHAIN, {4: [keep(LINK_LOCAL[4]), *map(keep, RFC1918), masq()]}, id="defaults"),
        pytest.param("nonMasqueradeCIDRs:\n  - 198.51.100.0/24\n  - 10.0.0.0/8\nmasqLinkLocal: true\n", [], CHAIN,
                     {4: [keep("198.51.100.0/24"), keep("10.0.0.0/8"), masq()]}, id="custom-list-in-file-order"),
        pytest.param(None, ["--nomasq-all-reserved-ranges"], CHAIN,
                     {4: [keep(LINK_LOCAL[4]), *map(keep, RFC1918 + RESERVED), masq()]}, id="nomasq-all-reserved-ranges"),
        pytest.param(None, ["--random-fully=false"], CHAIN,
                     {4: [keep(LINK_LOCAL[4]), *map(keep, RFC1918), masq(random_fully=False)]}, id="random-fully-false"),
        pytest.param("nonMasqueradeCIDRs: [192.0.2.0/24]\n", ["-masq-chain=MQ-TEST", "-v=2", "--logtostderr"], "MQ-TEST",
                     {4: [keep(LINK_LOCAL[4], "MQ-TEST"), keep("192.0.2.0/24", "MQ-TEST"), masq("MQ-TEST")]},
                     id="go-style-flags-custom-chain"),
        pytest.param(None, ["--masq-chain", "A" * 28], "A" * 28,
                     {4: [keep(LINK_LOCAL[4], "A" * 28), *(keep(c, "A" * 28) for c in RFC1918), masq("A" * 28)]},
                     id="longest-chain-name-28"),
        pytest.param("nonMasqueradeCIDRs: [192.0.2.0/24, 10.0.0.0/8, 192.0.2.0/24]\n", [], CHAIN,
                     {4: [keep(LINK_LOCAL[4]), keep("192.0.2.0/24"), keep("10.0.0.0/8"), keep("192.0.2.0/24"), masq()]},
                     id="duplicates-kept-like-upstream"),
        pytest.param("nonMasqueradeCIDRs: [192.0.2.0/24, 2001:db8:1::/64]\n", ["--enable-ipv6"], CHAIN,
                     {4: [keep(LINK_LOCAL[4]), keep("192.0.2.0/24"), masq()],
                      6: [keep(LINK_LOCAL[6]), keep("2001:db8:1::/64"), masq()]}, id="ipv4-and-ipv6"),
        pytest.param("nonMasqueradeCIDRs: [2001:db8:1::/64]\nmasqLinkLocalIPv6: true\n", ["--enable-ipv6"], CHAIN,
                     {4: [keep(LINK_LOCAL[4]), masq()], 6: [keep("2001:db8:1::/64"), masq()]},
                     id="ipv6-link-local-masqueraded"),
        pytest.param(None, ["--to-ports", "1024-29999,32768-65535"], CHAIN,
                     {4: [keep(LINK_LOCAL[4]), *map(keep, RFC1918), *TO_PORTS_TWO, masq()]}, id="to-ports-two-intervals"),
        pytest.param("nonMasqueradeCIDRs: []\n", ["--to-ports=1000-1999,3000-3999,5000-5999", "--random-fully=false"], CHAIN,
                     {4: [keep(LINK_LOCAL[4]), *TO_PORTS_THREE, masq(random_fully=False)]},
                     id="to-ports-three-intervals-no-random-fully"),
        pytest.param(None, ["--enable-ipv6", "--to-ports", "1024-29999,32768-65535"], CHAIN,
                     {4: [keep(LINK_LOCAL[4]), *map(keep, RFC1918), *TO_PORTS_TWO, masq()],
                      6: [keep(LINK_LOCAL[6]), *TO_PORTS_TWO, masq()]}, id="to-ports-ipv6"),
    ],
)
def test_kernel_holds_exactly_the_upstream_rules(node_ns, masqd, config, flags, chain, expected):
    masqd.ok(node_ns, *flags, config=config)
    for family in (4, 6):
        save = netns.iptables_save(node_ns, family)
        if family not in expected:
            assert save == "".join(f"{line}\n" for line in ("*nat", *BUILTIN_NAT_CHAINS, "COMMIT")), "table touched"
            continue
        assert masqd_lines(save, chain) == [f":{chain} - [0:0]", jump_rule(chain), *expected[family]]
        assert save == nat_table(expected[family], chain)
    # The rendering matches the kernel's canonical form, so a second run finds nothing to write.
    handles = {family: nft_nat(node_ns, family) for family in expected}
    second = masqd.ok(node_ns, *flags, config=config)
    assert writes_logged(second.stderr) == []
    assert {family: nft_nat(node_ns, family) for family in expected} == handles


@pytest.mark.parametrize(
    "cidr, family",
    [
        pytest.param("0.0.0.0/1", 4, id="v4-half"),
        pytest.param("192.0.2.7/32", 4, id="v4-host"),
        pytest.param("2001:DB8:0:0:1::/80", 6, id="v6-uppercase-uncompressed"),
        pytest.param("2001:db8::1/128", 6, id="v6-host"),
        # iptables-save prints no -d for /0, and inet_ntop's dotted form for embedded IPv4
        pytest.param("0.0.0.0/0", 4, id="v4-everything"),
        pytest.param("::/0", 6, id="v6-everything"),
        pytest.param("::ffff:192.0.2.0/120", 6, id="v6-ipv4-mapped"),
        pytest.param("::ffff:0.0.0.0/96", 6, id="v6-ipv4-mapped-zero"),
        pytest.param("::192.0.2.0/120", 6, id="v6-ipv4-compatible"),
        pytest.param("::0.0.1.0/120", 6, id="v6-low-not-dotted"),
        pytest.param("1::ffff:c000:200/120", 6, id="v6-ffff-not-mapped"),
    ],
)
def test_second_run_writes_nothing_whatever_the_cidr_spelling(node_ns, masqd, cidr, family):
    """The design's "no blind re-apply": an unchanged kernel sees no writes. That needs the rendered
    rules to match iptables-save's canonical form for every accepted CIDR."""
    config = f'nonMasqueradeCIDRs: ["{cidr}"]\n'
    masqd.ok(node_ns, "--enable-ipv6", config=config)
    handles = nft_nat(node_ns, family)
    second = masqd.ok(node_ns, "--enable-ipv6", config=config)
    assert [event["reason"] for event in writes_logged(second.stderr)] == []
    assert nft_nat(node_ns, family) == handles


# --- idempotency, drift, and other actors' rules ----------------------------------------------------

FOREIGN_RULES = {
    4: """*nat
:MQ-CUSTOM - [0:0]
-A POSTROUTING -s 10.244.9.0/24 -j MQ-CUSTOM
-A MQ-CUSTOM -d 203.0.113.0/24 -j RETURN
-A MQ-CUSTOM -p udp -j SNAT --to-source 172.30.0.1
COMMIT
*filter
:MQ-FILTER - [0:0]
-A FORWARD -s 10.244.9.0/24 -j MQ-FILTER
-A MQ-FILTER -p tcp --dport 443 -j ACCEPT
COMMIT
""",
    6: """*nat
:MQ-CUSTOM - [0:0]
-A POSTROUTING -s fd00:9::/64 -j MQ-CUSTOM
-A MQ-CUSTOM -d 2001:db8:9::/64 -j RETURN
-A MQ-CUSTOM -p udp -j SNAT --to-source fd00:30::1
COMMIT
*filter
:MQ-FILTER - [0:0]
-A FORWARD -s fd00:9::/64 -j MQ-FILTER
-A MQ-FILTER -p tcp --dport 443 -j ACCEPT
COMMIT
""",
}


@pytest.mark.parametrize("families", [pytest.param((4,), id="ipv4"), pytest.param((4, 6), id="ipv4-and-ipv6")])
def test_runs_are_idempotent_and_leave_other_rules_alone(node_ns, masqd, families):
    flags = family_flags(max(families))
    for family in (4, 6):
        netns.run(node_ns, f"{iptables(family)}-restore", "--noflush", input=FOREIGN_RULES[family])
    before = {family: netns.iptables_save(node_ns, family, table=None) for family in (4, 6)}
    filter_before = {family: netns.iptables_save(node_ns, family, table="filter") for family in (4, 6)}

    masqd.ok(node_ns, *flags)
    after_first = {family: netns.iptables_save(node_ns, family, table=None) for family in (4, 6)}
    for family in (4, 6):
        assert netns.iptables_save(node_ns, family, table="filter") == filter_before[family]
        if family not in families:
            assert after_first[family] == before[family]
            continue
        assert foreign(after_first[family]) == before[family].splitlines()  # same lines, same order
        nat = netns.iptables_save(node_ns, family)
        postrouting = [line for line in nat.splitlines() if line.startswith("-A POSTROUTING ")]
        assert postrouting[-1] == jump_rule() and postrouting.count(jump_rule()) == 1  # appended after the foreign rule
    handles = {family: nft_nat(node_ns, family) for family in families}

    second = masqd.ok(node_ns, *flags)
    third = masqd.ok(node_ns, *flags, alias=True)
    for run in (second, third):
        assert writes_logged(run.stderr) == []
    assert {family: netns.iptables_save(node_ns, family, table=None) for family in (4, 6)} == after_first
    assert {family: nft_nat(node_ns, family) for family in families} == handles


DRIFT = [
    pytest.param(4, [["-A", "POSTROUTING", *jump_args()]], id="second-jump"),
    pytest.param(4, [["-A", "POSTROUTING", *jump_args()]] * 2, id="third-jump"),
    pytest.param(4, [["-I", "POSTROUTING", "1", *jump_args()]], id="extra-jump-inserted-first"),
    pytest.param(4, [["-D", "POSTROUTING", *jump_args()]], id="jump-deleted"),
    pytest.param(4, [["-D", CHAIN, "2"]], id="rule-deleted"),
    pytest.param(4, [["-I", CHAIN, "1", "-d", "192.0.2.0/24", "-j", "RETURN"]], id="rule-added"),
    pytest.param(4, [["-F", CHAIN]], id="chain-flushed"),
    pytest.param(4, [["-D", "POSTROUTING", *jump_args()], ["-F", CHAIN], ["-X", CHAIN]], id="chain-and-jump-deleted"),
    pytest.param(6, [["-A", "POSTROUTING", *jump_args()]], id="ipv6-second-jump"),
    pytest.param(6, [["-F", CHAIN]], id="ipv6-chain-flushed"),
]


@pytest.mark.parametrize("family, edits", DRIFT)
def test_next_run_heals_drift(node_ns, masqd, family, edits):
    flags = family_flags(family)
    masqd.ok(node_ns, *flags)
    good = netns.iptables_save(node_ns, family)
    for edit in edits:
        netns.run(node_ns, iptables(family), "-t", "nat", *edit)
    assert netns.iptables_save(node_ns, family) != good
    healed = masqd.ok(node_ns, *flags)
    assert netns.iptables_save(node_ns, family) == good
    assert masqd_lines(good).count(jump_rule()) == 1
    assert writes_logged(healed.stderr), "the repair should be logged as a write"


IPV6 = ["--enable-ipv6"]
CONFIG_A = "nonMasqueradeCIDRs: [192.0.2.0/24, 198.51.100.0/24, 10.0.0.0/8]\n"
CONFIG_B = "nonMasqueradeCIDRs: [203.0.113.0/24]\n"
RULES_A = (keep(LINK_LOCAL[4]), keep("192.0.2.0/24"), keep("198.51.100.0/24"), keep("10.0.0.0/8"), masq())
RULES_B = (keep(LINK_LOCAL[4]), keep("203.0.113.0/24"), masq())


def test_config_change_replaces_the_chain_atomically(topology, masqd):
    masqd.ok(topology.node, config=CONFIG_A)
    assert topology.source_seen("192.0.2.2") == layout.POD_V4

    # Watch the chain from outside while it is rewritten: every snapshot must be A or B in full,
    # never empty, half-written or a mix.
    snapshots: list[tuple[str, ...]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            save = netns.iptables_save(topology.node)
            snapshots.append(tuple(line for line in masqd_lines(save) if line.startswith(f"-A {CHAIN} ")))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for config in (CONFIG_B, CONFIG_A, CONFIG_B):
            masqd.ok(topology.node, config=config)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert snapshots and set(snapshots) <= {RULES_A, RULES_B}

    assert netns.iptables_save(topology.node) == nat_table(list(RULES_B))
    seen = {dest: topology.source_seen(dest) for dest in ("192.0.2.2", "198.51.100.2", "10.99.0.2", "203.0.113.2")}
    assert seen == {"192.0.2.2": layout.NODE_V4, "198.51.100.2": layout.NODE_V4, "10.99.0.2": layout.NODE_V4,
                    "203.0.113.2": layout.POD_V4}


@pytest.mark.parametrize(
    "bad_config, flags, fragments",
    [
        pytest.param("nonMasqueradeCIDRs: [10.0.0.1/8]\n", IPV6, ["nonMasqueradeCIDRs[0]", "10.0.0.1/8", "10.0.0.0/8"],
                     id="misaligned-cidr"),
        pytest.param("nonMasqueradeCIDRs: [192.0.2.0/33]\n", IPV6, ["nonMasqueradeCIDRs[0]", "192.0.2.0/33"], id="bad-prefix"),
        pytest.param("nonMasqueradeCIDRs: [2001:db8:1::/64]\n", [], ["nonMasqueradeCIDRs[0]", "--enable-ipv6"],
                     id="ipv6-without-enable-ipv6"),
        pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8\n", IPV6, ["not valid YAML or JSON"], id="broken-yaml"),
        pytest.param("cidrLimit: 1\nnonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n", IPV6, ["cidrLimit=1"], id="over-cidr-limit"),
        pytest.param("masqLinkLocal: maybe\n", IPV6, ["masqLinkLocal", "true or false"], id="bad-bool"),
        pytest.param("resyncInterval: 60\n", IPV6, ["resyncInterval", "Go duration"], id="resync-not-a-duration"),
        pytest.param("- 10.0.0.0/8\n", IPV6, ["<top level>", "mapping"], id="not-a-mapping"),
    ],
)
def test_invalid_config_exits_1_and_keeps_the_last_good_rules(node_ns, masqd, bad_config, flags, fragments):
    masqd.ok(node_ns, "--enable-ipv6", config=CONFIG_A)
    good = {family: netns.iptables_save(node_ns, family, table=None) for family in (4, 6)}
    handles = {family: nft_nat(node_ns, family) for family in (4, 6)}

    result = masqd(node_ns, *flags, config=bad_config)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr
    for fragment in fragments:
        assert any(fragment in line for line in errors), (fragment, result.stderr)
    assert {family: netns.iptables_save(node_ns, family, table=None) for family in (4, 6)} == good
    assert {family: nft_nat(node_ns, family) for family in (4, 6)} == handles


# --- the xtables lock (iptables-legacy; the nft variant takes no lock) -------------------------------

LEGACY = 'Binaries("iptables-legacy-save", "iptables-legacy-restore", "iptables-legacy")'
_RESTORE_IN_NAMESPACE = f"""
import sys, anyio
import masqd.backends.iptables.executor as executor
from masqd.backends.iptables import SubprocessExecutor
from masqd.backends.iptables_mode import Binaries
from masqd.errors import ApplyError
if len(sys.argv) > 1:
    executor.LOCK_WAIT_SECONDS = int(sys.argv[1])
executor = SubprocessExecutor(binaries={{4: {LEGACY}}})
text = "*nat\\n:MQ-LOCKED - [0:0]\\n-A MQ-LOCKED -d 192.0.2.0/24 -j RETURN\\nCOMMIT\\n"
print("ready", flush=True)
try:
    anyio.run(executor.restore, 4, text)
except ApplyError as exc:
    print("apply-error " + str(exc), flush=True)
    sys.exit(3)
print("done", flush=True)
"""


def _lock_waiters(lockfile: Path) -> int:
    """How many processes are blocked waiting for a flock on ``lockfile``."""
    suffix = f":{os.stat(lockfile).st_ino} "
    with open("/proc/locks") as locks:
        return sum(1 for line in locks if " -> FLOCK " in line and suffix in line)


def _lock_env(lockfile: Path) -> dict[str, str]:
    return {**os.environ, "XTABLES_LOCKFILE": str(lockfile)}


def _start_restore(ns: str, lockfile: Path, *args: str) -> subprocess.Popen[str]:
    return netns.popen(ns, sys.executable, "-c", _RESTORE_IN_NAMESPACE, *args,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_lock_env(lockfile))


def _legacy_chain(ns: str) -> list[str]:
    # iptables-legacy-save takes no lock, so it can look while the lock is held.
    return [line for line in netns.iptables_save(ns, binary="iptables-legacy-save").splitlines() if "MQ-LOCKED" in line]


@pytest.fixture
def xtables_lock(tmp_path):
    """A private xtables lock file (passed to iptables as XTABLES_LOCKFILE, so the host's
    /run/xtables.lock is never contended) and a descriptor on it, not locked yet. Locking it with
    ``fcntl.flock`` holds the lock as another iptables process would."""
    if shutil.which("iptables-legacy-restore") is None or shutil.which("iptables-legacy-save") is None:
        pytest.skip("iptables-legacy is not installed")
    lockfile = tmp_path / "xtables.lock"
    fd = os.open(lockfile, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        yield lockfile, fd
    finally:
        os.close(fd)  # releases the lock if the test has not


@pytest.fixture
def held_lock(xtables_lock):
    """An exclusive flock on a private xtables lock file, as another iptables process would hold."""
    fcntl.flock(xtables_lock[1], fcntl.LOCK_EX)
    return xtables_lock


def test_restore_waits_for_the_xtables_lock(node_ns, held_lock):
    lockfile, fd = held_lock
    process = _start_restore(node_ns, lockfile)
    try:
        assert process.stdout.readline().strip() == "ready"
        # the restore is blocked on our lock: the kernel lists it as a waiter ("->") in /proc/locks
        assert netns.wait_for(lambda: _lock_waiters(lockfile) > 0, timeout=20), "restore never waited for the lock"
        assert process.poll() is None, process.communicate()
        assert _legacy_chain(node_ns) == [], "the restore went ahead while the lock was held"
        fcntl.flock(fd, fcntl.LOCK_UN)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert stdout.splitlines()[-1] == "done"
    assert _legacy_chain(node_ns) == [":MQ-LOCKED - [0:0]", "-A MQ-LOCKED -d 192.0.2.0/24 -j RETURN"]


def test_lock_held_past_the_wait_is_an_apply_error(node_ns, held_lock):
    lockfile, _ = held_lock
    process = _start_restore(node_ns, lockfile, "1")  # -w 1 instead of the default wait
    try:
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 3, stderr
    message = stdout.split("apply-error ", 1)[-1]
    assert message.startswith("iptables-legacy-restore -w 1 --noflush exited 4:"), stdout
    assert "holding the xtables lock" in message
    assert _legacy_chain(node_ns) == []


# --- the daemon and a held xtables lock ------------------------------------------------------------

LOCK_BEFORE = "resyncInterval: 1h\nnonMasqueradeCIDRs: [198.51.100.0/24]\n"
LOCK_AFTER = "resyncInterval: 1h\nnonMasqueradeCIDRs: [203.0.113.0/24]\n"
LOCK_HELD_SECONDS = 3.0
HTTP_ADDRESS = "127.0.0.1:9142"  # inside the test's namespace
#: ``masqd`` with a shorter xtables lock wait, so a lock held past it costs seconds, not tens.
_MASQD_SHORT_LOCK_WAIT = """
import sys
import masqd.backends.iptables.executor as executor
executor.LOCK_WAIT_SECONDS = int(sys.argv.pop(1))
from masqd.cli import main
sys.exit(main())
"""
_HTTP_GET = """
import sys, urllib.error, urllib.request
try:
    answer = urllib.request.urlopen(sys.argv[1], timeout=5)
except urllib.error.HTTPError as exc:
    answer = exc
print(answer.status)
print(answer.read().decode())
"""


def _http_get(ns: str, path: str) -> tuple[int, str]:
    """Status and body of ``GET path`` from the daemon's endpoint inside ``ns``."""
    out = netns.run(ns, sys.executable, "-c", _HTTP_GET, f"http://{HTTP_ADDRESS}{path}").stdout
    status, body = out.split("\n", 1)
    return int(status), body.strip()


def _legacy_ours(ns: str) -> list[str]:
    """masqd's lines in the legacy nat table (plain iptables-legacy-save takes no lock)."""
    return masqd_lines(netns.iptables_save(ns, binary="iptables-legacy-save"))


def _legacy_expected(cidr: str) -> list[str]:
    return [f":{CHAIN} - [0:0]", jump_rule(), keep("169.254.0.0/16"), keep(cidr), masq()]


def _is_lock_wait(event: dict) -> bool:
    return "xtables lock" in event.get("event", "")


def _is_sync_failure(event: dict) -> bool:
    return event.get("event", "").startswith("sync failed")


@pytest.fixture
def legacy_daemon(node_ns, xtables_lock, tmp_path):
    """Start ``masqd run --iptables-mode legacy`` in ``node_ns`` on LOCK_BEFORE, with the private
    lock file as its XTABLES_LOCKFILE and its endpoint on HTTP_ADDRESS; returns once the first
    apply is in the kernel. ``lock_wait``: a shorter LOCK_WAIT_SECONDS. Killed at teardown."""
    from masqd_proc import MASQD, DaemonProcess

    started: list[DaemonProcess] = []
    config = tmp_path / "config"

    def start(lock_wait: int | None = None) -> DaemonProcess:
        config.write_text(LOCK_BEFORE)
        command = (str(MASQD),) if lock_wait is None else (sys.executable, "-c", _MASQD_SHORT_LOCK_WAIT, str(lock_wait))
        process = DaemonProcess(node_ns, config, "--iptables-mode", "legacy", f"--http-address={HTTP_ADDRESS}",
                                env={"XTABLES_LOCKFILE": str(xtables_lock[0])}, command=command)
        started.append(process)
        process.next_event(lambda e: e.get("event") == "rules applied")
        assert _legacy_ours(node_ns) == _legacy_expected("198.51.100.0/24")
        return process

    yield start
    for process in started:
        process.kill()


def test_daemon_waits_for_a_held_xtables_lock_then_applies_and_logs_the_wait_once(node_ns, xtables_lock,
                                                                                 legacy_daemon, tmp_path):
    """Another process holds the xtables lock for a few seconds while the config changes: the
    daemon's restore waits on it (on the private lock file: XTABLES_LOCKFILE is honoured), the
    kernel keeps the old rules meanwhile, the daemon stays healthy, says once that it is waiting,
    and applies the change as soon as the lock is released; no error, no failed sync, ready."""
    lockfile, fd = xtables_lock
    d = legacy_daemon()
    fcntl.flock(fd, fcntl.LOCK_EX)
    locked = time.monotonic()
    try:
        write_atomically(tmp_path / "config", LOCK_AFTER)
        # the kernel lists masqd's iptables-legacy-restore as a waiter on *our* lock file
        assert netns.wait_for(lambda: _lock_waiters(lockfile) > 0, timeout=10), "masqd never waited for the lock"
        wait = d.next_event(_is_lock_wait)
        assert wait["level"] == "warning", wait
        assert _legacy_ours(node_ns) == _legacy_expected("198.51.100.0/24"), "applied while the lock was held"
        assert d.proc.poll() is None
        status, body = _http_get(node_ns, "/healthz")
        assert status == 200, body  # a pass waiting on the lock is not a stuck reconciler
        time.sleep(max(0.0, LOCK_HELD_SECONDS - (time.monotonic() - locked)))
        assert _lock_waiters(lockfile) > 0, "masqd stopped waiting before the lock was released"
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    update = d.next_event(lambda e: e.get("event") == "rules updated", timeout=15)
    assert update["trigger"] == "file" and update["cidrs_added"] == ["203.0.113.0/24"], update
    assert _legacy_ours(node_ns) == _legacy_expected("203.0.113.0/24")
    # one more pass (SIGHUP), so every line the waiting pass could have logged has been read
    d.proc.send_signal(signal.SIGHUP)
    d.next_event(lambda e: e.get("event") == "in sync" and e.get("trigger") == "sighup")
    assert [e for e in d.events if _is_lock_wait(e)] == [wait], "the wait must be logged exactly once"
    assert [e for e in d.events if e.get("level") == "error" or _is_sync_failure(e)] == []
    assert [e["event"] for e in d.writes()] == ["rules applied", "rules updated"]
    assert _http_get(node_ns, "/readyz")[0] == 200
    assert _http_get(node_ns, "/healthz")[0] == 200
    assert d.stop() == 0


def test_lock_held_past_the_wait_fails_the_sync_once_then_retries_until_it_applies(node_ns, xtables_lock,
                                                                                  legacy_daemon, tmp_path):
    """Held past the restore's lock wait (shortened to 1 s here), the sync fails: logged once as
    an error naming the lock, /readyz not ready with the reason, the kernel keeping the old rules;
    the reconciler retries with back-off (repeats logged at debug level only) and applies the
    change once the lock is released. The wait itself is logged once for the whole episode."""
    lockfile, fd = xtables_lock
    d = legacy_daemon(lock_wait=1)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        write_atomically(tmp_path / "config", LOCK_AFTER)
        first = d.next_event(_is_sync_failure)
        assert first["level"] == "error" and first["trigger"] == "file", first
        assert "holding the xtables lock" in first["error"], first
        status, body = _http_get(node_ns, "/readyz")
        assert status == 503 and "the last apply failed" in body and "xtables lock" in body, body
        assert _http_get(node_ns, "/healthz")[0] == 200
        # two retries fail the same way (the lock is still held): debug level, marked repeated
        for _ in range(2):
            again = d.next_event(_is_sync_failure)
            assert again["level"] == "debug" and again["repeated"] is True and again["trigger"] == "retry", again
        assert _legacy_ours(node_ns) == _legacy_expected("198.51.100.0/24")
        assert netns.wait_for(lambda: _lock_waiters(lockfile) > 0, timeout=10), "no retry waits for the lock"
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    update = d.next_event(lambda e: e.get("event") == "rules updated", timeout=30)
    assert update["trigger"] == "retry" and update["cidrs_added"] == ["203.0.113.0/24"], update
    assert _legacy_ours(node_ns) == _legacy_expected("203.0.113.0/24")
    assert _http_get(node_ns, "/readyz")[0] == 200
    d.proc.send_signal(signal.SIGHUP)
    d.next_event(lambda e: e.get("event") == "in sync" and e.get("trigger") == "sighup")
    assert [e for e in d.events if e.get("level") == "error"] == [first]
    waits = [e for e in d.events if _is_lock_wait(e)]
    assert len(waits) == 1 and waits[0]["level"] == "warning", waits
    assert d.stop() == 0
