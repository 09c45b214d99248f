"""After an apply, live flows follow the rules (``--conntrack-reconcile``): the reconciler's step
that deletes the conntrack entries an apply left stale.

It runs after a successful apply that changed what some traffic gets (:func:`masqd.flows.
decisions_changed`), or after a first write whose previous rules are unknown, and never undoes or
delays the apply: it runs once the rules are written and the pass recorded, and whatever goes
wrong is logged, counted and tried again on the next pass. Each run reads the table once (a dump
cannot resume where an earlier one stopped) and is bounded: at most :data:`MAX_DELETES_PER_PASS`
deletions within :data:`DEADLINE_SECONDS`; what is left is deleted on the next pass (the resync at
the latest). The kernel is read and written by the backend's
``conntrack`` table (:class:`masqd.backends.conntrack.ConntrackTable`); which entries are stale
is :func:`masqd.flows.stale_flows` (pure).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
import structlog

from masqd.flows import DEFAULT_CONNTRACK_MODE, PROTOCOL_NUMBERS, decisions_changed, mode_protocols, stale_flows
from masqd.ruleset import RuleSet

log = structlog.get_logger("masqd.conntrack")

#: Entries deleted in one pass at most; the rest wait for the next pass.
MAX_DELETES_PER_PASS = 10_000
#: Seconds one pass may spend deleting; the rest waits for the next pass.
DEADLINE_SECONDS = 5.0
#: Seconds the table may take to be read before the step gives up (a kernel that does not answer;
#: the whole table is read every time, since a new dump starts from its beginning again: about
#: 25 us per entry in ``all`` mode, the kernel filtering the dump to UDP in ``udp`` mode).
READ_TIMEOUT_SECONDS = 30.0
#: Entries deleted between two looks at the deadline.
DELETES_PER_CALL = 512
#: Earlier rule sets remembered while work is pending (a burst of changes within one deadline).
REMEMBERED_RULE_SETS = 4
#: Stale flows named in a log line at most (the rest are counted).
LOGGED_FLOWS = 20


@dataclass(frozen=True, slots=True)
class FlowReport:
    """What one run did. ``deleted``: per ``(family label, protocol)``, the entries deleted;
    ``listed``: the stale entries a read-only table (the dry-run backend's) would have deleted;
    ``error``: why the run stopped (``None``: it did not); ``remaining``: stale entries are left
    for the next pass (the cap or the deadline was reached, or an error)."""

    deleted: Mapping[tuple[str, str], int] = field(default_factory=dict)
    listed: int = 0
    error: str | None = None
    remaining: bool = False

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


def flow_fields(report: FlowReport | None) -> dict[str, object]:
    """The :class:`~masqd.audit.AuditEvent` fields of a run (none without one)."""
    if report is None:
        return {}
    deleted: dict[str, dict[str, int]] = {}
    for (family, protocol), count in sorted(report.deleted.items()):
        deleted.setdefault(family, {})[protocol] = count
    return {"conntrack_deleted": deleted, "conntrack_error": report.error}


class FlowCleanup:
    """The reconciler's conntrack step. ``mode``: one of :data:`masqd.flows.CONNTRACK_MODES`.
    ``addresses``: reads the node's addresses, flows from and to which are never touched
    (default: :func:`masqd.sources.addresses.local_addresses`)."""

    def __init__(self, mode: str = DEFAULT_CONNTRACK_MODE, addresses: Callable[[], Awaitable[frozenset]] | None = None,
                 *, limit: int = MAX_DELETES_PER_PASS, deadline: float = DEADLINE_SECONDS,
                 read_timeout: float = READ_TIMEOUT_SECONDS, batch: int = DELETES_PER_CALL):
        self.protocols = mode_protocols(mode)
        self.mode = mode
        self.addresses = addresses
        self.limit = limit
        self.deadline = deadline
        self.read_timeout = read_timeout
        self.batch = batch
        #: Work left by an earlier pass: the rule sets applied before it (empty: unknown). None: none.
        self.pending: tuple[RuleSet, ...] | None = None
        self._logged_error: str | None = None  # the failure logged last (a repeat is a debug event)

    def _work(self, before: RuleSet | None, after: RuleSet, wrote: bool) -> tuple[RuleSet, ...] | None:
        """The earlier rule sets whose flows to check against ``after``, or ``None``: no work."""
        pending = self.pending
        if before is None:
            return () if wrote else pending
        if not decisions_changed(before, after):
            return pending
        if pending == ():
            return ()
        earlier = [rules for rules in pending or () if rules is not before]  # by identity: hashing 100k CIDRs costs
        return (before, *earlier)[:REMEMBERED_RULE_SETS]

    async def run(self, table, before: RuleSet | None, after: RuleSet, wrote: bool) -> FlowReport | None:
        """Check and prune the live flows after a pass that applied ``after`` (the kernel held
        ``before``, ``None`` when unknown; ``wrote``: the pass wrote rules). ``table``: the
        backend's conntrack table, or ``None`` (a backend without one). ``None``: nothing to do."""
        if self.mode == "none" or table is None:
            return None
        befores = self._work(before, after, wrote)
        if befores is None:
            return None
        self.pending = befores  # until this run finishes
        try:
            report = await self._prune(table, befores, after)
        except Exception as exc:  # never the apply's failure: logged (once while it repeats), counted, tried again
            done = exc.report if isinstance(exc, _Refused) else FlowReport()
            report = FlowReport(done.deleted, error=str(exc) or repr(exc), remaining=not table.read_only)
        if report.error is not None:
            level = log.debug if report.error == self._logged_error else log.info if table.read_only else log.warning
            level("conntrack: could not reconcile live flows" + ("; trying again on the next pass" if report.remaining
                                                                 else ""), error=report.error, mode=self.mode)
        self._logged_error = report.error
        if not report.remaining:
            self.pending = None
        return report

    async def _prune(self, table, befores: tuple[RuleSet, ...], after: RuleSet) -> FlowReport:
        stale: list = []
        only = next(iter(self.protocols)) if self.protocols is not None and len(self.protocols) == 1 else None

        def select(flows) -> bool:  # each datagram of the dump as it arrives
            stale.extend(stale_flows(flows, after, befores, local=local, protocols=self.protocols))
            return len(stale) <= self.limit  # past the cap: stop reading, the rest on the next pass

        read_all = False
        with anyio.move_on_after(self.read_timeout) as reading:
            if self.addresses is None:
                from masqd.sources.addresses import local_addresses

                self.addresses = local_addresses
            local = await self.addresses()
            for family in after.families:
                if not await table.scan(family.family, PROTOCOL_NUMBERS.get(only), select):
                    break
            else:
                read_all = True
        if reading.cancelled_caught:
            return FlowReport(error=f"the conntrack table was not read within {self.read_timeout:g} s",
                              remaining=True)
        chosen = stale[:self.limit]
        shown = [f"{entry.flow}: {entry.reason}" for entry in chosen[:LOGGED_FLOWS]]
        if table.read_only:
            if chosen:
                log.info("dry-run: would delete stale conntrack entries", count=len(chosen), flows=shown)
            return FlowReport(listed=len(chosen))
        deleted: Counter[tuple[str, str]] = Counter()
        gone, refused, done = 0, [], 0
        deadline = anyio.current_time() + self.deadline
        batch = min(self.batch, getattr(table, "batch", self.batch))
        while done < len(chosen) and anyio.current_time() < deadline:
            result = await table.delete([entry.flow for entry in chosen[done:done + batch]])
            done = min(done + batch, len(chosen))
            deleted.update((f"ipv{flow.family}", flow.protocol_name) for flow in result.deleted)
            gone += result.gone
            refused += result.refused
        if chosen:
            log.debug("conntrack: stale entries", count=len(chosen), deleted=sum(deleted.values()), gone=gone,
                      flows=shown)
        remaining = not read_all or done < len(chosen)
        if remaining:
            log.info("conntrack: more stale entries than one pass deletes; the rest on the next pass",
                     deleted=sum(deleted.values()), cap=self.limit, deadline=self.deadline)
        if refused:
            raise _Refused(f"the kernel refused {len(refused)} deletes, e.g. {refused[0][0]}: {refused[0][1]}",
                           FlowReport(dict(deleted), remaining=True))
        return FlowReport(dict(deleted), remaining=remaining)


class _Refused(Exception):
    """Some deletes were refused: reported like any failure, with what was deleted."""

    def __init__(self, message: str, report: FlowReport):
        super().__init__(message)
        self.report = report
