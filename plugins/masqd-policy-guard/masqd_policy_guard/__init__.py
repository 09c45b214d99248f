"""masqd plugin: policies the non-masquerade list must satisfy, from a small YAML file.

``MASQD_POLICY_GUARD`` names the policy file; without it (or when the file does not exist) the
default policy applies: no default route. Keys, all optional:

``allowDefaultRoute`` (bool, default false)
    ``0.0.0.0/0`` or ``::/0`` would exempt every destination from masquerading, so pods would
    reach the internet with their own addresses; refused unless this is true.
``minPrefixLength`` (mapping ``ipv4: N``, ``ipv6: N``; default 0 for both, i.e. off)
    refuse CIDRs shorter than /N (``10.0.0.0/7`` with ``ipv4: 8``).
``alwaysMasquerade`` (list of CIDRs, default empty)
    destinations that must always be masqueraded (an egress firewall that only allows the node
    addresses, say): a non-masquerade CIDR overlapping any of them is refused.

The file is read again whenever it changes. A policy file that is not valid makes the hook fail
naming the file and key, so masqd keeps its last good rules rather than running unguarded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import masqd
from masqd.cidrs import CIDRError, Network, parse_cidr

__version__ = "0.1.0"

_KEYS = ("allowDefaultRoute", "minPrefixLength", "alwaysMasquerade")


@dataclass(frozen=True)
class Policy:
    allow_default_route: bool = False
    min_prefix_length: Mapping[int, int] = field(default_factory=lambda: {4: 0, 6: 0})
    always_masquerade: tuple[Network, ...] = ()


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse a policy document; raises ValueError naming ``source`` and the key."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from None
    if document is None:
        return Policy()
    if not isinstance(document, dict):
        raise ValueError(f"{source}: expected a mapping with keys {', '.join(_KEYS)}")
    unknown = sorted(set(map(str, document)) - set(_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_KEYS)}")
    allow = document.get("allowDefaultRoute", False)
    if not isinstance(allow, bool):
        raise ValueError(f"{source}: allowDefaultRoute: {allow!r}: expected true or false")
    lengths = document.get("minPrefixLength") or {}
    if not isinstance(lengths, dict) or set(map(str, lengths)) - {"ipv4", "ipv6"}:
        raise ValueError(f"{source}: minPrefixLength: {lengths!r}: expected a mapping such as {{ipv4: 8, ipv6: 32}}")
    minimum = {4: 0, 6: 0}
    for family, limit in ((4, 32), (6, 128)):
        value = lengths.get(f"ipv{family}", 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise ValueError(f"{source}: minPrefixLength.ipv{family}: {value!r}: expected a whole number 0-{limit}")
        minimum[family] = value
    ranges = document.get("alwaysMasquerade") or []
    if not isinstance(ranges, list):
        raise ValueError(f"{source}: alwaysMasquerade: {ranges!r}: expected a list of CIDRs")
    parsed = []
    for index, value in enumerate(ranges):
        try:
            parsed.append(parse_cidr(value))
        except CIDRError as exc:
            raise ValueError(f"{source}: alwaysMasquerade[{index}]: {value!r}: {exc.reason}") from None
    return Policy(allow, minimum, tuple(parsed))


def violations(policy: Policy, cidrs, source: str = "the policy") -> list[str]:
    """One message per CIDR that breaks ``policy``, in list order."""
    problems = []
    for net in cidrs:
        if net.prefixlen == 0 and not policy.allow_default_route:
            problems.append(f"{net} exempts every destination from masquerading; set allowDefaultRoute: true "
                            f"in {source} to allow it")
        elif net.prefixlen < policy.min_prefix_length[net.version]:
            problems.append(f"{net} is shorter than /{policy.min_prefix_length[net.version]}, the shortest IPv{net.version} "
                            f"prefix {source} allows (minPrefixLength)")
        for guarded in policy.always_masquerade:
            if guarded.version == net.version and net.overlaps(guarded):
                problems.append(f"{net} overlaps {guarded}, which {source} says must always be masqueraded "
                                "(alwaysMasquerade)")
    return problems


class PolicyGuard:
    """The plugin object; ``plugin`` below is the one built from the environment."""

    name = "policy-guard"

    def __init__(self, path: Path | None = None):
        self.path = path
        self._cache: tuple[tuple, Policy] | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> PolicyGuard:
        path = environ.get("MASQD_POLICY_GUARD")
        return cls(Path(path) if path else None)

    def policy(self) -> Policy:
        if self.path is None:
            return Policy()
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return Policy()
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cache is None or self._cache[0] != signature:
            self._cache = (signature, parse_policy(self.path.read_text(encoding="utf-8"), str(self.path)))
        return self._cache[1]

    @masqd.hookimpl
    def validate_config(self, cidrs):
        return violations(self.policy(), cidrs, str(self.path) if self.path else "the default policy")


plugin = PolicyGuard.from_environment()
