"""Finding the rules a previous masqd may have left with another backend or iptables variant,
so that switching never leaves two rule sets applying at once."""

from __future__ import annotations

import shutil

from masqd.backends.base import Backend
from masqd.backends.iptables.backend import IptablesBackend
from masqd.backends.iptables_mode import installed_modes, legacy_readable
from masqd.backends.nftables.backend import NftablesBackend


def leftover_backends(active: Backend) -> tuple[Backend, ...]:
    """The other backends whose rules a previous masqd may have left behind (another backend, or
    the other iptables variant), so that switching never leaves two rule sets applying at once.
    Asked after the first sync, when an ``auto`` iptables backend knows its variant."""
    others: list[Backend] = []
    if active.name in ("iptables", "nftables"):
        variant = getattr(active, "mode", None)
        # legacy tables this process cannot read (not root) cannot hold rules it wrote either
        others += [IptablesBackend(mode=mode) for mode in installed_modes()
                   if mode != variant and (mode != "legacy" or legacy_readable())]
    if active.name == "iptables" and shutil.which("nft"):
        others.append(NftablesBackend())
    return tuple(others)
