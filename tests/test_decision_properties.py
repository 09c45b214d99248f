"""The decision model (issue 16) against an independent reference, on every backend's rules.

(a) The rules each backend renders decide as a reference longest-prefix function does. The
reference (:func:`reference_decision`) is written here from the issue's semantics, from the
config document and flags alone (it does not use ``masqd.ruleset``'s decision code or CIDR
algebra); the iptables and nft texts masqd renders are run by the small interpreters of
``tests/rule_eval.py`` on random packets. Random configs cluster their CIDRs (inside
10.0.0.0/8, 2001:db8::/32, fd00::/8, link-local) so that keep and masquerade entries nest often.

(b) With none of the new keys (or with them empty), the rule texts are upstream's byte for byte:
an independent "upstream renderer" here writes what kubernetes-sigs/ip-masq-agent's chain looks
like in ``iptables-save`` form (design.md, "Compatibility contract"), and the nft script masqd
wrote before the decision model; it is checked against the golden files first, then against
masqd for random upstream-only configs and flags.

Protocols: packets carry ``tcp``, ``udp``, ``sctp`` or ``icmp``, so the ``--to-ports`` rules
(``-p`` / ``meta l4proto``) are modelled; the random spreading (``-m statistic``, ``numgen``) is
followed both ways (see ``rule_eval``): the decision must be the same on every branch, and the
ports spread in proportion to the size of each interval.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masqd.backends.iptables.render import render_ruleset as render_iptables
from masqd.backends.nftables.render import render_ruleset as render_nftables
from masqd.config import AgentOptions, parse_config, parse_to_ports
from masqd.errors import ConfigError
from masqd.ruleset import compute_ruleset

from rule_eval import KEEP, MASQUERADE, SNAT, IptablesProgram, NftablesProgram, Packet, interface_matches

GOLDEN = Path(__file__).parent / "golden"

# --- the reference ---------------------------------------------------------------------------------

#: Upstream's defaults (design.md), written out here rather than taken from masqd.config.
RFC1918 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
RESERVED = ("100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
            "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4")
LINK_LOCAL = {4: ipaddress.ip_network("169.254.0.0/16"), 6: ipaddress.ip_network("fe80::/10")}
PORT_PROTOCOLS = ("tcp", "udp", "sctp")


def NETS(texts) -> tuple:  # noqa: N802 (reads as the constant lists it builds)
    return tuple(ipaddress.ip_network(t) for t in texts)


@dataclass(frozen=True)
class Model:
    """The inputs of the decision, read from the config document and the flags."""

    families: tuple[int, ...]
    keep: tuple  # networks, link-local included unless masqueraded by config
    masq: tuple
    keep_sources: tuple
    masq_sources: tuple
    interfaces: tuple[str, ...]
    snat: dict  # family -> address text or None
    to_ports: tuple[tuple[int, int], ...]
    random_fully: bool


def model_of(doc: dict, flags: dict) -> Model:
    enable_ipv6 = flags.get("enable_ipv6", False)
    families = (4, 6) if enable_ipv6 else (4,)
    if "nonMasqueradeCIDRs" in doc:
        keep = NETS(doc["nonMasqueradeCIDRs"] or ())
    else:
        keep = NETS(RFC1918 + (RESERVED if flags.get("nomasq_all_reserved_ranges") else ()))
    if not doc.get("masqLinkLocal", False):
        keep += (LINK_LOCAL[4],)
    if enable_ipv6 and not doc.get("masqLinkLocalIPv6", False):
        keep += (LINK_LOCAL[6],)
    to_ports = []
    for piece in filter(None, flags.get("to_ports", "").split(",")):
        first, _, last = piece.partition("-")
        to_ports.append((int(first), int(last or first)))
    return Model(
        families=families,
        keep=keep,
        masq=NETS(doc.get("masqueradeCIDRs") or ()),
        keep_sources=NETS(doc.get("nonMasqueradeSourceCIDRs") or ()),
        masq_sources=NETS(doc.get("masqueradeSourceCIDRs") or ()),
        interfaces=tuple(doc.get("outputInterfaces") or ()),
        snat={4: doc.get("snatToAddress"), 6: doc.get("snatToAddressIPv6")},
        to_ports=tuple(to_ports),
        random_fully=flags.get("random_fully", True),
    )


def reference_decision(model: Model, packet: Packet) -> tuple[str, str | None]:
    """The issue's steps 1-5 for a packet leaving the node to a non-local destination:
    ``(KEEP, None)``, ``(MASQUERADE, None)`` or ``(SNAT, address)``."""
    if model.interfaces and not any(interface_matches(p, packet.oif, "+") for p in model.interfaces):
        return KEEP, None  # 1
    if any(packet.src in net for net in model.keep_sources if net.version == packet.src.version):
        return KEEP, None  # 2
    if model.masq_sources and not any(packet.src in net for net in model.masq_sources
                                      if net.version == packet.src.version):
        return KEEP, None  # 3
    # 4: the longest matching prefix decides; none matching: masquerade. (The same prefix in both
    # lists is refused by validation, so there is no tie.)
    matching = [(net.prefixlen, kept) for nets, kept in ((model.keep, True), (model.masq, False))
                for net in nets if net.version == packet.dst.version and packet.dst in net]
    if matching and max(matching)[1]:
        return KEEP, None
    snat = model.snat[packet.family]  # 5
    return (MASQUERADE, None) if snat is None else (SNAT, str(ipaddress.ip_address(snat)))


def test_reference_examples_from_the_issue():
    """The reference itself, on the issue's two examples."""
    nested = model_of({"nonMasqueradeCIDRs": ["10.0.0.0/8", "10.99.0.0/24"], "masqueradeCIDRs": ["10.99.0.0/16"]}, {})
    for dst, action in (("10.99.0.7", KEEP), ("10.99.1.7", MASQUERADE), ("10.1.1.1", KEEP), ("11.0.0.1", MASQUERADE)):
        assert reference_decision(nested, packet("10.244.0.5", dst)) == (action, None)
    metadata = model_of({"masqueradeCIDRs": ["169.254.169.254/32"], "masqLinkLocal": False}, {})
    assert reference_decision(metadata, packet("10.244.0.5", "169.254.169.254")) == (MASQUERADE, None)
    assert reference_decision(metadata, packet("10.244.0.5", "169.254.169.253")) == (KEEP, None)


