"""The decision model beyond upstream (issue 16) against the real kernel, with real packets.

Each test runs ``masqd run --once`` in the node namespace of a pod -> node -> dest topology
(:mod:`masqd.testing.topology`) on each backend (nftables; iptables in its default variant; and
iptables-legacy, where the kernel has it, for SNAT and interfaces), sends UDP datagrams from the pod, from a chosen source
address, and asserts the source address the destination saw:

- nested keep / masquerade destination ranges in both directions (longest prefix wins), IPv4 and
  IPv6, and the issue's example;
- the metadata example (``masqLinkLocal: false`` + ``masqueradeCIDRs: [169.254.169.254/32]``),
  and its IPv6 counterpart (AWS's ``fd00:ec2::254``);
- ``masqueradeSourceCIDRs`` / ``nonMasqueradeSourceCIDRs`` with pod sources inside and outside
  the lists (a second address on the pod link, and one outside the pod range);
- ``snatToAddress`` / ``snatToAddressIPv6`` to a second node address (with ``--to-ports`` too),
  and a SNAT address that is not on the node, which is refused and writes nothing;
- ``outputInterfaces`` that match the egress link (by name, by ``+`` prefix) and that do not.

After every apply a second ``run --once`` must find the kernel in sync (nothing logged as written,
rule handles unchanged), and the rules the tools print (``iptables-save -t nat``, ``nft list
table``) have the expected shape. Expected decisions are written out here, and for destination
ranges computed by a small reference longest-prefix function, never taken from masqd's code.

The packet tests share one topology per module (rules are flushed before and after each test;
every probe uses a fresh destination port, so no conntrack entry from an earlier test decides a
packet); the SNAT tests have their own, since a second IPv6 address on the node's dest-facing
link changes which address MASQUERADE picks.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import shlex
import shutil
from dataclasses import dataclass

import pytest

from masqd_proc import log_events, writes_logged

from masqd.testing import netns
from masqd.testing import topology as layout
from masqd.testing.netns import CHAIN, NFT_FAMILY

pytestmark = pytest.mark.netns

POD_V4, POD_V6 = layout.POD_V4, layout.POD_V6
POD2_V4, POD2_V6 = "10.244.1.3", "fd00:244::3"  # a second pod address, on the pod link
OUTSIDE_V4, OUTSIDE_V6 = "10.245.0.3", "fd00:245::3"  # a pod source outside the pod range (routed to the pod)
NODE = {4: layout.NODE_V4, 6: layout.NODE_V6}
SNAT_V4, SNAT_V6 = "172.30.0.5", "fd00:30::5"  # a second node address on the dest-facing link
METADATA_V4, METADATA_V6 = "169.254.169.254", "fd00:ec2::254"
LINK_LOCAL = {4: "169.254.0.0/16", 6: "fe80::/10"}

#: Destinations the shared topology adds to the dest namespace, with the route the node needs
#: (``None``: an existing route covers it).
EXTRA_DESTINATIONS = (
    ("203.0.113.100", None), ("203.0.113.200", None),
    ("10.99.1.2", "10.99.1.0/24"),
    (METADATA_V4, f"{METADATA_V4}/32"), ("169.254.9.2", "169.254.9.0/24"),
    ("2001:db8:1:1::2", None),
    (METADATA_V6, "fd00:ec2::/64"), ("fd00:ec2::3", None),
)

#: ``masqd run --once`` prints these events when it writes; a run on an in-sync kernel prints none.
WRITE_EVENTS = {"rules applied", "rules updated", "rules restored after outside change"}


# --- backends ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """How masqd is run (``--backend NAME`` and extra flags) and how its rules are read back."""

    name: str  # masqd's --backend
    flags: tuple[str, ...] = ()
    legacy: bool = False

    @property
    def kind(self) -> str:
        return "nftables" if self.name == "nftables" else "iptables"

    def text(self, ns: str, family: int) -> str:
        """What the tools print of masqd's rules for ``family``: ``nft list table ip|ip6 masqd``,
        or ``iptables-save -t nat`` (the variant masqd was told to use)."""
        if self.name == "nftables":
            return netns.nft(ns, "list", "table", NFT_FAMILY[family], "masqd", check=False).stdout
        binary = None
        if self.legacy:
            binary = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
        return netns.iptables_save(ns, family, binary=binary)


BACKENDS = {
    "iptables": Backend("iptables"),
    "iptables-legacy": Backend("iptables", ("--iptables-mode", "legacy"), legacy=True),
    "nftables": Backend("nftables"),
}
LEGACY_TOOLS = ("iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore",
                "ip6tables-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore")


@functools.cache
def _legacy_unavailable() -> str | None:
    """Why iptables-legacy cannot be used here (``None``: it can)."""
    missing = [tool for tool in LEGACY_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    with netns.namespace("legacy-probe") as ns:
        for binary in ("iptables-legacy-save", "ip6tables-legacy-save"):
            probe = netns.run(ns, binary, "-t", "nat", check=False)
            if probe.returncode != 0:
                return f"this kernel has no legacy (x_tables) nat table: {probe.stderr.strip()}"
    return None


def _chosen(name: str) -> Backend:
    chosen = BACKENDS[name]
    if chosen.legacy and (reason := _legacy_unavailable()) is not None:
        pytest.skip(reason)
    return chosen


@pytest.fixture(params=["iptables", "nftables"])
def backend(request, netns_supported) -> Backend:
    """The default iptables variant and nftables (iptables-legacy writes the same rule texts; the
    tests that use ``any_backend`` run it too)."""
    return _chosen(request.param)


@pytest.fixture(params=list(BACKENDS))
def any_backend(request, netns_supported) -> Backend:
    """Every backend, iptables-legacy included: for the rules whose kernel handling differs most
    between the variants (the SNAT target, interface matches)."""
    return _chosen(request.param)


# --- topologies -------------------------------------------------------------------------------------


def _flush_rules(ns: str) -> None:
    """Remove every NAT rule from ``ns``: nftables (masqd's tables and iptables-nft's) and, if the
    legacy nat tables exist there, their chains. Then nothing in ``ns`` rewrites a packet."""
    netns.nft(ns, "flush", "ruleset")
    for family, binary in ((4, "iptables-legacy"), (6, "ip6tables-legacy")):
        names = netns.run(ns, "cat", f"/proc/net/{'ip' if family == 4 else 'ip6'}_tables_names", check=False).stdout
        if "nat" in names.split():
            netns.run(ns, binary, "-t", "nat", "-F")
            netns.run(ns, binary, "-t", "nat", "-X")
    assert netns.nft(ns, "list", "ruleset").stdout.strip() == ""


@pytest.fixture(scope="module")
def shared_topology(netns_supported):
    """One pod -> node -> dest topology for the module's packet tests, with the extra
    destinations and pod sources they use; deleted at the end of the module (also on failure)."""
    topo = layout.Topology()
    try:
        for address, route in EXTRA_DESTINATIONS:
            topo.add_destination(address, route)
        topo.add_pod_address(POD2_V4)
        topo.add_pod_address(POD2_V6)
        topo.add_pod_address(OUTSIDE_V4, 32)
        topo.add_pod_address(OUTSIDE_V6, 128)
        yield topo
    finally:
        topo.close()


@pytest.fixture
def topology(shared_topology):
    """The shared topology with no NAT rule in the node, before and after the test."""
    _flush_rules(shared_topology.node)
    yield shared_topology
    _flush_rules(shared_topology.node)


@pytest.fixture(scope="module")
def shared_snat_topology(netns_supported):
    """A topology whose node has a second address on its dest-facing link (SNAT_V4, SNAT_V6)."""
    topo = layout.Topology()
    try:
        topo.add_node_address(SNAT_V4)
        topo.add_node_address(SNAT_V6)
        yield topo
    finally:
        topo.close()


@pytest.fixture
def snat_topology(shared_snat_topology):
    _flush_rules(shared_snat_topology.node)
    yield shared_snat_topology
    _flush_rules(shared_snat_topology.node)


def test_topology_does_no_nat_by_itself(topology):
    """Without masqd every probe of this module arrives with the address it was sent from."""
    probes = [(POD_V4, "192.0.2.2", "kept"), (POD2_V4, "203.0.113.100", "kept"), (OUTSIDE_V4, METADATA_V4, "kept"),
              (POD_V6, "2001:db8:1:1::2", "kept"), (POD2_V6, METADATA_V6, "kept"), (OUTSIDE_V6, "2001:db8:2::2", "kept")]
    assert_seen(topology, probes)


# --- running masqd; what the destination saw --------------------------------------------------------


def _kernel_snapshot(ns: str, backend: Backend) -> str:
    """``nft -a list ruleset`` (handles change whenever anything is rewritten), and for legacy
    iptables its nat tables (which nft cannot see)."""
    text = netns.nft(ns, "-a", "list", "ruleset").stdout
    if backend.legacy:
        text += netns.iptables_save(ns, 4, binary="iptables-legacy-save")
        text += netns.iptables_save(ns, 6, binary="ip6tables-legacy-save")
    return text


def apply(masqd, ns: str, backend: Backend, config: str, *flags: str):
    """``masqd run --once`` with ``config``; it must write. Then run it again: the read-back must
    find the kernel in sync (no write logged, nothing rewritten). Returns the first run."""
    flags = (*backend.flags, *flags)
    first = masqd.ok(ns, *flags, config=config, backend=backend.name)
    assert [e.get("event") for e in writes_logged(first.stderr)] == ["rules applied"], first.stderr
    before = _kernel_snapshot(ns, backend)
    second = masqd.ok(ns, *flags, config=config, backend=backend.name)
    events = [e.get("event") for e in log_events(second.stderr)]
    assert writes_logged(second.stderr) == [] and not WRITE_EVENTS & set(events), \
        f"the second run rewrote rules (read-back not in sync):\n{second.stderr}"
    assert _kernel_snapshot(ns, backend) == before, "the second run changed the kernel"
    return first


def _expected(source: str, who: str) -> str:
    if who == "kept":
        return source
    if who == "node":
        return NODE[6 if ":" in source else 4]
    return who  # an explicit address


def observe(topo: layout.Topology, probes) -> dict[tuple[str, str], str | None]:
    """Send one datagram per ``(source, destination)``, each to its own port; the address each
    destination saw (``None``: nothing arrived)."""
    seen = topo.sources_seen([(source, dest) for source, dest, *_ in probes])
    return {pair: None if got is None else got[0] for pair, got in seen.items()}


def assert_seen(topo: layout.Topology, probes) -> None:
    """``probes``: ``(source, destination, who)``, who being ``"kept"`` (the destination sees the
    source itself), ``"node"`` (the node's address on the dest link: MASQUERADE) or an address."""
    want = {(source, dest): _expected(source, who) for source, dest, who in probes}
    assert observe(topo, probes) == want


def masquerade_rules(text: str) -> list[str]:
    """The MASQUERADE rules of an iptables-save text or an nft listing (comments aside)."""
    return [line for line in text.splitlines()
            if "-j MASQUERADE" in line or re.match(r"\s*(oifname \S+ )?(meta l4proto \S+ )?masquerade\b", line)]


def assert_shapes(ns: str, backend: Backend, shapes: dict) -> None:
    """``shapes[kind][family]``: fragments the tools' listing of masqd's rules must contain."""
    for family, fragments in shapes.get(backend.kind, {}).items():
        text = backend.text(ns, family)
        for fragment in fragments:
            assert fragment in text, f"{fragment!r} not in the IPv{family} rules:\n{text}"


# --- a reference longest-prefix decision, to check the rules the kernel holds -------------------------

Interval = tuple[int, int]


def _merge(intervals) -> list[Interval]:
    merged: list[list[int]] = []
    for first, last in sorted(intervals):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [tuple(interval) for interval in merged]


def _bounds(net) -> Interval:
    return int(net.network_address), int(net.broadcast_address)


def _address(value: int, family: int):
    return ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value)


