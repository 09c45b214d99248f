"""Live flows against the rules: which conntrack entries an apply left stale (pure).

The kernel decides NAT when a connection's conntrack entry is created, and keeps that decision
for the entry's life: a UDP flow masqueraded before ``nonMasqueradeCIDRs`` gained its destination
is still masqueraded after the apply, until it has been idle long enough to expire (and a DNS
client or a tunnel sending every few seconds never is). ``--conntrack-reconcile`` deletes such
entries after an apply, so the next packet creates a new one under the new rules.

:func:`stale_flows` picks them. A :class:`Flow` is stale when what the conntrack entry does
disagrees with what the rules now decide (:meth:`masqd.ruleset.RuleSet.decide`) for its
source and its real destination (the reply's source: after a Service's DNAT, the endpoint):

- source-NATed (its source address rewritten), and the destination is now kept (``masqueraded,
  now kept``);
- not source-NATed, and the destination is now masqueraded (``kept, now masqueraded``);
- source-NATed to another address than the ``snatToAddress`` now set (``SNAT to A, now B``).

Never touched: flows from an address of the node itself (a local process, not a pod: masqd's
rules never rewrote them), flows to an address of the node, a pod's flow to itself through a
Service (hairpin: kube-proxy masquerades it), flows in a conntrack zone other than 0 (another
datapath's, Open vSwitch's), families the rules do not cover, and protocols outside the mode's.
With earlier rule sets given (``before``), only flows whose decision differs between one of them
and the rules now are considered, so flows NATed by someone else for reasons of their own are left
alone unless the change concerns them; without them (the first write after a restart), flows
both DNATed and source-NATed are left alone: kube-proxy masquerades some Service traffic itself. With ``outputInterfaces`` (now or before) a flow without
source NAT is never called stale: conntrack does not record the interface it left through, and
masqd's rules leave traffic through other interfaces alone. Flows to a node address (inbound, a
NodePort kube-proxy forwards) are not a pod's egress and are left to kube-proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from masqd.ruleset import RuleSet

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ``--conntrack-reconcile``: none (leave live flows), udp (the default: UDP only, whose flows
#: a deletion merely re-creates), all (TCP and every other protocol too: an established TCP
#: connection whose NAT changes breaks, as it would have broken at its next reply anyway).
CONNTRACK_MODES: tuple[str, ...] = ("none", "udp", "all")
DEFAULT_CONNTRACK_MODE = "udp"

#: IP protocol numbers and the names the metrics and logs use; any other is ``other``.
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOL_NAMES.items()}

#: ``enum ip_conntrack_status`` bits (<linux/netfilter/nf_conntrack_common.h>).
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, "other")


def mode_protocols(mode: str) -> frozenset[str] | None:
    """The protocol names a mode touches (``None``: all of them)."""
    if mode not in CONNTRACK_MODES:
        raise ValueError(f"conntrack mode {mode!r}: expected one of {', '.join(CONNTRACK_MODES)}")
    return {"none": frozenset(), "udp": frozenset({"udp"}), "all": None}[mode]


@dataclass(frozen=True, slots=True)
class Flow:
    """One conntrack entry. ``source`` / ``destination``: the original direction as the pod sent
    it (``destination`` is a Service's address when kube-proxy DNATed it); ``reply_source`` /
    ``reply_destination``: the reply direction, so the real destination and, when the source was
    NATed, the address it was rewritten to. ``status``: the ``IPS_*`` bits. ``key``: what names
    this entry to the kernel for a delete (:mod:`masqd.backends.conntrack.messages`)."""

    family: int
    protocol: int
    source: Address
    destination: Address
    reply_source: Address
    reply_destination: Address
    status: int = 0
    source_port: int | None = None
    destination_port: int | None = None
    zone: int = 0
    key: bytes = b""

    @property
    def source_nat(self) -> bool:
        """The source address was rewritten (``IPS_SRC_NAT`` alone is set too when the kernel
        only changed the source port to keep two flows apart)."""
        return self.reply_destination != self.source

    @property
    def destination_nat(self) -> bool:
        return self.reply_source != self.destination

    @property
    def protocol_name(self) -> str:
        return protocol_name(self.protocol)

    def __str__(self) -> str:
        def end(address: Address, port: int | None) -> str:
            text = f"[{address}]" if address.version == 6 and port is not None else str(address)
            return text if port is None else f"{text}:{port}"

        text = f"{self.protocol_name} {end(self.source, self.source_port)} -> {end(self.destination, self.destination_port)}"
        if self.destination_nat:
            text += f" (DNAT to {self.reply_source})"
        if self.source_nat:
            text += f" (SNAT to {self.reply_destination})"
        return text


@dataclass(frozen=True, slots=True)
class StaleFlow:
    """A flow whose NAT no longer matches the rules, and why (``masqueraded, now kept``)."""

    flow: Flow
    reason: str


def decisions_changed(before: RuleSet, after: RuleSet) -> bool:
    """Whether some traffic is decided otherwise by ``after`` than by ``before``: a difference in
    what the rules match on (destinations, sources, interfaces, the SNAT address), not in how
    they are written (the chain's name, ``--to-ports``, ``--random-fully``)."""
    if before.interfaces != after.interfaces or len(before.families) != len(after.families):
        return True
    return any((b.family, b.nonmasq, b.masq, b.keep_sources, b.masq_sources, b.snat_to)
               != (a.family, a.nonmasq, a.masq, a.keep_sources, a.masq_sources, a.snat_to)
               for b, a in zip(before.families, after.families))


def stale_flows(flows: Iterable[Flow], after: RuleSet, before: Sequence[RuleSet] = (), *,
                local: Collection[Address] = frozenset(), protocols: Collection[str] | None = None) -> list[StaleFlow]:
    """The flows of ``flows`` whose NAT disagrees with ``after`` (module docstring), in order.
    ``before``: the rule sets applied earlier whose flows may still live (empty: unknown, every
    flow is compared with ``after`` alone). ``local``: the node's addresses. ``protocols``: the
    protocol names to consider (``None``: all)."""
    unsure_unnated = bool(after.interfaces) or any(rules.interfaces for rules in before)
    snat_changed = {f.family: any(_snat_to(rules, f.family) != f.snat_to for rules in before) for f in after.families}
    stale = []
    for flow in flows:
        if protocols is not None and flow.protocol_name not in protocols:
            continue
        family = after.family(flow.family)
        if family is None or flow.zone or flow.source in local or flow.destination in local \
                or flow.reply_source in local or flow.reply_source == flow.source:
            continue
        if not before and flow.destination_nat and flow.source_nat:
            continue  # kube-proxy may have masqueraded it (a Service's marked traffic): unknown without the rules before
        target = flow.reply_source
        now = after.decide(target, flow.source)
        if before and not snat_changed[flow.family] and all(rules.decide(target, flow.source) == now
                                                             for rules in before):
            continue
        if flow.source_nat and not now:
            stale.append(StaleFlow(flow, "masqueraded, now kept"))
        elif not flow.source_nat and now and not unsure_unnated:
            stale.append(StaleFlow(flow, "kept, now masqueraded"))
        elif flow.source_nat and now and family.snat_to is not None and flow.reply_destination != family.snat_to:
            stale.append(StaleFlow(flow, f"SNAT to {flow.reply_destination}, now {family.snat_to}"))
    return stale


def _snat_to(rules: RuleSet, family: int) -> Address | None:
    held = rules.family(family)
    return None if held is None else held.snat_to
