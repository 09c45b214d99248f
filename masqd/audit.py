"""The audit record: what one apply attempt did, handed to every ``audit`` hook. Pure: no I/O."""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from masqd.cidrs import Network, cidr_text

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
        }