def _segments(nets, family: int) -> list[Interval]:
    """The address space cut at every edge of ``nets``: within a segment every address is in the
    same networks."""
    top = 2 ** (32 if family == 4 else 128)
    cuts = sorted({0} | {_bounds(n)[0] for n in nets} | {_bounds(n)[1] + 1 for n in nets} - {top})
    return [(start, (cuts[i + 1] if i + 1 < len(cuts) else top) - 1) for i, start in enumerate(cuts)]


def reference_kept(keep, masquerade, family: int) -> list[Interval]:
    """Destinations of ``family`` that keep the pod address: the longest prefix among the keep and
    the masquerade entries decides (a masquerade entry wins a tie), no match masquerades."""
    entries = [(ipaddress.ip_network(c), True) for c in keep] + [(ipaddress.ip_network(c), False) for c in masquerade]
    entries = [(net, kept) for net, kept in entries if net.version == family]
    kept_segments = []
    for first, last in _segments([net for net, _ in entries], family):
        address = _address(first, family)
        matches = [(net.prefixlen, not kept, kept) for net, kept in entries if address in net]
        if matches and max(matches)[2]:
            kept_segments.append((first, last))
    return _merge(kept_segments)


def iptables_kept(save_text: str, family: int) -> list[Interval]:
    """Destinations masqd's chain keeps, by first match over its ``-A`` lines (read from the
    iptables-save text; the chain may only match on destinations here)."""
    rules = []
    for line in save_text.splitlines():
        if not line.startswith(f"-A {CHAIN} "):
            continue
        words = shlex.split(line)
        assert not {"-s", "-o", "-p", "-i"} & set(words), f"a destination-only chain was expected: {line}"
        destination = words[words.index("-d") + 1] if "-d" in words else ("0.0.0.0/0" if family == 4 else "::/0")
        rules.append((ipaddress.ip_network(destination), words[words.index("-j") + 1]))
    assert rules and rules[-1][1] in ("MASQUERADE", "SNAT"), f"no final masquerade rule:\n{save_text}"
    kept = []
    for first, last in _segments([net for net, _ in rules], family):
        address = _address(first, family)
        target = next((target for net, target in rules if address in net), "RETURN")  # off the end: kept
        if target == "RETURN":
            kept.append((first, last))
    return _merge(kept)


