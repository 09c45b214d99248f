"""Backends: ways to program masquerade rules. See :mod:`masqd.backends.base` for the interface."""

from __future__ import annotations

from collections.abc import Callable

from masqd.backends.base import Backend
from masqd.backends.dryrun import DryRunBackend
from masqd.backends.iptables import IptablesBackend

#: Backend name (as given to ``--backend``) -> factory.
BACKENDS: dict[str, Callable[[], Backend]] = {
    "iptables": IptablesBackend,
    "dry-run": DryRunBackend,
}


def make_backend(name: str) -> Backend:
    """A new backend by ``--backend`` name; raises ``KeyError`` for an unknown name."""
    return BACKENDS[name]()