def packet(src: str, dst: str, oif: str = "eth0", proto: str = "tcp") -> Packet:
    return Packet(ipaddress.ip_address(src), ipaddress.ip_address(dst), oif, proto)


# --- checking a rendering against the reference -----------------------------------------------------


@dataclass
class Case:
    doc: dict
    flags: dict
    text: str = ""
    random_fully_supported: bool = True
    model: Model = field(init=False)
    options: AgentOptions = field(init=False)

    def __post_init__(self):
        self.text = self.text or json.dumps(self.doc)
        self.model = model_of(self.doc, self.flags)
        options = dict(self.flags)
        options["to_ports"] = parse_to_ports(options.get("to_ports", ""))
        self.options = AgentOptions(**options)

    def ruleset(self):
        return compute_ruleset(parse_config(self.text, self.options).config, self.options)

    def programs(self) -> dict[str, tuple[object, str]]:
        """Each backend's interpreter of masqd's rendering, and the rendered text."""
        ruleset = self.ruleset()
        ipt = render_iptables(ruleset, random_fully_supported=self.random_fully_supported)
        nft = render_nftables(ruleset)
        return {"iptables": (IptablesProgram(ipt), ipt), "nftables": (NftablesProgram(nft), nft)}


def check(case: Case, backend: str, program, text: str, pkt: Packet) -> None:
    """The rendered rules treat ``pkt`` as the reference decides, on every random branch."""
    outcomes = program.outcomes(pkt)
    expected = reference_decision(case.model, pkt)
    where = (f"\nbackend: {backend}\nconfig: {case.text}\nflags: {case.flags}\npacket: src={pkt.src} dst={pkt.dst} "
             f"oif={pkt.oif} proto={pkt.proto}\nreference: {expected}\noutcomes: {outcomes}\nrendered:\n{text}")
    assert sum(outcomes.values()) == 1, where
    assert {o.decision for o in outcomes} == {expected}, where
    if expected[0] == KEEP:
        return
    fully = case.model.random_fully and (backend == "nftables" or case.random_fully_supported)
    assert {o.fully_random for o in outcomes} == {fully}, where
    spread: dict = {}
    for outcome, weight in outcomes.items():
        spread[outcome.ports] = spread.get(outcome.ports, 0) + weight
    if case.model.to_ports and pkt.proto in PORT_PROTOCOLS:
        total = sum(last - first + 1 for first, last in case.model.to_ports)
        assert set(spread) == set(case.model.to_ports), where
        for (first, last), weight in spread.items():  # iptables stores probabilities in 31 bits
            assert math.isclose(weight, Fraction(last - first + 1, total), abs_tol=1e-8), where
    else:
        assert set(spread) == {None}, where


# --- (a) table: explicit cases ---------------------------------------------------------------------

K, M = (KEEP, None), (MASQUERADE, None)
POD, POD6 = "10.244.1.5", "fd00:244::5"

