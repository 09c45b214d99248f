"""The resync timer: asks for a reconcile every ``resyncInterval`` so drift is healed."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from masqd.events import Notify


class TimerSource:
    """Asks for a reconcile every ``interval()`` seconds.

    ``interval`` is read at the start of each wait; :meth:`reschedule` restarts the current wait,
    so a shorter ``resyncInterval`` takes effect at once instead of after the old one elapses.
    """

    name = "timer"

    def __init__(self, interval: Callable[[], float]):
        self._interval = interval
        self._wake = anyio.Event()

    def reschedule(self) -> None:
        self._wake.set()

    async def run(self, notify: Notify) -> None:
        while True:
            self._wake = anyio.Event()
            with anyio.move_on_after(self._interval()) as scope:
                await self._wake.wait()
            if scope.cancelled_caught:
                notify()
