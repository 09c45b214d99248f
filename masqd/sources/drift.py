"""Drift sources: notice when someone else changes masqd's rules, between resyncs.

Another actor (an operator's ``iptables -F``, a CNI plugin re-creating its tables, a script that
flushes the ruleset) can change or remove masqd's rules at any moment. The resync timer heals that
at the next ``resyncInterval`` (default 60 s); these sources shorten the window:

- :class:`KernelMonitorSource`, for a backend that can follow the kernel's changes (nftables:
  ``nft monitor``): the kernel reports every transaction, and one made by another process on
  masqd's tables asks for a reconcile at once, which restores them within milliseconds.
- :class:`DriftCheckSource`, for a backend that can only read back (iptables: there is no change
  notification for legacy xtables): every ``--drift-check-interval`` (default 10 s) it reads the
  chain back and asks for a reconcile only when it differs from the rules last applied.

Neither writes: the reconciler repairs, as for any other event. ``--drift-check-interval 0``
turns both off (the resync timer still heals).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import structlog

from masqd.errors import MasqdError
from masqd.events import Notify

log = structlog.get_logger("masqd.sources.drift")

#: Default seconds between two read-backs of the rules by :class:`DriftCheckSource`.
DRIFT_CHECK_SECONDS = 10.0


class KernelMonitorSource:
    """Runs the backend's ``monitor(notify)``: a reconcile for each outside change it reports.
    When the monitor fails (``nft monitor`` exits), the daemon restarts this source after a
    back-off and asks for a reconcile, since changes may have been missed meanwhile."""

    name = "kernel-monitor"

    def __init__(self, monitor: Callable[[Callable[[str], None]], Awaitable[None]]):
        self._monitor = monitor

    async def run(self, notify: Notify) -> None:
        def changed(change: str) -> None:
            log.info("another process changed masqd's rules; restoring them", change=change)
            notify(change)

        log.debug("following the kernel's changes to masqd's rules")
        await self._monitor(changed)


class DriftCheckSource:
    """Every ``interval`` seconds, ``check()`` (the reconciler's read-back); a reconcile when it
    names a difference. A read that fails is logged once (until one succeeds again) and tried
    again at the next interval; the reconciler's own syncs report the failure too."""

    name = "drift-check"

    def __init__(self, check: Callable[[], Awaitable[str | None]], interval: float):
        self._check = check
        self.interval = interval

    async def run(self, notify: Notify) -> None:
        failing = False
        while True:
            await anyio.sleep(self.interval)
            try:
                drift = await self._check()
            except MasqdError as exc:
                if not failing:
                    log.warning("drift check could not read the rules back; will retry", error=str(exc),
                                retry_in_s=self.interval)
                failing = True
                continue
            failing = False
            if drift is None:
                log.debug("drift check: the kernel holds the rules last applied")
            else:
                log.info("drift check: the kernel no longer holds the rules last applied", drift=drift)
                notify(drift)
