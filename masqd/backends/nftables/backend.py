"""The nftables backend itself: reads masqd's tables back, changes only the set elements that
differ when only they do (over netlink, :mod:`.netlink`), replaces a table that differs otherwise
in one transaction, verifies what it wrote, follows other processes' changes, and cleans up.

What the kernel holds is known without reading it back only while ``nft monitor`` follows the
kernel (:meth:`NftablesBackend.monitor`) and has seen no other writer since masqd last read or
wrote the table: an edit of k CIDRs is then one transaction of about k element changes, at any
set size. Everything that may make the kernel differ from what masqd knows (start-up, a change
by another process, events the monitor lost, the monitor stopping, a failed write) makes the
next sync read the table back and compare it whole, as every sync without a monitor does."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import anyio
import structlog

from masqd.aio import Backoff
from masqd.backends.conntrack import ConntrackTable
from masqd.cidrs import range_networks
from masqd.backends.base import ForeignRule, Held, LiveRules, SyncResult
from masqd.backends.nftables.executor import NftExecutor, NftMonitor, NftSubprocessExecutor
from masqd.backends.nftables.live import why_rewritten, live_family, other_nat_chains, parse_listing
from masqd.backends.nftables.monitor import ChangeFilter
from masqd.backends.nftables.services import TABLE as KUBE_PROXY_TABLE
from masqd.backends.nftables.services import parse_services
from masqd.backends.nftables.render import (DEFAULT_PRIORITY, NFT_FAMILY, TABLE, TableState, cidr_pieces,
                                            render_delete, render_replace, render_ruleset, ruleset_states)
from masqd.backends.services import ServiceMap
from masqd.backends.services_live import with_node_addresses
from masqd.errors import BackendError, ElementsRefusedError
from masqd.ruleset import RuleSet

log = structlog.get_logger("masqd.backends.nftables")

#: A change of more intervals than this (removed plus added) replaces the table whole with
#: ``nft -f`` instead: past it, writing the set anew costs less than changing it element by element.
MAX_ELEMENT_CHANGES = 20_000
#: Seconds between the marked transactions that prove a newly started ``nft monitor`` listens
#: (it prints nothing until a change happens), doubled per try up to the max.
PROBE_SECONDS = 0.05
PROBE_MAX_SECONDS = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Known:
    """What the kernel held of one family's table (``None``: no table) when masqd last read or
    wrote it, and the monitor epoch it was learnt in."""

    epoch: int
    state: TableState | None


class NftablesBackend:
    """masqd's own ``ip``/``ip6`` ``masqd`` tables, written with ``nft -f -`` in one transaction,
    their set elements changed in place when only they differ. ``priority``: the nat chain's
    (``--nftables-priority``; ``None``: :data:`~.render.DEFAULT_PRIORITY`, ``srcnat + 10``); a
    table whose chain is at another priority is rewritten like any other difference."""

    name = "nftables"
    #: Where its rules go, in the ``ip`` and ``ip6`` families (the start-up log shows it).
    table = TABLE

    def __init__(self, executor: NftExecutor | None = None, *, priority: int | None = None,
                 conntrack: ConntrackTable | None = None):
        self.executor: NftExecutor = executor or NftSubprocessExecutor()
        #: The namespace's live flows (``--conntrack-reconcile``); the daemon's backends get the
        #: kernel's (``default_plugins/backends.py``); ``None``: live flows are left alone.
        self.conntrack = conntrack
        self.priority = DEFAULT_PRIORITY if priority is None else priority
        self._known: dict[int, _Known] = {}
        #: Bumped whenever the kernel may have changed without masqd knowing what it holds: what
        #: was learnt in an older epoch is read back before it is relied on.
        self._epoch = 0
        self._listening = False  # a monitor follows the kernel's changes, proven by seeing masqd's own

    async def probe(self) -> None:
        """Nothing to learn: every nft that has ``fully-random`` and ``fib`` is good enough."""

    def render(self, ruleset: RuleSet) -> str:
        return render_ruleset(ruleset, self.priority)

    async def current(self, family: int) -> TableState | None:
        text = await self.executor.list_table(family)
        return None if text is None else parse_listing(text, family)

    def _trusted(self, family: int) -> _Known | None:
        """What masqd knows the kernel holds for ``family`` without reading it, or ``None``."""
        known = self._known.get(family)
        return known if known is not None and self._listening and known.epoch == self._epoch else None

    async def _held(self, desired: TableState, edit: bool) -> TableState | None:
        """What the kernel holds of ``desired``'s table: known when the monitor vouches for it
        during an ``edit`` (a sync that changes some family masqd knows), read back otherwise: a
        sync that would change nothing is the periodic comparison, which does not take the
        monitor's word for it."""
        known = self._trusted(desired.family)
        if known is not None and edit:
            return known.state
        return await self.current(desired.family)

    async def _table_present(self, family: int) -> bool:
        known = self._trusted(family)
        if known is not None:
            return known.state is not None
        return await self.executor.list_table(family) is not None

    async def sync(self, ruleset: RuleSet) -> SyncResult:
        epoch = self._epoch
        replace: list[TableState] = []
        changes: list[tuple[TableState, list[tuple[int, int]], list[tuple[int, int]]]] = []
        reasons: dict[int, str] = {}
        wanted = ruleset_states(ruleset, self.priority)
        edit = any((known := self._trusted(d.family)) is not None and known.state != d for d in wanted)
        held: dict[str, object] = {f.label: f.nonmasq for f in ruleset.families}  # in sync: as desired
        for desired in wanted:
            current = await self._held(desired, edit)
            if current == desired:
                self._known[desired.family] = _Known(epoch, desired)
                continue
            held[f"ipv{desired.family}"] = () if current is None else partial(range_networks, current.intervals,
                                                                               desired.family)
            change = _element_change(current, desired)
            if change is None:
                replace.append(desired)
                reasons[desired.family] = why_rewritten(current, desired)
            else:
                changes.append((desired, *change))
                reasons[desired.family] = (f"table {NFT_FAMILY[desired.family]} {TABLE}: set elements differ "
                                           f"({len(change[0])} intervals removed, {len(change[1])} added)")
        # a family no longer managed (IPv6 turned off) must not keep masquerading from an old table
        managed = {family.family for family in ruleset.families}
        unmanaged = tuple([f for f in (4, 6) if f not in managed and await self._table_present(f)])
        for f in (4, 6):
            if f not in managed and f not in unmanaged:
                self._known[f] = _Known(epoch, None)
        if changes and not replace and not unmanaged:
            # one transaction for every family, as a replace is: never the new set of one family
            # beside the old set of the other
            try:
                await self.executor.change_elements([(d.family, removed, added) for d, removed, added in changes])
            except ElementsRefusedError as exc:
                # the kernel does not hold what masqd thought (another writer the monitor has not
                # reported yet): compare it whole and write what differs, as at start-up
                log.info("set elements could not be changed in place; reading the tables back", error=str(exc))
                for desired, _, _ in changes:
                    self._known.pop(desired.family, None)
                    current = await self.current(desired.family)
                    if current == desired:
                        del reasons[desired.family]
                    else:
                        replace.append(desired)
                        reasons[desired.family] = why_rewritten(current, desired)
            except BaseException:  # timed out, cancelled: the batch may or may not have been applied
                for desired, _, _ in changes:
                    self._known.pop(desired.family, None)  # read back next time, not believed
                raise
            else:
                self._known.update((d.family, _Known(epoch, d)) for d, _, _ in changes)
        else:  # a table is replaced anyway: every change goes into that one transaction
            replace += [desired for desired, _, _ in changes]
        if replace or unmanaged:
            script = render_replace(replace) + render_delete(unmanaged)
            applied = False
            try:
                await self.executor.apply(script)
                applied = True
                await self._verify(replace)
            except BaseException as exc:
                for family in (*(s.family for s in replace), *unmanaged):
                    self._known.pop(family, None)
                if applied and isinstance(exc, BackendError):  # the kernel no longer holds what it did
                    exc.written = tuple(f"ipv{f}" for f in reasons) + tuple(f"ipv{f}" for f in unmanaged)
                raise
            self._known.update((state.family, _Known(epoch, state)) for state in replace)
            self._known.update((family, _Known(epoch, None)) for family in unmanaged)
        written = tuple(f"ipv{f}" for f in reasons) + tuple(f"ipv{f}" for f in unmanaged)
        return SyncResult(
            written,
            tuple(reasons.values()) + tuple(f"table {NFT_FAMILY[f]} {TABLE} removed: that family is not enabled"
                                            for f in unmanaged),
            Held(held),
        )

    async def _verify(self, written: list[TableState]) -> None:
        """Read the tables just written back, without their elements (a terse listing costs
        next to nothing even at 100k elements; a full one about as much as the write, see
        ``benchmarks/RESULTS.md``), so that a table the kernel keeps in another form is an error,
        not a rewrite on every resync. The elements are compared by the next resync."""
        structure = await self.executor.list_structure()
        for desired in written:
            after = parse_listing(structure, desired.family)
            if after is None or dataclasses.replace(after, intervals=desired.intervals) != desired:
                raise BackendError(
                    f"{NFT_FAMILY[desired.family]} {TABLE}: nft accepted the table but reads it back differently"
                )

    async def read_back(self, ruleset: RuleSet) -> LiveRules:
        """What the kernel holds of masqd's table for each family of ``ruleset``; reads only."""
        structure = await self.executor.list_structure()
        families = []
        for family, desired in zip(ruleset.families, ruleset_states(ruleset, self.priority)):
            state = await self.current(family.family)
            priority = state.chain[2] if state is not None and state.chain is not None else self.priority
            others = other_nat_chains(structure, family.family, priority if isinstance(priority, int) else self.priority)
            live = live_family(state, desired, others)
            families.append(dataclasses.replace(live, services=await self._services(family.family)))
        return LiveRules(self.name, f"table {TABLE}", tuple(families))

    async def _services(self, family: int) -> ServiceMap:
        """kube-proxy's Services from its ``kube-proxy`` table (nftables mode), for explain to
        follow a ClusterIP to its endpoints; empty when there is no such table, or the executor
        reads only masqd's own (a test's)."""
        if not isinstance(self.executor, NftSubprocessExecutor):
            return ServiceMap()
        listing = await self.executor.list_table(family, KUBE_PROXY_TABLE)
        return await with_node_addresses(parse_services(listing, family), family)

    async def foreign_rules(self, ruleset: RuleSet) -> dict[int, tuple[ForeignRule, ...]]:
        """Per family of ``ruleset``, the other tables' chains hooked at nat postrouting that may
        masquerade (:func:`.live.other_nat_chains`): one listing of the ruleset without set
        elements (a sync reads only masqd's own tables)."""
        structure = await self.executor.list_structure()
        return {family.family: other_nat_chains(structure, family.family, self.priority) for family in ruleset.families}

    async def monitor(self, notify: Callable[[str], None], ready: Callable[[], None] | None = None) -> None:
        """Until cancelled, call ``notify(change)`` soon after another process changes masqd's
        tables (``change``: the first thing it did, as ``nft monitor`` prints it), so that drift
        is healed at once instead of at the next resync. masqd's own writes are not reported.
        ``ready()`` is called once the monitor is seen to listen (``nft monitor`` prints nothing
        until a change: masqd makes marked, empty transactions until it reports one); from the
        next full comparison on, edits are written without reading the table back first.
        Raises :class:`~masqd.errors.BackendError` when ``nft monitor`` cannot run or exits."""
        executor = self.executor
        if not isinstance(executor, NftMonitor):
            raise BackendError(f"{type(executor).__name__} cannot follow nftables changes (it has no monitor())")
        changes = ChangeFilter(executor.write_marker)
        rest = b""
        self._forget()
        try:
            async with executor.monitor() as output, anyio.create_task_group() as tg:
                tg.start_soon(self._probe, executor)
                async for chunk in output:
                    *lines, rest = (rest + chunk).split(b"\n")
                    for line in lines:
                        if (change := changes.feed(line.decode(errors="replace"))) is not None:
                            self._forget()
                            notify(change)
                        elif changes.own_transactions and not self._listening:
                            self._listening = True
                            self._forget()  # what was learnt before it listened is read back once
                            if ready is not None:
                                ready()
        finally:
            self._listening = False
            self._forget()

    async def _probe(self, executor: NftExecutor) -> None:
        """Make marked, empty transactions until the monitor has reported one (then it listens)."""
        delays = Backoff(PROBE_SECONDS, PROBE_MAX_SECONDS, jitter=0)
        while not self._listening:
            try:
                await executor.change_elements(())
            except ElementsRefusedError:  # netlink cannot be used here: nft writes the marker
                await executor.apply("")
            await anyio.sleep(delays.next_delay())

    def _forget(self) -> None:
        """The kernel may differ from what masqd knows: the next sync reads back."""
        self._epoch += 1

    async def cleanup(self, chain: str = "", families: tuple[int, ...] = (4, 6)) -> tuple[str, ...]:
        """Delete masqd's tables (``chain`` is the iptables backend's concern and is ignored).
        Returns what was removed (e.g. ``("ip masqd",)``)."""
        present = [f for f in families if await self.executor.list_table(f) is not None]
        if present:
            await self.executor.apply(render_delete(tuple(present)))
        for family in present:
            self._known.pop(family, None)
        return tuple(f"{NFT_FAMILY[f]} {TABLE}" for f in present)


def _element_change(current: TableState | None,
                    desired: TableState) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
    """The intervals to remove from and add to ``current``'s set to make it ``desired``'s, when
    that is the only difference and it is small enough (:data:`MAX_ELEMENT_CHANGES`); else ``None``."""
    if current is None or dataclasses.replace(current, intervals=desired.intervals) != desired:
        return None
    before, after = current.intervals, desired.intervals
    # an edit changes a few intervals somewhere in two long sorted lists: compare only between
    # the common head and the common tail (a plain loop: the sets of 100k intervals cost 10x more)
    head, shortest = 0, min(len(before), len(after))
    while head < shortest and before[head] == after[head]:
        head += 1
    tail = 0
    while tail < shortest - head and before[-1 - tail] == after[-1 - tail]:
        tail += 1
    old, new = set(before[head:len(before) - tail]), set(after[head:len(after) - tail])
    # as the elements nft -f writes them: an interval that is no CIDR is several elements
    removed, added = cidr_pieces(sorted(old - new), desired.family), cidr_pieces(sorted(new - old), desired.family)
    if len(removed) + len(added) > MAX_ELEMENT_CHANGES:
        return None
    return removed, added
