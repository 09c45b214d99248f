"""kube-proxy's Services as the kernel holds them, backend-neutral: which addresses (and ports)
kube-proxy DNATs to which endpoints, and which of that traffic it marks for its own masquerade.
Read back by each backend from kube-proxy's rules of its kind (iptables: ``KUBE-SERVICES``,
:mod:`masqd.backends.iptables.services`; nftables: the ``kube-proxy`` table,
:mod:`masqd.backends.nftables.services`), for ``masqd explain --live``: traffic to a ClusterIP
leaves the node addressed to an endpoint, so masqd's rules act on the endpoint, not on the
ClusterIP. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from masqd.cidrs import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: What a :class:`ServiceFrontend` is, in kube-proxy's words (its rule comments).
CLUSTER_IP, EXTERNAL_IP, LOAD_BALANCER_IP, NODE_PORT = "cluster IP", "external IP", "loadbalancer IP", "nodePort"
#: kube-proxy's default masquerade mark (``--iptables-masquerade-bit 14``).
DEFAULT_MARK = 0x4000


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    """One endpoint traffic to a Service port is DNATed to; ``chain``: kube-proxy's chain for it
    (``KUBE-SEP-...``, ``endpoint-...``)."""

    address: Address
    port: int | None
    chain: str

    def __str__(self) -> str:
        if self.port is None:
            return str(self.address)
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceFrontend:
    """An address and port (or, :data:`NODE_PORT`, a port on the node's addresses) that kube-proxy
    DNATs to ``endpoints``.

    service: the Service port as kube-proxy names it (``default/kubernetes:https``).
    kind: :data:`CLUSTER_IP`, :data:`EXTERNAL_IP`, :data:`LOAD_BALANCER_IP` or :data:`NODE_PORT`.
    address: the destination (``None`` for a NodePort: any of :attr:`ServiceMap.nodeport_addresses`).
    chain: the chain its traffic is sent to (``KUBE-SVC-...``, ``KUBE-EXT-...``, ``service-...``).
    marks_all: every packet to it is marked for kube-proxy's masquerade (external traffic).
    marks_unless_from: packets from sources outside these are marked (``! -s CLUSTER-CIDR``;
        empty: no such rule).
    """

    service: str
    kind: str
    protocol: str
    port: int
    chain: str
    address: Address | None = None
    endpoints: tuple[ServiceEndpoint, ...] = ()
    marks_all: bool = False
    marks_unless_from: tuple[Network, ...] = ()

    def marked(self, source: Address | None, endpoint: ServiceEndpoint | None = None) -> bool | None:
        """Whether kube-proxy marks traffic from ``source`` (to ``endpoint``) for its masquerade:
        ``None`` when that depends on a source not given."""
        if self.marks_all:
            return True
        if source is None:
            return None if self.marks_unless_from else False
        if endpoint is not None and source == endpoint.address:
            return True  # hairpin: an endpoint reaching itself through the Service
        return bool(self.marks_unless_from) and not any(source in net for net in self.marks_unless_from
                                                        if net.version == source.version)

    @property
    def label(self) -> str:
        """``default/kubernetes:https cluster IP, tcp/443`` (a NodePort: ``..., nodePort tcp/30080``)."""
        return f"{self.service or self.chain} {self.kind}, {self.protocol}/{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceMap:
    """kube-proxy's Service frontends of one family, as read back.

    where: what was read (``iptables chain KUBE-SERVICES``, ``nftables table ip kube-proxy``);
        empty when kube-proxy's rules are not there.
    nodeport_addresses: the addresses NodePorts are served on (kube-proxy's ``nodeport-ips``, or
        every address of the node when its rule says ``LOCAL``); ``nodeports_local`` says the latter.
    mark: the mark kube-proxy sets on traffic it masquerades; ``masquerades_marked``: its
        postrouting rule that masquerades marked traffic is there and hooked.
    """

    where: str = ""
    frontends: tuple[ServiceFrontend, ...] = ()
    nodeport_addresses: tuple[Address, ...] = ()
    nodeports_local: bool = False
    mark: int = DEFAULT_MARK
    masquerades_marked: bool = False
    postrouting: str = ""

    def at(self, address: Address) -> tuple[ServiceFrontend, ...]:
        """The frontends traffic to ``address`` meets: its ClusterIP / external IP / load balancer
        ports, then, when it is an address NodePorts are served on, the NodePorts."""
        own = tuple(f for f in self.frontends if f.address == address)
        if address in self.nodeport_addresses:
            own += tuple(f for f in self.frontends if f.kind == NODE_PORT)
        return own

    def requires_mark(self, mark: str | None) -> bool:
        """Whether a rule that masquerades only traffic carrying ``mark`` (``VALUE/MASK``, as
        :attr:`~masqd.backends.base.ForeignRule.mark`) acts on what kube-proxy marks: its mask
        covers kube-proxy's bit and the value sets it."""
        if mark is None:
            return False
        value, _, mask = mark.partition("/")
        try:
            value_int, mask_int = int(value, 0), int(mask or "0xffffffff", 0)
        except ValueError:
            return False
        return value_int & mask_int == self.mark and mask_int & self.mark == self.mark


def endpoint(text: str, family: int, chain: str) -> ServiceEndpoint | None:
    """``10.244.1.5:6443`` / ``[fd00::5]:6443`` / ``10.244.1.5`` (a DNAT target) as an endpoint of
    ``family``; ``None`` when it is not one."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port) if port else None
    except ValueError:
        return None
    return ServiceEndpoint(address, number, chain) if address.version == family else None
