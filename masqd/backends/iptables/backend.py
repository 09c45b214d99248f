"""The iptables backend itself: reads each family back, plans, writes with the executor (an edit
in place of a chain it knows, else the whole chain, checked at once); also the cleanup of
everything masqd wrote."""

from __future__ import annotations

import dataclasses
from functools import partial

import structlog

from masqd.backends.conntrack import ConntrackTable
from masqd.backends.base import ForeignRule, Held, LiveRules, SyncResult
from masqd.backends.iptables.executor import IptablesExecutor, SubprocessExecutor
from masqd.backends.iptables.incremental import RenderedRules, plan_edit
from masqd.backends.iptables.live import live_family, postrouting_rules
from masqd.backends.iptables.services import parse_services
from masqd.backends.iptables.render import (APPEND, RANDOM_FULLY_MIN_VERSION, NatState, parse_iptables_version,
                                            parse_nat_chains, parse_nat_state, plan_restore, read_back_difference,
                                            render_removal, render_restore, render_ruleset)
from masqd.backends.iptables_mode import binaries_for, detect_mode, installed_modes
from masqd.backends.services_live import with_node_addresses
from masqd.backends.tools import run_tool
from masqd.errors import ApplyError, BackendError, ReadBackError, ToolMissingError, ToolTimeoutError
from masqd.ruleset import FamilyRules, RuleSet

log = structlog.get_logger("masqd.backend.iptables")


