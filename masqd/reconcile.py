"""The reconciler: the only code that calls a backend, and the only writer of the agent's status.

For every batch of events it recomputes the whole desired state (read every config input,
validate and merge its texts, hear the plugins, compute the RuleSet) and asks the backend to
sync. Failures never remove rules: a bad config or a refused apply leaves the kernel as it was, is
logged with its cause, counted (:class:`masqd.status.AgentStatus`), and retried on the next event
(or after a short, jittered back-off when the apply itself failed). A rejected config is not
read back on every change of it (see :meth:`Reconciler.reconcile`). What it logs, and how it keeps
repeats out of the log: :mod:`masqd.reconcile_log`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from masqd.aio import Backoff, deadline_listener
from masqd.audit import AuditEvent, CidrChanges, family_changes
from masqd.backends.base import Backend, SyncResult
from masqd.config import AgentOptions, MasqConfig, MergedConfig, default_config
from masqd.errors import (BackendError, BackendUnsupported, ConfigError, MasqdError, PluginError, Problem,
                          SnatAddressError, ToolStoppedError)
from masqd.events import Event
from masqd.flow_cleanup import FlowCleanup, FlowReport, flow_fields
from masqd.flows import DEFAULT_CONNTRACK_MODE
from masqd.inputs import ConfigLoader, config_loader
from masqd.plugins import Contribution, Plugins
from masqd.plan import plan_rules
from masqd.reconcile_log import LOGGED_CIDRS as LOGGED_CIDRS  # (named here too, as before the split)
from masqd.reconcile_log import REPEAT_ERROR_LOG_SECONDS as REPEAT_ERROR_LOG_SECONDS
from masqd.reconcile_log import PassLog, log_pass
from masqd.ruleset import RuleSet
from masqd.shadowing import Shadowing, find_shadowing
from masqd.sources.drift import DRIFT_CHECK_SECONDS
from masqd.status import AgentStatus

log = structlog.get_logger("masqd.reconcile")

#: First retry delay after a failed sync, doubled (with jitter) per failure up to RETRY_MAX_SECONDS.
RETRY_INITIAL_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
#: The triggers of a pass that syncs the rules last applied while the config is rejected, however
#: recently the kernel was read: those about the kernel (drift seen, the resync timer), a person
#: asking (SIGHUP, one manual pass), the first pass and a retry of a failed sync. Others (a config
#: file, a ConfigMap or policy changing, an address, a plugin's source) say an input changed, which
#: changes nothing in the kernel: they sync only when the kernel was last confirmed longer ago
#: than the drift checks' interval (see :meth:`Reconciler.reconcile`).
HEALING_TRIGGERS = frozenset({"drift-check", "kernel-monitor", "timer", "sighup", "startup", "manual", "retry"})


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
        drift_check_interval: float = DRIFT_CHECK_SECONDS,
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
        (and has no rules last applied to keep): the rejection is not logged as well.
        ``drift_check_interval``: ``--drift-check-interval`` (0: off, then the resync interval
        stands for it): how long a rejected config's passes go without reading the kernel back."""
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
        self.drift_check_interval = drift_check_interval
        #: The clock of the log's repeat limits and of the read-backs while the config is rejected.
        self.clock: Callable[[], float] = time.monotonic
        #: The SNAT addresses the newest desired state asks for (applied or refused): the address
        #: changes worth a pass (:mod:`masqd.sources.addresses`).
        self.snat_addresses: frozenset = frozenset()
        self.config: MasqConfig = default_config(options)  # last good config
        #: The merged config and plugin contributions of the last good desired state.
        self.desired_from: tuple[MergedConfig, tuple[Contribution, ...]] | None = None
        self._retry = Backoff(retry_initial_seconds, RETRY_MAX_SECONDS)
        self._retry_delay: float | None = None  # seconds until a failed sync is retried; None: none pending
        self._leftovers_pending: list[Backend] | None = None  # None: not looked for yet
        self._log = PassLog()
        self._syncs = 0  # syncs started (a drift check that saw one start discards what it read)
        self._confirmed_at: float | None = None  # when a sync last succeeded (clock); None: failed since
        self._changes_memo: tuple | None = None  # (before, after, their CIDR changes), see _changes
        self.flow_cleanup = FlowCleanup(conntrack, self._local_addresses)
        self._flows: FlowReport | None = None  # what the pass's conntrack step did
        self._held: dict | None = None  # what the backend said the kernel held before the pass's sync

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
        file (or plugin) is reported once, not on every resync; repeats of one kind of problem at
        most once a minute (:class:`masqd.reconcile_log.PassLog`).
        """
        try:
            loaded = self.loader.load()
            config = loaded.config
            ruleset, contributions = await plan_rules(config, self.options, self.plugins, loaded.merged)
            await self._check_snat_addresses(ruleset)
        except ConfigError as exc:
            if not self.once:
                self._log.config_rejected(exc, self.clock())
            raise
        self._log.config_accepted(loaded.merged.sources, loaded.warnings)
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

    async def reconcile(self, events: tuple[Event, ...] = (Event("manual"),)) -> SyncResult:
        """One full pass. Raises :class:`MasqdError` on failure (after recording it).

        With an invalid config the rules last applied are still synced, so drift made by someone
        else is healed while the config is being fixed; the config error is raised afterwards. Not
        on every change of an invalid config though (a file growing by megabytes a second would
        have the kernel read back each time): a pass that only an input changing asked for (no
        trigger in :data:`HEALING_TRIGGERS`) syncs when the last successful sync is older than the
        drift checks' interval (the resync interval when they are off), or failed.
        """
        started = time.perf_counter()
        trigger = ",".join(dict.fromkeys(e.trigger for e in events))
        before = self.status.applied
        listening = deadline_listener.set(self.status.allow_until)  # a long tool run is no stuck pass
        try:
            result = await self._reconcile(trigger, started, {e.trigger for e in events})
        except BaseException as exc:
            self._audit(trigger, before, None, SyncResult(getattr(exc, "written", ())), exc, started)
            raise
        finally:
            deadline_listener.reset(listening)
        self._audit(trigger, before, self.status.applied, result, None, started)
        return result

    async def _reconcile(self, trigger: str, started: float, triggers: set[str]) -> SyncResult:
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
                if not self._heal_now(triggers):
                    log.debug("config rejected; the rules last applied were confirmed recently, not read back now",
                              trigger=trigger)
                    raise
            # A sync started is finished: shutdown waits for it rather than killing iptables-restore
            # between two families (bounded by the restore's own lock wait).
            with anyio.CancelScope(shield=True):
                self._syncs += 1
                self._confirmed_at = None
                result = await self.backend.sync(desired)
                self._confirmed_at = self.clock()
                self._held = result.held
                if self._leftovers_pending != []:
                    await self._remove_leftovers(desired.chain)
            await self._check_shadowing(desired)
        except MasqdError as exc:
            self._record_error(exc)
            if not isinstance(exc, ConfigError):
                self.status.sync_failure = str(exc)
                self._log.sync_failed(exc, self.backend.name, trigger, self.clock())
            raise
        finally:
            self.status.generation += 1
        before = self.status.applied
        self.status.repaired = bool(result.changed) and desired == before and not result.unread
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
        log_pass(self.backend.name, trigger, before, desired, result, accepted=config_error is None,
                 repaired=self.status.repaired, flows=self._flows, contributions=self.contributions,
                 changes=lambda: self._changes(before, desired),
                 duration_ms=round((time.perf_counter() - started) * 1000, 2))
        if config_error is not None:
            self._record_error(config_error)
            raise config_error
        self.status.last_error = None
        self._log.sync_succeeded()
        return result

    def _heal_now(self, triggers: set[str]) -> bool:
        """Whether a pass whose config was rejected syncs the rules last applied (see :meth:`reconcile`)."""
        if self._confirmed_at is None or not HEALING_TRIGGERS.isdisjoint(triggers):
            return True
        interval = self.drift_check_interval if self.drift_check_interval > 0 else self.config.resync_interval
        return self.clock() - self._confirmed_at >= interval

    def _audit(self, trigger: str, before: RuleSet | None, after: RuleSet | None, result: SyncResult,
               error: BaseException | None, started: float) -> None:
        if self.on_audit is None or isinstance(error, (anyio.get_cancelled_exc_class(), ToolStoppedError)):
            return  # a pass cut short by shutdown decided nothing
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
        per family, ``; ``-joined), or ``None``: it does, nothing has been applied yet, a sync ran
        meanwhile (it read back already; a pass that rejected a config without syncing does not
        count), a retry of a failed sync is scheduled (with its back-off; it reads back too), or
        the backend cannot read back. Only reads.
        Raises :class:`~masqd.errors.BackendError` when the kernel cannot be read."""
        applied, syncs = self.status.applied, self._syncs
        read_back = getattr(self.backend, "read_back", None)
        if applied is None or read_back is None or self.status.busy_since is not None or self._retry_delay is not None:
            return None
        live = await read_back(applied)
        if self._syncs != syncs or self.status.busy_since is not None:
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
        self._log.shadowing(found)

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
        self.status.busy_allowed_until = 0.0
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