def assert_kernel_keeps(ns: str, backend: Backend, family: int, keep, masquerade) -> None:
    """The destinations masqd's rules keep in the kernel are exactly the reference's."""
    want = reference_kept(keep, masquerade, family)
    text = backend.text(ns, family)
    assert masquerade_rules(text), text
    if backend.kind == "nftables":
        assert f"{NFT_FAMILY[family]} daddr @nonmasq{family} return" in text, text
        assert _merge(netns.set_intervals(ns, family)) == want
    else:
        assert iptables_kept(text, family) == want


# --- 1, 2: destinations: nested ranges both ways; the metadata example -------------------------------

RFC1918 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")


@dataclass(frozen=True)
class DestinationCase:
    config: str
    flags: tuple[str, ...]
    expected: dict[str, str]  # destination -> "kept" / "node", sent from POD_V4 / POD_V6
    keep: dict[int, tuple[str, ...]]  # the keep entries per family, link-local included
    masquerade: tuple[str, ...]


DESTINATION_CASES = [
    pytest.param(DestinationCase(
        'nonMasqueradeCIDRs: [203.0.113.0/24, "2001:db8::/32"]\nmasqueradeCIDRs: [203.0.113.0/26, "2001:db8:1::/48"]\n',
        ("--enable-ipv6",),
        {"203.0.113.2": "node", "203.0.113.100": "kept", "203.0.113.200": "kept", "192.0.2.2": "node",
         "10.99.0.2": "node",  # the list replaces the defaults
         "2001:db8:1::2": "node", "2001:db8:1:1::2": "node", "2001:db8:2::2": "kept"},
        {4: (LINK_LOCAL[4], "203.0.113.0/24"), 6: (LINK_LOCAL[6], "2001:db8::/32")},
        ("203.0.113.0/26", "2001:db8:1::/48")),
        id="masquerade-range-inside-a-kept-range"),
    pytest.param(DestinationCase(
        'nonMasqueradeCIDRs: [203.0.113.0/24, 203.0.113.0/28, "2001:db8::/32", "2001:db8:1::/64"]\n'
        'masqueradeCIDRs: [203.0.113.0/25, "2001:db8:1::/48"]\n',
        ("--enable-ipv6",),
        {"203.0.113.2": "kept",  # /28 keep inside the /25 masquerade inside the /24 keep
         "203.0.113.100": "node", "203.0.113.200": "kept", "192.0.2.2": "node",
         "2001:db8:1::2": "kept", "2001:db8:1:1::2": "node", "2001:db8:2::2": "kept"},
        {4: (LINK_LOCAL[4], "203.0.113.0/24", "203.0.113.0/28"), 6: (LINK_LOCAL[6], "2001:db8::/32", "2001:db8:1::/64")},
        ("203.0.113.0/25", "2001:db8:1::/48")),
        id="kept-range-inside-a-masquerade-range-inside-a-kept-range"),
    pytest.param(DestinationCase(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 10.99.0.0/24]\nmasqueradeCIDRs: [10.99.0.0/16]\n",
        (),
        {"10.99.0.2": "kept", "10.99.1.2": "node", "192.0.2.2": "node",
         "2001:db8:1::2": "kept"},  # IPv6 untouched without --enable-ipv6
        {4: (LINK_LOCAL[4], "10.0.0.0/8", "10.99.0.0/24")},
        ("10.99.0.0/16",)),
        id="issue-example-10.99"),
    pytest.param(DestinationCase(
        f"masqLinkLocal: false\nmasqueradeCIDRs: [{METADATA_V4}/32]\n",
        (),
        {METADATA_V4: "node", "169.254.9.2": "kept", "10.99.0.2": "kept", "192.0.2.2": "node"},
        {4: (LINK_LOCAL[4], *RFC1918)},
        (f"{METADATA_V4}/32",)),
        id="metadata-server-masqueraded-rest-of-link-local-kept"),
    pytest.param(DestinationCase(
        f'masqLinkLocal: false\nnonMasqueradeCIDRs: [10.0.0.0/8, "fd00:ec2::/64"]\n'
        f'masqueradeCIDRs: [{METADATA_V4}/32, "{METADATA_V6}/128"]\n',
        ("--enable-ipv6",),
        {METADATA_V6: "node", "fd00:ec2::3": "kept", "2001:db8:1::2": "node",
         METADATA_V4: "node", "169.254.9.2": "kept", "10.99.0.2": "kept"},
        {4: (LINK_LOCAL[4], "10.0.0.0/8"), 6: (LINK_LOCAL[6], "fd00:ec2::/64")},
        (f"{METADATA_V4}/32", f"{METADATA_V6}/128")),
        id="metadata-server-ipv6-fd00-ec2"),
]