class IptablesBackend:
    """Programs the upstream agent's nat chain and POSTROUTING jump, IPv4 and (optionally) IPv6.

    Every sync reads each family back (iptables has no change notification, and another writer's
    change must be healed, not overwritten unseen) and writes only when it differs, one family at
    a time. It writes in one of two ways:

    - an edit in place (:func:`.incremental.plan_edit`: the rules to go deleted by their text,
      the new ones inserted at their positions), when the chain read back is exactly the one this
      backend knows (it wrote it, or read it back equal to what it wanted) and holds its one jump:
      the daemon's config edits, whose cost then follows the change, not the chain's length. What
      an edit wrote is checked by the next read-back (the next sync, or the drift check): a chain
      found different from it is then rewritten whole and checked at once, as below;
    - a rewrite of the whole chain (and the jump), in every other case (the first write of this
      process, another writer's change, a large change, an edit the kernel refused because the
      chain changed after the read-back), read back at once: a rule the kernel stores differently
      from how it was rendered is reported as an error instead of being rewritten (and blamed on
      someone else) on every resync.

    ``mode`` picks the iptables variant: ``legacy``, ``nft``, or ``auto`` (detected on first use,
    see :mod:`masqd.backends.iptables_mode`). An injected ``executor`` is used as it is. ``jump``:
    ``--postrouting-jump`` (:data:`.render.APPEND`, upstream's place, or :data:`.render.INSERT`);
    a jump found in the other place is moved, in the same transaction as the chain.
    """

    name = "iptables"

    def __init__(self, executor: IptablesExecutor | None = None, *, random_fully_supported: bool | None = None,
                 mode: str = "auto", jump: str = APPEND, conntrack: ConntrackTable | None = None):
        self.mode = mode if executor is None else "given"
        self.jump = jump
        self.executor: IptablesExecutor = executor or SubprocessExecutor(
            None if mode == "auto" else binaries_for(mode))
        #: The namespace's live flows (``--conntrack-reconcile``); the daemon's backends get the
        #: kernel's (``default_plugins/backends.py``); ``None``: live flows are left alone.
        self.conntrack = conntrack
        #: Whether the iptables binary knows --random-fully; None until :meth:`probe` ran.
        self.random_fully_supported = random_fully_supported
        self._rendered = RenderedRules()
        #: Per family, the chain's rules as this backend last wrote them or read them back equal
        #: to what it wanted (with the one jump); absent when unknown (before the first sync,
        #: after a failed or refused write, after cleanup).
        self._known: dict[int, tuple[str, ...]] = {}
        #: Per family, the nat table as this backend last read it, and the rules masqd does not
        #: write found in it (:meth:`foreign_rules`; kept while the text stays the same).
        self._saved: dict[int, str] = {}
        self._foreign: dict[int, tuple[str, str, tuple[ForeignRule, ...]]] = {}
        self._held: dict[int, object] = {}  # per family, the kept CIDRs the chain held before this sync wrote it
        self._unread: list[str] = []  # the families this sync replaced without reading them first

    async def probe(self) -> None:
        """Pick the iptables variant (``auto``), then learn whether ``--random-fully`` is available."""
        if self.mode == "auto":
            self.mode = await detect_mode(_save_or_none)
            self.executor = SubprocessExecutor(binaries_for(self.mode))
            log.info("iptables variant chosen", mode=self.mode)
        if self.random_fully_supported is None:
            version = parse_iptables_version(await self.executor.version(4))
            self.random_fully_supported = version is not None and version >= RANDOM_FULLY_MIN_VERSION

    def render(self, ruleset: RuleSet) -> str:
        """What a sync would write to an empty kernel (``--random-fully`` assumed when not probed)."""
        return render_ruleset(ruleset, random_fully_supported=self.random_fully_supported is not False,
                              placement=self.jump)

    async def sync(self, ruleset: RuleSet) -> SyncResult:
        await self.probe()
        written: list[str] = []
        reasons: list[str] = []
        self._held = {}
        self._unread = []
        for family in ruleset.families:
            try:
                reason = await self._sync_family(ruleset, family)
            except BackendError as exc:
                exc.written = tuple(written) + exc.written  # this family's too, when it was written
                raise
            if reason is not None:
                written.append(family.label)
                reasons.append(reason)
        held = Held({f.label: self._held.get(f.family, f.nonmasq) for f in ruleset.families})  # unwritten: as desired
        return SyncResult(tuple(written), tuple(reasons), held, unread=tuple(self._unread))

    def _desired(self, ruleset: RuleSet, family: FamilyRules) -> tuple[str, ...]:
        return self._rendered.rules(ruleset, family, bool(self.random_fully_supported))

    async def _sync_family(self, ruleset: RuleSet, family: FamilyRules) -> str | None:
        """Bring one family in line; return why it was written, or None when it was in sync."""
        desired = self._desired(ruleset, family)
        known = self._known.pop(family.family, None)  # unknown until this sync has read or written it
        reason = await self._bring_in_line(family, ruleset.chain, desired, known)
        self._known[family.family] = desired
        return reason

    async def _bring_in_line(self, family: FamilyRules, chain: str, desired: tuple[str, ...],
                             known: tuple[str, ...] | None) -> str | None:
        try:
            state = await self._read(family.family, chain)
        except ToolTimeoutError as exc:
            return await self._rewrite_unread(family, chain, desired, exc)
        text, reason = plan_restore(desired, state, chain, self.jump)
        if text is None:
            return None
        self._held[family.family] = partial(_kept, state, family.family, desired, chain)  # read only if needed
        edit = plan_edit(state.rules, desired, chain) \
            if state.rules == known and state.jumps == 1 and state.misplaced(self.jump) is None else None
        if edit is not None:
            if await self._edited(family, edit.script):
                return f"chain {chain} edited in place: {edit.deleted} rule(s) deleted, {edit.inserted} inserted"
            text, reason = plan_restore(desired, await self._read(family.family, chain), chain, self.jump)
            if text is None:
                return None
        await self._restore_checked(family, chain, desired, text)
        return reason

    async def _restore_checked(self, family: FamilyRules, chain: str, desired: tuple[str, ...], text: str) -> None:
        """Write ``text`` and read back at once: the kernel must then hold ``desired`` and one jump.
        Any failure after the write says the family was written (the kernel no longer holds what
        it did)."""
        await self.executor.restore(family.family, text)
        try:
            after = await self._read(family.family, chain)
            if plan_restore(desired, after, chain, self.jump)[0] is not None:
                raise BackendError(f"{family.label}: iptables accepted the rules but reads them back differently; "
                                   f"{read_back_difference(desired, after.rules)}; {after.jumps} jump(s)")
        except BackendError as exc:
            exc.written = (family.label,)
            raise

    async def _rewrite_unread(self, family: FamilyRules, chain: str, desired: tuple[str, ...],
                              timeout: ToolTimeoutError) -> str:
        """The nat table could not be read in time: most likely masqd's own chain is huge (a large
        config applied before, by this process or one before it: the nft variant's save slows
        with the square of the rules). Replace the chain with the desired rules without reading
        it first (``:CHAIN - [0:0]`` flushes only it; the POSTROUTING jump is left as it is), then
        read back what is now a table of the desired size and finish as usual: the jump, and the
        check of what was written. A smaller config thus always recovers the node."""
        log.warning("the nat table could not be read back in time; replacing chain whole without reading it "
                    "first, then reading it back", family=family.label, chain=chain, error=str(timeout))
        await self.executor.restore(family.family, render_restore(desired, chain, jumps_present=1))
        first = f"chain {chain} replaced unread (reading the nat table took over {round(timeout.timeout, 1):g} s)"
        self._unread.append(family.label)
        try:
            state = await self._read(family.family, chain)
            text, reason = plan_restore(desired, state, chain, self.jump)
            if text is not None:
                await self._restore_checked(family, chain, desired, text)
                return f"{first}; then {reason}"
        except BackendError as exc:
            exc.written = (family.label,)  # the chain was written: the kernel no longer holds what it did
            raise
        return first

    async def _edited(self, family: FamilyRules, script: str) -> bool:
        """Apply an edit; False when iptables refused one of its lines (a rule to delete is gone,
        a position is past the end: the chain changed after it was read back), so that nothing
        of it was applied. Any other failure (the xtables lock, a killed tool) is raised."""
        try:
            await self.executor.restore(family.family, script)
        except ApplyError as exc:
            if exc.line is None:
                raise
            log.info("iptables refused an edit of the chain, which changed after it was read back; rewriting it "
                     "whole", family=family.label, error=str(exc))
            return False
        return True

    async def _read(self, family: int, chain: str) -> NatState:
        self._saved.pop(family, None)  # a failed read leaves nothing believed about the table
        text = self._saved[family] = await self.executor.save(family)
        return parse_nat_state(text, chain)

    async def foreign_rules(self, ruleset: RuleSet) -> dict[int, tuple[ForeignRule, ...]]:
        """Per family of ``ruleset``, the nat POSTROUTING rules masqd does not write that may act on
        its traffic (:func:`.live.postrouting_rules`), from the nat table the last sync read: no
        read of its own after a sync."""
        found = {}
        for family in ruleset.families:
            text = self._saved.get(family.family)
            if text is None:
                text = self._saved[family.family] = await self.executor.save(family.family)
            cached = self._foreign.get(family.family)
            if cached is None or cached[:2] != (ruleset.chain, text):
                rules = postrouting_rules(parse_nat_chains(text), ruleset.chain, family.family)
                cached = self._foreign[family.family] = (ruleset.chain, text, rules)
            found[family.family] = cached[2]
        return found

    async def read_back(self, ruleset: RuleSet) -> LiveRules:
        """What the kernel holds of ``ruleset``'s chain and jump, per family; reads only (the
        variant is picked as :meth:`sync` would pick it)."""
        await self.probe()
        families = []
        for family in ruleset.families:
            desired = self._desired(ruleset, family)
            text = await self.executor.save(family.family)
            state = parse_nat_state(text, ruleset.chain)
            chains = parse_nat_chains(text)
            live = live_family(state, family.family, desired, ruleset.chain, chains, placement=self.jump)
            # kube-proxy's Services in the same nat table, for explain to follow a ClusterIP to its endpoints
            services = await with_node_addresses(parse_services(chains, family.family), family.family)
            families.append(dataclasses.replace(live, services=services))
        return LiveRules(self.name, f"chain {ruleset.chain}", tuple(families))

    async def cleanup(self, chain: str, families: tuple[int, ...] = (4, 6)) -> tuple[str, ...]:
        """Remove ``chain`` and masqd's POSTROUTING jumps to it, nothing else. With ``auto`` every
        installed iptables variant is cleaned (masqd may have run in either). An IPv6 family whose
        tables cannot be read (no IPv6 nat on this kernel, or no ip6tables binary) has nothing of
        masqd's and is skipped. Returns what was removed, e.g.
        ``("ipv4 chain IP-MASQ-AGENT (nft)", "ipv4 jump (nft)")``."""
        self._known.clear()  # what is left is read back again before the next write
        variants = installed_modes() if self.mode == "auto" else ()
        targets = [(v, SubprocessExecutor(binaries_for(v))) for v in variants] or [(self.mode, self.executor)]
        removed: list[str] = []
        for variant, executor in targets:
            for family in families:
                try:
                    state = await self._cleanup_state(executor, family, chain)
                except (ReadBackError, ToolMissingError):
                    if family == 4:
                        raise
                    continue
                text = render_removal(chain, state)
                if text is not None:
                    await executor.restore(family, text)
                    where = f" ({variant})" if len(targets) > 1 else ""  # name it when several were looked at
                    label = f"ipv{family}"
                    removed += [f"{label} chain {chain}{where}"] * state.chain_exists
                    removed += [f"{label} jump{where}"] * bool(state.jumps)
        return tuple(removed)

    @staticmethod
    async def _cleanup_state(executor: IptablesExecutor, family: int, chain: str) -> NatState:
        """The nat table's state for cleanup. A table too big to read in time (masqd's own huge
        chain) has the chain emptied unread first, as a sync replaces it, and is read again."""
        try:
            return parse_nat_state(await executor.save(family), chain)
        except ToolTimeoutError as exc:
            log.warning("the nat table could not be read back in time; emptying chain unread, then reading it back",
                        family=f"ipv{family}", chain=chain, error=str(exc))
            await executor.restore(family, render_restore((), chain, jumps_present=1))
            return parse_nat_state(await executor.save(family), chain)


def _kept(state: NatState, family: int, desired: tuple[str, ...], chain: str) -> tuple:
    """The non-masquerade CIDRs of the chain in ``state`` (what a sync found before writing)."""
    return live_family(state, family, desired, chain).nonmasq


async def _save_or_none(command: list[str]) -> str | None:
    """The output of an iptables-save ``command`` for mode detection; ``None`` when it failed or
    its binary cannot be started."""
    try:
        result = await run_tool(command)
    except ToolMissingError:
        return None
    return result.stdout.decode(errors="replace") if result.returncode == 0 else None
