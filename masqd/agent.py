"""The one place an agent is built: plugins, backend, config inputs, reconciler, status, event
sources, audit trail and (for the daemon) metrics, wired once and complete.

The daemon (:func:`masqd.daemon.run_daemon`) only runs what :func:`build_agent` built; the
one-shot commands (``run --once``, ``validate``, ``render``, ``explain``, ``cleanup``) use the
same agent without running it; :mod:`masqd.testing` builds its harness here too, so the tests
exercise the agent that ships.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import structlog

from masqd.audit import AuditEvent
from masqd.backends.base import Backend, SyncResult
from masqd.config import AgentOptions
from masqd.errors import KubeError, SourceReadError, safe_repr
from masqd.inputs import ConfigInput, ConfigLoader, FileInput, config_loader
from masqd.plugins import Plugins, RegisteredSource, SourceContext
from masqd.flows import DEFAULT_CONNTRACK_MODE
from masqd.reconcile import RETRY_INITIAL_SECONDS, Reconciler
from masqd.sources.drift import DRIFT_CHECK_SECONDS, drift_source
from masqd.status import AgentStatus

if TYPE_CHECKING:  # imported when used: the API client costs start-up time and memory
    from masqd.http import Address
    from masqd.kube.settings import KubeSettings
    from masqd.metrics import Metrics

log = structlog.get_logger("masqd.agent")

#: Audit events waiting for slow audit hooks beyond this are dropped (and counted in the log).
AUDIT_BUFFER = 256
#: Seconds a one-shot command waits for one event source's ``read_once``.
SOURCE_READ_TIMEOUT_SECONDS = 30.0


class AuditTrail:
    """Where the reconciler's audit events go. ``listeners`` (the metrics) get each one at once
    and must not block; the plugins' ``audit`` hooks get them in order from a bounded queue, away
    from the reconciler's path: the daemon delivers them from a task of their own
    (:meth:`deliver`), a one-shot command before it returns (:meth:`flush`). When the hooks fall
    :data:`AUDIT_BUFFER` events behind, new ones are dropped and the drop is logged."""

    def __init__(self, plugins: Plugins):
        self.plugins = plugins
        self.listeners: list[Callable[[AuditEvent], None]] = []
        self.dropped = 0
        self._hooks = plugins.implements("audit")
        self._queue: collections.deque[AuditEvent] = collections.deque()
        self._arrived: anyio.Event | None = None  # set when an event is queued while deliver() waits

    def __call__(self, event: AuditEvent) -> None:
        for listener in self.listeners:
            listener(event)
        if not self._hooks:
            return
        if len(self._queue) >= AUDIT_BUFFER:
            self.dropped += 1
            log.warning("audit hooks are behind; audit event dropped", dropped_total=self.dropped, result=event.result)
            return
        self._queue.append(event)
        if self._arrived is not None:
            self._arrived.set()

    async def deliver(self) -> None:
        """Hand every audit event to the audit hooks, in order, until cancelled."""
        while True:
            await self.flush()
            self._arrived = anyio.Event()
            if not self._queue:
                await self._arrived.wait()

    async def flush(self) -> None:
        """Hand the audit events queued so far to the audit hooks."""
        while self._queue:
            await self.plugins.audit(self._queue.popleft())


class ResyncListeners:
    """The callbacks ``SourceContext.on_resync_interval_change`` registers; called whenever the
    config's ``resyncInterval`` changes. One that raises does not stop the others."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def __call__(self) -> None:
        for callback in self.callbacks:
            try:
                callback()
            except Exception as exc:
                log.error("resync interval callback failed", callback=safe_repr(callback), error=safe_repr(exc))


