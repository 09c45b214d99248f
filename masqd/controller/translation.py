"""The pure translation: ``EgressNATPolicy`` objects and Nodes in, the desired state out.

:func:`translate` computes what the cluster should hold (the ``masqd-managed`` spec, the agents'
ConfigMap text, each policy's status); :func:`managed_action`, :func:`configmap_action` and
:func:`status_action` decide, for one object as the API holds it, what write (if any) puts it
right. No I/O, no clock, no client: objects may be lightkube objects or plain mappings, and the
tests drive everything here table-driven.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from masqd.cidrs import CIDRError, Network, parse_cidr
from masqd.config import RFC1918_CIDRS
from masqd.controller.options import ControllerOptions
from masqd.errors import ConfigError, truncate
from masqd.policies import MAX_DESTINATIONS, as_mapping, parse_policy, policy_name

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
#: The condition type the controller records on each policy.
ACCEPTED = "Accepted"
#: A condition message is cut to this many characters (the API allows 32768).
MAX_MESSAGE = 4096


def default_policy_spec() -> dict[str, Any]:
    """The spec of the ``default`` policy the controller creates: ``NoSNAT`` to RFC 1918."""
    return {"action": "NoSNAT", "destinations": [{"cidr": cidr} for cidr in RFC1918_CIDRS]}


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
        return PolicyStatus(False, truncate(message, MAX_MESSAGE), generation)
    if not policy.keeps_pod_address:
        return PolicyStatus(True, f"{policy.action}: traffic to these destinations is masqueraded; "
                                  "nothing to write", generation)
    kept, left_out = policy.cidrs, policy.ignored
    written.update(kept)
    message = f"{len(kept)} destination{' keeps' if len(kept) == 1 else 's keep'} the pod address"
    if left_out:
        message += (f"; IPv6 destinations left out (the controller runs without --enable-ipv6): "
                    f"{', '.join(map(str, left_out))}")
    return PolicyStatus(True, truncate(message, MAX_MESSAGE), generation)


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


# --- what to write, given an object as the API holds it ---------------------------------------------


def managed_action(obj: Any, spec: dict[str, Any] | None) -> str | None:
    """``"create"``, ``"replace"`` or ``"delete"`` for the ``masqd-managed`` policy ``obj`` (``None``
    when absent) to hold ``spec`` and the managed-by label, or ``None`` when it already does."""
    if spec is None:
        return "delete" if obj is not None else None
    if obj is None:
        return "create"
    data = as_mapping(obj)
    labels = (data.get("metadata") or {}).get("labels") or {}
    if data.get("spec") != spec or labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
        return "replace"
    return None


def configmap_action(obj: Any, text: str) -> str | None:
    """``"create"`` or ``"replace"`` for the ConfigMap ``obj`` (``None`` when absent) to hold
    ``text`` under its ``config`` key, or ``None`` when it already does."""
    if obj is None:
        return "create"
    return None if (obj.data or {}).get(CONFIG_KEY) == text else "replace"


def status_action(obj: Any, status: PolicyStatus, name: str, managed: dict[str, Any] | None,
                  now: datetime) -> list[dict[str, Any]] | None:
    """The conditions to write, or ``None`` when the object already says so (or is gone, or has
    changed since ``status`` was computed: the watch brings that change and another pass). ``now``
    stamps a condition whose status flips."""
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
    conditions = merge_condition(previous, status.condition(previous, now))
    return None if conditions == previous else conditions

