"""Load: a burst of config changes is coalesced, and the agent ends on the last one.

``benchmarks/burst.py`` measures the same with the real command (passes, time, RSS before and
after); here the behaviour is asserted, never a time.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.events import Event, make_emit
from masqd.reconcile import Reconciler
from test_daemon import NO_RESYNC, Running, cidrs_of, wait_until, write_atomically

BURST = 10_000


def nth(i: int) -> str:
    return f"10.{i // 256}.{i % 256}.0/24"


async def test_ten_thousand_config_changes_are_coalesced_and_the_last_one_wins(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [192.0.2.0/24]\n")
    backend = DryRunBackend()
    async with Running(backend, config) as daemon:
        for i in range(BURST):
            write_atomically(config, NO_RESYNC + f"nonMasqueradeCIDRs: [{nth(i)}]\n")
            await anyio.sleep(0)  # the watcher and the reconciler run in between, as with a real writer
        await wait_until(lambda: cidrs_of(backend.applied)[1:] == [nth(BURST - 1)], "the last config")
        passes = daemon.reconciler.generation
        assert passes < BURST // 2, f"{passes} passes for {BURST} changes: not coalesced"
        assert backend.writes <= passes and daemon.reconciler.errors == 0
        await anyio.sleep(0.3)  # nothing left queued: no pass after the last state
        assert daemon.reconciler.generation == passes


async def test_an_event_flood_costs_a_bounded_number_of_passes(tmp_path: Path) -> None:
    """A source emitting events as fast as it can: the queue is bounded (EVENT_BUFFER), so the
    flood is dropped rather than queued, and every pass still sees the newest state."""
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [198.51.100.0/24]\n")
    backend = DryRunBackend()
    reconciler = Reconciler(backend, AgentOptions(), config)
    send, receive = anyio.create_memory_object_stream[Event](max_buffer_size=64)
    emit = make_emit(send)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reconciler.run, receive)
        for i in range(BURST):
            emit(Event("flood", str(i)))
            if i % 1000 == 0:
                await anyio.sleep(0)
        await wait_until(lambda: reconciler.generation >= 1, "a pass")
        send.close()
    assert reconciler.generation <= BURST // 1000 + 2  # one pass per yield at most, not per event
    assert cidrs_of(backend.applied)[1:] == ["198.51.100.0/24"] and backend.writes == 1
