"""The values ``masqd explain`` reports (verdicts, matches, the source and interface rules, the
report) and the parsers of its arguments. Pure: no I/O."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from masqd.backends.base import (
    AFTER,
    BEFORE,
    INSIDE,
    KEEPS,
    MASQUERADES,
    ForeignRule,
    LiveRules,
)
from masqd.backends.services import ServiceEndpoint, ServiceFrontend, ServiceMap
from masqd.cidrs import Network
from masqd.config.model import INTERFACE_NAME
from masqd.provenance import Origin

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Verdicts: the pod address is kept (a non-masquerade CIDR matches), the address is masqueraded,
#: masqd's rules do not act on it (IPv6 not enabled; in the kernel: its rules are not there), or
#: (``--live``) rules masqd does not write may decide either way.
KEEP, MASQUERADE, UNMANAGED, UNCERTAIN = "keep", "masquerade", "unmanaged", "uncertain"
HEADLINES = {
    KEEP: "keeps the pod source address (not masqueraded)",
    MASQUERADE: "masqueraded to the node's address",
    UNMANAGED: "not masqueraded by masqd",
    UNCERTAIN: "uncertain: rules masqd does not write may decide",
}
STAGES = {BEFORE: "ahead of its chain", INSIDE: "in its chain", AFTER: "after its chain"}
MAY_ACT = {BEFORE: "may act first", INSIDE: "may act first, in masqd's chain", AFTER: "may act after masqd's chain"}
EFFECTS = {MASQUERADES: "it may masquerade", KEEPS: "it may end nat processing: not masqueraded",
            "either": "it may masquerade or end nat processing"}
NO_DESIRED = "no desired state to compare with: the config is invalid"
IPV6_UNMANAGED = ("IPv6 is not managed by masqd (it runs without --enable-ipv6): it writes no IPv6 rules, so masqd "
                   "does not masquerade it")
LOCAL_NOTE = "unless it is an address of this node: traffic to the node's own addresses is never masqueraded"
#: At most this many CIDRs are listed in one difference line (the count of the rest follows).
LISTED = 20


@dataclass(frozen=True, slots=True)
class Match:
    """A CIDR containing the address, and its origins (empty: a CIDR of the kernel's that the
    desired state does not hold). ``merged_from``: when the kernel holds a merged block, the
    desired CIDRs behind it that contain the address. ``masquerade``: a masquerade entry
    (``masqueradeCIDRs``, a plugin's ``masquerade_cidrs``), not a non-masquerade one; also used
    for the entries of the source lists. ``part_of``: (``--live``) the kernel holds the
    longest-prefix result flattened, and this CIDR of it keeps the address for that desired
    entry (whose origins are given)."""

    cidr: Network
    origins: tuple[Origin, ...]
    merged_from: tuple[Network, ...] = ()
    masquerade: bool = False
    part_of: Network | None = None


@dataclass(frozen=True, slots=True)
class SourceRule:
    """What the source rules of a rule set do with traffic from ``address`` (``--from``; ``None``:
    not given, a source the lists leave to the destination).

    keep_sources: the ``nonMasqueradeSourceCIDRs`` of the family, with their origins.
    masq_sources: the ``masqueradeSourceCIDRs`` of the family (``None``: the key lists none, any
        source may be masqueraded; empty: it lists only the other family's, none may).
    keeps_by: the list whose rule keeps the pod address (``nonMasqueradeSourceCIDRs``: the source
        is in it; ``masqueradeSourceCIDRs``: it is outside every entry), ``None`` when the source
        rules leave it to the destination.
    held_by: the entry holding ``address`` (of ``nonMasqueradeSourceCIDRs`` when that list keeps
        it, else of ``masqueradeSourceCIDRs``), ``None`` when none does.
    """

    address: Address | None
    keep_sources: tuple[Match, ...] = ()
    masq_sources: tuple[Match, ...] | None = None
    keeps_by: str | None = None
    held_by: Match | None = None

    @property
    def keeps(self) -> bool:
        return self.keeps_by is not None


@dataclass(frozen=True, slots=True)
class InterfaceRule:
    """What ``outputInterfaces`` does with traffic leaving through ``name`` (``--out-interface``;
    ``None``: not given, an interface the list leaves to the source and destination).
    ``patterns``: the list (iptables' form, ``ens+``) with each name's origins; ``matched``: the
    name of it ``name`` matches."""

    name: str | None
    patterns: tuple[tuple[str, tuple[Origin, ...]], ...] = ()
    matched: str | None = None

    @property
    def keeps(self) -> bool:
        """Traffic through ``name`` leaves unmasqueraded: the list is not empty and holds no match."""
        return self.name is not None and bool(self.patterns) and self.matched is None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a rule set does with traffic to one address. ``reason``: why, when no CIDR says it
    (masqd's rules absent, IPv6 not enabled, masqLinkLocal: true).

    With ``--live``: ``masqd``, what masqd's own rules in the kernel do (``matches`` and ``reason``
    are theirs); ``foreign``, the rules masqd does not write that may act on the address, in the
    kernel's order; ``decided_by``, the last of them when it surely matches and so decides
    ``action`` (then ``matches`` is empty).

    The decision model's steps: ``interface`` and ``source``, the rules that act before the
    destination (``None``: none set and no flag given); ``deciding``, the destination's longest
    matching entry (non-masquerade or masquerade; the kernel: its most specific CIDR), and
    ``overridden``, the other entries holding it, longest first (``matches`` stays the
    non-masquerade CIDRs that keep it, as before: empty when a rule or a masquerade entry
    decides); ``snat_to``, the address masquerading rewrites to (``None``: the node's,
    MASQUERADE) and ``snat_origins`` where it was set."""

    action: str  # KEEP, MASQUERADE, UNMANAGED or UNCERTAIN
    matches: tuple[Match, ...] = ()
    reason: str | None = None
    masqd: str | None = None
    foreign: tuple[ForeignRule, ...] = ()
    decided_by: ForeignRule | None = None
    deciding: Match | None = None
    overridden: tuple[Match, ...] = ()
    source: SourceRule | None = None
    interface: InterfaceRule | None = None
    snat_to: str | None = None
    snat_origins: tuple[Origin, ...] = ()

    @property
    def masquerades(self) -> bool:
        return self.action == MASQUERADE

    @property
    def rewrite(self) -> str | None:
        """The address masqd's own rules rewrite the source to when they masquerade: ``snat_to``,
        or ``None`` (the node's address); also ``None`` when a rule masqd does not write decides."""
        return self.snat_to if self.decided_by is None else None

    @property
    def rule_keeps(self) -> bool:
        """An interface or source rule keeps the pod address, before the destination is looked at."""
        return bool((self.interface and self.interface.keeps) or (self.source and self.source.keeps))


@dataclass(frozen=True, slots=True)
class Explanation:
    """One address: the desired state's verdict (``None``: the config is invalid, the kernel alone
    is explained) and, with ``--live``, the kernel's. ``as_ipv4``: the IPv4 address an
    IPv4-mapped ``address`` was explained as."""

    address: Address
    desired: Verdict | None
    live: Verdict | None = None
    as_ipv4: ipaddress.IPv4Address | None = None
    #: (``--live``) kube-proxy DNATs traffic to the address: each Service port, its endpoints explained.
    services: tuple[ServiceRoute, ...] = ()

    @property
    def family(self) -> int:
        return (self.as_ipv4 or self.address).version

    @property
    def shown_address(self) -> str:
        """The address as given; an IPv4-mapped one in its dotted form (``::ffff:10.1.1.1``)."""
        return f"::ffff:{self.as_ipv4}" if self.as_ipv4 is not None else str(self.address)

    @property
    def drift(self) -> bool:
        """The kernel masquerades it and the desired state would not, or the other way round, or
        both masquerade it (masqd's own rules) to different addresses (SNAT, MASQUERADE).
        An ``uncertain`` verdict (a rule masqd does not write *may* decide, depending on matches
        explain does not evaluate, such as a CNI plugin's jump to its masquerade chain) is shown
        but is not drift. kube-proxy's packet-mark MASQUERADE, on every node, acts on marked
        traffic only (:attr:`~masqd.backends.base.ForeignRule.mark`) and decides nothing here."""
        if any(endpoint.drift for route in self.services for endpoint in route.endpoints):
            return True
        if self.live is None or self.desired is None or self.live.action == UNCERTAIN:
            return False
        if self.live.masquerades != self.desired.masquerades:
            return True
        return self.live.masquerades and self.live.decided_by is None and self.live.snat_to != self.desired.snat_to


@dataclass(frozen=True, slots=True)
class EndpointRoute:
    """One endpoint of a Service port, explained as traffic to it is (``explanation``: masqd's
    rules, desired and in the kernel, with kube-proxy's mark-only masquerade left out).
    ``marked``: kube-proxy marks this traffic for its own masquerade (``None``: that depends on a
    source not given); marked traffic is masqueraded whatever masqd decides, so it is not drift."""

    endpoint: ServiceEndpoint
    explanation: Explanation
    marked: bool | None = False

    @property
    def drift(self) -> bool:
        return self.marked is not True and self.explanation.drift


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """A Service port kube-proxy DNATs the explained address to (:class:`ServiceFrontend`), with
    each endpoint explained; ``services``: the map it was read from (names, mark, chains)."""

    frontend: ServiceFrontend
    endpoints: tuple[EndpointRoute, ...]
    services: ServiceMap
    marked: bool | None = False


def parse_destination(text: str) -> Address:
    """An IPv4 or IPv6 address (``10.1.2.3``, ``2001:db8::1``); raises ``ValueError`` saying what is
    valid (a CIDR is not an address)."""
    return _address(text, "address, e.g. 10.1.2.3 or 2001:db8::1", "one address of the network, e.g. its first")


def parse_source(text: str) -> Address:
    """``--from SOURCE``: the source address of the traffic explained (a pod's, e.g. 10.244.1.5);
    raises ``ValueError`` saying what is valid. Its family is checked against the destinations'
    by :func:`source_family_problem`."""
    return _address(text, "source address, e.g. 10.244.1.5 or 2001:db8::5", "one address, e.g. the pod's")


def _address(text: str, what: str, instead_of_cidr: str) -> Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        hint = f"; give {instead_of_cidr}" if "/" in text else ""
        raise ValueError(f"not an IPv4 or IPv6 {what}{hint}") from None


def parse_interface(text: str) -> str:
    """``--out-interface NAME``: the interface traffic leaves through; raises ``ValueError`` saying
    what is valid (a wildcard such as ``eth+`` is a pattern, not an interface)."""
    if text.endswith("+") and INTERFACE_NAME.fullmatch(text[:-1] or "x"):
        raise ValueError("a wildcard matches many interfaces (outputInterfaces may hold one); give the name of the "
                         "one traffic leaves through, e.g. eth0")
    if not INTERFACE_NAME.fullmatch(text) or text in (".", ".."):
        raise ValueError("not an interface name: 1-15 letters, digits, '_', '.', '-' or '@' (not starting with '-'; not '.' or '..'), "
                         "e.g. eth0")
    return text


def source_family_problem(source: Address, addresses) -> str | None:
    """Why ``--from source`` cannot be explained with these destinations (``None``: it can): it
    must be of each destination's family (an IPv4-mapped address counts as IPv4)."""
    version = explained_as(source)[0].version
    other = [str(address) for address in addresses if explained_as(address)[0].version != version]
    if not other:
        return None
    return (f"--from {source} is an IPv{version} address, but {', '.join(other)} "
            f"{'is' if len(other) == 1 else 'are'} IPv{6 if version == 4 else 4}: traffic has one address family; "
            f"give a source of the destination's family (explain IPv4 and IPv6 destinations separately)")


@dataclass(frozen=True, slots=True)
class Report:
    """Every address explained; with ``--live`` the rules read back and, per family, what differs
    in them from the desired state (no entry, or an empty one: nothing)."""

    explanations: tuple[Explanation, ...]
    live: LiveRules | None = None
    differences: dict[int, tuple[str, ...]] = field(default_factory=dict)
    #: False: the config is invalid, so the kernel's rules are explained alone (no desired state).
    compared: bool = True
    #: The decision model beyond upstream is in play (one of its keys set, in the desired state or
    #: the kernel, or ``--from`` / ``--out-interface`` given): the JSON output holds its facts.
    extended: bool = False

    @property
    def drift(self) -> bool:
        """Any address decided otherwise by the kernel, or any family whose rules differ."""
        return any(e.drift for e in self.explanations) or any(self.differences.values())

def explained_as(address: Address) -> tuple[Address, ipaddress.IPv4Address | None]:
    """The address traffic really goes to: an IPv4-mapped IPv6 address leaves as IPv4."""
    mapped = address.ipv4_mapped if address.version == 6 else None
    return (mapped, mapped) if mapped is not None else (address, None)
