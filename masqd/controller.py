"""``masqd controller``: translates ``EgressNATPolicy`` objects into the agents' ConfigMap.

This is the flow GKE documents, for any cluster. The controller

- creates the editable ``default`` policy (``NoSNAT`` to the RFC 1918 ranges) whenever it is absent;
- maintains the ``masqd-managed`` policy (label ``app.kubernetes.io/managed-by: masqd``) holding the
  cluster's own ranges: every Node's ``spec.podCIDRs`` (``spec.podCIDR`` when that is absent) and
  the ``--service-cidr`` / ``--node-cidr`` flags; anyone else's edit is reverted, a deletion undone
  (with no range to hold it is deleted: an empty policy would be invalid);
- writes the union of every valid ``NoSNAT`` policy's destinations into the ConfigMap's ``config``
  key, only when the text changes (IPv6 destinations only with ``--enable-ipv6``);
- records each policy's ``Accepted`` condition through the status subresource, only when it changes.

Layering: :func:`translate` is pure (API objects in, desired state out) and tested table-driven; the
:class:`Controller` shell reads the API through :class:`~masqd.kube.Reflector` watches and writes
only what differs (each write re-reads the object first and retries on ``409 Conflict``). Only the
leader writes: :class:`LeaderElector` holds a ``coordination.k8s.io/v1`` Lease the way client-go's
leader election does (acquire when free or expired, renew every retry period, stop all leader work
at once when renewal has failed for longer than the renew deadline, release on shutdown).

Every API failure is logged and retried after a jittered back-off; nothing here crashes the process.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import anyio
import structlog
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Node
from lightkube.types import PatchType

from masqd.cidrs import CIDRError, Network, parse_cidr
from masqd.config import RFC1918_CIDRS
from masqd.errors import ConfigError, FlagError, KubeError
from masqd.kube import (
    RETRIED,
    Backoff,
    EgressNATPolicy,
    KubeSettings,
    ObjectRef,
    Reflector,
    describe_failure,
    make_client,
    status_code,
)
from masqd.policies import MAX_DESTINATIONS, as_mapping, parse_policy, policy_name

log = structlog.get_logger("masqd.controller")

#: The policy the controller creates when absent; users edit it freely.
DEFAULT_POLICY = "default"
#: The policy the controller owns: the cluster's own ranges. Edits by anyone else are reverted.
MANAGED_POLICY = "masqd-managed"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "masqd"
#: The ConfigMap key the agents read (mounted at /etc/config/ip-masq-agent).
CONFIG_KEY = "config"
#: The agents' default ``cidrLimit``; a longer list carries its own ``cidrLimit``.
AGENT_CIDR_LIMIT = 64
DEFAULT_LEASE = ObjectRef("kube-system", "masqd-controller")
#: The condition type the controller records on each policy.
ACCEPTED = "Accepted"
#: A condition message is cut to this many characters (the API allows 32768).
MAX_MESSAGE = 4096
#: Writes re-read and retried this many times on ``409 Conflict`` before backing off.
CONFLICT_RETRIES = 5


def default_policy_spec() -> dict[str, Any]:
    """The spec of the ``default`` policy the controller creates: ``NoSNAT`` to RFC 1918."""
    return {"action": "NoSNAT", "destinations": [{"cidr": cidr} for cidr in RFC1918_CIDRS]}


# --- the pure translation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControllerOptions:
    """The ``masqd controller`` flags, validated.

    configmap: the ConfigMap the agents read (``--configmap``); its ``config`` key is written.
    lease: the Lease replicas elect a leader on (``--lease``, default kube-system/masqd-controller).
    service_cidrs / node_cidrs: the cluster's Service and node ranges (``--service-cidr``,
        ``--node-cidr``, repeatable); the managed policy holds them next to the Nodes' pod ranges.
    enable_ipv6: write IPv6 destinations too; only for clusters whose agents all run with
        ``--enable-ipv6`` (an agent without it rejects a config listing an IPv6 CIDR).
    """

    configmap: ObjectRef
    lease: ObjectRef = DEFAULT_LEASE
    service_cidrs: tuple[Network, ...] = ()
    node_cidrs: tuple[Network, ...] = ()
    enable_ipv6: bool = False


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    """What the controller says about one policy: accepted or not, why, and for which generation."""

    accepted: bool
    message: str
    observed_generation: int | None = None

    @property
    def reason(self) -> str:
        return "Valid" if self.accepted else "Invalid"

    def condition(self, previous: Sequence[Mapping[str, Any]] | None, now: datetime) -> dict[str, Any]:
        """The ``Accepted`` condition; ``lastTransitionTime`` is kept from ``previous`` (the
        object's current conditions) unless the condition's status flips."""
        state = "True" if self.accepted else "False"
        before = find_condition(previous, ACCEPTED)
        since = before.get("lastTransitionTime") if before is not None and before.get("status") == state else None
        condition: dict[str, Any] = {"type": ACCEPTED, "status": state, "reason": self.reason,
                                     "message": self.message}
        if self.observed_generation is not None:
            condition["observedGeneration"] = self.observed_generation
        condition["lastTransitionTime"] = since or format_time(now)
        return condition


@dataclass(frozen=True, slots=True)
class Translation:
    """The desired state for one set of policies and nodes (see :func:`translate`).

    managed_spec: the spec ``masqd-managed`` must have; ``None`` when the cluster has no range to
        hold (then the policy must not exist).
    config_text: the ConfigMap's ``config`` value.
    cidrs: the non-masquerade CIDRs in it, in the order written.
    statuses: policy name -> its status, for every policy object given.
    default_missing: no ``default`` policy exists (it is to be created; meanwhile it counts as
        present with its initial spec, so the ConfigMap does not flap).
    warnings: problems that are not a policy's (an unusable Node pod range), one line each.
    """

    managed_spec: dict[str, Any] | None
    config_text: str
    cidrs: tuple[Network, ...]
    statuses: dict[str, PolicyStatus] = field(default_factory=dict)
    default_missing: bool = False
    warnings: tuple[str, ...] = ()


def network_key(net: Network) -> tuple[int, int, int]:
    """Sort key: IPv4 before IPv6, then by address, then shorter prefix first."""
    return net.version, int(net.network_address), net.prefixlen


def cluster_cidrs(nodes: Iterable[Any], options: ControllerOptions) -> tuple[tuple[Network, ...], tuple[str, ...]]:
    """The cluster's own ranges: Nodes' pod ranges and the flags, sorted and de-duplicated; and a
    warning for each Node range that is not a CIDR."""
    found: set[Network] = set(options.service_cidrs) | set(options.node_cidrs)
    warnings: list[str] = []
    for node in nodes:
        name, values = _node_pod_cidrs(node)
        for value in values:
            try:
                found.add(parse_cidr(value))
            except CIDRError as exc:
                warnings.append(f"Node {name}: spec.podCIDRs: {value!r}: {exc.reason}; left out")
    cidrs = sorted(found, key=network_key)
    if len(cidrs) > MAX_DESTINATIONS:  # a policy may list at most this many: merge neighbours
        cidrs = _collapse(cidrs)
    return tuple(cidrs), tuple(sorted(warnings))


def _collapse(cidrs: list[Network]) -> list[Network]:
    v4 = [n for n in cidrs if n.version == 4]
    v6 = [n for n in cidrs if n.version == 6]
    merged = list(ipaddress.collapse_addresses(v4)) + list(ipaddress.collapse_addresses(v6))
    return sorted(merged, key=network_key)


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _node_pod_cidrs(node: Any) -> tuple[str, list[Any]]:
    metadata = _field(node, "metadata")
    name = str(_field(metadata, "name") or "?")
    spec = _field(node, "spec")
    many = _field(spec, "podCIDRs")
    if many:
        return name, list(many)
    one = _field(spec, "podCIDR")
    return name, [one] if one else []


def managed_policy_spec(cidrs: Sequence[Network]) -> dict[str, Any] | None:
    """The ``masqd-managed`` spec holding ``cidrs`` (``None`` when there are none)."""
    if not cidrs:
        return None
    return {"action": "NoSNAT", "destinations": [{"cidr": str(net)} for net in cidrs]}


def render_config(cidrs: Sequence[Network]) -> str:
    """The agents' config text: ``nonMasqueradeCIDRs``, and past the agents' 64 a ``cidrLimit``
    with room for one more policy (``MAX_DESTINATIONS``): an agent that also watches the policies
    counts a new policy's CIDRs against this limit until the controller has written them here."""
    if not cidrs:
        return "nonMasqueradeCIDRs: []\n"
    lines = ["nonMasqueradeCIDRs:", *(f"- {net}" for net in cidrs)]
    if len(cidrs) > AGENT_CIDR_LIMIT:
        lines.append(f"cidrLimit: {len(cidrs) + MAX_DESTINATIONS}")
    return "\n".join(lines) + "\n"


def translate(policies: Mapping[str, Any] | Iterable[Any], nodes: Iterable[Any], options: ControllerOptions) -> Translation:
    """The desired state, from the policy objects (name -> object, or an iterable), the Node objects
    and the flags. Pure: objects may be lightkube objects or plain mappings.

    The managed policy counts with the spec it must have (whatever it holds now), and a missing
    ``default`` policy with the spec it is about to be created with, so the ConfigMap does not
    change while the controller is putting them right. An invalid policy is left out as a whole
    and its status says why; without ``enable_ipv6`` a policy's IPv6 destinations are left out and
    its status says so.
    """
    objects = list(policies.values()) if isinstance(policies, Mapping) else list(policies)
    by_name = {policy_name(obj): obj for obj in objects}
    cluster, warnings = cluster_cidrs(nodes, options)
    managed_spec = managed_policy_spec(cluster)

    judged: dict[str, Any] = {}
    for name, obj in by_name.items():
        if name == MANAGED_POLICY:
            if managed_spec is None:
                continue  # about to be deleted: contributes nothing
            metadata = as_mapping(obj).get("metadata") or {}
            obj = {"metadata": {"name": name, "generation": _field(metadata, "generation")}, "spec": managed_spec}
        judged[name] = obj
    extra = {}
    if MANAGED_POLICY not in judged and managed_spec is not None:
        extra[MANAGED_POLICY] = {"metadata": {"name": MANAGED_POLICY}, "spec": managed_spec}
    default_missing = DEFAULT_POLICY not in by_name
    if default_missing:
        extra[DEFAULT_POLICY] = {"metadata": {"name": DEFAULT_POLICY}, "spec": default_policy_spec()}

    written: set[Network] = set()
    statuses: dict[str, PolicyStatus] = {}
    for name in sorted({**judged, **extra}):
        status = _judge(judged.get(name, extra.get(name)), options, written)
        if name in judged:
            statuses[name] = status
    cidrs = tuple(sorted(written, key=network_key))
    return Translation(managed_spec, render_config(cidrs), cidrs, statuses, default_missing, warnings)


def _judge(obj: Any, options: ControllerOptions, written: set[Network]) -> PolicyStatus:
    """Validate one policy; add what it contributes to ``written``; return its status."""
    metadata = as_mapping(obj).get("metadata") or {}
    generation = _field(metadata, "generation")
    generation = generation if isinstance(generation, int) and not isinstance(generation, bool) else None
    try:
        policy = parse_policy(obj, allow_ipv6=options.enable_ipv6)
    except ConfigError as exc:
        message = "; ".join(str(problem) for problem in exc.problems)
        return PolicyStatus(False, _cut(message), generation)
    if not policy.keeps_pod_address:
        return PolicyStatus(True, f"{policy.action}: traffic to these destinations is masqueraded; "
                                  "nothing to write", generation)
    kept, left_out = policy.cidrs, policy.ignored
    written.update(kept)
    message = f"{len(kept)} destination{' keeps' if len(kept) == 1 else 's keep'} the pod address"
    if left_out:
        message += (f"; IPv6 destinations left out (the controller runs without --enable-ipv6): "
                    f"{', '.join(map(str, left_out))}")
    return PolicyStatus(True, _cut(message), generation)


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def find_condition(conditions: Sequence[Mapping[str, Any]] | None, kind: str) -> Mapping[str, Any] | None:
    for condition in conditions or ():
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return condition
    return None


def merge_condition(conditions: Sequence[Mapping[str, Any]] | None, condition: dict[str, Any]) -> list[dict[str, Any]]:
    """``conditions`` with the condition of the same type replaced (or appended); others kept."""
    merged = [dict(c) for c in conditions or () if isinstance(c, Mapping) and c.get("type") != condition["type"]]
    index = next((i for i, c in enumerate(conditions or ()) if isinstance(c, Mapping) and c.get("type") == condition["type"]),
                 len(merged))
    merged.insert(min(index, len(merged)), condition)
    return merged


def format_time(moment: datetime) -> str:
    """A ``metav1.Time``: RFC 3339, seconds, UTC with ``Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(moment: datetime) -> str:
    """A ``metav1.MicroTime``: RFC 3339 with microseconds, UTC with ``Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def default_identity() -> str:
    """``hostname_RANDOMHEX``: unique per process, readable in ``kubectl get lease``."""
    return f"{socket.gethostname()}_{secrets.token_hex(6)}"


# --- leader election ---------------------------------------------------------------------------------


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
        current = await _get_or_none(self.client, Lease, self.lease.name, self.lease.namespace)
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
            current = await _get_or_none(self.client, Lease, self.lease.name, self.lease.namespace)
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


async def _get_or_none(client: AsyncClient, resource: type, name: str, namespace: str | None = None) -> Any:
    try:
        if namespace is None:
            return await client.get(resource, name)
        return await client.get(resource, name, namespace=namespace)
    except ApiError as exc:
        if status_code(exc) == 404:
            return None
        raise


# --- the controller shell ----------------------------------------------------------------------------


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
                           lambda: _get_or_none(self.client, EgressNATPolicy, DEFAULT_POLICY),
                           lambda obj: None if obj is not None else "create",
                           self._create_default)
        managed = translation.managed_spec
        managed_written = await converge(
            f"EgressNATPolicy {MANAGED_POLICY}", policies.objects.get(MANAGED_POLICY),
            lambda: _get_or_none(self.client, EgressNATPolicy, MANAGED_POLICY),
            lambda obj: _managed_action(obj, managed),
            lambda obj, action: self._write_managed(obj, action, managed))
        ref = self.options.configmap
        text = translation.config_text
        await converge(f"configmap {ref}", configmaps.objects.get(ref.name),
                       lambda: _get_or_none(self.client, ConfigMap, ref.name, ref.namespace),
                       lambda obj: _configmap_action(obj, text),
                       lambda obj, action: self._write_configmap(obj, action, text))
        for name, status in translation.statuses.items():
            if name == MANAGED_POLICY and managed_written:
                continue  # its spec was just put right: the status follows on the next pass
            if name not in policies.objects:
                continue
            await converge(f"EgressNATPolicy {name} status", policies.objects.get(name),
                           lambda name=name: _get_or_none(self.client, EgressNATPolicy, name),
                           lambda obj, status=status, name=name: _status_action(obj, status, name, managed),
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
        raise KubeError(f"{what}: still conflicting after {CONFLICT_RETRIES} attempts")

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


def _managed_action(obj: Any, spec: dict[str, Any] | None) -> str | None:
    if spec is None:
        return "delete" if obj is not None else None
    if obj is None:
        return "create"
    data = as_mapping(obj)
    labels = (data.get("metadata") or {}).get("labels") or {}
    if data.get("spec") != spec or labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
        return "replace"
    return None


def _configmap_action(obj: Any, text: str) -> str | None:
    if obj is None:
        return "create"
    return None if (obj.data or {}).get(CONFIG_KEY) == text else "replace"


def _status_action(obj: Any, status: PolicyStatus, name: str, managed: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The conditions to write, or ``None`` when the object already says so (or is gone, or has
    changed since ``status`` was computed: the watch brings that change and another pass)."""
    if obj is None:
        return None
    data = as_mapping(obj)
    metadata = data.get("metadata") or {}
    generation = metadata.get("generation")
    if status.observed_generation is not None and generation != status.observed_generation:
        return None
    if name == MANAGED_POLICY and data.get("spec") != managed:
        return None
    previous = (data.get("status") or {}).get("conditions")
    conditions = merge_condition(previous, status.condition(previous, _utcnow()))
    return None if conditions == previous else conditions


# --- the process -------------------------------------------------------------------------------------


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


def parse_cidr_flag(text: str, flag: str) -> Network:
    """A CIDR given to ``--FLAG``; raises :class:`~masqd.errors.FlagError` naming the flag."""
    try:
        return parse_cidr(text)
    except CIDRError as exc:
        raise FlagError(flag, text, exc.reason) from None
