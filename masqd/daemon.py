"""The daemon: runs an agent (:func:`masqd.agent.build_agent`) in one anyio task group: its event
sources, the signal handler, the reconciler, the audit trail and the HTTP endpoint (``/metrics``,
``/healthz``, ``/readyz``).

SIGHUP reloads now; SIGTERM and SIGINT stop the daemon cleanly. Rules stay in the kernel on exit,
as with the upstream agent, so traffic keeps flowing while masqd restarts.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from functools import partial

import anyio
import structlog

from masqd.agent import Agent
from masqd.aio import Backoff, stopping, supervise
from masqd.errors import MasqdError
from masqd.events import Emit, Event, make_emit, notifier
from masqd.http import HttpServer, agent_routes, run_endpoint
from masqd.plugins import RegisteredSource

log = structlog.get_logger("masqd.daemon")

#: Pending events beyond this are dropped: a full queue already guarantees a sync.
EVENT_BUFFER = 64
#: A source that fails is restarted after about this many seconds, doubled (with jitter) per
#: failure up to the max, and back to the first after it ran longer than the max.
SOURCE_RESTART_SECONDS = 1.0
SOURCE_RESTART_MAX_SECONDS = 60.0


async def _supervise(registered: RegisteredSource, emit: Emit) -> None:
    """Run a source: a failure is logged and the source restarted after a back-off, so a broken
    watch never stops the reconciler (the resync timer keeps the rules healed meanwhile). One that
    returns is done. An event is emitted on each restart, since changes may have been missed
    while it was down."""

    def failed(exc: BaseException | None, delay: float) -> None:
        log.error("event source failed; restarting it", source=registered.name, plugin=registered.plugin,
                  error=str(exc) if isinstance(exc, MasqdError) else repr(exc), retry_in_s=round(delay, 3))

    await supervise(partial(registered.source.run, notifier(emit, registered.name)),
                    Backoff(SOURCE_RESTART_SECONDS, SOURCE_RESTART_MAX_SECONDS), on_failure=failed,
                    on_restart=lambda: emit(Event(registered.name, "restarted")))


async def _handle_signals(emit: Emit, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading")
                emit(Event("sighup"))
            else:
                log.info("shutting down", signal=signal.Signals(signum).name)
                stop = stopping.get()
                if stop is not None:
                    stop.set()  # a long read-back in the shielded sync is killed, not waited for
                scope.cancel()
                return


async def run_daemon(agent: Agent, *, handle_signals: bool = True,
                     on_http_ready: Callable[[list[str]], None] | None = None) -> None:
    """Run ``agent`` until SIGTERM/SIGINT (or cancellation).

    With ``agent.http_address`` the HTTP endpoint runs too (an address that cannot be bound is
    retried, see :func:`masqd.http.run_endpoint`), and ``on_http_ready`` is called with the
    addresses bound. ``handle_signals=False``: for an agent run inside another program (tests).
    """
    send, receive = anyio.create_memory_object_stream[Event](max_buffer_size=EVENT_BUFFER)
    emit = make_emit(send)
    # where the rules go: the nftables backend's own table (it has no --masq-chain), else the chain
    table = getattr(agent.backend, "table", None)
    where = {"table": table} if table else {"chain": agent.options.masq_chain}
    log.info("masqd starting", backend=agent.backend.name, config=agent.loader.names, **where,
             ipv6=agent.options.enable_ipv6, sources=[s.name for s in agent.sources],
             conntrack_reconcile=agent.reconciler.flow_cleanup.mode)
    for name, note in agent.loader.missing_at_start():  # once: later changes are logged as they happen
        log.warning(f"config file: {note}", path=name)
    stopping.set(anyio.Event())  # this task's context, copied into every task started below
    async with send, anyio.create_task_group() as tg:
        if agent.http_address is not None:
            server = HttpServer(agent_routes(agent.status, agent.metrics))
            tg.start_soon(run_endpoint, agent.http_address, server, on_http_ready)
        tg.start_soon(agent.audit.deliver)
        tg.start_soon(agent.reconciler.run, receive)
        for registered in agent.sources:
            tg.start_soon(_supervise, registered, emit)
        if handle_signals:
            tg.start_soon(_handle_signals, emit, tg.cancel_scope)
        emit(Event("startup"))
    log.info("masqd stopped")
