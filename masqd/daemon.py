"""The daemon: one anyio task group running the sources, the signal handler, the reconciler and
the HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``).

SIGHUP reloads now; SIGTERM and SIGINT stop the daemon cleanly. Rules stay in the kernel on exit,
as with the upstream agent, so traffic keeps flowing while masqd restarts.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import partial

import anyio
import anyio.abc
import structlog

from masqd.audit import AuditEvent
from masqd.backends.base import Backend
from masqd.config import AgentOptions
from masqd.errors import MasqdError, safe_repr
from masqd.events import Emit, Event, make_emit, notifier
from masqd.http import Address, HttpServer, agent_routes, run_endpoint
from masqd.inputs import ConfigLoader, FileInput
from masqd.kube import KubeSettings
from masqd.plugins import Plugins, RegisteredSource, SourceContext
from masqd.reconcile import Reconciler
from masqd.sources.drift import DRIFT_CHECK_SECONDS

log = structlog.get_logger("masqd.daemon")

#: Pending events beyond this are dropped: a full queue already guarantees a sync.
EVENT_BUFFER = 64
#: Audit events waiting for slow audit hooks beyond this are dropped (and counted in the log).
AUDIT_BUFFER = 256
#: A source that fails is restarted after this many seconds, doubled per failure up to the max.
SOURCE_RESTART_SECONDS = 1.0
SOURCE_RESTART_MAX_SECONDS = 60.0


async def _supervise(registered: RegisteredSource, emit: Emit) -> None:
    """Run a source forever: a failure is logged and the source restarted after a back-off, so a
    broken watch never stops the reconciler (the resync timer keeps the rules healed meanwhile).
    The back-off doubles while the source keeps failing, and starts over after it ran for longer
    than the longest back-off.
    An event is emitted on each restart, since changes may have been missed while it was down."""
    delay = SOURCE_RESTART_SECONDS
    notify = notifier(emit, registered.name)
    while True:
        started = time.monotonic()
        try:
            await registered.source.run(notify)
            return
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # even SystemExit from a plugin's source is only that source's failure
            if time.monotonic() - started > SOURCE_RESTART_MAX_SECONDS:
                delay = SOURCE_RESTART_SECONDS  # it had been working: a new failure, not a repeat
            log.error("event source failed; restarting it", source=registered.name, plugin=registered.plugin,
                      error=str(exc) if isinstance(exc, MasqdError) else repr(exc), retry_in_s=delay)
        await anyio.sleep(delay)
        delay = min(delay * 2, SOURCE_RESTART_MAX_SECONDS)
        emit(Event(registered.name, "restarted"))


async def _deliver_audit(plugins: Plugins, events: anyio.abc.ObjectReceiveStream[AuditEvent]) -> None:
    """Hand each audit event to the audit hooks, in order, away from the reconciler's path."""
    async with events:
        async for event in events:
            await plugins.audit(event)


def _audit_sink(send: anyio.abc.ObjectSendStream[AuditEvent]):
    dropped = 0

    def sink(event: AuditEvent) -> None:
        nonlocal dropped
        try:
            send.send_nowait(event)
        except anyio.WouldBlock:
            dropped += 1
            log.warning("audit hooks are behind; audit event dropped", dropped_total=dropped, result=event.result)

    return sink


def _fan_out(listeners: list[Callable[[AuditEvent], None]]) -> Callable[[AuditEvent], None] | None:
    """One ``on_audit`` callback handing each event to every listener (metrics, audit hooks)."""
    if not listeners:
        return None

    def deliver(event: AuditEvent) -> None:
        for listener in listeners:
            listener(event)

    return deliver


def _call_each(callbacks: list[Callable[[], None]]) -> None:
    """Every ``on_resync_interval_change`` callback; one that raises does not stop the others."""
    for callback in callbacks:
        try:
            callback()
        except Exception as exc:
            log.error("resync interval callback failed", callback=safe_repr(callback), error=safe_repr(exc))


async def _handle_signals(emit: Emit, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading")
                emit(Event("sighup"))
            else:
                log.info("shutting down", signal=signal.Signals(signum).name)
                scope.cancel()
                return


async def run_daemon(
    backend: Backend,
    options: AgentOptions,
    config: str | os.PathLike[str] | ConfigLoader,
    *,
    reconciler: Reconciler | None = None,
    plugins: Plugins | None = None,
    handle_signals: bool = True,
    kube: KubeSettings | None = None,
    http_address: Address | None = None,
    on_http_ready: Callable[[list[str]], None] | None = None,
    drift_check_interval: float = DRIFT_CHECK_SECONDS,
) -> Reconciler:
    """Run until SIGTERM/SIGINT (or cancellation). Returns the reconciler for inspection.

    The event sources are those the plugins register (the default plugins: the config file watch
    and the resync timer); ``plugins`` defaults to the default plugins alone. With
    ``http_address`` the HTTP endpoint runs too (an address that cannot be bound is retried, see
    :func:`masqd.http.run_endpoint`), and ``on_http_ready`` is called with the addresses bound.
    ``drift_check_interval`` (seconds, 0: off) paces the read-back of a backend without a kernel
    monitor; one with a monitor (nftables) follows the kernel's changes instead.
    """
    plugins = plugins or Plugins.load(entry_points=False)
    reconciler = reconciler or Reconciler(backend, options, config)
    loader = reconciler.loader
    if reconciler.plugins is None:  # one place hands the plugins over, whoever built the reconciler
        reconciler.plugins = plugins
    interval_listeners: list[Callable[[], None]] = []
    reconciler.on_resync_interval = partial(_call_each, interval_listeners)
    first_file = next((i.name for i in loader.inputs if isinstance(i, FileInput)), "")
    context = SourceContext(first_file, options, lambda: reconciler.resync_interval, interval_listeners.append,
                            loader.inputs, kube, drift_check_interval, reconciler.kernel_monitor,
                            reconciler.check_drift)
    sources = plugins.sources(context)
    send, receive = anyio.create_memory_object_stream[Event](max_buffer_size=EVENT_BUFFER)
    audit_send, audit_receive = anyio.create_memory_object_stream[AuditEvent](max_buffer_size=AUDIT_BUFFER)
    emit = make_emit(send)
    log.info("masqd starting", backend=backend.name, config=loader.names, chain=options.masq_chain,
             ipv6=options.enable_ipv6, sources=[s.name for s in sources])
    listeners: list[Callable[[AuditEvent], None]] = [reconciler.on_audit] if reconciler.on_audit else []
    async with send, audit_send, anyio.create_task_group() as tg:
        if http_address is not None:
            from masqd.metrics import Metrics

            watches = [s.source for s in sources if hasattr(s.source, "reflector")]
            metrics = Metrics(reconciler, plugins=plugins, watches=lambda: watches)
            listeners.append(metrics.observe)
            tg.start_soon(run_endpoint, http_address, HttpServer(agent_routes(reconciler, metrics)), on_http_ready)
        if plugins.implements("audit"):
            listeners.append(_audit_sink(audit_send))
            tg.start_soon(_deliver_audit, plugins, audit_receive)
        else:
            audit_receive.close()
        reconciler.on_audit = _fan_out(listeners)
        tg.start_soon(reconciler.run, receive)
        for registered in sources:
            tg.start_soon(_supervise, registered, emit)
        if handle_signals:
            tg.start_soon(_handle_signals, emit, tg.cancel_scope)
        emit(Event("startup"))
    log.info("masqd stopped")
    return reconciler