@dataclass(eq=False)
class Agent:
    """Everything one masqd agent is made of (see :func:`build_agent`)."""

    options: AgentOptions
    backend: Backend
    plugins: Plugins
    loader: ConfigLoader
    reconciler: Reconciler
    status: AgentStatus
    audit: AuditTrail
    #: every event source: the plugins' (config watches, timer, API watches) and the drift source
    sources: tuple[RegisteredSource, ...] = ()
    #: the Kubernetes flags, or ``None`` when masqd does not talk to the API
    kube: KubeSettings | None = None
    #: where the daemon serves /metrics, /healthz and /readyz (``None``: nowhere)
    http_address: Address | None = None
    #: the agent's Prometheus metrics, when it serves them
    metrics: Metrics | None = None

    async def read_sources_once(self) -> None:
        """For a one-shot command: each event source's ``read_once`` (what a watch's first list
        would hand over). Raises :class:`~masqd.errors.SourceReadError` naming the source that
        failed, whatever it raised, or that took longer than :data:`SOURCE_READ_TIMEOUT_SECONDS`;
        :class:`~masqd.errors.KubeError` (no credentials: a usage error) as it is."""
        for registered in self.sources:
            read_once = getattr(registered.source, "read_once", None)
            if read_once is None:
                continue
            what = f"event source {registered.name} (plugin {registered.plugin})"
            try:
                with anyio.move_on_after(SOURCE_READ_TIMEOUT_SECONDS) as deadline:
                    await read_once()
            except (KubeError, SourceReadError):
                raise
            except Exception as exc:  # a plugin's source: its failure, named, whatever it raised
                raise SourceReadError(what, f"raised {safe_repr(exc)}") from None
            if deadline.cancelled_caught:
                raise SourceReadError(what, f"did not finish within {SOURCE_READ_TIMEOUT_SECONDS:g} s")

    async def run_once(self) -> SyncResult:
        """``run --once``: read the event sources once, reconcile once, and hand the audit event
        to the audit hooks before returning or raising."""
        await self.read_sources_once()
        try:
            return await self.reconciler.reconcile()
        finally:
            await self.audit.flush()


def build_agent(
    options: AgentOptions,
    *,
    backend: Backend,
    config: str | os.PathLike[str] | ConfigLoader | Sequence[ConfigInput],
    plugins: Plugins | None = None,
    kube: KubeSettings | None = None,
    once: bool = False,
    http_address: Address | None = None,
    drift_check_interval: float = DRIFT_CHECK_SECONDS,
    retry_initial_seconds: float = RETRY_INITIAL_SECONDS,
    leftovers: Callable[[Backend], tuple[Backend, ...]] | None = None,
    conntrack: str = DEFAULT_CONNTRACK_MODE,
) -> Agent:
    """A complete agent.

    options: the agent flags. backend: the backend (see :meth:`Plugins.make_backend`).
    config: a config file path, the config inputs, or a loader over them.
    plugins: the loaded plugins (default: the default plugins alone).
    kube: the Kubernetes flags (:class:`masqd.kube.KubeSettings`), or ``None``.
    once: for a one-shot command: no drift source, no metrics; sources are read, not run.
    http_address: where the daemon serves its endpoint (:class:`masqd.http.Address`), or ``None``.
    drift_check_interval: seconds between read-backs of a backend without a kernel monitor (0: off).
    retry_initial_seconds: the first delay before a failed sync is retried.
    leftovers: finds the backends whose rules a previous masqd may have left, to remove them.
    conntrack: ``--conntrack-reconcile`` (:data:`masqd.flows.CONNTRACK_MODES`).
    """
    plugins = plugins or Plugins.load(entry_points=False)
    loader = config_loader(config, options)
    status = AgentStatus()
    audit = AuditTrail(plugins)
    listeners = ResyncListeners()
    reconciler = Reconciler(backend, options, loader, plugins=plugins, status=status, on_audit=audit,
                            on_resync_interval=listeners, retry_initial_seconds=retry_initial_seconds,
                            leftovers=leftovers, conntrack=conntrack, once=once,
                            drift_check_interval=drift_check_interval)
    first_file = next((i.name for i in loader.inputs if isinstance(i, FileInput)), "")
    context = SourceContext(config_path=first_file, options=options, resync_interval=lambda: reconciler.resync_interval,
                            on_resync_interval_change=listeners.add, config_inputs=loader.inputs, kube=kube, once=once)
    sources = list(plugins.sources(context))
    drift = None if once else drift_source(reconciler.kernel_monitor, reconciler.check_drift, drift_check_interval)
    if drift is not None:
        sources.append(RegisteredSource("masqd", drift.name, drift))
    if not once:  # snatToAddress: a refused state is tried again when its address arrives
        from masqd.sources.addresses import AddressSource

        addresses = AddressSource(lambda: reconciler.snat_addresses)
        sources.append(RegisteredSource("masqd", addresses.name, addresses))
    metrics = None
    if http_address is not None and not once:
        from masqd.metrics import Metrics  # only for an agent that serves it

        watches = [s.source for s in sources if hasattr(s.source, "reflector")]
        metrics = Metrics(status, backend=backend.name, options=options, plugins=plugins, watches=lambda: watches,
                          triggers=[s.name for s in sources], conntrack=conntrack)
        audit.listeners.append(metrics.observe)
    return Agent(options=options, backend=backend, plugins=plugins, loader=loader, reconciler=reconciler,
                 status=status, audit=audit, sources=tuple(sources), kube=kube, http_address=http_address,
                 metrics=metrics)
