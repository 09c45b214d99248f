"""Drift sources: notice when someone else changes masqd's rules, between resyncs.

Another actor (an operator's ``iptables -F``, a CNI plugin re-creating its tables, a script that
flushes the ruleset) can change or remove masqd's rules at any moment. The resync timer heals that
at the next ``resyncInterval`` (default 60 s); these sources shorten the window:

- :class:`KernelMonitorSource`, for a backend that can follow the kernel's changes (nftables:
  ``nft monitor``): the kernel reports every transaction, and one made by another process on
  masqd's tables asks for a reconcile at once, which restores them within milliseconds; so does
  the monitor starting to listen (a backend's monitor may say when: ``ready``). Repairs
  have a budget (:data:`REPAIR_BURST` at once, then one per :data:`REPAIR_REFILL_SECONDS`), so two
  writers fighting over the tables (a second masqd with another config, say) do not rewrite them
  in a tight loop: the fight is logged once, naming the other writer, and slowed down. While the
  monitor cannot run, the rules are read back at once and every ``--drift-check-interval``.
- :class:`DriftCheckSource`, for a backend that can only read back (iptables: there is no change
  notification for legacy xtables): every ``--drift-check-interval`` (default 30 s) it reads the
  chain back and asks for a reconcile only when it differs from the rules last applied; when a
  read takes long (a huge table), checks are spaced so they cost at most a tenth of the time.

Neither writes: the reconciler repairs, as for any other event. ``--drift-check-interval 0``
turns both off (the resync timer still heals). The agent picks one for its backend
(:func:`drift_source`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
import anyio.abc
import structlog

from masqd.aio import Backoff, supervise
from masqd.errors import MasqdError
from masqd.events import EventSource, Notify

log = structlog.get_logger("masqd.sources.drift")

#: Default seconds between two read-backs of the rules by :class:`DriftCheckSource`.
DRIFT_CHECK_SECONDS = 30.0
#: The shortest ``--drift-check-interval`` (each check runs ``iptables-save``); 0 turns it off.
MIN_DRIFT_CHECK_SECONDS = 0.1
#: A drift check waits at least this many times as long as the last one took before the next.
CHECK_COST_SHARE = 10
#: Outside changes restored at once, in a burst; beyond, one restore per REPAIR_REFILL_SECONDS.
REPAIR_BURST = 5
REPAIR_REFILL_SECONDS = 10.0
#: After the kernel monitor fails, it is started again after about this many seconds, doubled
#: (with jitter) per failure up to the max, and back to the first after it ran longer than the max.
MONITOR_RETRY_SECONDS = 1.0
MONITOR_RETRY_MAX_SECONDS = 60.0
#: Seconds after starting the monitor again before the pass that covers the time without one
#: (nft says nothing when it is listening; it is, well before this).
MONITOR_SETTLE_SECONDS = 0.5

Check = Callable[[], Awaitable[str | None]]
Monitor = Callable[[Callable[[str], None]], Awaitable[None]]


def drift_source(monitor: Monitor | None, check: Check | None, interval: float) -> EventSource | None:
    """The drift source for a backend: its kernel monitor when it has one (``monitor``), else the
    periodic read-back (``check``); ``None`` with ``interval`` 0 or neither."""
    if interval <= 0:
        return None
    if monitor is not None:
        return KernelMonitorSource(monitor, check, interval)
    if check is not None:
        return DriftCheckSource(check, interval)
    return None


class RepairBudget:
    """A token bucket for repairs: ``burst`` at once, then one per ``refill`` seconds. Pure: the
    caller passes the time."""

    def __init__(self, burst: int = REPAIR_BURST, refill: float = REPAIR_REFILL_SECONDS, now: float = 0.0):
        self.burst, self.refill = burst, refill
        self._tokens, self._at = float(burst), now

    def take(self, now: float) -> float:
        """Spend one repair; returns how many seconds to wait before making it (0: at once)."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) / self.refill)
        self._at = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens * self.refill

    def full(self, now: float) -> bool:
        return self._tokens + (now - self._at) / self.refill >= self.burst


