"""Shared async helpers, kept apart from domain code: back-off and supervision, written once.

Everything in masqd that retries (a failed sync, an event source that died, ``nft monitor``
exiting, the Kubernetes API failing, ``accept()`` out of descriptors) waits with one
:class:`Backoff`; everything that must keep running despite failures runs under
:func:`supervise`. kopf's ``_cogs`` is the model: small, generic, no knowledge of masqd's domain.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

import anyio

#: Told the deadline of each kernel tool run (seconds, the grace for a killed one included) when
#: set: the reconciler sets it for its pass, so ``/healthz`` allows a pass as long as the tool it
#: runs is allowed to take (:meth:`masqd.status.AgentStatus.allow_until`). Read by
#: :func:`masqd.backends.tools.run_tool`.
deadline_listener: ContextVar[Callable[[float], None] | None] = ContextVar("deadline_listener", default=None)
#: Set when the daemon is asked to stop (SIGTERM, SIGINT): a kernel tool that only reads is killed
#: then (:func:`masqd.backends.tools.run_tool`), though the sync running it is shielded from
#: cancellation so that writes finish. Given to the daemon's tasks by :func:`masqd.daemon.run_daemon`.
stopping: ContextVar[anyio.Event | None] = ContextVar("stopping", default=None)


class Backoff:
    """Jittered exponential back-off.

    The n-th consecutive delay is drawn from ``[step * (1 - jitter), step]``, where ``step`` is
    ``initial * 2**(n-1)`` capped at ``maximum``: with the default ``jitter`` of one half, a
    thousand nodes retrying after the same outage spread their attempts over half of each step
    instead of arriving at once. ``jitter=0`` gives the plain doubling.

    :meth:`reset` after a success. :meth:`ran` reports how long the attempt that just failed had
    run: one that ran longer than ``healthy_after`` seconds (default: ``maximum``) had been
    working, so its failure is a new one and the back-off starts over instead of continuing to
    grow from an outage long past.
    """

    def __init__(self, initial: float, maximum: float, *, jitter: float = 0.5, healthy_after: float | None = None,
                 rng: random.Random | None = None):
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, not {jitter!r}")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.healthy_after = maximum if healthy_after is None else healthy_after
        self.failures = 0  # consecutive failures since the last reset
        self._rng = rng or random.Random()

    @property
    def step(self) -> float:
        """The upper bound of the next delay."""
        return min(self.maximum, self.initial * 2 ** min(self.failures, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt (counts one more failure)."""
        step = self.step
        self.failures += 1
        if not self.jitter:
            return step
        return step * (1 - self.jitter) + self._rng.uniform(0, step * self.jitter)

    def ran(self, seconds: float) -> None:
        """The attempt that just ended ran this long: start over when it had been healthy."""
        if seconds > self.healthy_after:
            self.reset()

    def reset(self) -> None:
        self.failures = 0


async def supervise(run: Callable[[], Awaitable[object]], backoff: Backoff, *,
                    on_failure: Callable[[BaseException | None, float], None],
                    while_waiting: Callable[[], Awaitable[object]] | None = None,
                    on_restart: Callable[[], None] | None = None,
                    restart_on_return: bool = False) -> None:
    """Run ``run()`` until it returns (or, with ``restart_on_return``, forever), restarting it
    after ``backoff``'s delay whenever it fails.

    ``on_failure(error, delay)`` is told each failure before the wait (``error`` is ``None`` when
    ``run`` returned and ``restart_on_return`` is set); it must not raise. Cancellation is never a
    failure: it ends the supervision at once. Any other exception, even ``SystemExit`` from a
    plugin's code, is only that task's failure. ``while_waiting()`` runs during each wait and is
    cancelled when the wait is over (a fallback while the real thing is down). ``on_restart()`` is
    called after each wait, just before ``run()`` starts again (what was missed while it was down
    may need a look); it must not raise.
    """
    while True:
        started = time.monotonic()
        error: BaseException | None = None
        try:
            await run()
            if not restart_on_return:
                return
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # noqa: BLE001 - the supervised task's failure, reported and retried
            error = exc
        backoff.ran(time.monotonic() - started)
        delay = backoff.next_delay()
        on_failure(error, delay)
        with anyio.move_on_after(delay):
            if while_waiting is not None:
                await while_waiting()
            else:
                await anyio.sleep_forever()
        if on_restart is not None:
            on_restart()