DECISION_CASES = [
    pytest.param(
        {"nonMasqueradeCIDRs": ["10.0.0.0/8", "10.99.0.0/24"], "masqueradeCIDRs": ["10.99.0.0/16"]}, {},
        [(POD, "10.1.2.3", K), (POD, "10.99.0.0", K), (POD, "10.99.0.255", K), (POD, "10.99.1.0", M),
         (POD, "10.98.255.255", K), (POD, "10.99.255.255", M), (POD, "10.100.0.0", K), (POD, "11.0.0.1", M),
         (POD, "169.254.0.1", K)],
        id="keep-masq-keep-nested"),
    pytest.param(
        {"nonMasqueradeCIDRs": ["10.0.0.0/8", "10.99.0.0/24"], "masqueradeCIDRs": ["10.99.0.0/16", "10.99.0.128/25"]},
        {}, [(POD, "10.99.0.127", K), (POD, "10.99.0.128", M), (POD, "10.99.0.255", M), (POD, "10.99.1.1", M),
             (POD, "10.0.0.1", K)],
        id="keep-masq-keep-masq-nested"),
    pytest.param(
        {"nonMasqueradeCIDRs": ["10.99.0.0/24"], "masqueradeCIDRs": ["10.99.0.0/16"]}, {},
        [(POD, "10.99.0.9", K), (POD, "10.99.1.9", M), (POD, "10.0.0.1", M), (POD, "169.254.1.1", K)],
        id="keep-inside-masq"),
    pytest.param(
        {"masqueradeCIDRs": ["169.254.169.254/32"], "masqLinkLocal": False}, {},
        [(POD, "169.254.169.254", M), (POD, "169.254.169.253", K), (POD, "169.254.169.255", K),
         (POD, "169.254.0.1", K), (POD, "10.1.1.1", K), (POD, "192.168.3.3", K), (POD, "8.8.8.8", M)],
        id="metadata-server"),
    pytest.param(
        {"masqueradeCIDRs": ["203.0.113.0/24", "0.0.0.0/1"]}, {},
        [(POD, "203.0.113.5", M), (POD, "10.1.1.1", K), (POD, "172.16.0.1", K), (POD, "192.168.0.1", K),
         (POD, "169.254.1.1", K), (POD, "198.51.100.1", M), (POD, "127.0.0.2", M)],
        id="masq-entry-outside-or-around-every-keep-range-changes-nothing"),
    pytest.param(
        {"nonMasqueradeCIDRs": ["fd00::/8", "2001:db8::/32", "2001:db8:99:1::/64", "10.0.0.0/8"],
         "masqueradeCIDRs": ["2001:db8:99::/48", "fe80::1/128", "10.99.0.0/16"]},
        {"enable_ipv6": True},
        [(POD6, "2001:db8::1", K), (POD6, "2001:db8:99::1", M), (POD6, "2001:db8:99:1::1", K),
         (POD6, "2001:db8:99:2::1", M), (POD6, "fe80::1", M), (POD6, "fe80::2", K), (POD6, "fd00::1", K),
         (POD6, "2606:4700::1", M), (POD, "10.99.0.1", M), (POD, "10.98.0.1", K)],
        id="ipv6-nested-and-link-local-host"),
    pytest.param(
        {"nonMasqueradeCIDRs": ["2001:db8::/32"], "masqueradeCIDRs": ["2001:db8::/33"], "masqLinkLocalIPv6": True},
        {"enable_ipv6": True},
        [(POD6, "2001:db8::1", M), (POD6, "2001:db8:8000::1", K), (POD6, "fe80::1", M)],
        id="ipv6-masq-half-of-keep-link-local-masqueraded"),
    pytest.param(
        {"masqueradeSourceCIDRs": ["10.244.0.0/16"], "nonMasqueradeCIDRs": ["10.0.0.0/8", "fd00::/8"]},
        {"enable_ipv6": True},
        [(POD, "198.51.100.1", M), ("10.245.0.1", "198.51.100.1", K), (POD, "10.1.1.1", K),
         (POD6, "2606:4700::1", K), (POD6, "fd00::1", K), ("::ffff:10.244.1.5", "2606:4700::1", K)],
        id="masq-sources-only-ipv4-with-ipv6-enabled"),
    pytest.param(
        {"masqueradeSourceCIDRs": ["10.244.0.0/16", "fd00:244::/48"], "nonMasqueradeSourceCIDRs": ["10.244.5.0/24"]},
        {"enable_ipv6": True},
        [("10.244.5.1", "198.51.100.1", K), ("10.244.6.1", "198.51.100.1", M), ("10.0.0.1", "198.51.100.1", K),
         (POD6, "2606:4700::1", M), ("fd00:245::1", "2606:4700::1", K)],
        id="masq-and-non-masq-sources"),
    pytest.param(
        {"nonMasqueradeSourceCIDRs": ["10.244.5.0/24", "0.0.0.0/32"]}, {},
        [("10.244.5.9", "198.51.100.1", K), ("10.244.6.9", "198.51.100.1", M), ("0.0.0.0", "198.51.100.1", K)],
        id="non-masq-sources"),
    pytest.param(
        {"outputInterfaces": ["eth0", "ens+"]}, {},
        [(POD, "198.51.100.1", M, "eth0"), (POD, "198.51.100.1", K, "eth1"), (POD, "198.51.100.1", M, "ens3"),
         (POD, "198.51.100.1", M, "ens"), (POD, "198.51.100.1", K, "en"), (POD, "10.1.1.1", K, "eth0")],
        id="output-interfaces"),
    pytest.param(
        {"snatToAddress": "192.0.2.10", "snatToAddressIPv6": "2001:db8::10", "nonMasqueradeCIDRs": ["10.0.0.0/8"]},
        {"enable_ipv6": True, "to_ports": "1024-29999,32768-65535"},
        [(POD, "198.51.100.1", (SNAT, "192.0.2.10")), (POD, "198.51.100.1", (SNAT, "192.0.2.10"), "eth0", "icmp"),
         (POD, "198.51.100.1", (SNAT, "192.0.2.10"), "eth0", "sctp"), (POD, "10.0.0.1", K),
         (POD6, "2606:4700::1", (SNAT, "2001:db8::10"), "eth0", "udp"), (POD6, "fe80::1", K)],
        id="snat-to-addresses-with-to-ports"),
    pytest.param(
        {"snatToAddressIPv6": "2001:db8::10"}, {"enable_ipv6": True, "random_fully": False},
        [(POD, "198.51.100.1", M), (POD6, "2606:4700::1", (SNAT, "2001:db8::10"))],
        id="snat-ipv6-only"),
    pytest.param(
        {"masqueradeSourceCIDRs": ["10.244.0.0/16", "10.250.0.0/16"], "outputInterfaces": ["eth0", "wg+"],
         "masqueradeCIDRs": ["10.99.0.0/16"], "snatToAddress": "192.0.2.10"},
        {"to_ports": "8000,9000-9099"},
        [(POD, "10.99.0.1", (SNAT, "192.0.2.10"), "wg1"), ("10.250.0.1", "198.51.100.1", (SNAT, "192.0.2.10"), "eth0"),
         ("10.250.0.1", "198.51.100.1", K, "eth1"), ("10.251.0.1", "198.51.100.1", K, "eth0"),
         (POD, "10.98.0.1", K, "eth0")],
        id="sources-times-interfaces-with-to-ports"),
]


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
@pytest.mark.parametrize(("doc", "flags", "packets"), DECISION_CASES)
def test_rendered_rules_decide_the_table_cases(doc, flags, packets, backend):
    case = Case(doc, flags)
    program, text = case.programs()[backend]
    for src, dst, expected, *rest in packets:
        pkt = packet(src, dst, *rest)
        assert reference_decision(case.model, pkt) == expected, (src, dst, rest)
        check(case, backend, program, text, pkt)


