"""The desired state: a backend-neutral, frozen :class:`RuleSet`. Pure: no I/O.

A RuleSet says, per address family, which destinations keep the pod source address (in the order
the rules are written) and how everything else is masqueraded. Backends only translate it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from masqd.cidrs import LINK_LOCAL_V4, LINK_LOCAL_V6, Network, network_key, split_families, unique
from masqd.config import AgentOptions, MasqConfig, PortRange

#: Protocols that get per-interval ``--to-ports`` rules, in rule order (upstream order).
PORT_PROTOCOLS: tuple[str, ...] = ("tcp", "udp", "sctp")


@dataclass(frozen=True, slots=True)
class FamilyRules:
    """One address family's non-masquerade list, link-local first when it is exempt."""

    family: int  # 4 or 6
    nonmasq: tuple[Network, ...]

    @property
    def label(self) -> str:
        """``ipv4`` or ``ipv6``: how logs and results name the family."""
        return f"ipv{self.family}"


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

    @property
    def families(self) -> tuple[FamilyRules, ...]:
        return (self.ipv4,) if self.ipv6 is None else (self.ipv4, self.ipv6)

    def cidrs(self) -> frozenset[Network]:
        """Every exempt destination, both families (for change logs and metrics)."""
        return frozenset(net for fam in self.families for net in fam.nonmasq)


def nonmasq_list(config: MasqConfig, extra: tuple[Network, ...] = ()) -> tuple[Network, ...]:
    """The config's non-masquerade CIDRs (file order, duplicates kept, as upstream), then each
    of ``extra`` (plugin contributions) that is not already listed, once. Link-local not included."""
    if not extra:
        return config.non_masquerade_cidrs
    listed = set(map(network_key, config.non_masquerade_cidrs))
    return config.non_masquerade_cidrs + tuple(net for key, net in unique(extra).items() if key not in listed)


def compute_ruleset(config: MasqConfig, options: AgentOptions, extra: tuple[Network, ...] = (), *,
                    listed: tuple[Network, ...] | None = None) -> RuleSet:
    """Derive the desired rules from a validated config, the flags and validated plugin CIDRs.

    Link-local (169.254.0.0/16, and fe80::/10 for IPv6) comes first unless masqueraded by config;
    then the configured CIDRs of that family in file order, duplicates kept, exactly as the
    upstream agent writes them; then ``extra`` (plugin contributions) not already listed.
    ``listed``: :func:`nonmasq_list` of ``config`` and ``extra``, when the caller has it already.
    """
    v4, v6 = split_families(nonmasq_list(config, extra) if listed is None else listed)
    ipv4 = FamilyRules(4, (() if config.masq_link_local else (LINK_LOCAL_V4,)) + v4)
    ipv6 = None
    if options.enable_ipv6:
        ipv6 = FamilyRules(6, (() if config.masq_link_local_ipv6 else (LINK_LOCAL_V6,)) + v6)
    return RuleSet(
        chain=options.masq_chain,
        ipv4=ipv4,
        ipv6=ipv6,
        masquerade=Masquerade(random_fully=options.random_fully, to_ports=options.to_ports),
    )
