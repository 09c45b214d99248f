"""Reading kube-proxy's Services back, the part that asks the kernel: the node's own addresses,
when kube-proxy serves NodePorts on every local address (iptables' ``-m addrtype --dst-type
LOCAL``, nftables' ``fib daddr type local``). The parsing is pure (:mod:`masqd.backends.services`
and each backend's ``services`` module); the backends call this from ``read_back``."""

from __future__ import annotations

from dataclasses import replace

from masqd.backends.services import ServiceMap


async def with_node_addresses(services: ServiceMap, family: int) -> ServiceMap:
    """``services`` with :attr:`~ServiceMap.nodeport_addresses` filled in from the addresses
    assigned in this namespace (loopback left out, as kube-proxy leaves it out) when its NodePorts
    are served on every local address; as it is otherwise, or when the addresses cannot be read."""
    if not services.nodeports_local or not services.frontends:
        return services
    from masqd.sources.addresses import local_addresses  # one rtnetlink dump

    try:
        local = await local_addresses()
    except OSError:
        return services
    found = sorted(a for a in local if a.version == family and not a.is_loopback and not a.is_link_local)
    return replace(services, nodeport_addresses=tuple(dict.fromkeys((*services.nodeport_addresses, *found))))
