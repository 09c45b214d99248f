"""The built-in backends: ``iptables`` (the default, as upstream), ``nftables`` and ``dry-run``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from masqd.hookspecs import hookimpl

if TYPE_CHECKING:  # each backend's code is imported when that backend is made
    from masqd.backends.base import BackendSettings
    from masqd.backends.dryrun import DryRunBackend
    from masqd.backends.iptables.backend import IptablesBackend
    from masqd.backends.nftables.backend import NftablesBackend


def _iptables(settings: BackendSettings) -> IptablesBackend:
    from masqd.backends.conntrack import ConntrackTable
    from masqd.backends.iptables.backend import IptablesBackend

    return IptablesBackend(mode=settings.iptables_mode, jump=settings.postrouting_jump, conntrack=ConntrackTable())


def _nftables(settings: BackendSettings) -> NftablesBackend:
    from masqd.backends.conntrack import ConntrackTable
    from masqd.backends.nftables.backend import NftablesBackend

    return NftablesBackend(priority=settings.nftables_priority, conntrack=ConntrackTable())


def _dry_run(settings: BackendSettings) -> DryRunBackend:
    from masqd.backends.conntrack import ConntrackTable
    from masqd.backends.dryrun import DryRunBackend

    # lists the live flows an apply would delete; renders what the iptables backend would write
    return DryRunBackend(ConntrackTable(read_only=True), placement=settings.postrouting_jump)


@hookimpl
def register_backends(register):
    register("iptables", _iptables)
    register("nftables", _nftables)
    register("dry-run", _dry_run)
