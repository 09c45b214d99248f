"""What the reconciler (:mod:`masqd.reconcile`) says in the log about its passes: a rejected or
accepted config, a failed sync, a write, rules of others that may shadow masqd's.

A failure that keeps coming back is said once, not on every pass: repeats of one *kind* (the
error's :attr:`~masqd.errors.MasqdError.kind`, whatever its text: a tool whose output differs on
every run, a file growing past the size limit) are logged at most once per
:data:`REPEAT_ERROR_LOG_SECONDS`, the next line giving the newest text and how many repeats were
left out (``repeats``); a failure of another kind is logged at once. Only logs: the status is the
reconciler's to write.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence

import structlog

from masqd.audit import CidrChanges, distinct_cidrs
from masqd.backends.base import SyncResult
from masqd.cidrs import cidr_text
from masqd.errors import ConfigError, MasqdError, PluginError, SnatAddressError, ToolStoppedError
from masqd.flow_cleanup import FlowReport
from masqd.plugins import Contribution
from masqd.ruleset import RuleSet
from masqd.shadowing import Reported, Shadowing

log = structlog.get_logger("masqd.reconcile")

#: Repeats of one kind of failure are logged at most this often (those in between are debug events).
REPEAT_ERROR_LOG_SECONDS = 60.0
#: A write's log line lists at most this many added (and removed) CIDRs, and counts the rest.
LOGGED_CIDRS = 50


class Repeats:
    """Whether a failure is worth a log line: the first of its kind at once, a repeat of the same
    kind at most once per :data:`REPEAT_ERROR_LOG_SECONDS`, counting the repeats left out in between.
    Each of the :data:`KINDS_KEPT` kinds seen last has its own limit, so failures alternating between
    two kinds (a config broken one way, then another, and back) are not each logged every time."""

    #: The kinds remembered at once (the oldest is forgotten first).
    KINDS_KEPT = 16

    def __init__(self) -> None:
        self._kinds: dict[Hashable, list] = {}  # kind -> [when logged, repeats left out since]

    def check(self, kind: Hashable, now: float) -> int | None:
        """``None`` for a repeat to leave out (counted); else this one is logged, and the result is
        how many repeats of its kind were left out since its last line (0 for a new kind)."""
        entry = self._kinds.get(kind)
        if entry is not None and now - entry[0] < REPEAT_ERROR_LOG_SECONDS:
            entry[1] += 1
            self._kinds[kind] = self._kinds.pop(kind)  # seen last: forgotten last
            return None
        repeats = entry[1] if entry is not None else 0
        self._kinds.pop(kind, None)
        self._kinds[kind] = [now, 0]
        while len(self._kinds) > self.KINDS_KEPT:
            del self._kinds[next(iter(self._kinds))]
        return repeats

    def clear(self) -> None:
        """The failure is over: the next one is logged at once."""
        self._kinds.clear()


def _repeats(count: int) -> dict[str, int]:
    return {"repeats": count} if count else {}


class PassLog:
    """The reconciler's log lines, and what it remembers to keep them few (see the module docstring)."""

    def __init__(self) -> None:
        self._findings: tuple[str, ...] = ()  # the config problems/warnings logged last
        self._rejections = Repeats()
        self._sync_errors = Repeats()
        self._shadowing = Reported()  # the shadowing rules warned about

    def config_rejected(self, exc: ConfigError, now: float) -> None:
        """A config (or plugins, or a SNAT address) rejected the new state. The same problems as
        the line logged last are not logged again (a bad file is reported once, not on every
        resync); other problems of the same kind at most once a minute (:class:`Repeats`)."""
        findings = ("error", *map(str, exc.problems + exc.warnings))
        if findings == self._findings:
            return
        repeats = self._rejections.check(exc.kind, now)
        what = ("plugins rejected the new state" if isinstance(exc, PluginError) else
                "SNAT address not on this node, new state refused" if isinstance(exc, SnatAddressError)
                else "config rejected")
        if repeats is None:
            log.debug(f"{what}; keeping the rules last applied", path=exc.source, repeated=True,
                      problems=[str(p) for p in exc.problems])
            return
        self._findings = findings
        log.error(f"{what}; keeping the rules last applied", path=exc.source,
                  problems=[str(p) for p in exc.problems], warnings=[str(w) for w in exc.warnings], **_repeats(repeats))

    def config_accepted(self, sources: Sequence[str], warnings: Sequence[tuple[str, object]]) -> None:
        """The config was accepted: said once after a rejection (whether or not the rules then
        change), and its warnings when they differ from the ones logged last."""
        rejected_before = self._findings[:1] == ("error",)
        findings = ("ok", *(f"{name}: {w}" for name, w in warnings))
        if findings == self._findings:
            return
        self._findings = findings
        self._rejections.clear()
        if rejected_before:
            log.info("config accepted again", path=list(sources) or ["defaults"])
        for name, warning in warnings:
            log.warning("config warning", path=name, problem=str(warning))

    def sync_failed(self, exc: MasqdError, backend: str, trigger: str, now: float) -> None:
        """A sync failed: what the kernel holds now, and why (repeats of one kind once a minute)."""
        written = getattr(exc, "written", ())
        if isinstance(exc, ToolStoppedError):  # SIGTERM during a read-back: no failure of the node's
            log.info("sync cut short: masqd is shutting down", backend=backend, trigger=trigger,
                     written=list(written), error=str(exc))
            return
        timed_out = getattr(exc, "wrote", False)  # a write killed at its deadline may have committed
        if written:
            message = (f"sync failed after writing {', '.join(written)}; "
                       + ("then a write timed out, and what the kernel holds is unknown until the next read-back"
                          if timed_out else "other parts keep their previous rules"))
        elif timed_out:
            message = "sync failed; a write timed out, and what the kernel holds is unknown until the next read-back"
        else:
            message = "sync failed; kernel keeps its previous rules"
        repeats = self._sync_errors.check((exc.kind, tuple(written)), now)
        if repeats is None:
            log.debug(message, backend=backend, trigger=trigger, error=str(exc), repeated=True)
            return
        log.error(message, backend=backend, trigger=trigger, error=str(exc), written=list(written), **_repeats(repeats))

    def sync_succeeded(self) -> None:
        self._sync_errors.clear()

    def shadowing(self, found: tuple[Shadowing, ...]) -> None:
        """Warn once per distinct rule that may shadow masqd's (again if it comes back)."""
        new, gone = self._shadowing.update(found)
        for item in new:
            log.warning("a rule masqd does not write may masquerade traffic masqd keeps", family=item.label,
                        rule=item.rule.text, where=item.where, kept=item.kept_text(), kept_count=len(item.kept))
        for item in gone:
            log.info("the rule that could masquerade traffic masqd keeps is gone", family=item.label,
                     rule=item.rule.text)