@pytest.mark.parametrize("interfaces", [["+"], ["eth0", "+"]], ids=["plus-alone", "plus-among-others"])
def test_output_interfaces_any_name_is_refused(interfaces):
    """``+`` matches every interface (iptables' meaning), in a form neither kernel takes back as
    written (nft refuses ``oifname "*"``, iptables-save drops ``-o +``): the config refuses it."""
    with pytest.raises(ConfigError, match=r"'\+' alone is every interface: leave outputInterfaces out"):
        Case({"outputInterfaces": interfaces}, {}).ruleset()


# --- (a) property: random configs and packets --------------------------------------------------------

V4_ANCHORS = ("10.0.0.0", "10.99.0.0", "10.99.0.5", "10.99.0.128", "10.99.1.0", "10.1.2.3", "10.255.255.255",
              "10.127.255.255", "10.128.0.0")
V4_OTHERS = ("169.254.169.254/32", "169.254.0.0/17", "169.254.0.0/16", "169.254.128.0/24", "192.168.0.0/16",
             "192.168.1.0/24", "172.16.0.0/12", "172.31.0.0/16", "0.0.0.0/0", "203.0.113.0/24", "198.51.100.0/24",
             "100.64.0.0/10", "128.0.0.0/1", "0.0.0.0/1", "11.0.0.0/8", "9.255.255.255/32")
V6_ANCHORS = ("2001:db8::", "2001:db8:0:99::", "2001:db8:0:99::80", "2001:db8:ffff::", "fd00::", "fd00::1",
              "fe80::", "fe80::1", "fe80::a9fe:a9fe", "::ffff:10.0.0.0", "::")
V6_LENGTHS = (8, 10, 16, 32, 33, 48, 56, 64, 65, 96, 104, 112, 120, 126, 127, 128)
SOURCE_V4 = ("10.244.0.0", "10.244.5.0", "10.244.5.128", "10.0.0.0", "192.168.0.0", "0.0.0.0")
SOURCE_V6 = ("fd00:244::", "fd00:244:5::", "fd00::", "2001:db8::", "::ffff:10.244.0.0")
#: (Not "+" alone: the config refuses it, see test_output_interfaces_any_name_is_refused.)
INTERFACE_PATTERNS = ("eth0", "eth1", "eth+", "ens3", "ens+", "e+", "wg0", "bond0.100", "veth-a@if2")
INTERFACES = ("eth0", "eth1", "eth10", "ens3", "ens33", "e", "wg0", "bond0.100", "veth-a@if2", "lo")
SNAT4 = ("192.0.2.10", "198.51.100.7", "10.0.0.5")
SNAT6 = ("2001:db8::10", "fd00::5", "2001:db8:0:99::1")
TO_PORTS = ("", "", "", "32768-65535", "1024-29999,32768-65535", "8000", "5000-5249,1000-1999,3000-3499",
            "65535,1-1")


def _net(anchor, prefixlen):
    return ipaddress.ip_network(f"{anchor}/{prefixlen}", strict=False)


