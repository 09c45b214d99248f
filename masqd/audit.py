"""The audit record: what one apply attempt did, handed to every ``audit`` hook. Pure: no I/O."""

from __future__ import annotations

import itertools
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from masqd.cidrs import Network, cidr_text, network_key
from masqd.ruleset import RuleSet

#: applied: rules were written; unchanged: the kernel already held them (nothing written);
#: rejected: the config or a plugin made the new state unusable (the last good rules stay);
#: failed: the kernel could not be read or refused the write (it keeps what it held).
Result = Literal["applied", "unchanged", "rejected", "failed"]
RESULTS: tuple[str, ...] = ("applied", "unchanged", "rejected", "failed")


class CidrChanges(Mapping[str, tuple[str, ...]]):
    """Per family label, CIDRs as strings (``10.0.0.0/8``), each family's made when first read:
    an audit hook that never looks at a 100k-CIDR change does not pay for its text. ``networks``:
    the same per family label, as networks (only families with at least one)."""

    __slots__ = ("_texts", "networks")

    def __init__(self, networks: Mapping[str, Sequence[Network]] | None = None):
        self.networks: dict[str, tuple[Network, ...]] = {
            label: tuple(nets) for label, nets in (networks or {}).items() if nets}
        self._texts: dict[str, tuple[str, ...]] = {}

    def __getitem__(self, label: str) -> tuple[str, ...]:
        texts = self._texts.get(label)
        if texts is None:
            texts = self._texts[label] = tuple(map(cidr_text, self.networks[label]))
        return texts

    def __iter__(self) -> Iterator[str]:
        return iter(self.networks)

    def __len__(self) -> int:
        return len(self.networks)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One apply attempt.

    time: when the attempt ended, seconds since the epoch (UTC).
    trigger: what asked for it, e.g. ``file``, ``timer``, ``sighup``, ``startup``, ``retry``, a
        plugin source's name; several joined with ``,`` when a burst was coalesced.
    backend: the backend's name (``iptables``, ``nftables``, ``dry-run``, a plugin's).
    result: one of :data:`RESULTS`.
    added / removed: per family (``ipv4``, ``ipv6``), the non-masquerade CIDRs (as strings) that
        this attempt added to or removed from the applied rules, sorted by address and prefix
        length; empty unless ``result`` is ``applied``. Read-only mappings (given a
        :class:`CidrChanges`, its strings are made when first read).
    written: the parts the backend rewrote (``ipv4``, ``ipv6``); empty unless applied.
    error: what went wrong (``rejected`` / ``failed``), else ``None``.
    duration: seconds the attempt took (reading the config, the plugins' hooks and the sync).
    repair: the rules were rewritten although the desired state had not changed: something else
        had changed masqd's rules in the kernel (drift), and this attempt restored them.
    conntrack_deleted: per family and protocol (``{"ipv4": {"udp": 3}}``), the conntrack entries
        this attempt deleted because the rules now decide their traffic otherwise
        (``--conntrack-reconcile``; :mod:`masqd.flow_cleanup`).
    conntrack_error: why that step did not finish (it is tried again on the next pass), else ``None``.
    """

    time: float
    trigger: str
    backend: str
    result: Result
    added: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    removed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    written: tuple[str, ...] = ()
    error: str | None = None
    duration: float = 0.0
    repair: bool = False
    conntrack_deleted: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    conntrack_error: str | None = None

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"result {self.result!r}: expected one of {', '.join(RESULTS)}")
        for name in ("added", "removed"):  # read-only views, so no hook can change what the next sees
            changes = getattr(self, name)
            if not isinstance(changes, CidrChanges):  # read-only already, its strings made when read
                changes = {family: tuple(cidrs) for family, cidrs in changes.items()}
            object.__setattr__(self, name, types.MappingProxyType(changes))

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready copy (plain dicts and lists)."""
        return {
            "time": self.time,
            "trigger": self.trigger,
            "backend": self.backend,
            "result": self.result,
            "added": {family: list(cidrs) for family, cidrs in self.added.items()},
            "removed": {family: list(cidrs) for family, cidrs in self.removed.items()},
            "written": list(self.written),
            "error": self.error,
            "duration": self.duration,
            "repair": self.repair,
            "conntrack_deleted": {family: dict(counts) for family, counts in self.conntrack_deleted.items()},
            "conntrack_error": self.conntrack_error,
        }


def distinct_cidrs(ruleset: RuleSet) -> int:
    """The non-masquerade CIDRs of ``ruleset``, each counted once per family (a list may repeat one)."""
    return sum(len(set(map(network_key, family.nonmasq))) for family in ruleset.families)


def family_changes(before: RuleSet | Mapping[str, Sequence[Network]] | None,
                   after: RuleSet | None) -> tuple[CidrChanges, CidrChanges]:
    """Per family label, the CIDRs added and removed between two rule sets (``before`` may be what
    the kernel held instead: per family label, its non-masquerade CIDRs), each sorted by
    (address, prefix length); as text only when read (the log shows the first few, an audit hook
    may read them all or none).

    Networks are keyed and sorted by :func:`~masqd.cidrs.network_key`, a plain int: ``ipaddress``'s
    own hashing and ordering are an order of magnitude slower, which at 100k CIDRs cost more than
    the kernel write this describes."""
    added: dict[str, list] = {}
    removed: dict[str, list] = {}
    old = ({} if before is None else dict(before) if isinstance(before, Mapping)
           else {f.label: f.nonmasq for f in before.families})
    new = {f.label: f.nonmasq for f in after.families} if after is not None else {}
    for label in sorted(old.keys() | new.keys()):
        was, now = old.get(label, ()), new.get(label, ())
        if was is now:
            continue
        was_keys, now_keys = list(map(network_key, was)), list(map(network_key, now))
        was_set, now_set = set(was_keys), set(now_keys)
        added[label] = _sorted_missing(now, now_keys, now_set, was_set)
        removed[label] = _sorted_missing(was, was_keys, was_set, now_set)
    return CidrChanges(added), CidrChanges(removed)


def _sorted_missing(networks, keys: list[int], keyset: set[int], present: set[int]) -> list:
    """Each of ``networks`` (``keys``: their :func:`~masqd.cidrs.network_key`, ``keyset``: those
    as a set) whose key is not in ``present``, once (its first listing), sorted by key."""
    kept: Sequence[int] = range(len(keys))
    if present:
        missing = keyset - present
        if not missing:
            return []
        kept = list(itertools.compress(kept, map(missing.__contains__, keys)))
    order = sorted(kept, key=keys.__getitem__)  # stable: of equal keys, the first listed comes first
    if len(keyset) < len(keys):  # some listed more than once: keep the first of each run of equal keys
        order = [i for i, before in zip(order, [-1, *order]) if before < 0 or keys[i] != keys[before]]
    return list(map(networks.__getitem__, order))

