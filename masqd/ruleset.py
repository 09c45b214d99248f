"""The desired state: a backend-neutral, frozen :class:`RuleSet`, and the decision model. Pure: no I/O.

A RuleSet says, per address family, which destinations keep the pod source address (in the order
the rules are written) and how everything else is masqueraded. Backends only translate it.

The decision for a packet leaving the node to a non-local destination (:meth:`RuleSet.decide`,
which every backend's rules implement and ``explain`` reports):

1. leaving through an interface outside a non-empty ``outputInterfaces``: kept;
2. from a source in ``nonMasqueradeSourceCIDRs``: kept;
3. ``masqueradeSourceCIDRs`` non-empty and the source in none of them: kept;
4. otherwise the longest prefix matching the destination among the keep entries (link-local,
   config, defaults, plugins, policies) and the masquerade entries (``masqueradeCIDRs``,
   plugins) decides; no match: masqueraded;
5. masqueraded is MASQUERADE, or SNAT to ``snatToAddress`` / ``snatToAddressIPv6``.

With none of those keys set, the keep list is upstream's and rendered as upstream renders it. A
masquerade entry that lies inside a shorter keep entry cuts it: the outermost keep entry holding
it is then written as the longest-prefix result within it, flattened into the fewest CIDRs, after
the keep entries no override touches, as listed (:attr:`FamilyRules.nonmasq`); while
:attr:`FamilyRules.listed` keeps the entries as listed, for ``explain`` and provenance.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
from dataclasses import dataclass
from fractions import Fraction

from masqd.cidrs import (LINK_LOCAL_V4, LINK_LOCAL_V6, Network, longest_prefix_ranges, network_key, range_networks,
                         split_families, unique)
from masqd.config import AgentOptions, MasqConfig, PortRange

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Protocols that get per-interval ``--to-ports`` rules, in rule order (upstream order).
PORT_PROTOCOLS: tuple[str, ...] = ("tcp", "udp", "sctp")


@dataclass(frozen=True, slots=True)
class FamilyRules:
    """One address family's decisions (see the module docstring).

    nonmasq: the destinations the rules keep, in rule order: the keep entries as listed
        (link-local first when it is exempt, duplicates kept, as upstream); when a masquerade
        entry cuts into one, the entries no override touches, as listed, then the ranges cut,
        each as its longest-prefix result in the fewest CIDRs, in address order.
    keep: the keep entries as listed when ``nonmasq`` is their flattening; ``None`` otherwise.
    masq: the masquerade entries (``masqueradeCIDRs``, plugins), each once.
    keep_sources: ``nonMasqueradeSourceCIDRs`` of this family.
    masq_sources: ``masqueradeSourceCIDRs`` of this family; ``None`` when the key lists none at
        all (any source), empty when it lists only the other family's (no source).
    snat_to: the address to SNAT to instead of MASQUERADE (``None``: MASQUERADE).
    """

    family: int  # 4 or 6
    nonmasq: tuple[Network, ...]
    keep: tuple[Network, ...] | None = None
    masq: tuple[Network, ...] = ()
    keep_sources: tuple[Network, ...] = ()
    masq_sources: tuple[Network, ...] | None = None
    snat_to: Address | None = None

    @property
    def label(self) -> str:
        """``ipv4`` or ``ipv6``: how logs and results name the family."""
        return f"ipv{self.family}"

    @property
    def listed(self) -> tuple[Network, ...]:
        """The keep entries as listed (link-local, config, plugins)."""
        return self.nonmasq if self.keep is None else self.keep

    @property
    def masquerades_any(self) -> bool:
        """Some source may be masqueraded (``masqueradeSourceCIDRs`` lists one of this family, or none at all)."""
        return self.masq_sources is None or bool(self.masq_sources)

    def deciding(self, destination: Address) -> tuple[Network, bool] | None:
        """The longest entry holding ``destination`` and whether it keeps (``None``: none holds
        it, so it is masqueraded). Entries of equal length: a masquerade entry wins, as in
        :func:`~masqd.cidrs.longest_prefix_ranges`."""
        found = [(net.prefixlen, False, net) for net in self.listed if destination in net]
        found += [(net.prefixlen, True, net) for net in self.masq if destination in net]
        if not found:
            return None
        _, masqueraded, net = max(found, key=lambda item: item[:2])
        return net, not masqueraded

    def source_rule(self, source: Address) -> tuple[str, Network | None] | None:
        """Why traffic from ``source`` is never masqueraded: ``("nonMasqueradeSourceCIDRs", net)``
        or ``("masqueradeSourceCIDRs", None)``; ``None`` when the source leaves the decision to
        the destination."""
        return source_rule(source, self.keep_sources, self.masq_sources)


@dataclass(frozen=True, slots=True)
class PortShare:
    """One ``--to-ports`` interval and the probability of choosing it among it and the later ones.

    ``probability`` is ``None`` for the last interval of a protocol (it takes what is left).
    """

    ports: PortRange
    probability: Fraction | None


@dataclass(frozen=True, slots=True)
class Masquerade:
    """How non-exempt traffic is masqueraded."""

    random_fully: bool = True
    to_ports: tuple[PortRange, ...] = ()

    def port_shares(self) -> tuple[PortShare, ...]:
        """Spread connections evenly over all ports: interval i is taken with probability
        size(i) / (size(i) + size of every later interval), the last one unconditionally."""
        shares = []
        remaining = sum(r.size for r in self.to_ports)
        for index, ports in enumerate(self.to_ports):
            last = index == len(self.to_ports) - 1
            shares.append(PortShare(ports, None if last else Fraction(ports.size, remaining)))
            remaining -= ports.size
        return tuple(shares)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything a backend needs to write: chain name, per-family lists, masquerade action."""

    chain: str
    ipv4: FamilyRules
    ipv6: FamilyRules | None  # None: IPv6 is not managed (no --enable-ipv6)
    masquerade: Masquerade
    #: ``outputInterfaces``: only traffic leaving through one of these is masqueraded (a trailing
    #: ``+`` matches any name starting with the rest); empty: any interface.
    interfaces: tuple[str, ...] = ()

    @property
    def families(self) -> tuple[FamilyRules, ...]:
        return (self.ipv4,) if self.ipv6 is None else (self.ipv4, self.ipv6)

    def cidrs(self) -> frozenset[Network]:
        """Every exempt destination, both families (for change logs and metrics)."""
        return frozenset(net for fam in self.families for net in fam.nonmasq)

    def family(self, version: int) -> FamilyRules | None:
        return self.ipv4 if version == 4 else self.ipv6

    def interface_matches(self, interface: str) -> bool:
        """Whether traffic leaving through ``interface`` may be masqueraded (``outputInterfaces``)."""
        return not self.interfaces or any(interface_matches(pattern, interface) for pattern in self.interfaces)

    def decide(self, destination: Address, source: Address | None = None, interface: str | None = None) -> bool:
        """Whether a packet to the non-local ``destination`` is masqueraded: the decision every
        backend's rules make (module docstring). ``source`` / ``interface`` ``None``: one that the
        source and interface rules leave to the destination (a source no list singles out; an
        interface ``outputInterfaces`` holds)."""
        family = self.family(destination.version)
        if family is None:
            return False
        if interface is not None and not self.interface_matches(interface):
            return False
        if source is not None and family.source_rule(source) is not None:
            return False
        if source is None and not family.masquerades_any:
            return False
        decided = family.deciding(destination)
        return decided is None or not decided[1]