v4_nets = st.one_of(
    st.builds(_net, st.sampled_from(V4_ANCHORS) | st.integers(10 << 24, (11 << 24) - 1).map(ipaddress.IPv4Address),
              st.integers(8, 32)),
    st.sampled_from(V4_OTHERS).map(ipaddress.ip_network),
)
v6_nets = st.builds(_net, st.sampled_from(V6_ANCHORS), st.sampled_from(V6_LENGTHS) | st.integers(0, 128))
source_v4 = st.builds(_net, st.sampled_from(SOURCE_V4), st.sampled_from((8, 16, 24, 25, 32)) | st.integers(0, 32))
source_v6 = st.builds(_net, st.sampled_from(SOURCE_V6), st.sampled_from((16, 32, 48, 64, 128)) | st.integers(0, 128))


def _texts(nets):
    return [str(net) for net in nets]


@st.composite
def decision_cases(draw) -> Case:
    enable_ipv6 = draw(st.booleans())
    nets = (v4_nets | v6_nets) if enable_ipv6 else v4_nets
    sources = (source_v4 | source_v6) if enable_ipv6 else source_v4
    flags = {
        "enable_ipv6": enable_ipv6,
        "random_fully": draw(st.booleans()),
        "nomasq_all_reserved_ranges": draw(st.booleans()),
        "to_ports": draw(st.sampled_from(TO_PORTS)),
    }
    doc: dict = {}
    if draw(st.integers(0, 4)):  # mostly set; absent: the defaults
        doc["nonMasqueradeCIDRs"] = _texts(draw(st.lists(nets, max_size=8)))
    for key in ("masqLinkLocal", "masqLinkLocalIPv6"):
        if draw(st.booleans()):
            doc[key] = draw(st.booleans())
    # masquerade entries: anything but a prefix that is also a keep entry (validation refuses that)
    keep = set(model_of(doc, flags).keep)
    doc["masqueradeCIDRs"] = _texts(net for net in draw(st.lists(nets, max_size=6)) if net not in keep)
    if draw(st.integers(0, 2)) == 0:
        doc["nonMasqueradeSourceCIDRs"] = _texts(draw(st.lists(sources, max_size=3)))
    if draw(st.integers(0, 2)) == 0:
        listed = draw(st.lists(sources, max_size=3))
        if enable_ipv6 and draw(st.booleans()):
            listed = [net for net in listed if net.version == 4]  # no IPv6 source: no IPv6 masquerade
        doc["masqueradeSourceCIDRs"] = _texts(listed)
    if draw(st.integers(0, 2)) == 0:
        doc["snatToAddress"] = draw(st.sampled_from(SNAT4))
    if enable_ipv6 and draw(st.integers(0, 2)) == 0:
        doc["snatToAddressIPv6"] = draw(st.sampled_from(SNAT6))
    if draw(st.integers(0, 2)) == 0:
        doc["outputInterfaces"] = draw(st.lists(st.sampled_from(INTERFACE_PATTERNS), max_size=3, unique=True))
    text = yaml.safe_dump(doc) if draw(st.booleans()) else json.dumps(doc)
    return Case(doc, flags, text, random_fully_supported=draw(st.booleans()))