@pytest.mark.parametrize("case", DESTINATION_CASES)
def test_longest_prefix_decides_the_destination(topology, masqd, backend, case):
    apply(masqd, topology.node, backend, case.config, *case.flags)
    pod = {4: POD_V4, 6: POD_V6}
    assert_seen(topology, [(pod[6 if ":" in dest else 4], dest, who) for dest, who in case.expected.items()])
    for family, keep in case.keep.items():
        assert_kernel_keeps(topology.node, backend, family, keep, case.masquerade)


# --- 3: sources --------------------------------------------------------------------------------------

SOURCE_RETURN = {
    "iptables": '-A IP-MASQ-AGENT -s {net} -m comment --comment "masqd: traffic from this source is not subject to MASQUERADE" -j RETURN',
    "nftables": "{ip} saddr {addr} return",
}


def _source_shapes(keep_sources=(), masq_sources=()) -> dict:
    """Fragments for a ``nonMasqueradeSourceCIDRs`` RETURN per source and the masquerade rule
    scoped to ``masqueradeSourceCIDRs`` (one source per family here)."""
    shapes: dict = {"iptables": {4: [], 6: []}, "nftables": {4: [], 6: []}}
    for net in keep_sources:
        family = 6 if ":" in net else 4
        host = str(ipaddress.ip_network(net).network_address) if net.endswith(("/32", "/128")) else net
        shapes["iptables"][family].append(SOURCE_RETURN["iptables"].format(net=net))
        shapes["nftables"][family].append(SOURCE_RETURN["nftables"].format(ip=NFT_FAMILY[family], addr=host))
    for net in masq_sources:
        family = 6 if ":" in net else 4
        host = str(ipaddress.ip_network(net).network_address) if net.endswith(("/32", "/128")) else net
        shapes["iptables"][family].append(f"-A {CHAIN} -s {net} -m comment")
        shapes["nftables"][family].append(f"{NFT_FAMILY[family]} saddr != {host} return")
    return shapes