class DriftCheckSource:
    """Every ``interval`` seconds, ``check()`` (the reconciler's read-back); a reconcile when it
    names a difference. A difference is logged when it is new (the same one again, when the
    repair did not take, is a debug event); a read that fails is logged once until one succeeds."""

    name = "drift-check"

    def __init__(self, check: Check, interval: float):
        self._check = check
        self.interval = interval
        self._failing = False
        self._logged: str | None = None

    async def run(self, notify: Notify) -> None:
        await self.poll(notify, at_once=False)

    async def poll(self, notify: Notify, *, at_once: bool) -> None:
        """Check every ``interval`` until cancelled; the first check at once with ``at_once``."""
        if not at_once:
            await anyio.sleep(self.interval)
        while True:
            started = anyio.current_time()
            await self._check_once(notify)
            await anyio.sleep(self.next_wait(anyio.current_time() - started))

    def next_wait(self, took: float) -> float:
        """Seconds until the next check after one that took ``took``: the interval, or longer when
        reading back is slow (a table of 200k iptables-nft rules takes about 40 s to read), so that
        checking never takes more than 1/:data:`CHECK_COST_SHARE` of the time."""
        return max(self.interval, took * CHECK_COST_SHARE)

    async def _check_once(self, notify: Notify) -> None:
        try:
            drift = await self._check()
        except MasqdError as exc:
            if not self._failing:
                log.warning("drift check could not read the rules back; will retry", error=str(exc),
                            retry_in_s=self.interval)
            self._failing = True
            return
        self._failing = False
        if drift is None:
            log.debug("drift check: the kernel holds the rules last applied")
            self._logged = None
            return
        level = log.debug if drift == self._logged else log.info
        level("drift check: the kernel no longer holds the rules last applied", drift=drift)
        self._logged = drift
        notify(drift)


class KernelMonitorSource:
    """Runs the backend's ``monitor(changed)`` and asks for a reconcile per outside change, within
    the repair budget. When the monitor fails (``nft monitor`` exits or cannot start), the rules
    are read back at once and every ``interval`` (``check``) until it is started again after a
    back-off; once it listens again, a reconcile covers the time without one."""

    name = "kernel-monitor"

    def __init__(self, monitor: Monitor, check: Check | None = None, interval: float = DRIFT_CHECK_SECONDS):
        self._monitor = monitor
        self._fallback = DriftCheckSource(check, interval) if check is not None else None
        self.budget = RepairBudget(now=time.monotonic())
        self._changes: list[str] = []
        self._arrived = anyio.Event()

    def _changed(self, change: str) -> None:
        self._changes.append(change)
        self._arrived.set()

    async def run(self, notify: Notify) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._deliver, notify)
            await self._follow(notify, tg)

    async def _follow(self, notify: Notify, tg: anyio.abc.TaskGroup) -> None:
        """Run the monitor; while it is down (it failed, or ended), read back instead, and start it
        again after a back-off (a bug in it is only this source's failure too)."""
        says_ready = _accepts_ready(self._monitor)

        async def follow() -> None:
            log.debug("following the kernel's changes to masqd's rules")
            if says_ready:  # a pass once it listens: what changed before it did is compared then
                await self._monitor(self._changed, ready=partial(notify, "kernel monitor listening"))
            else:
                await self._monitor(self._changed)

        def restarted() -> None:  # a pass once the new monitor is listening, for what changed while none was
            if not says_ready:
                tg.start_soon(_notify_later, notify, MONITOR_SETTLE_SECONDS, "monitor restarted")

        def failed(exc: BaseException | None, delay: float) -> None:
            error = "the monitor ended" if exc is None else str(exc) if isinstance(exc, MasqdError) else repr(exc)
            log.warning("cannot follow the kernel's changes to masqd's rules; reading them back meanwhile",
                        error=error, retry_in_s=round(delay, 3),
                        read_back_every_s=None if self._fallback is None else self._fallback.interval)

        read_back = None if self._fallback is None else partial(self._fallback.poll, notify, at_once=True)
        await supervise(follow, Backoff(MONITOR_RETRY_SECONDS, MONITOR_RETRY_MAX_SECONDS), on_failure=failed,
                        while_waiting=read_back, on_restart=restarted, restart_on_return=True)

    async def _deliver(self, notify: Notify) -> None:
        fighting = False
        while True:
            await self._arrived.wait()
            now = time.monotonic()
            calm = self.budget.full(now)  # no repair for a while: any fight is over
            wait = self.budget.take(now)
            if wait > 0:
                if not fighting:
                    log.warning("masqd's rules keep being changed by another process; restoring them at most "
                                f"every {self.budget.refill:g} s while this goes on (is another masqd or "
                                "ip-masq-agent running?)", change=self._changes[-1], changes=len(self._changes))
                fighting = True
                await anyio.sleep(wait)  # changes meanwhile are restored together, by the next pass
            elif calm:
                fighting = False
            self._arrived = anyio.Event()
            changes, self._changes = self._changes, []
            log.info("another process changed masqd's rules; restoring them", change=changes[0],
                     **({"more_changes": len(changes) - 1} if len(changes) > 1 else {}))
            notify(changes[0])


def _accepts_ready(monitor: Monitor) -> bool:
    """Whether the backend's ``monitor`` says when it listens (``ready=``; optional, see
    :class:`masqd.backends.base.Backend`)."""
    try:
        return "ready" in inspect.signature(monitor).parameters
    except (TypeError, ValueError):
        return False


async def _notify_later(notify: Notify, delay: float, reason: str) -> None:
    await anyio.sleep(delay)
    notify(reason)