def _near(net) -> list[int]:
    """Addresses at and just around ``net``'s edges."""
    top = (1 << net.max_prefixlen) - 1
    first, last = int(net.network_address), int(net.broadcast_address)
    return [a for a in (first - 1, first, first + 1, (first + last) // 2, last - 1, last, last + 1) if 0 <= a <= top]


def _address_in(draw, family: int, nets, anchors) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    bits = 32 if family == 4 else 128
    nets = [net for net in nets if net.version == family]
    candidates = sorted({a for net in nets for a in _near(net)} | {int(cls(a)) for a in anchors})
    inside = [st.builds(lambda net, r: int(net.network_address) + r % net.num_addresses,
                        st.sampled_from(nets), st.integers(0, 2**bits))] if nets else []
    return cls(draw(st.one_of(st.sampled_from(candidates), *inside, st.integers(0, 2**bits - 1))))


@st.composite
def packets_for(draw, model: Model) -> Packet:
    family = draw(st.sampled_from(model.families))
    dst_anchors = V4_ANCHORS + ("8.8.8.8", "169.254.169.254") if family == 4 else V6_ANCHORS + ("2606:4700::1",)
    src_anchors = SOURCE_V4 + ("10.244.5.9",) if family == 4 else SOURCE_V6 + ("fd00:244:5::9",)
    dst = _address_in(draw, family, model.keep + model.masq, dst_anchors)
    src = _address_in(draw, family, model.keep_sources + model.masq_sources, src_anchors)
    return Packet(src, dst, draw(st.sampled_from(INTERFACES)), draw(st.sampled_from(PORT_PROTOCOLS + ("icmp",))))


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=decision_cases(), data=st.data())
def test_rendered_rules_decide_as_the_reference(backend, case, data):
    program, text = case.programs()[backend]
    assert program.families == case.model.families
    for pkt in data.draw(st.lists(packets_for(case.model), min_size=1, max_size=30), label="packets"):
        check(case, backend, program, text, pkt)


# --- (b) upstream's rule texts ----------------------------------------------------------------------

NONMASQ_COMMENT = "ip-masq-agent: local traffic is not subject to MASQUERADE"
MASQ_COMMENT = "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)"
JUMP_COMMENT = "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {} chain"


def _keep_lists(doc: dict, flags: dict) -> dict[int, list]:
    """Per family, upstream's keep list in rule order: link-local, then the file's CIDRs (or the
    defaults) in file order, duplicates kept."""
    if "nonMasqueradeCIDRs" in doc:
        listed = NETS(doc["nonMasqueradeCIDRs"] or ())
    else:
        listed = NETS(RFC1918 + (RESERVED if flags.get("nomasq_all_reserved_ranges") else ()))
    masq_link_local = {4: doc.get("masqLinkLocal", False), 6: doc.get("masqLinkLocalIPv6", False)}
    families = (4, 6) if flags.get("enable_ipv6") else (4,)
    return {f: ([] if masq_link_local[f] else [LINK_LOCAL[f]]) + [n for n in listed if n.version == f]
            for f in families}


def _save_cidr(net) -> str:
    """A network as iptables-save prints it: the C library's inet_ntop (IPv4-mapped and
    IPv4-compatible IPv6 addresses in dotted form)."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, net.network_address.packed)}/{net.prefixlen}"


def _port_shares(to_ports: str) -> list[tuple[str, int, int | None]]:
    """(ports text, interval size, size of it and every later interval or None for the last)."""
    ranges = [(int(first), int(last or first)) for p in to_ports.split(",") if p
              for first, _, last in (p.partition("-"),)]
    texts = [str(first) if first == last else f"{first}-{last}" for first, last in ranges]  # as iptables-save prints
    sizes = [last - first + 1 for first, last in ranges]
    return [(text, size, None if i == len(ranges) - 1 else sum(sizes[i:]))
            for i, (text, size) in enumerate(zip(texts, sizes, strict=True))]


def upstream_iptables(doc: dict, flags: dict, random_fully_supported: bool = True) -> str:
    chain = flags.get("masq_chain", "IP-MASQ-AGENT")
    suffix = " --random-fully" if flags.get("random_fully", True) and random_fully_supported else ""
    parts = []
    for family, keep in _keep_lists(doc, flags).items():
        lines = ["# iptables-restore --noflush" if family == 4 else "# ip6tables-restore --noflush", "*nat",
                 f":{chain} - [0:0]"]
        for net in keep:
            match = "" if net.prefixlen == 0 else f"-d {_save_cidr(net)} "
            lines.append(f'-A {chain} {match}-m comment --comment "{NONMASQ_COMMENT}" -j RETURN')
        for proto in ("tcp", "udp", "sctp") if flags.get("to_ports") else ():
            for ports, size, remaining in _port_shares(flags["to_ports"]):
                statistic = ""
                if remaining is not None:  # as the kernel stores it (31-bit fixed point), as iptables prints it
                    stored = math.floor(0x80000000 * size / remaining + 0.5)
                    statistic = f" -m statistic --mode random --probability {stored / 0x80000000:.11f}"
                lines.append(f'-A {chain} -p {proto} -m comment --comment "{MASQ_COMMENT}"{statistic} '
                             f"-j MASQUERADE --to-ports {ports}{suffix}")
        lines.append(f'-A {chain} -m comment --comment "{MASQ_COMMENT}" -j MASQUERADE{suffix}')
        lines.append(f'-A POSTROUTING -m comment --comment "{JUMP_COMMENT.format(chain)}" '
                     f"-m addrtype ! --dst-type LOCAL -j {chain}")
        lines.append("COMMIT")
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def upstream_nftables(doc: dict, flags: dict) -> str:
    """The nft script masqd wrote before the decision model (the golden files' form)."""
    fully = " fully-random" if flags.get("random_fully", True) else ""
    parts = []
    for family, keep in _keep_lists(doc, flags).items():
        name, kind = ("ip", "ipv4_addr") if family == 4 else ("ip6", "ipv6_addr")
        elements = ", ".join(map(str, ipaddress.collapse_addresses(keep)))
        lines = [f"add table {name} masqd", f"delete table {name} masqd", f"table {name} masqd {{",
                 '\tcomment "masqd: masquerade decisions for traffic leaving this node '
                 '(managed by masqd, do not edit)"',
                 f"\tset nonmasq{family} {{", f"\t\ttype {kind}", "\t\tflags interval",
                 '\t\tcomment "masqd: destinations that keep the pod source address"']
        if elements:
            lines.append(f"\t\telements = {{ {elements} }}")
        lines += ["\t}", "\tchain nat {",
                  '\t\tcomment "masqd: masquerade traffic that is not local and not in the non-masquerade set"',
                  "\t\ttype nat hook postrouting priority srcnat + 10; policy accept;",
                  "\t\tfib daddr type local return", f"\t\t{name} daddr @nonmasq{family} return"]
        for proto in ("tcp", "udp", "sctp") if flags.get("to_ports") else ():
            for ports, size, remaining in _port_shares(flags["to_ports"]):
                numgen = "" if remaining is None else f" numgen random mod {remaining} < {size}"
                lines.append(f"\t\tmeta l4proto {proto}{numgen} masquerade to :{ports}{fully}")
        lines += [f"\t\tmasquerade{fully}", "\t}", "}"]
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def masqd_renders(doc: dict, flags: dict, random_fully_supported: bool = True, text: str | None = None):
    case = Case(doc, flags, text or "")
    ruleset = case.ruleset()
    return render_iptables(ruleset, random_fully_supported=random_fully_supported), render_nftables(ruleset)


ONLY_10 = {"nonMasqueradeCIDRs": ["10.0.0.0/8"]}
IPV6_DOC = {"nonMasqueradeCIDRs": ["10.0.0.0/8", "fd00::/8", "192.168.0.0/16", "2001:db8::/32"]}
TWO_RANGES = "1024-29999,32768-65535"

#: (golden name, doc, flags, random_fully_supported); the goldens are the texts before issue 16.
UPSTREAM_GOLDENS = [
    pytest.param("defaults", {}, {}, True, id="defaults"),
    pytest.param("nomasq_all_reserved_ranges", {}, {"nomasq_all_reserved_ranges": True}, True, id="reserved"),
    pytest.param("ipv6", IPV6_DOC, {"enable_ipv6": True}, True, id="ipv6"),
    pytest.param("masq_link_local", {"masqLinkLocal": True}, {}, True, id="masqLinkLocal"),
    pytest.param("masq_link_local_ipv6", {"masqLinkLocalIPv6": True, "nonMasqueradeCIDRs": ["10.0.0.0/8", "fd00::/8"]},
                 {"enable_ipv6": True}, True, id="masqLinkLocalIPv6"),
    pytest.param("custom_chain", {}, {"masq_chain": "MASQD-EGRESS"}, True, id="custom-chain"),
    pytest.param("random_fully_false", {}, {"random_fully": False}, True, id="random-fully-false"),
    pytest.param("to_ports_one_range", ONLY_10, {"to_ports": "32768-65535"}, True, id="to-ports-one-range"),
    pytest.param("to_ports_two_ranges", ONLY_10, {"to_ports": TWO_RANGES}, True, id="to-ports-two-ranges"),
    pytest.param("to_ports_two_ranges_no_random_fully", ONLY_10, {"to_ports": TWO_RANGES, "random_fully": False},
                 True, id="to-ports-two-ranges-no-random-fully"),
    pytest.param("to_ports_three_ranges", ONLY_10, {"to_ports": "1000-1999,3000-3499,5000-5249"}, True,
                 id="to-ports-three-ranges"),
    pytest.param("to_ports_single_port", ONLY_10, {"to_ports": "8000"}, True, id="to-ports-single-port"),
]


@pytest.mark.parametrize(("name", "doc", "flags", "supported"), UPSTREAM_GOLDENS)
def test_upstream_renderer_writes_the_goldens(name, doc, flags, supported):
    """The independent renderers of this file reproduce the golden texts (written before issue 16
    and checked against real iptables-save and nft), so they are a fair "before"."""
    ipt = GOLDEN / "iptables" / f"{name}.txt"
    nft = GOLDEN / "nftables" / f"{name}.txt"
    assert ipt.exists() or nft.exists()
    if ipt.exists():
        assert upstream_iptables(doc, flags, supported) == ipt.read_text()
    if nft.exists():
        assert upstream_nftables(doc, flags) == nft.read_text()


@pytest.mark.parametrize(("name", "doc", "flags", "supported"), UPSTREAM_GOLDENS)
def test_masqd_renders_the_goldens(name, doc, flags, supported):
    ipt, nft = masqd_renders(doc, flags, supported)
    if (GOLDEN / "iptables" / f"{name}.txt").exists():
        assert ipt == (GOLDEN / "iptables" / f"{name}.txt").read_text()
    if (GOLDEN / "nftables" / f"{name}.txt").exists():
        assert nft == (GOLDEN / "nftables" / f"{name}.txt").read_text()


def _spellings(net) -> st.SearchStrategy[str]:
    """Ways a config may write ``net`` (IPv6: compressed, exploded, upper case)."""
    if net.version == 4:
        return st.just(str(net))
    upper = f"{net.network_address.exploded.upper()}/{net.prefixlen}"
    return st.sampled_from((str(net), net.exploded, str(net).upper(), upper))


UPSTREAM_V6 = st.builds(_net, st.sampled_from(V6_ANCHORS + ("::ffff:0.0.0.0", "::0.0.0.1", "::1:0:0:0", "2001:db8::1")),
                        st.sampled_from(V6_LENGTHS + (0, 1, 95, 97)) | st.integers(0, 128))
CHAINS = ("IP-MASQ-AGENT", "MASQD-EGRESS", "x", "A" * 28, "my_chain.1", "0")


@st.composite
def upstream_configs(draw, neutral_keys: bool = False):
    """(doc, text, flags, random_fully_supported) with only upstream's keys and flags; with
    ``neutral_keys``, the new keys added with empty / null values."""
    flags = {
        "enable_ipv6": draw(st.booleans()),
        "random_fully": draw(st.booleans()),
        "nomasq_all_reserved_ranges": draw(st.booleans()),
        "to_ports": draw(st.sampled_from(TO_PORTS)),
        "masq_chain": draw(st.sampled_from(CHAINS)),
    }
    nets = (v4_nets | UPSTREAM_V6) if flags["enable_ipv6"] else v4_nets
    doc: dict = {}
    choice = draw(st.integers(0, 5))
    if choice == 0:
        doc["nonMasqueradeCIDRs"] = None  # like Go: an empty list
    elif choice < 5:
        listed = draw(st.lists(nets, max_size=10))
        if listed and draw(st.booleans()):  # duplicates are kept, in file order
            listed += draw(st.lists(st.sampled_from(listed), max_size=3))
            listed = draw(st.permutations(listed))
        doc["nonMasqueradeCIDRs"] = [draw(_spellings(net)) for net in listed]
    for key in ("masqLinkLocal", "masqLinkLocalIPv6"):
        if draw(st.booleans()):
            doc[key] = draw(st.booleans())
    if draw(st.booleans()):
        doc["resyncInterval"] = draw(st.sampled_from(("60s", "5m", "1m30s", "500ms", "1h")))
    if draw(st.booleans()):
        count = len(doc["nonMasqueradeCIDRs"] or ()) if "nonMasqueradeCIDRs" in doc else \
            len(RFC1918 + (RESERVED if flags["nomasq_all_reserved_ranges"] else ()))  # the defaults count too
        doc["cidrLimit"] = draw(st.integers(count, count + 3))
    if neutral_keys:
        for key in ("masqueradeCIDRs", "masqueradeSourceCIDRs", "nonMasqueradeSourceCIDRs", "outputInterfaces"):
            if draw(st.booleans()):
                doc[key] = draw(st.sampled_from(([], None)))
        for key in ("snatToAddress", "snatToAddressIPv6"):  # null: ignored with a warning, default kept
            if draw(st.integers(0, 3)) == 0:
                doc[key] = None
    text = yaml.safe_dump(doc) if draw(st.booleans()) else json.dumps(doc)
    return doc, text, flags, draw(st.booleans())


def _upstream_doc(doc: dict) -> dict:
    """What upstream reads of ``doc``: its CIDRs as networks (spelling does not matter)."""
    if doc.get("nonMasqueradeCIDRs"):
        doc = {**doc, "nonMasqueradeCIDRs": [str(ipaddress.ip_network(t)) for t in doc["nonMasqueradeCIDRs"]]}
    return doc


@settings(max_examples=200, deadline=None)
@given(upstream_configs())
def test_upstream_configs_render_upstreams_texts(config):
    doc, text, flags, supported = config
    ipt, nft = masqd_renders(doc, flags, supported, text)
    assert ipt == upstream_iptables(_upstream_doc(doc), flags, supported), text
    assert nft == upstream_nftables(_upstream_doc(doc), flags), text


@settings(max_examples=150, deadline=None)
@given(upstream_configs(neutral_keys=True))
def test_new_keys_left_empty_render_upstreams_texts(config):
    doc, text, flags, supported = config
    ipt, nft = masqd_renders(doc, flags, supported, text)
    upstream = {k: v for k, v in _upstream_doc(doc).items()
                if k in ("nonMasqueradeCIDRs", "masqLinkLocal", "masqLinkLocalIPv6")}
    assert ipt == upstream_iptables(upstream, flags, supported), text
    assert nft == upstream_nftables(upstream, flags), text


NEUTRAL = [
    pytest.param({"masqueradeCIDRs": []}, id="masqueradeCIDRs-empty"),
    pytest.param({"masqueradeSourceCIDRs": []}, id="masqueradeSourceCIDRs-empty"),
    pytest.param({"nonMasqueradeSourceCIDRs": []}, id="nonMasqueradeSourceCIDRs-empty"),
    pytest.param({"outputInterfaces": []}, id="outputInterfaces-empty"),
    pytest.param({"masqueradeCIDRs": None, "masqueradeSourceCIDRs": None, "nonMasqueradeSourceCIDRs": None},
                 id="cidr-lists-null"),
    pytest.param({"masqueradeCIDRs": [], "masqueradeSourceCIDRs": [], "nonMasqueradeSourceCIDRs": [],
                  "outputInterfaces": []}, id="all-empty"),
]


@pytest.mark.parametrize("neutral", NEUTRAL)
@pytest.mark.parametrize(("name", "doc", "flags", "supported"), UPSTREAM_GOLDENS)
def test_new_keys_left_empty_render_the_goldens(name, doc, flags, supported, neutral):
    ipt, nft = masqd_renders({**doc, **neutral}, flags, supported)
    if (GOLDEN / "iptables" / f"{name}.txt").exists():
        assert ipt == (GOLDEN / "iptables" / f"{name}.txt").read_text()
    if (GOLDEN / "nftables" / f"{name}.txt").exists():
        assert nft == (GOLDEN / "nftables" / f"{name}.txt").read_text()
