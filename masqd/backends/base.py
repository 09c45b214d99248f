"""The backend interface: what the reconciler may ask of a backend, and what it gets back.

A backend turns a :class:`~masqd.ruleset.RuleSet` into kernel state. ``render`` is pure (the
exact text the backend would write to an empty kernel); ``sync`` reads the kernel back, writes
only what differs, atomically, and says what it wrote. Only the reconciler calls ``sync``.
``read_back`` (optional) only reads: it says what the kernel holds as a :class:`LiveRules`, for
``masqd explain --live`` and the drift check; ``monitor`` (optional) follows the kernel's changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from masqd.backends.services import ServiceMap
from masqd.cidrs import Network
from masqd.config import AgentOptions
from masqd.ruleset import RuleSet


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """What a backend factory is called with (see :func:`masqd.hookspecs.register_backends`).

    options: the validated agent flags (chain name, IPv6, --random-fully, --to-ports).
    iptables_mode: ``--iptables-mode`` (``auto``, ``legacy``, ``nft``), for iptables-based backends.
    postrouting_jump: ``--postrouting-jump``: where the iptables backend keeps its POSTROUTING
        jump: ``append`` (upstream's place, after kube-proxy's ``KUBE-POSTROUTING``) or ``insert``
        (the first rule).
    nftables_priority: ``--nftables-priority``: the nftables backend's nat chain priority
        (``None``: its default, ``srcnat + 10``, after kube-proxy's chain).
    """

    options: AgentOptions = AgentOptions()
    iptables_mode: str = "auto"
    postrouting_jump: str = "append"
    nftables_priority: int | None = None


class Held(Mapping):
    """Per family label, the non-masquerade CIDRs the kernel held before a sync (``SyncResult.held``):
    each a tuple, or a function giving it, called when the family is first read. Only a first
    write's log line reads them, while working them out from the kernel's rules is O(CIDRs): 0.3 s
    at 100k, which every edit would otherwise pay before it is written."""

    def __init__(self, families: Mapping[str, tuple[Network, ...] | Callable[[], tuple[Network, ...]]]):
        self._families = dict(families)

    def __getitem__(self, label: str) -> tuple[Network, ...]:
        value = self._families[label]
        if callable(value):
            value = self._families[label] = value()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._families)

    def __len__(self) -> int:
        return len(self._families)


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one ``sync`` did. ``written`` names each part rewritten (e.g. ``("ipv4",)``); empty when
    the kernel already held the desired rules. ``reasons`` says, per part written, why. ``held``:
    per family label, the non-masquerade CIDRs the kernel held before the sync (what a first
    write after a restart or a migration changed; ``None``: the backend does not say)."""

    written: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    held: Mapping[str, tuple[Network, ...]] | None = None
    #: the parts rewritten without reading them first (the read ran out of time): a write that is
    #: no repair of someone else's change
    unread: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.written)


#: When a :class:`ForeignRule` acts, relative to masqd's rules.
BEFORE, INSIDE, AFTER = "before", "inside", "after"
#: What a :class:`ForeignRule` may do to a packet's source address.
MASQUERADES, KEEPS, EITHER = "masquerade", "keep", "either"


@dataclass(frozen=True, slots=True)
class ForeignRule:
    """A rule (or another table's chain) masqd does not write that may decide whether traffic of
    its family is masqueraded. Rules that cannot decide it (a LOG, a MARK, a chain that only
    returns) are not listed.

    text: the rule as the tool prints it, or (a chain) ``table ip nat chain POSTROUTING priority 100``.
    kind: ``rule``, or ``chain``: another table's chain hooked at nat postrouting, whose rules are
        not evaluated.
    stage: :data:`BEFORE` masqd's rules (an earlier POSTROUTING rule, a chain at the same or an
        earlier priority), :data:`INSIDE` masqd's chain (ahead of its ``position``-th
        non-masquerade CIDR), or :data:`AFTER` it (acts only on traffic masqd's rules leave
        alone: a later POSTROUTING rule, a chain at a later priority).
    effect: :data:`MASQUERADES` (rewrites the source: MASQUERADE, SNAT...), :data:`KEEPS` (ends
        nat processing without rewriting it: ACCEPT), or :data:`EITHER` (a jump to another chain).
    destination: the destinations it is limited to (``None``: any, or not known); ``negated``: it
        applies to destinations outside ``destination`` instead.
    certain: it matches every packet to such a destination (no match that is not evaluated).
    position: (:data:`INSIDE`) how many of :attr:`LiveFamily.nonmasq` come before it.
    mark: the packet mark every way it may masquerade requires (``0x4000/0x4000``: value/mask, as
        ``-m mark --mark`` takes it), so it masquerades only traffic another component marked
        (kube-proxy's 0x4000), not pod traffic as such; ``None``: no mark is required.
    """

    text: str
    stage: str
    effect: str
    destination: Network | None = None
    negated: bool = False
    certain: bool = False
    position: int = 0
    kind: str = "rule"
    mark: str | None = None

    def may_match(self, address) -> bool:
        """Whether traffic to ``address`` (of this rule's family) may match it."""
        if self.destination is None:
            return True
        return (address in self.destination) != self.negated


