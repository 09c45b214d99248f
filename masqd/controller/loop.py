"""The controller loop: while leading, watch the policies, Nodes and the ConfigMap, and write only
what differs from :func:`~masqd.controller.translation.translate`'s desired state.

Each write re-reads the object first and retries on ``409 Conflict``; every API failure is logged
and retried after a jittered back-off, so nothing here crashes the process.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import anyio
import structlog
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Node
from lightkube.types import PatchType

from masqd.aio import Backoff
from masqd.controller.leader import LeaderElector, default_identity
from masqd.controller.options import ControllerOptions
from masqd.controller.translation import (
    ACCEPTED,
    CONFIG_KEY,
    DEFAULT_POLICY,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MANAGED_POLICY,
    Translation,
    configmap_action,
    default_policy_spec,
    find_condition,
    managed_action,
    status_action,
    translate,
)
from masqd.errors import ApiWriteError, KubeError
from masqd.kube.client import EgressNATPolicy, describe_failure, get_or_none, make_client, status_code
from masqd.kube.reflector import RETRIED, Reflector
from masqd.kube.settings import KubeSettings
from masqd.policies import as_mapping

log = structlog.get_logger("masqd.controller")

#: Writes re-read and retried this many times on ``409 Conflict`` before backing off.
CONFLICT_RETRIES = 5


class _Trigger:
    """A resettable wake-up: ``set()`` from callbacks, ``wait()`` returns once per burst."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class Controller:
    """The controller process: leader election, and while leading, watches and writes.

    ``client`` is owned by the caller. ``writes`` counts the writes it made (policies, ConfigMap,
    statuses; not the Lease), ``translation`` is the last desired state computed, ``syncs`` counts
    the completed passes. The durations are client-go's defaults; tests pass shorter ones.
    """

    def __init__(self, client: AsyncClient, options: ControllerOptions, *, settings: KubeSettings | None = None,
                 identity: str | None = None, lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0, resync_interval: float = 300.0, coalesce: float = 0.05):
        self.client = client
        self.options = options
        self.settings = settings or KubeSettings()
        self.identity = identity or default_identity()
        self.elector = LeaderElector(client, options.lease, self.identity, lease_duration=lease_duration,
                                     renew_deadline=renew_deadline, retry_period=retry_period)
        self.resync_interval = resync_interval
        self.coalesce = coalesce
        self.writes = 0
        self.syncs = 0
        self.translation: Translation | None = None
        self._reported: tuple = ()

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader

    async def run(self) -> None:
        """Campaign and lead until cancelled; a leader releases the Lease on the way out."""
        log.info("controller starting", identity=self.identity, lease=str(self.options.lease),
                 configmap=str(self.options.configmap), ipv6=self.options.enable_ipv6)
        try:
            await self.elector.run(self._lead)
        finally:
            log.info("controller stopped", identity=self.identity)

    async def _lead(self) -> None:
        trigger = _Trigger()

        def changed(_objects: dict[str, Any]) -> None:
            trigger.set()

        ref = self.options.configmap
        policies = Reflector(self.client, EgressNATPolicy, self.settings, changed, what="EgressNATPolicy objects")
        nodes = Reflector(self.client, Node, self.settings, changed, what="nodes")
        configmaps = Reflector(self.client, ConfigMap, self.settings, changed, namespace=ref.namespace,
                               fields={"metadata.name": ref.name}, what=f"configmap {ref}")
        reflectors = (policies, nodes, configmaps)
        async with anyio.create_task_group() as tg:
            for reflector in reflectors:
                tg.start_soon(reflector.run)
            await self._reconcile_loop(trigger, reflectors)

    async def _reconcile_loop(self, trigger: _Trigger, reflectors: tuple[Reflector, Reflector, Reflector]) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        failing = False
        while True:
            with anyio.move_on_after(self.resync_interval):
                await trigger.wait()
            await anyio.sleep(self.coalesce)  # let a burst of watch events land first
            if not all(reflector.synced for reflector in reflectors):
                continue  # each first list sets the trigger again
            try:
                await self._sync(*reflectors)
            except Exception as exc:  # noqa: BLE001 - an API failure (or a bug) must not end leadership
                delay = backoff.next_delay()
                fields = {"error": describe_failure(exc), "retry_in_s": round(delay, 2)}
                if not isinstance(exc, (*RETRIED, KubeError)):
                    log.exception("controller sync failed unexpectedly; retrying", **fields)
                elif failing:
                    log.debug("controller sync still failing", **fields)
                else:
                    log.warning("controller sync failed; retrying", **fields)
                failing = True
                await anyio.sleep(delay)
                trigger.set()
                continue
            if failing:
                log.info("controller sync recovered", failures=backoff.failures)
                failing = False
            backoff.reset()

    async def _sync(self, policies: Reflector, nodes: Reflector, configmaps: Reflector) -> None:
        # Each object is converged on its own: one refused write (a 403, a 422) is reported and
        # retried, but does not keep the ConfigMap or the other policies from being written.
        failed: list[Exception] = []

        async def converge(*args: Any) -> bool:
            try:
                return await self._converge(*args)
            except (*RETRIED, KubeError) as exc:
                log.warning("controller write failed; the other objects are still converged", what=args[0],
                            error=describe_failure(exc))
                failed.append(exc)
                return False

        translation = translate(policies.objects, nodes.objects.values(), self.options)
        self.translation = translation
        self._report(translation)
        if translation.default_missing:
            await converge(f"EgressNATPolicy {DEFAULT_POLICY}", policies.objects.get(DEFAULT_POLICY),
                           lambda: get_or_none(self.client, EgressNATPolicy, DEFAULT_POLICY),
                           lambda obj: None if obj is not None else "create",
                           self._create_default)
        managed = translation.managed_spec
        managed_written = await converge(
            f"EgressNATPolicy {MANAGED_POLICY}", policies.objects.get(MANAGED_POLICY),
            lambda: get_or_none(self.client, EgressNATPolicy, MANAGED_POLICY),
            lambda obj: managed_action(obj, managed),
            lambda obj, action: self._write_managed(obj, action, managed))
        ref = self.options.configmap
        text = translation.config_text
        await converge(f"configmap {ref}", configmaps.objects.get(ref.name),
                       lambda: get_or_none(self.client, ConfigMap, ref.name, ref.namespace),
                       lambda obj: configmap_action(obj, text),
                       lambda obj, action: self._write_configmap(obj, action, text))
        for name, status in translation.statuses.items():
            if name == MANAGED_POLICY and managed_written:
                continue  # its spec was just put right: the status follows on the next pass
            if name not in policies.objects:
                continue
            await converge(f"EgressNATPolicy {name} status", policies.objects.get(name),
                           lambda name=name: get_or_none(self.client, EgressNATPolicy, name),
                           lambda obj, status=status, name=name: status_action(obj, status, name, managed,
                                                                             datetime.now(timezone.utc)),
                           lambda obj, conditions, name=name: self._write_status(name, obj, conditions))
        if failed:
            raise failed[0]
        self.syncs += 1

    async def _converge(self, what: str, cached: Any, fetch: Callable[[], Awaitable[Any]],
                        plan: Callable[[Any], Any], write: Callable[[Any, Any], Awaitable[None]]) -> bool:
        """Write when ``plan`` says the object needs it: checked on the watch's copy first (no
        request when nothing is to do), then on a fresh read; ``409 Conflict`` re-reads and retries.
        Returns whether it wrote."""
        if plan(cached) is None:
            return False
        for _attempt in range(CONFLICT_RETRIES):
            current = await fetch()
            action = plan(current)
            if action is None:
                return False
            try:
                await write(current, action)
            except ApiError as exc:
                if status_code(exc) == 409:
                    log.info("write conflict; re-reading", what=what)
                    continue
                raise
            self.writes += 1
            return True
        raise ApiWriteError(f"{what}: still conflicting after {CONFLICT_RETRIES} attempts")

    async def _create_default(self, _current: Any, _action: Any) -> None:
        policy = EgressNATPolicy(metadata={"name": DEFAULT_POLICY}, spec=default_policy_spec())
        await self.client.create(policy)
        log.info("created the default EgressNATPolicy", policy=DEFAULT_POLICY)

    async def _write_managed(self, current: Any, action: str, spec: dict[str, Any] | None) -> None:
        if action == "delete":
            await self.client.delete(EgressNATPolicy, MANAGED_POLICY)
            log.info("deleted the managed EgressNATPolicy: the cluster has no ranges to hold", policy=MANAGED_POLICY)
            return
        labels = {MANAGED_BY_LABEL: MANAGED_BY}
        if action == "create":
            await self.client.create(EgressNATPolicy(metadata={"name": MANAGED_POLICY, "labels": labels}, spec=spec))
        else:
            metadata = dict(as_mapping(current).get("metadata") or {})
            metadata["labels"] = {**(metadata.get("labels") or {}), **labels}
            await self.client.replace(EgressNATPolicy(metadata=metadata, spec=spec))
        log.info(f"{action}d the managed EgressNATPolicy", policy=MANAGED_POLICY,
                 destinations=len((spec or {}).get("destinations", ())))

    async def _write_configmap(self, current: Any, action: str, text: str) -> None:
        ref = self.options.configmap
        if action == "create":
            await self.client.create(ConfigMap(
                metadata=ObjectMeta(name=ref.name, namespace=ref.namespace, labels={MANAGED_BY_LABEL: MANAGED_BY}),
                data={CONFIG_KEY: text}))
        else:
            current.data = {**(current.data or {}), CONFIG_KEY: text}
            await self.client.replace(current)
        log.info("wrote the agents' ConfigMap", configmap=str(ref), cidrs=len(self.translation.cidrs)
                 if self.translation else None)

    async def _write_status(self, name: str, current: Any, conditions: list[dict[str, Any]]) -> None:
        version = (as_mapping(current).get("metadata") or {}).get("resourceVersion")
        patch: dict[str, Any] = {"status": {"conditions": conditions}}
        if version:
            patch["metadata"] = {"resourceVersion": version}  # a precondition: 409 when it changed
        await self.client.patch(EgressNATPolicy.Status, name, patch, patch_type=PatchType.MERGE)
        accepted = find_condition(conditions, ACCEPTED) or {}
        log.info("recorded policy status", policy=name, accepted=accepted.get("status"),
                 reason=accepted.get("reason"), observed_generation=accepted.get("observedGeneration"))

    def _report(self, translation: Translation) -> None:
        """Log node warnings and rejected policies when they change (not on every pass)."""
        rejected = tuple(sorted((name, s.message) for name, s in translation.statuses.items() if not s.accepted))
        fingerprint = (translation.warnings, rejected)
        if fingerprint == self._reported:
            return
        self._reported = fingerprint
        for warning in translation.warnings:
            log.warning(warning)
        for name, message in rejected:
            log.error("EgressNATPolicy rejected", policy=name, problems=message)


async def run_controller(options: ControllerOptions, settings: KubeSettings, *, handle_signals: bool = True,
                         client: AsyncClient | None = None, **timings: float) -> Controller:
    """Run the controller until SIGTERM/SIGINT (or cancellation); a leader releases its Lease on
    the way out. ``timings``: :class:`Controller`'s durations. Returns the controller."""
    own_client = client is None
    client = client or make_client(settings)
    controller = Controller(client, options, settings=settings, **timings)
    try:
        async with anyio.create_task_group() as tg:
            if handle_signals:
                tg.start_soon(_stop_on_signal, tg.cancel_scope)
            await controller.run()
    finally:
        if own_client:
            with anyio.CancelScope(shield=True):
                await client.close()
    return controller


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutting down", signal=signal.Signals(signum).name)
            scope.cancel()
            return

