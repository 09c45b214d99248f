"""The reconciler: the only code that calls a backend, and the only writer of the agent's status.

For every batch of events it recomputes the whole desired state (read every config input,
validate and merge its texts, hear the plugins, compute the RuleSet) and asks the backend to
sync. Failures never remove rules: a bad config or a refused apply leaves the kernel as it was, is
logged with its cause, counted (:class:`masqd.status.AgentStatus`), and retried on the next event
(or after a short, jittered back-off when the apply itself failed).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from masqd.aio import Backoff
from masqd.audit import AuditEvent, CidrChanges, distinct_cidrs, family_changes
from masqd.backends.base import Backend, SyncResult
from masqd.cidrs import cidr_text
from masqd.config import AgentOptions, MasqConfig, MergedConfig, default_config
from masqd.errors import (BackendError, BackendUnsupported, ConfigError, MasqdError, PluginError, Problem,
                          SnatAddressError)
from masqd.events import Event
from masqd.flow_cleanup import FlowCleanup, FlowReport, flow_fields
from masqd.flows import DEFAULT_CONNTRACK_MODE
from masqd.inputs import ConfigLoader, config_loader
from masqd.plugins import Contribution, Plugins
from masqd.plan import plan_rules
from masqd.ruleset import RuleSet
from masqd.shadowing import Reported, Shadowing, find_shadowing
from masqd.status import AgentStatus

log = structlog.get_logger("masqd.reconcile")

#: First retry delay after a failed sync, doubled (with jitter) per failure up to RETRY_MAX_SECONDS.
RETRY_INITIAL_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
#: The same sync error is logged at most this often (repeats in between are debug events).
REPEAT_ERROR_LOG_SECONDS = 60.0
#: A write's log line lists at most this many added (and removed) CIDRs, and counts the rest.
LOGGED_CIDRS = 50


class Reconciler:
    """Turns events into backend syncs. See the module docstring for the failure rules."""

    def __init__(
        self,
        backend: Backend,
        options: AgentOptions,
        config: str | os.PathLike[str] | ConfigLoader,
        *,
        plugins: Plugins | None = None,
        status: AgentStatus | None = None,
        on_audit: Callable[[AuditEvent], None] | None = None,
        on_resync_interval: Callable[[], None] | None = None,
        retry_initial_seconds: float = RETRY_INITIAL_SECONDS,
        leftovers: Callable[[Backend], tuple[Backend, ...]] | None = None,
        addresses: Callable[[], Awaitable[frozenset]] | None = None,
        conntrack: str = DEFAULT_CONNTRACK_MODE,
        once: bool = False,
    ):
        """``config``: a path (one file) or a loader over several inputs. ``plugins``: their
        ``nonmasq_cidrs`` / ``validate_config`` hooks (``None``: none). ``status``: where the
        outcome of each pass is recorded for ``/healthz``, ``/readyz`` and the metrics.
        ``on_audit``: handed every :class:`AuditEvent`; must not block. ``on_resync_interval``:
        called when ``resyncInterval`` changes. ``leftovers``: finds backends whose rules a
        previous masqd may have left (removed after the first good sync). ``addresses``: reads
        the addresses of masqd's network namespace, to check a ``snatToAddress`` before it is
        applied (default: :func:`masqd.sources.addresses.local_addresses`, read only then).
        ``conntrack``: ``--conntrack-reconcile``, which live flows an apply that changed decisions
        prunes (:mod:`masqd.flow_cleanup`), through the backend's ``conntrack`` table if it has one.
        ``once``: for ``run --once``, whose command prints a rejected config's problems itself
        (and has no rules last applied to keep): the rejection is not logged as well."""
        self.backend = backend
        self.options = options
        self.loader = config_loader(config, options)
        self.plugins = plugins
        self.status = status if status is not None else AgentStatus()
        self.on_audit = on_audit
        self.on_resync_interval = on_resync_interval
        self.leftovers = leftovers
        self.addresses = addresses
        self.once = once
        #: The SNAT addresses the newest desired state asks for (applied or refused): the address
        #: changes worth a pass (:mod:`masqd.sources.addresses`).
        self.snat_addresses: frozenset = frozenset()
        self.config: MasqConfig = default_config(options)  # last good config
        #: The merged config and plugin contributions of the last good desired state.
        self.desired_from: tuple[MergedConfig, tuple[Contribution, ...]] | None = None
        self._retry = Backoff(retry_initial_seconds, RETRY_MAX_SECONDS)
        self._retry_delay: float | None = None  # seconds until a failed sync is retried; None: none pending
        self._leftovers_pending: list[Backend] | None = None  # None: not looked for yet
        self._logged_findings: tuple[str, ...] = ()  # the config problems/warnings logged last
        self._last_sync_error: tuple[str, float] | None = None  # (message, when logged)
        self._changes_memo: tuple | None = None  # (before, after, their CIDR changes), see _changes
        self.flow_cleanup = FlowCleanup(conntrack, self._local_addresses)
        self._flows: FlowReport | None = None  # what the pass's conntrack step did
        self._held: dict | None = None  # what the backend said the kernel held before the pass's sync
        self._shadowing = Reported()  # the shadowing rules warned about

    @property
    def origins(self) -> dict:
        """CIDR -> the config sources listing it, of the last good config."""
        return {} if self.desired_from is None else self.desired_from[0].origins

    @property
    def contributions(self) -> tuple[Contribution, ...]:
        """The plugins' CIDRs of the last good desired state."""
        return () if self.desired_from is None else self.desired_from[1]

    @property
    def resync_interval(self) -> float:
        return self.config.resync_interval

    async def desired(self) -> RuleSet:
        """Load and validate the config, ask the plugins for CIDRs and vetoes, update the last
        good config, return the desired rules. Raises :class:`ConfigError` (or its subclass
        :class:`PluginError`) and then changes nothing.

        Problems and warnings are logged when they differ from the ones logged last, so a bad
        file (or plugin) is reported once, not on every resync.
        """
        try:
            loaded = self.loader.load()
            config = loaded.config
            ruleset, contributions = await plan_rules(config, self.options, self.plugins, loaded.merged)
            await self._check_snat_addresses(ruleset)
        except ConfigError as exc:
            if self._changed_since_logged(("error", *map(str, exc.problems + exc.warnings))) and not self.once:
                what = ("plugins rejected the new state" if isinstance(exc, PluginError) else
                        "SNAT address not on this node, new state refused" if isinstance(exc, SnatAddressError)
                        else "config rejected")
                log.error(f"{what}; keeping the rules last applied", path=exc.source,
                          problems=[str(p) for p in exc.problems], warnings=[str(w) for w in exc.warnings])
            raise
        rejected_before = self._logged_findings[:1] == ("error",)
        if self._changed_since_logged(("ok", *(f"{name}: {w}" for name, w in loaded.warnings))):
            if rejected_before:  # said once, whether or not the rules then change
                log.info("config accepted again", path=list(loaded.merged.sources) or ["defaults"])
            for name, warning in loaded.warnings:
                log.warning("config warning", path=name, problem=str(warning))
        previous = self.config.resync_interval_ns
        self.config = config
        self.desired_from = (loaded.merged, contributions)
        self.status.latest_valid = ruleset
        if config.resync_interval_ns != previous and self.on_resync_interval is not None:
            self.on_resync_interval()
        return ruleset

    async def _check_snat_addresses(self, ruleset: RuleSet) -> None:
        """Raise :class:`SnatAddressError` when ``ruleset`` SNATs to an address no interface of
        this network namespace holds (see :class:`~masqd.errors.SnatAddressError`)."""
        wanted = {(family.family, family.snat_to) for family in ruleset.families if family.snat_to is not None}
        self.snat_addresses = frozenset(address for _, address in wanted)
        self.status.snat_missing = frozenset()
        if not wanted:
            return
        try:
            assigned = await self._local_addresses()
        except OSError as exc:
            raise SnatAddressError([Problem("snatToAddress", None, f"cannot read this node's addresses: {exc}")]) from None
        missing = sorted(wanted - {(address.version, address) for address in assigned})
        self.status.snat_missing = frozenset(address for _, address in missing)
        if missing:
            raise SnatAddressError([Problem("snatToAddress" if version == 4 else "snatToAddressIPv6", str(address),
                                            "not assigned to any interface in masqd's network namespace; the rules "
                                            "last applied stay, and the state is applied once the address is here "
                                            "(the daemon checks again when an address changes, and at each resync)")
                                    for version, address in missing])

    async def _local_addresses(self) -> frozenset:
        if self.addresses is None:
            from masqd.sources.addresses import local_addresses  # read only when needed

            self.addresses = local_addresses
        return await self.addresses()

    def _changed_since_logged(self, findings: tuple[str, ...]) -> bool:
        """True (and remembered) when these config findings differ from the ones logged last."""
        if findings == self._logged_findings:
            return False
        self._logged_findings = findings
        return True

    async def reconcile(self, events: tuple[Event, ...] = (Event("manual"),)) -> SyncResult:
        """One full pass. Raises :class:`MasqdError` on failure (after recording it).

        With an invalid config the rules last applied are still synced, so drift made by someone
        else is healed while the config is being fixed; the config error is raised afterwards.
        """
        started = time.perf_counter()
        trigger = ",".join(dict.fromkeys(e.trigger for e in events))
        before = self.status.applied
        try:
            result = await self._reconcile(trigger, started)
        except BaseException as exc:
            self._audit(trigger, before, None, SyncResult(getattr(exc, "written", ())), exc, started)
            raise
        self._audit(trigger, before, self.status.applied, result, None, started)
        return result

    async def _reconcile(self, trigger: str, started: float) -> SyncResult:
        config_error: ConfigError | None = None
        self.status.repaired = False
        self._flows = self._held = None
        try:
            try:
                desired = await self.desired()
                self.status.config_failure = None
            except ConfigError as exc:
                self.status.config_failure = str(exc)
                self.status.config_rejections += 1
                if self.status.applied is None:
                    raise
                config_error, desired = exc, self.status.applied
            # A sync started is finished: shutdown waits for it rather than killing iptables-restore
            # between two families (bounded by the restore's own lock wait).
            with anyio.CancelScope(shield=True):
                result = await self.backend.sync(desired)
                self._held = result.held
                if self._leftovers_pending != []:
                    await self._remove_leftovers(desired.chain)
            await self._check_shadowing(desired)
        except MasqdError as exc:
            self._record_error(exc)
            if not isinstance(exc, ConfigError):
                self.status.sync_failure = str(exc)
                self._log_sync_error(exc, trigger)
            raise
        finally:
            self.status.generation += 1
        before = self.status.applied
        self.status.repaired = bool(result.changed) and desired == before
        if config_error is None:
            self.status.applied_from = self.desired_from
        self.status.applied = desired
        if self.status.holds_latest_valid:
            # Only a sync of the newest valid state settles an earlier failure: healing the
            # rules last applied while the config is bad leaves the kernel behind that state.
            self.status.applied_at = time.time()
            self.status.sync_failure = None
        if config_error is None:  # live flows follow, once the pass is recorded (masqd.flow_cleanup)
            self._flows = await self.flow_cleanup.run(getattr(self.backend, "conntrack", None), before, desired,
                                                      bool(result.changed))
        if result.changed:
            self._log_write(before, desired, result, trigger, started)
        elif self._flows is not None and self._flows.total:
            log.info("stale conntrack entries deleted", backend=self.backend.name, trigger=trigger,
                     conntrack_deleted=self._flows.total)
        elif before is None and config_error is None:  # a first pass (start-up, --once) that wrote nothing
            log.info("rules already in place", backend=self.backend.name, trigger=trigger,
                     cidrs=distinct_cidrs(desired))
        else:
            log.debug("in sync", backend=self.backend.name, trigger=trigger)
        if config_error is not None:
            self._record_error(config_error)
            raise config_error
        self.status.last_error = None
        self._last_sync_error = None
        return result

    def _audit(self, trigger: str, before: RuleSet | None, after: RuleSet | None, result: SyncResult,
               error: BaseException | None, started: float) -> None:
        if self.on_audit is None or isinstance(error, anyio.get_cancelled_exc_class()):
            return
        if isinstance(error, ConfigError):
            outcome = "rejected"
        elif error is not None:
            outcome = "failed"
        else:
            outcome = "applied" if result.changed else "unchanged"
        added, removed = self._changes(before, after) if outcome == "applied" else ({}, {})
        self.on_audit(AuditEvent(time=time.time(), trigger=trigger, backend=self.backend.name, result=outcome,
                                 added=added, removed=removed, written=result.written,
                                 error=None if error is None else str(error) or repr(error),
                                 duration=time.perf_counter() - started, repair=self.status.repaired,
                                 **flow_fields(self._flows)))

    async def _remove_leftovers(self, chain: str) -> None:
        """After a good sync, remove what another backend (or iptables variant) of a previous
        masqd left, so two rule sets do not apply at once. A failure is logged and tried again
        after the next sync; it never undoes the sync."""
        pending = self._leftovers_pending
        if pending is None:
            pending = self._leftovers_pending = list(self.leftovers(self.backend)) if self.leftovers else []
        for other in list(pending):
            try:
                removed = await other.cleanup(chain)
            except MasqdError as exc:
                log.warning("could not remove another backend's leftovers; will retry", backend=other.name,
                            error=str(exc))
                continue
            pending.remove(other)
            if removed:
                log.info("removed another backend's leftovers", backend=other.name, removed=list(removed))

    async def render(self, ruleset: RuleSet) -> str:
        """The exact text the backend would write for ``ruleset`` to a kernel holding none of
        masqd's rules (``masqd render``; touches nothing). The backend first learns what the tools
        here support (``probe``); where they cannot be run, it renders what a current version gets."""
        try:
            await self.backend.probe()
        except BackendError:
            pass
        return self.backend.render(ruleset)

    async def cleanup(self) -> tuple[str, ...]:
        """Remove everything the backend created (``masqd cleanup``)."""
        return await self.backend.cleanup(self.options.masq_chain)

    async def read_back(self, ruleset: RuleSet):
        """What the kernel holds of ``ruleset``'s rules (``masqd explain --live``): the backend's
        optional ``read_back``, which only reads. Raises :class:`~masqd.errors.BackendUnsupported`
        when the backend has none (a plugin's may not), :class:`~masqd.errors.BackendError` when the
        kernel cannot be read."""
        read_back = getattr(self.backend, "read_back", None)
        if read_back is None:
            raise BackendUnsupported(self.backend.name, "this backend cannot read its rules back (it has no "
                                     "read_back method), which explain --live needs; run explain without --live")
        return await read_back(ruleset)

    async def rules_of_other_backends(self, ruleset: RuleSet) -> list[tuple[str, str]]:
        """Each other backend (``leftovers``) whose rules the kernel holds, as ``(what, the flags
        that choose it)`` (for ``explain --live``); only reads, passing over one it cannot read."""
        found = []
        for other in self.leftovers(self.backend) if self.leftovers else ():
            read_back = getattr(other, "read_back", None)
            try:
                live = None if read_back is None else await read_back(ruleset)
            except MasqdError:
                continue
            if live is not None and any(family.present for family in live.families):
                mode = getattr(other, "mode", None) if live.backend == "iptables" else None
                found.append((f"{live.backend} backend, {live.where}" + (f" (iptables-{mode})" if mode else ""),
                              f"--backend {live.backend}" + (f" --iptables-mode {mode}" if mode else "")))
        return found

    @property
    def kernel_monitor(self) -> Callable[[Callable[[str], None]], Awaitable[None]] | None:
        """The backend's ``monitor(notify)`` (optional: it follows the kernel's changes to its rules
        and calls ``notify(change)`` for each made by someone else), or ``None``."""
        return getattr(self.backend, "monitor", None)

    async def check_drift(self) -> str | None:
        """Read the kernel back and say why it no longer holds the rules last applied (one reason
        per family, ``; ``-joined), or ``None``: it does, nothing has been applied yet, a pass ran
        meanwhile (its sync read back already), a retry of a failed sync is scheduled (with its
        back-off; it reads back too), or the backend cannot read back. Only reads.
        Raises :class:`~masqd.errors.BackendError` when the kernel cannot be read."""
        applied, generation = self.status.applied, self.status.generation
        read_back = getattr(self.backend, "read_back", None)
        if applied is None or read_back is None or self.status.busy_since is not None or self._retry_delay is not None:
            return None
        live = await read_back(applied)
        if self.status.generation != generation or self.status.busy_since is not None:
            return None
        self._report_shadowing(find_shadowing(applied, {family.family: family.foreign for family in live.families}))
        drifted = [f"{family.label}: {family.drift}" for family in live.families if family.drift is not None]
        return "; ".join(drifted) or None

    async def _check_shadowing(self, ruleset: RuleSet) -> None:
        """After a sync, the rules masqd does not write that may masquerade traffic ``ruleset``
        keeps (:mod:`masqd.shadowing`), from the backend's optional ``foreign_rules``; a read that
        fails leaves the last finding."""
        read = getattr(self.backend, "foreign_rules", None)
        try:
            foreign = None if read is None else await read(ruleset)
        except MasqdError as exc:
            log.debug("could not read the rules masqd does not write; shadowing not checked", error=str(exc))
            return
        except Exception as exc:  # a bug here must not fail a pass whose sync succeeded
            log.warning("could not check for shadowing rules; checked again on the next pass", error=repr(exc))
            return
        if foreign is not None:
            self._report_shadowing(find_shadowing(ruleset, foreign))

    def _report_shadowing(self, found: tuple[Shadowing, ...]) -> None:
        """Record ``found`` in the status; warn once per distinct rule (again if it comes back)."""
        self.status.shadowing = found
        new, gone = self._shadowing.update(found)
        for item in new:
            log.warning("a rule masqd does not write may masquerade traffic masqd keeps", family=item.label,
                        rule=item.rule.text, where=item.where, kept=item.kept_text(), kept_count=len(item.kept))
        for item in gone:
            log.info("the rule that could masquerade traffic masqd keeps is gone", family=item.label,
                     rule=item.rule.text)

    def _log_sync_error(self, exc: MasqdError, trigger: str) -> None:
        written = getattr(exc, "written", ())
        message = (f"sync failed after writing {', '.join(written)}; other parts keep their previous rules"
                   if written else "sync failed; kernel keeps its previous rules")
        now = time.monotonic()
        repeat = self._last_sync_error is not None and self._last_sync_error[0] == str(exc)
        if repeat and now - self._last_sync_error[1] < REPEAT_ERROR_LOG_SECONDS:
            log.debug(message, backend=self.backend.name, trigger=trigger, error=str(exc), repeated=True)
            return
        log.error(message, backend=self.backend.name, trigger=trigger, error=str(exc), written=list(written))
        self._last_sync_error = (str(exc), now)

    def _changes(self, before: RuleSet | None, after: RuleSet | None) -> tuple[CidrChanges, CidrChanges]:
        """:func:`~masqd.audit.family_changes`, once for a pass's log line and audit event (a first
        pass's against what the backend said the kernel held)."""
        before = before if before is not None or self._held is None else self._held
        memo = self._changes_memo
        if memo is None or memo[0] is not before or memo[1] is not after:
            memo = self._changes_memo = (before, after, family_changes(before, after))
        return memo[2]

    def _record_error(self, exc: MasqdError) -> None:
        self.status.errors += 1
        self.status.last_error = exc

    def _log_write(self, before: RuleSet | None, desired: RuleSet, result: SyncResult, trigger: str,
                   started: float) -> None:
        fields = {
            "backend": self.backend.name,
            "trigger": trigger,
            "written": list(result.written),
            "reason": list(result.reasons),
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        for name, masquerade in (("cidrs_from_plugins", False), ("masquerade_cidrs_from_plugins", True)):
            shares = {c.plugin: len(c.cidrs) for c in self.contributions if c.cidrs and c.masquerade is masquerade}
            if shares:  # a plugin contributing both kinds has one Contribution of each
                fields[name] = shares
        if self._flows is not None and self._flows.total:
            fields["conntrack_deleted"] = self._flows.total
        if self.status.repaired:  # the rules already applied, written again: someone changed them
            log.warning("rules restored after outside change", **fields)
            return
        added, removed = self._changes(before, desired)
        for name, changes in (("cidrs_added", added), ("cidrs_removed", removed)):
            listed = itertools.chain.from_iterable(changes.networks.values())
            fields[name] = [cidr_text(net) for net in itertools.islice(listed, LOGGED_CIDRS)]
            count = sum(map(len, changes.networks.values()))
            if count > LOGGED_CIDRS:  # a 100k-CIDR change is counted, not printed
                fields[f"{name}_count"] = count
        if before is None:  # a first write: how many CIDRs it holds (the kernel may have held some already)
            log.info("rules applied", cidrs=distinct_cidrs(desired), **fields)
        else:
            log.info("rules updated", **fields)

    async def run(self, events: MemoryObjectReceiveStream[Event]) -> None:
        """Reconcile on every batch of events until the stream closes or the task is cancelled."""
        self.status.running = True
        try:
            await self._run(events)
        finally:
            self.status.running = False

    async def _run(self, events: MemoryObjectReceiveStream[Event]) -> None:
        async with events:
            while True:
                batch: list[Event] = [Event("retry")]
                with anyio.move_on_after(self._retry_delay):
                    try:
                        batch = [await events.receive()]
                    except anyio.EndOfStream:
                        return
                while True:  # coalesce everything already queued into this pass
                    try:
                        batch.append(events.receive_nowait())
                    except anyio.WouldBlock:
                        break
                    except anyio.EndOfStream:
                        break
                await self._reconcile_guarded(tuple(batch))

    async def _reconcile_guarded(self, batch: tuple[Event, ...]) -> None:
        self.status.busy_since = time.monotonic()
        try:
            await self.reconcile(batch)
        except PluginError:
            pass  # a plugin may recover on its own (a service back, a hung call returned): retry
        except ConfigError:
            self._no_retry()  # wait for the file to change (or the next resync)
            return
        except MasqdError:
            pass
        except Exception as exc:  # a bug must not take the agent (and the node's egress) down with it
            self.status.errors += 1
            self.status.sync_failure = f"internal error: {exc!r}"
            log.exception("internal error during sync; kernel keeps its previous rules", trigger=batch[0].trigger)
        else:
            self._no_retry()
            return
        finally:
            self.status.busy_since = None
        self._retry_delay = self._retry.next_delay()

    def _no_retry(self) -> None:
        self._retry.reset()
        self._retry_delay = None