def source_rule(source: Address, keep_sources: tuple[Network, ...],
                masq_sources: tuple[Network, ...] | None) -> tuple[str, Network | None] | None:
    """:meth:`FamilyRules.source_rule` over any source lists (``explain --live`` has the kernel's)."""
    held = next((net for net in keep_sources if source in net), None)
    if held is not None:
        return "nonMasqueradeSourceCIDRs", held
    if masq_sources is not None and not any(source in net for net in masq_sources):
        return "masqueradeSourceCIDRs", None
    return None


def interface_matches(pattern: str, interface: str) -> bool:
    """iptables' interface match: ``eth+`` is any name starting with ``eth``, else the exact name."""
    return interface.startswith(pattern[:-1]) if pattern.endswith("+") else interface == pattern


def nonmasq_list(config: MasqConfig, extra: tuple[Network, ...] = ()) -> tuple[Network, ...]:
    """The config's non-masquerade CIDRs (file order, duplicates kept, as upstream), then each
    of ``extra`` (plugin contributions) that is not already listed, once. Link-local not included."""
    if not extra:
        return config.non_masquerade_cidrs
    listed = set(map(network_key, config.non_masquerade_cidrs))
    return config.non_masquerade_cidrs + tuple(net for key, net in unique(extra).items() if key not in listed)


