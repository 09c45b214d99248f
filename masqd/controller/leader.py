"""Leader election on a ``coordination.k8s.io/v1`` Lease, the way client-go's leader election does it.

Only the leader writes: :class:`LeaderElector` acquires the Lease when it is free or expired, renews
it every retry period, stops all leader work at once when renewal has failed for longer than the
renew deadline, and releases it on shutdown.
"""

from __future__ import annotations

import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import anyio
import structlog
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from masqd.kube.client import describe_failure, get_or_none, status_code
from masqd.kube.reflector import RETRIED
from masqd.kube.settings import ObjectRef

log = structlog.get_logger("masqd.controller")


def format_micro_time(moment: datetime) -> str:
    """A ``metav1.MicroTime``: RFC 3339 with microseconds, UTC with ``Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def default_identity() -> str:
    """``hostname_RANDOMHEX``: unique per process, readable in ``kubectl get lease``."""
    return f"{socket.gethostname()}_{secrets.token_hex(6)}"



class LeaderElector:
    """Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go does it.

    A candidate takes the Lease when it is absent (create), released (empty holder) or expired:
    the holder's ``renewTime`` + ``leaseDurationSeconds`` has passed *and* this candidate has seen
    the Lease unchanged for that long on its own monotonic clock (so a skewed clock elsewhere
    cannot make two leaders). Every write carries the ``resourceVersion`` read, so of two
    candidates racing only one wins (the other gets ``409 Conflict``). The leader renews every
    ``retry_period``; when renewal has failed for ``renew_deadline`` (shorter than the lease
    duration, so it stops before anyone may take over) the leader work is cancelled at once and
    the candidate campaigns again. On shutdown a leader releases the Lease so another takes over
    without waiting for it to expire.
    """

    def __init__(self, client: AsyncClient, lease: ObjectRef, identity: str, *, lease_duration: float = 15.0,
                 renew_deadline: float = 10.0, retry_period: float = 2.0, rng: random.Random | None = None):
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("leader election needs 0 < retry_period < renew_deadline < lease_duration, got "
                             f"{retry_period}, {renew_deadline}, {lease_duration}")
        self.client = client
        self.lease = lease
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.is_leader = False
        self.terms = 0  # how many times this candidate became leader
        self._rng = rng or random.Random()
        self._observed_version: str | None = None
        self._observed_at = 0.0
        self._observed_holder: str | None = None
        self._holding = False  # the last write or read says we hold the Lease
        self._failing_logged = False

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Campaign; while leader, run ``lead()`` (cancelled when leadership is lost). Until cancelled."""
        try:
            while True:
                await self._acquire()
                await self._lead(lead)
        finally:
            self.is_leader = False
            if self._holding:
                with anyio.CancelScope(shield=True), anyio.move_on_after(max(self.retry_period, 1.0)):
                    await self._release()

    async def _acquire(self) -> None:
        logged = False
        while True:
            if await self._attempt():
                return
            if not logged and self._observed_holder:
                log.info("waiting for the leader lease", lease=str(self.lease), holder=self._observed_holder,
                         identity=self.identity)
                logged = True
            await anyio.sleep(self.retry_period * self._rng.uniform(1.0, 1.2))

    async def _lead(self, lead: Callable[[], Awaitable[None]]) -> None:
        self.terms += 1
        self.is_leader = True
        log.info("became leader", lease=str(self.lease), identity=self.identity)
        failed = False
        try:
            async with anyio.create_task_group() as tg:

                async def work() -> None:
                    nonlocal failed
                    try:
                        await lead()
                    except Exception:
                        log.exception("leader work failed; giving up leadership and campaigning again")
                        failed = True
                    tg.cancel_scope.cancel()

                tg.start_soon(work)
                await self._keep_renewing()
                tg.cancel_scope.cancel()  # stop every write at once
        finally:
            self.is_leader = False
        log.warning("stopped leading", lease=str(self.lease), identity=self.identity,
                    holder=self._observed_holder)
        if failed:  # let another candidate try; come back after a pause
            await self._release_quietly()
            await anyio.sleep(self.retry_period * self._rng.uniform(1.0, 2.0))

    async def _keep_renewing(self) -> None:
        last_renew = time.monotonic()
        while True:
            left = self.renew_deadline - (time.monotonic() - last_renew)
            await anyio.sleep(max(0.0, min(self.retry_period, left)))
            left = self.renew_deadline - (time.monotonic() - last_renew)
            renewed = False
            if left > 0:
                with anyio.move_on_after(left):
                    renewed = await self._attempt()
            if renewed:
                last_renew = time.monotonic()
                continue
            if self._observed_holder is not None and self._observed_holder != self.identity:
                log.warning("another candidate holds the leader lease", lease=str(self.lease),
                            holder=self._observed_holder)
                return
            if time.monotonic() - last_renew >= self.renew_deadline:
                log.error("could not renew the leader lease within the renew deadline; stopping leader work",
                          lease=str(self.lease), renew_deadline_s=self.renew_deadline)
                return

    async def _attempt(self) -> bool:
        """One try to acquire or renew; ``True`` when this candidate holds the Lease now."""
        try:
            result = await self._try_acquire_or_renew()
        except RETRIED as exc:
            if not self._failing_logged:
                log.warning("leader lease request failed; retrying", lease=str(self.lease), error=describe_failure(exc))
                self._failing_logged = True
            return False
        self._failing_logged = False
        return result

    async def _try_acquire_or_renew(self) -> bool:
        now = _utcnow()
        stamp = format_micro_time(now)
        current = await get_or_none(self.client, Lease, self.lease.name, self.lease.namespace)
        if current is None:
            lease = Lease(metadata=ObjectMeta(name=self.lease.name, namespace=self.lease.namespace),
                          spec=LeaseSpec(holderIdentity=self.identity, leaseDurationSeconds=_seconds(self.lease_duration),
                                         acquireTime=stamp, renewTime=stamp, leaseTransitions=0))
            try:
                created = await self.client.create(lease)
            except ApiError as exc:
                if status_code(exc) == 409:
                    return False  # another candidate created it first
                raise
            self._observe(created)
            self._holding = True
            return True
        self._observe(current)
        spec = current.spec or LeaseSpec()
        holder = spec.holderIdentity or ""
        if holder and holder != self.identity and not self._expired(spec, now):
            self._holding = False
            return False
        ours = holder == self.identity
        current.spec = LeaseSpec(
            holderIdentity=self.identity,
            leaseDurationSeconds=_seconds(self.lease_duration),
            acquireTime=_stamp_of(spec.acquireTime) if ours and spec.acquireTime else stamp,
            renewTime=stamp,
            leaseTransitions=(spec.leaseTransitions or 0) + (0 if ours else 1),
        )
        try:
            updated = await self.client.replace(current)
        except ApiError as exc:
            if status_code(exc) == 409:
                return False  # someone wrote it since we read it: they won
            raise
        if not ours:
            log.info("acquired the leader lease", lease=str(self.lease), previous=holder or None)
        self._observe(updated)
        self._holding = True
        return True

    def _observe(self, lease: Any) -> None:
        version = lease.metadata.resourceVersion if lease.metadata is not None else None
        holder = lease.spec.holderIdentity if lease.spec is not None else None
        self._observed_holder = holder or None
        if version != self._observed_version or version is None:
            self._observed_version = version
            self._observed_at = time.monotonic()

    def _expired(self, spec: LeaseSpec, now: datetime) -> bool:
        duration = spec.leaseDurationSeconds or self.lease_duration
        renewed = spec.renewTime or spec.acquireTime
        stale_by_holder = renewed is None or _as_datetime(renewed).timestamp() + duration <= now.timestamp()
        stale_here = time.monotonic() - self._observed_at >= duration
        return stale_by_holder and stale_here

    async def _release_quietly(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(max(self.retry_period, 1.0)):
            await self._release()

    async def _release(self) -> None:
        """Give the Lease up (empty holder) so another candidate takes over at once."""
        try:
            current = await get_or_none(self.client, Lease, self.lease.name, self.lease.namespace)
            if current is None or current.spec is None or current.spec.holderIdentity != self.identity:
                self._holding = False
                return
            stamp = format_micro_time(_utcnow())
            current.spec = LeaseSpec(holderIdentity="", leaseDurationSeconds=1, acquireTime=stamp, renewTime=stamp,
                                     leaseTransitions=current.spec.leaseTransitions or 0)
            await self.client.replace(current)
            self._holding = False
            log.info("released the leader lease", lease=str(self.lease), identity=self.identity)
        except RETRIED as exc:
            log.warning("could not release the leader lease; it expires on its own", lease=str(self.lease),
                        error=describe_failure(exc))


def _seconds(value: float) -> int:
    return max(1, round(value))


def _stamp_of(value: Any) -> str:
    return format_micro_time(_as_datetime(value))


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
