"""The one back-off and supervision helper (masqd.aio) everything that retries uses."""

from __future__ import annotations

import random

import anyio
import pytest

from masqd.aio import Backoff, supervise


def test_backoff_doubles_is_capped_jittered_and_resets():
    backoff = Backoff(0.5, 8.0, rng=random.Random(1))
    steps = [0.5, 1, 2, 4, 8, 8, 8]
    delays = [backoff.next_delay() for _ in steps]
    assert all(step / 2 <= delay <= step for step, delay in zip(steps, delays))
    backoff.reset()
    assert 0.25 <= backoff.next_delay() <= 0.5
    firsts = {Backoff(0.5, 8.0, rng=random.Random(seed)).next_delay() for seed in range(200)}
    assert len(firsts) == 200  # 200 agents failing together do not retry together


def test_without_jitter_the_delays_are_the_plain_doubling():
    backoff = Backoff(1.0, 5.0, jitter=0)
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_failure_after_a_healthy_run_starts_over():
    backoff = Backoff(1.0, 60.0, jitter=0, healthy_after=30.0)
    assert [backoff.next_delay() for _ in range(3)] == [1.0, 2.0, 4.0]
    backoff.ran(10.0)  # failed again quickly: the outage goes on
    assert backoff.next_delay() == 8.0
    backoff.ran(31.0)  # it had been working: a new failure
    assert backoff.next_delay() == 1.0


def test_jitter_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="jitter must be between 0 and 1"):
        Backoff(1.0, 2.0, jitter=1.5)


async def test_supervise_restarts_a_failing_task_after_the_backoff_and_reports_each_failure():
    runs: list[int] = []
    failures: list[tuple[str, float]] = []

    async def run() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")

    with anyio.fail_after(5):
        await supervise(run, Backoff(0.01, 0.02, jitter=0),
                        on_failure=lambda exc, delay: failures.append((str(exc), delay)))
    assert runs == [0, 1, 2]  # ended when it returned
    assert failures == [("failure 1", 0.01), ("failure 2", 0.02)]


async def test_supervise_runs_the_fallback_while_waiting_and_restarts_a_task_that_returns():
    runs = 0
    fallback_runs = 0
    reasons: list[BaseException | None] = []

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            await anyio.sleep_forever()

    async def fallback() -> None:
        nonlocal fallback_runs
        fallback_runs += 1
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: supervise(run, Backoff(0.01, 0.01, jitter=0), on_failure=lambda e, d: reasons.append(e),
                                        while_waiting=fallback, restart_on_return=True))
        with anyio.fail_after(5):
            while runs < 3:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    assert reasons == [None, None] and fallback_runs == 2


async def test_supervise_calls_on_restart_after_each_wait_and_not_before_the_first_run():
    order: list[str] = []

    async def run() -> None:
        order.append("run")
        if order.count("run") < 3:
            raise RuntimeError("down")

    with anyio.fail_after(5):
        await supervise(run, Backoff(0.01, 0.01, jitter=0), on_failure=lambda e, d: order.append("failed"),
                        on_restart=lambda: order.append("restart"))
    assert order == ["run", "failed", "restart", "run", "failed", "restart", "run"]


async def test_supervise_does_not_treat_cancellation_as_a_failure():
    failures: list = []

    async def run() -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.05):
        await supervise(run, Backoff(0.01, 0.01), on_failure=lambda e, d: failures.append(e))
    assert failures == []