def compute_ruleset(config: MasqConfig, options: AgentOptions, extra: tuple[Network, ...] = (), *,
                    listed: tuple[Network, ...] | None = None, masq_extra: tuple[Network, ...] = ()) -> RuleSet:
    """Derive the desired rules from a validated config, the flags and validated plugin CIDRs.

    Link-local (169.254.0.0/16, and fe80::/10 for IPv6) comes first unless masqueraded by config;
    then the configured CIDRs of that family in file order, duplicates kept, exactly as the
    upstream agent writes them; then ``extra`` (plugin contributions) not already listed.
    ``listed``: :func:`nonmasq_list` of ``config`` and ``extra``, when the caller has it already.
    ``masq_extra``: the plugins' masquerade entries (``masquerade_cidrs``), beside the config's
    ``masqueradeCIDRs``.
    """
    v4, v6 = split_families(nonmasq_list(config, extra) if listed is None else listed)
    masq4, masq6 = split_families(masquerade_list(config, masq_extra))
    ipv4 = _family(4, (() if config.masq_link_local else (LINK_LOCAL_V4,)) + v4, masq4, config)
    ipv6 = None
    if options.enable_ipv6:
        ipv6 = _family(6, (() if config.masq_link_local_ipv6 else (LINK_LOCAL_V6,)) + v6, masq6, config)
    return RuleSet(
        chain=options.masq_chain,
        ipv4=ipv4,
        ipv6=ipv6,
        masquerade=Masquerade(random_fully=options.random_fully, to_ports=options.to_ports),
        interfaces=config.output_interfaces,
    )


def masquerade_list(config: MasqConfig, extra: tuple[Network, ...] = ()) -> tuple[Network, ...]:
    """The masquerade entries: ``masqueradeCIDRs``, then the plugins' ``extra``, each once."""
    if not extra and not config.masquerade_cidrs:
        return ()
    return tuple(unique(config.masquerade_cidrs + extra).values())


def _cut_regions(keys: list[int], masq: tuple[Network, ...]) -> list[tuple[int, int]]:
    """The outermost keep entries (``keys``: their :func:`~masqd.cidrs.network_key`) that hold a
    masquerade entry longer than themselves, as sorted ``(first, last)`` address ranges: the only
    ranges whose decisions the overrides change. Prefixes nest or are disjoint, so an entry
    starting inside one of them lies inside it."""
    shorter = []  # per masquerade entry, its shorter prefixes, shortest first: (key, first, last)
    for net in masq:
        bits, address, family_bit = net.max_prefixlen, int(net.network_address), net.version == 6
        prefixes = []
        for length in range(net.prefixlen):
            size = 1 << (bits - length)
            first = address & ~(size - 1)
            prefixes.append((first << 9 | length << 1 | family_bit, first, first + size - 1))
        shorter.append(prefixes)
    held = {key for prefixes in shorter for key, _, _ in prefixes}.intersection(keys)  # one pass over the keep list
    regions = set()
    for prefixes in shorter:
        outermost = next(((first, last) for key, first, last in prefixes if key in held), None)
        if outermost is not None:
            regions.add(outermost)
    return sorted(regions)


def _family(version: int, keep: tuple[Network, ...], masq: tuple[Network, ...], config: MasqConfig) -> FamilyRules:
    nonmasq, listed = keep, None
    keys = list(map(network_key, keep)) if masq else []
    regions = _cut_regions(keys, masq) if masq else []
    if regions:  # an override cuts into a kept range: flatten those ranges, keep the rest as listed
        starts, ends = [first for first, _ in regions], [last for _, last in regions]
        index = bisect.bisect_right

        def inside(key: int) -> bool:
            found = index(starts, key >> 9) - 1
            return found >= 0 and key >> 9 <= ends[found]

        held = list(map(inside, keys))
        cut_masq = [net for net in masq if inside(network_key(net))]
        flat = range_networks(longest_prefix_ranges(itertools.compress(keep, held), cut_masq), version)
        nonmasq, listed = tuple(itertools.compress(keep, (not h for h in held))) + flat, keep
    sources = config.masquerade_source_cidrs
    masq_sources = tuple(net for net in sources if net.version == version) if sources else None
    if masq_sources is not None and any(net.prefixlen == 0 for net in masq_sources):
        masq_sources = None  # every source of this family: the same as no list
    return FamilyRules(
        family=version,
        nonmasq=nonmasq,
        keep=listed,
        masq=masq,
        keep_sources=tuple(net for net in config.non_masquerade_source_cidrs if net.version == version),
        masq_sources=masq_sources,
        snat_to=config.snat_to_address if version == 4 else config.snat_to_address_ipv6,
    )