@dataclass(frozen=True, slots=True)
class LiveFamily:
    """What the kernel holds of masqd's rules for one address family, backend-neutral.

    family: 4 or 6.
    present: masqd's chain (iptables) or table (nftables) exists.
    hooked: traffic leaving the node reaches it: the POSTROUTING jump (iptables), the chain
        hooked at nat postrouting (nftables).
    local_exempt: destinations local to the node skip it (the jump's ``addrtype ! --dst-type
        LOCAL``; nftables' ``fib daddr type local return``).
    nonmasq: the destinations its rules keep (not masquerade), in rule order (nftables: the set's
        elements, merged and sorted as the kernel keeps them).
    masquerade: the final, unconditional masquerade rule is there.
    unexpected: what masqd would not have written (a foreign rule, a rule after the final
        masquerade, a second jump, a chain policy...), one description each.
    drift: why a sync would rewrite this family (``None``: the kernel holds exactly the rules
        of the rule set read back against).
    foreign: the rules masqd does not write that may decide what happens to traffic before,
        inside or after masqd's rules (:class:`ForeignRule`), in the order the kernel walks them.

    What the decision model's rules hold (see :mod:`masqd.ruleset`), when masqd wrote them:
    keep_sources: sources its rules never masquerade (``nonMasqueradeSourceCIDRs``).
    masq_sources: the only sources its rules masquerade (``None``: any).
    interfaces: the only interfaces its final masquerade rules act on, in iptables' form (``eth+``;
        empty: any).
    snat_to: the address its final rule rewrites to (``None``: MASQUERADE, the node's address).

    services: kube-proxy's Services of this family as its rules of the backend's kind hold them
        (:class:`~masqd.backends.services.ServiceMap`; empty: none there, or not read).
    """

    family: int
    present: bool
    hooked: bool = False
    local_exempt: bool = False
    nonmasq: tuple[Network, ...] = ()
    masquerade: bool = False
    unexpected: tuple[str, ...] = ()
    drift: str | None = None
    foreign: tuple[ForeignRule, ...] = ()
    keep_sources: tuple[Network, ...] = ()
    masq_sources: tuple[Network, ...] | None = None
    interfaces: tuple[str, ...] = ()
    snat_to: str | None = None
    services: ServiceMap = ServiceMap()

    @property
    def label(self) -> str:
        return f"ipv{self.family}"


@dataclass(frozen=True, slots=True)
class LiveRules:
    """What a backend read back from the kernel: one :class:`LiveFamily` per family of the rule
    set it was asked about. ``backend`` names the backend, ``where`` what it read (e.g. ``chain
    IP-MASQ-AGENT``, ``table masqd``), for messages."""

    backend: str
    where: str
    families: tuple[LiveFamily, ...]

    def family(self, number: int) -> LiveFamily | None:
        return next((family for family in self.families if family.family == number), None)

    @property
    def in_sync(self) -> bool:
        return all(family.drift is None for family in self.families)


@runtime_checkable
class Backend(Protocol):
    """A way to program masquerade rules.

    Optional: ``async def read_back(self, ruleset: RuleSet) -> LiveRules`` reads (never writes)
    what the kernel holds of this backend's rules for each family of ``ruleset``, and says per
    family whether a sync of ``ruleset`` would write (``LiveFamily.drift``). Parsing what the
    tools print into that value is pure. ``masqd explain --live`` needs it; a backend without it
    (a plugin's) is refused there with a message saying so. Raises
    :class:`~masqd.errors.BackendError` when the kernel cannot be read. The daemon also calls it
    every ``--drift-check-interval`` to notice rules changed by someone else between resyncs.

    Optional: ``async def foreign_rules(self, ruleset: RuleSet) -> dict[int, tuple[ForeignRule,
    ...]]``: per family of ``ruleset``, the rules masqd does not write around its own that may act
    on its traffic (as :attr:`LiveFamily.foreign` lists those before and after masqd's rules),
    read as cheaply as the backend can after a sync (iptables: from what the sync read). The
    reconciler calls it after every successful sync, to find rules that shadow masqd's
    (:mod:`masqd.shadowing`). Raises :class:`~masqd.errors.BackendError` when it cannot read.

    Optional: ``conntrack``, the live flows of the namespace the backend programs
    (:class:`masqd.backends.conntrack.ConntrackTable`, or ``None``): after an apply that changed
    decisions the reconciler deletes the entries whose NAT the new rules contradict
    (``--conntrack-reconcile``, :mod:`masqd.flow_cleanup`). A backend without it leaves flows be.

    Optional: ``async def monitor(self, notify: Callable[[str], None]) -> None`` follows the
    kernel's changes until cancelled and calls ``notify(change)`` for each one another process
    made to this backend's rules (not for its own writes); it raises
    :class:`~masqd.errors.BackendError` when it cannot go on, and is restarted after a back-off.
    A backend with it is not polled: the monitor replaces the drift check
    (:mod:`masqd.sources.drift`). A ``monitor`` that also takes ``ready: Callable[[], None]``
    calls ``ready()`` once it is known to listen; the daemon then asks for a pass, which compares
    what changed before it listened (the nftables backend writes edits without reading back
    only while its monitor vouches for the kernel).
    """

    name: str

    async def probe(self) -> None:
        """Learn what the tools on this host support (versions, features) without writing to the
        kernel. Called by ``sync`` itself; ``masqd render`` calls it so its output matches.
        Raises :class:`~masqd.errors.BackendError` when the tools cannot be run."""
        ...

    def render(self, ruleset: RuleSet) -> str:
        """The exact text this backend would apply to a kernel holding none of masqd's rules."""
        ...

    async def cleanup(self, chain: str) -> tuple[str, ...]:
        """Remove everything this backend creates (``chain``: the iptables chain name) and nothing
        else. Returns a description of each thing removed; empty when there was nothing."""
        ...

    async def sync(self, ruleset: RuleSet) -> SyncResult:
        """Make the kernel hold ``ruleset``: read back, write only if it differs, atomically.

        Raises :class:`~masqd.errors.BackendError` when the kernel cannot be read or refuses the
        write; the kernel then still holds what it held before.
        """
        ...
