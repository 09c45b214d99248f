"""The daemon: one anyio task group running the sources, the signal handler and the reconciler.

SIGHUP reloads now; SIGTERM and SIGINT stop the daemon cleanly. Rules stay in the kernel on exit,
as with the upstream agent, so traffic keeps flowing while masqd restarts.
"""

from __future__ import annotations

import os
import signal

import anyio
import structlog

from masqd.backends.base import Backend
from masqd.config import AgentOptions
from masqd.events import Emit, Event, Source, make_emit
from masqd.reconcile import Reconciler
from masqd.sources.files import ConfigFileSource
from masqd.sources.timer import TimerSource

log = structlog.get_logger("masqd.daemon")

#: Pending events beyond this are dropped: a full queue already guarantees a sync.
EVENT_BUFFER = 64
#: A source that fails is restarted after this many seconds, doubled per failure up to the max.
SOURCE_RESTART_SECONDS = 1.0
SOURCE_RESTART_MAX_SECONDS = 60.0


async def _supervise(source: Source, emit: Emit) -> None:
    """Run a source forever: a failure is logged and the source restarted after a back-off, so a
    broken watch never stops the reconciler (the resync timer keeps the rules healed meanwhile).
    An event is emitted on each restart, since changes may have been missed while it was down."""
    delay = SOURCE_RESTART_SECONDS
    while True:
        try:
            await source.run(emit)
            return
        except Exception as exc:
            log.error("event source failed; restarting it", source=source.name, error=repr(exc), retry_in_s=delay)
        await anyio.sleep(delay)
        delay = min(delay * 2, SOURCE_RESTART_MAX_SECONDS)
        emit(Event(source.name, "restarted"))


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
    config_path: str | os.PathLike[str],
    *,
    reconciler: Reconciler | None = None,
    extra_sources: tuple[Source, ...] = (),
    handle_signals: bool = True,
    file_source: ConfigFileSource | None = None,
) -> Reconciler:
    """Run until SIGTERM/SIGINT (or cancellation). Returns the reconciler for inspection."""
    reconciler = reconciler or Reconciler(backend, options, config_path)
    timer = TimerSource(lambda: reconciler.resync_interval)
    reconciler.on_resync_interval = timer.reschedule
    send, receive = anyio.create_memory_object_stream[Event](max_buffer_size=EVENT_BUFFER)
    emit = make_emit(send)
    sources: tuple[Source, ...] = (file_source or ConfigFileSource(config_path), timer, *extra_sources)
    log.info("masqd starting", backend=backend.name, config=str(config_path), chain=options.masq_chain,
             ipv6=options.enable_ipv6)
    async with send, anyio.create_task_group() as tg:
        tg.start_soon(reconciler.run, receive)
        for source in sources:
            tg.start_soon(_supervise, source, emit)
        if handle_signals:
            tg.start_soon(_handle_signals, emit, tg.cancel_scope)
        emit(Event("startup"))
    log.info("masqd stopped")
    return reconciler
