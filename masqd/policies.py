"""GKE-style ``EgressNATPolicy`` objects (``networking.gke.io/v1``, cluster scoped), validated into
typed values. Pure: no I/O.

A policy says, for its ``spec.destinations[].cidr``, what happens to traffic leaving pods:
``spec.action: NoSNAT`` keeps the pod address (the destinations become non-masquerade CIDRs);
``SNAT`` is accepted and contributes nothing (everything not listed is masqueraded anyway). The
agent (``--egress-nat-policies``) and the controller (``masqd controller``) read policies the
same way: an invalid policy is skipped as a whole, with every problem named, and never stops the
others from applying.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from masqd.cidrs import CIDRError, Network, parse_cidr
from masqd.errors import ConfigError, Problem, shorten

ACTIONS = ("NoSNAT", "SNAT")
#: More destinations than this in one policy is refused (the CRD's maxItems says the same).
MAX_DESTINATIONS = 1000


@dataclass(frozen=True, slots=True)
class Policy:
    """A valid policy. ``generation`` is ``metadata.generation`` (the controller reports it back
    in its status as ``observedGeneration``). ``ignored``: IPv6 destinations left out because
    IPv6 is not enabled here (the IPv4 ones still apply)."""

    name: str
    action: str
    cidrs: tuple[Network, ...]
    generation: int | None = None
    ignored: tuple[Network, ...] = ()

    @property
    def keeps_pod_address(self) -> bool:
        return self.action == "NoSNAT"


def as_mapping(obj: Any) -> Mapping[str, Any]:
    """An API object as a plain mapping (lightkube generic objects are dicts already)."""
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else obj


def policy_name(obj: Any) -> str:
    metadata = as_mapping(obj).get("metadata") or {}
    return str(metadata.get("name", "?")) if isinstance(metadata, Mapping) else "?"


def parse_policy(obj: Any, *, allow_ipv6: bool) -> Policy:
    """Validate one policy object. Raises :class:`ConfigError` (source ``EgressNATPolicy NAME``)
    listing every problem; ``allow_ipv6`` is false on an agent without ``--enable-ipv6``."""
    data = as_mapping(obj)
    name = policy_name(data)
    # An API server only sends DNS names; anything unprintable is quoted, so that a newline in a
    # name cannot start a line of its own in a log or a status message.
    source = f"EgressNATPolicy {name if name.isprintable() else repr(name)}"
    metadata = data.get("metadata") or {}
    problems: list[Problem] = []
    spec = data.get("spec")
    if not isinstance(spec, Mapping):
        raise ConfigError(source, [Problem("spec", shorten(spec), "expected a mapping with action and destinations")])
    action = spec.get("action")
    if action not in ACTIONS:
        problems.append(Problem("spec.action", shorten(action), f"expected one of {', '.join(ACTIONS)}"))
    destinations = spec.get("destinations")
    cidrs: list[Network] = []
    ignored: list[Network] = []
    if not isinstance(destinations, list) or not destinations:
        problems.append(Problem("spec.destinations", shorten(destinations), "expected a non-empty list of {cidr: ...}"))
    elif len(destinations) > MAX_DESTINATIONS:
        problems.append(Problem("spec.destinations", f"{len(destinations)} items", f"at most {MAX_DESTINATIONS} are accepted"))
    else:
        for index, item in enumerate(destinations):
            key = f"spec.destinations[{index}].cidr"
            raw = item.get("cidr") if isinstance(item, Mapping) else None
            try:
                net = parse_cidr(raw)
            except CIDRError as exc:
                problems.append(Problem(key, shorten(raw), exc.reason))
                continue
            kept = ignored if net.version == 6 and not allow_ipv6 else cidrs
            if net not in kept:
                kept.append(net)
    if problems:
        raise ConfigError(source, problems)
    generation = metadata.get("generation") if isinstance(metadata, Mapping) else None
    return Policy(name, action, tuple(cidrs), generation if isinstance(generation, int) else None, tuple(ignored))


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every policy read: the valid ones (by name) and the errors of the invalid ones."""

    valid: tuple[Policy, ...]
    invalid: tuple[ConfigError, ...]

    def nonmasq_origins(self) -> dict[Network, tuple[str, ...]]:
        """Each destination of a ``NoSNAT`` policy -> the policies listing it, in name order."""
        origins: dict[Network, list[str]] = {}
        for policy in self.valid:
            if policy.keeps_pod_address:
                for net in policy.cidrs:
                    origins.setdefault(net, []).append(policy.name)
        return {net: tuple(names) for net, names in origins.items()}


def parse_policies(objects: Iterable[Any], *, allow_ipv6: bool) -> PolicySet:
    """Validate every policy (in name order); invalid ones are set aside, never fatal."""
    valid: list[Policy] = []
    invalid: list[ConfigError] = []
    for obj in sorted(objects, key=policy_name):
        try:
            valid.append(parse_policy(obj, allow_ipv6=allow_ipv6))
        except ConfigError as exc:
            invalid.append(exc)
    return PolicySet(tuple(valid), tuple(invalid))