V4_SOURCES = (POD_V4, POD2_V4, OUTSIDE_V4)
V6_SOURCES = (POD_V6, POD2_V6, OUTSIDE_V6)


def _from_each(destination: str, whos: tuple[str, str, str]) -> list[tuple[str, str, str]]:
    sources = V6_SOURCES if ":" in destination else V4_SOURCES
    return [(source, destination, who) for source, who in zip(sources, whos)]


SOURCE_CASES = [
    pytest.param(
        'masqueradeSourceCIDRs: [10.244.1.2/32, "fd00:244::2/128"]\n',
        [*_from_each("192.0.2.2", ("node", "kept", "kept")), *_from_each("2001:db8:1::2", ("node", "kept", "kept")),
         (POD_V4, "10.99.0.2", "kept")],  # a listed source: the destination still decides
        _source_shapes(masq_sources=("10.244.1.2/32", "fd00:244::2/128")), None,
        id="masqueradeSourceCIDRs-one-pod-address"),
    pytest.param(
        'masqueradeSourceCIDRs: [10.244.1.0/24, "fd00:244::/64"]\n',
        [*_from_each("192.0.2.2", ("node", "node", "kept")), *_from_each("2001:db8:1::2", ("node", "node", "kept"))],
        _source_shapes(masq_sources=("10.244.1.0/24", "fd00:244::/64")), None,
        id="masqueradeSourceCIDRs-pod-range"),
    pytest.param(
        'nonMasqueradeSourceCIDRs: [10.244.1.3/32, "fd00:244::3/128"]\n',
        [*_from_each("192.0.2.2", ("node", "kept", "node")), *_from_each("2001:db8:1::2", ("node", "kept", "node"))],
        _source_shapes(keep_sources=("10.244.1.3/32", "fd00:244::3/128")), None,
        id="nonMasqueradeSourceCIDRs-one-pod-address"),
    pytest.param(
        'masqueradeSourceCIDRs: [10.244.1.0/24, "fd00:244::/64"]\n'
        'nonMasqueradeSourceCIDRs: [10.244.1.3/32, "fd00:244::3/128"]\n'
        'nonMasqueradeCIDRs: [203.0.113.0/24, "2001:db8:2::/48"]\nmasqueradeCIDRs: [203.0.113.0/26]\n',
        [*_from_each("203.0.113.2", ("node", "kept", "kept")),  # a masqueradeCIDRs destination: sources still rule
         *_from_each("2001:db8:1::2", ("node", "kept", "kept")),
         (POD_V4, "203.0.113.100", "kept"), (POD_V6, "2001:db8:2::2", "kept")],
        _source_shapes(keep_sources=("10.244.1.3/32", "fd00:244::3/128"), masq_sources=("10.244.1.0/24", "fd00:244::/64")),
        None, id="both-source-lists-and-masqueradeCIDRs"),
    pytest.param(
        "masqueradeSourceCIDRs: [10.244.1.0/24]\n",
        [*_from_each("192.0.2.2", ("node", "node", "kept")),
         *_from_each("2001:db8:1::2", ("kept", "kept", "kept"))],  # no IPv6 source listed: none masqueraded
        _source_shapes(masq_sources=("10.244.1.0/24",)),
        "lists no IPv6 source",  # legal, and warned about
        id="masqueradeSourceCIDRs-ipv4-only-masquerades-no-ipv6"),
]


