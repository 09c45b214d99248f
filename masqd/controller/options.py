"""The ``masqd controller`` flags, validated: :class:`ControllerOptions` and the flag parsers."""

from __future__ import annotations

from dataclasses import dataclass

from masqd.cidrs import CIDRError, Network, parse_cidr
from masqd.errors import FlagError
from masqd.kube.settings import ObjectRef

#: The Lease the replicas elect a leader on unless ``--lease`` names another.
DEFAULT_LEASE = ObjectRef("kube-system", "masqd-controller")


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


def parse_cidr_flag(text: str, flag: str) -> Network:
    """A CIDR given to ``--FLAG``; raises :class:`~masqd.errors.FlagError` naming the flag."""
    try:
        return parse_cidr(text)
    except CIDRError as exc:
        raise FlagError(flag, text, exc.reason) from None