def log_pass(backend: str, trigger: str, before: RuleSet | None, desired: RuleSet, result: SyncResult, *,
             accepted: bool, repaired: bool, flows: FlowReport | None, contributions: Sequence[Contribution],
             changes: Callable[[], tuple[CidrChanges, CidrChanges]], duration_ms: float) -> None:
    """The line for a pass whose sync succeeded: what it wrote and why (``changes``: the CIDRs it
    added and removed), the live flows it deleted, or that it found the rules in place.
    ``accepted``: the pass synced the new config (not the rules last applied, kept while it is
    rejected)."""
    if result.changed:
        _log_write(backend, trigger, before, desired, result, repaired=repaired, flows=flows,
                   contributions=contributions, changes=changes, duration_ms=duration_ms)
    elif flows is not None and flows.total:
        log.info("stale conntrack entries deleted", backend=backend, trigger=trigger, conntrack_deleted=flows.total)
    elif before is None and accepted:  # a first pass (start-up, --once) that wrote nothing
        log.info("rules already in place", backend=backend, trigger=trigger, cidrs=distinct_cidrs(desired))
    else:
        log.debug("in sync", backend=backend, trigger=trigger)


def _log_write(backend: str, trigger: str, before: RuleSet | None, desired: RuleSet, result: SyncResult, *,
               repaired: bool, flows: FlowReport | None, contributions: Sequence[Contribution],
               changes: Callable[[], tuple[CidrChanges, CidrChanges]], duration_ms: float) -> None:
    fields = {
        "backend": backend,
        "trigger": trigger,
        "written": list(result.written),
        "reason": list(result.reasons),
        "duration_ms": duration_ms,
    }
    for name, masquerade in (("cidrs_from_plugins", False), ("masquerade_cidrs_from_plugins", True)):
        shares = {c.plugin: len(c.cidrs) for c in contributions if c.cidrs and c.masquerade is masquerade}
        if shares:  # a plugin contributing both kinds has one Contribution of each
            fields[name] = shares
    if flows is not None and flows.total:
        fields["conntrack_deleted"] = flows.total
    if repaired:  # the rules already applied, written again: someone changed them
        log.warning("rules restored after outside change", **fields)
        return
    added, removed = changes()
    for name, found in (("cidrs_added", added), ("cidrs_removed", removed)):
        listed = itertools.chain.from_iterable(found.networks.values())
        fields[name] = [cidr_text(net) for net in itertools.islice(listed, LOGGED_CIDRS)]
        count = sum(map(len, found.networks.values()))
        if count > LOGGED_CIDRS:  # a 100k-CIDR change is counted, not printed
            fields[f"{name}_count"] = count
    if before is None:  # a first write: how many CIDRs it holds (the kernel may have held some already)
        log.info("rules applied", cidrs=distinct_cidrs(desired), **fields)
    else:
        log.info("rules updated", **fields)
