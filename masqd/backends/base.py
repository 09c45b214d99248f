"""The backend interface: what the reconciler may ask of a backend, and what it gets back.

A backend turns a :class:`~masqd.ruleset.RuleSet` into kernel state. ``render`` is pure (the
exact text the backend would write to an empty kernel); ``sync`` reads the kernel back, writes
only what differs, atomically, and says what it wrote. Only the reconciler calls ``sync``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from masqd.config import AgentOptions
from masqd.ruleset import RuleSet


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """What a backend factory is called with (see :func:`masqd.hookspecs.register_backends`).

    options: the validated agent flags (chain name, IPv6, --random-fully, --to-ports).
    iptables_mode: ``--iptables-mode`` (``auto``, ``legacy``, ``nft``), for iptables-based backends.
    """

    options: AgentOptions = AgentOptions()
    iptables_mode: str = "auto"


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one ``sync`` did. ``written`` names each part rewritten (e.g. ``("ipv4",)``); empty when
    the kernel already held the desired rules. ``reasons`` says, per part written, why."""

    written: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.written)


@runtime_checkable
class Backend(Protocol):
    """A way to program masquerade rules."""

    name: str

    async def probe(self) -> None:
        """Learn what the tools on this host support (versions, features) without writing to the
        kernel. Called by ``sync`` itself; ``masqd render`` calls it so its output matches.
        Raises :class:`~masqd.errors.BackendError` when the tools cannot be run."""
        ...

    def render(self, ruleset: RuleSet) -> str:
        """The exact text this backend would apply to a kernel holding none of masqd's rules."""
        ...

    async def cleanup(self, chain: str) -> tuple[str, ...]:
        """Remove everything this backend creates (``chain``: the iptables chain name) and nothing
        else. Returns a description of each thing removed; empty when there was nothing."""
        ...

    async def sync(self, ruleset: RuleSet) -> SyncResult:
        """Make the kernel hold ``ruleset``: read back, write only if it differs, atomically.

        Raises :class:`~masqd.errors.BackendError` when the kernel cannot be read or refuses the
        write; the kernel then still holds what it held before.
        """
        ...
