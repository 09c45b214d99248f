"""The nftables backend itself: reads masqd's tables back, replaces those that differ in one
checked transaction, verifies what it wrote, follows other processes' changes, and cleans up."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from masqd.backends.base import LiveRules, SyncResult
from masqd.backends.nftables.executor import NftExecutor, NftMonitor, NftSubprocessExecutor
from masqd.backends.nftables.live import why_rewritten, live_family, other_nat_chains, parse_listing
from masqd.backends.nftables.monitor import ChangeFilter
from masqd.backends.nftables.render import (NFT_FAMILY, SRCNAT_PRIORITY, TABLE, TableState, desired_state,
                                            render_delete, render_replace, render_ruleset)
from masqd.errors import BackendError
from masqd.ruleset import RuleSet

class NftablesBackend:
    """masqd's own ``ip``/``ip6`` ``masqd`` tables, written with ``nft -f -`` in one transaction."""

    name = "nftables"

    def __init__(self, executor: NftExecutor | None = None):
        self.executor: NftExecutor = executor or NftSubprocessExecutor()
        # per family, the set elements of the last table written and verified by this process
        self._written: dict[int, tuple[tuple[int, int], ...]] = {}

    async def probe(self) -> None:
        """Nothing to learn: every nft that has ``fully-random`` and ``fib`` is good enough."""

    def render(self, ruleset: RuleSet) -> str:
        return render_ruleset(ruleset)

    async def current(self, family: int) -> TableState | None:
        text = await self.executor.list_table(family)
        return None if text is None else parse_listing(text, family)

    async def sync(self, ruleset: RuleSet) -> SyncResult:
        stale: list[TableState] = []
        reasons: list[str] = []
        for family in ruleset.families:
            desired = desired_state(family, ruleset.masquerade)
            if self._written.get(family.family, desired.intervals) != desired.intervals:
                # the elements changed since this process wrote them, so the table is rewritten
                # anyway: reading 100k elements back first would cost as much as the write
                stale.append(desired)
                reasons.append(f"table {NFT_FAMILY[family.family]} {TABLE}: set elements differ")
                continue
            current = await self.current(family.family)
            if current != desired:
                stale.append(desired)
                reasons.append(why_rewritten(current, desired))
        # a family no longer managed (IPv6 turned off) must not keep masquerading from an old table
        managed = {family.family for family in ruleset.families}
        unmanaged = tuple([f for f in (4, 6) if f not in managed and await self.executor.list_table(f) is not None])
        if not stale and not unmanaged:
            return SyncResult()
        script = render_replace(stale) + render_delete(unmanaged)
        await self.executor.check(script)
        await self.executor.apply(script)
        await self._verify(stale)
        self._written.update((state.family, state.intervals) for state in stale)
        for family in unmanaged:
            self._written.pop(family, None)
        return SyncResult(
            tuple(f"ipv{s.family}" for s in stale) + tuple(f"ipv{f}" for f in unmanaged),
            tuple(reasons) + tuple(f"table {NFT_FAMILY[f]} {TABLE} removed: that family is not enabled" for f in unmanaged),
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
        for family in ruleset.families:
            desired = desired_state(family, ruleset.masquerade)
            state = await self.current(family.family)
            priority = state.chain[2] if state is not None and state.chain is not None else SRCNAT_PRIORITY
            others = other_nat_chains(structure, family.family, priority if isinstance(priority, int) else SRCNAT_PRIORITY)
            families.append(live_family(state, desired, others))
        return LiveRules(self.name, f"table {TABLE}", tuple(families))

    async def monitor(self, notify: Callable[[str], None]) -> None:
        """Until cancelled, call ``notify(change)`` soon after another process changes masqd's
        tables (``change``: the first thing it did, as ``nft monitor`` prints it), so that drift
        is healed at once instead of at the next resync. masqd's own writes are not reported.
        Raises :class:`~masqd.errors.BackendError` when ``nft monitor`` cannot run or exits."""
        executor = self.executor
        if not isinstance(executor, NftMonitor):
            raise BackendError(f"{type(executor).__name__} cannot follow nftables changes (it has no monitor())")
        changes = ChangeFilter(executor.write_marker)
        rest = b""
        async with executor.monitor() as output:
            async for chunk in output:
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    if (change := changes.feed(line.decode(errors="replace"))) is not None:
                        notify(change)

    async def cleanup(self, chain: str = "", families: tuple[int, ...] = (4, 6)) -> tuple[str, ...]:
        """Delete masqd's tables (``chain`` is the iptables backend's concern and is ignored).
        Returns what was removed (e.g. ``("ip masqd",)``)."""
        present = [f for f in families if await self.executor.list_table(f) is not None]
        if present:
            await self.executor.apply(render_delete(tuple(present)))
        for family in present:
            self._written.pop(family, None)
        return tuple(f"{NFT_FAMILY[f]} {TABLE}" for f in present)