@pytest.mark.parametrize("config, probes, shapes, warning", SOURCE_CASES)
def test_source_lists_decide_before_the_destination(topology, masqd, backend, config, probes, shapes, warning):
    first = apply(masqd, topology.node, backend, config, "--enable-ipv6")
    assert_seen(topology, probes)
    assert_shapes(topology.node, backend, shapes)
    warnings = [e.get("problem", "") for e in log_events(first.stderr) if e.get("event") == "config warning"]
    if warning is None:
        assert warnings == [], first.stderr
    else:
        assert any(warning in w for w in warnings), first.stderr


# --- 4: SNAT to a second node address -------------------------------------------------------------

SNAT_CONFIG = f'snatToAddress: {SNAT_V4}\nsnatToAddressIPv6: "{SNAT_V6}"\n'
SNAT_SHAPES = {
    "iptables": {4: [f"-j SNAT --to-source {SNAT_V4}"], 6: [f"-j SNAT --to-source {SNAT_V6}"]},
    "nftables": {4: [f"snat to {SNAT_V4}"], 6: [f"snat to {SNAT_V6}"]},
}


def test_snat_to_a_second_node_address(snat_topology, masqd, any_backend):
    backend = any_backend
    apply(masqd, snat_topology.node, backend, SNAT_CONFIG, "--enable-ipv6")
    assert_seen(snat_topology, [(POD_V4, "192.0.2.2", SNAT_V4), (POD_V6, "2001:db8:1::2", SNAT_V6),
                                (POD_V4, "10.99.0.2", "kept"), (POD_V6, "2001:db8:2::2", SNAT_V6)])
    assert_shapes(snat_topology.node, backend, SNAT_SHAPES)
    for family in (4, 6):
        assert masquerade_rules(backend.text(snat_topology.node, family)) == [], "SNAT replaces MASQUERADE"


def test_snat_with_to_ports(snat_topology, masqd, backend):
    apply(masqd, snat_topology.node, backend, SNAT_CONFIG, "--enable-ipv6", "--to-ports", "2000-2099")
    for dest, address in (("192.0.2.2", SNAT_V4), ("2001:db8:1::2", SNAT_V6)):
        for _ in range(2):
            seen = snat_topology.datagram_seen(dest, source=POD_V6 if ":" in dest else POD_V4)
            assert seen is not None and seen[0] == address and 2000 <= seen[1] <= 2099, (dest, seen)
    shapes = {"iptables": {4: [f"-j SNAT --to-source {SNAT_V4}:2000-2099"], 6: [f"-j SNAT --to-source [{SNAT_V6}]:2000-2099"]},
              "nftables": {4: [f"snat to {SNAT_V4}:2000-2099"], 6: [f"snat to [{SNAT_V6}]:2000-2099"]}}
    assert_shapes(snat_topology.node, backend, shapes)


@pytest.mark.parametrize("key, address, flags", [
    pytest.param("snatToAddress", "172.30.0.99", (), id="ipv4"),
    pytest.param("snatToAddressIPv6", "fd00:30::2", ("--enable-ipv6",), id="ipv6-the-neighbours-address"),
])
def test_snat_to_an_address_not_on_the_node_is_refused_and_writes_nothing(snat_topology, masqd, backend, key,
                                                                          address, flags):
    """Refused before anything is written; and with rules applied before, those stay as they were."""
    ns = snat_topology.node
    refused = f'{key}: "{address}"\n'
    result = masqd(ns, *backend.flags, *flags, config=refused, backend=backend.name)
    assert result.returncode != 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert any(key + ":" in line and address in line for line in errors), result.stderr
    assert writes_logged(result.stderr) == []
    for family in (4, 6):
        assert CHAIN not in backend.text(ns, family)
        assert "masqd" not in netns.nft(ns, "list", "tables").stdout

    apply(masqd, ns, backend, SNAT_CONFIG, "--enable-ipv6")  # a good state first
    before = _kernel_snapshot(ns, backend)
    again = masqd(ns, *backend.flags, "--enable-ipv6", config=refused, backend=backend.name)
    assert again.returncode != 0 and writes_logged(again.stderr) == [], again.stderr
    assert _kernel_snapshot(ns, backend) == before
    assert_seen(snat_topology, [(POD_V4, "192.0.2.2", SNAT_V4), (POD_V6, "2001:db8:1::2", SNAT_V6)])


# --- 5: output interfaces ---------------------------------------------------------------------------

INTERFACE_CASES = [
    pytest.param("[eth0, vdst]", "node", ['oifname "eth0"', 'oifname "vdst"'], ["-o eth0 ", "-o vdst "],
                 id="egress-link-by-name-one-of-two"),
    pytest.param("[vd+]", "node", ['oifname "vd*"'], ["-o vd+ "], id="egress-link-by-prefix"),
    pytest.param("[vpod, eth+]", "kept", ['oifname "vpod"', 'oifname "eth*"'], ["-o vpod ", "-o eth+ "],
                 id="neither-name-nor-prefix-matches-the-egress"),
]


@pytest.mark.parametrize("interfaces, who, nft_shapes, iptables_shapes", INTERFACE_CASES)
def test_output_interfaces(topology, masqd, any_backend, interfaces, who, nft_shapes, iptables_shapes):
    backend = any_backend
    """Only traffic leaving through a listed interface is masqueraded: the node's egress link to
    dest is ``vdst`` (``vpod`` faces the pod, and no ``eth*`` exists on the node)."""
    apply(masqd, topology.node, backend, f"outputInterfaces: {interfaces}\n", "--enable-ipv6")
    assert_seen(topology, [(POD_V4, "192.0.2.2", who), (POD_V6, "2001:db8:1::2", who),
                           (POD2_V4, "198.51.100.2", who),
                           (POD_V4, "10.99.0.2", "kept")])  # a kept destination stays kept on any interface
    assert_shapes(topology.node, backend, {"nftables": {4: nft_shapes, 6: nft_shapes},
                                           "iptables": {4: iptables_shapes, 6: iptables_shapes}})
