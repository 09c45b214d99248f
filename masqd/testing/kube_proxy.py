"""kube-proxy's NAT rules, generated the way kube-proxy writes them, for tests that need a node
on which kube-proxy has programmed Services (``masqd explain --live`` following a ClusterIP to its
endpoints, masqd's rules next to kube-proxy's). No pytest here; nothing runs until ``load_*``.

What it models, read from kube-proxy's own sources (kubernetes/kubernetes
``pkg/proxy/iptables/proxier.go`` and ``pkg/proxy/nftables/proxier.go``, ``README.md`` and the
expected dumps in ``proxier_test.go``); this is an independent generator of the same layout, not
a copy of that code:

- iptables mode (:func:`iptables_restore_text`, for ``iptables-restore --noflush`` into the nat
  table, IPv4 or IPv6): ``KUBE-SERVICES`` (one ``cluster IP`` rule per Service port, one
  ``external IP`` rule per external IP, and last the ``-m addrtype --dst-type LOCAL -j
  KUBE-NODEPORTS`` tail call), ``KUBE-NODEPORTS``, ``KUBE-EXT-<hash>`` (mark for masquerade,
  then the Service chain), ``KUBE-SVC-<hash>`` (``! -s <clusterCIDR> ... -j KUBE-MARK-MASQ``,
  then one jump per endpoint with ``-m statistic --mode random --probability 1/(n-i)`` on all
  but the last), ``KUBE-SEP-<hash>`` (hairpin ``-s <endpoint> -j KUBE-MARK-MASQ``, then ``DNAT
  --to-destination``), ``KUBE-MARK-MASQ`` (``--or-mark 0x4000``) and ``KUBE-POSTROUTING``
  (return unless marked, clear the mark, ``MASQUERADE --random-fully``). kube-proxy prepends its
  jumps from ``PREROUTING`` / ``OUTPUT`` (to ``KUBE-SERVICES``) and ``POSTROUTING`` (to
  ``KUBE-POSTROUTING``); so does this (``-I CHAIN 1``). Chain names are ``KUBE-SVC-`` etc. plus
  the first 16 characters of base32(sha256(...)) as kube-proxy names them. Only the nat table:
  the filter-table ``REJECT`` for Services without endpoints is not modelled.
- nftables mode (:func:`nft_text`, an ``nft -f`` script): table ``ip kube-proxy`` /
  ``ip6 kube-proxy`` with the base chains ``nat-prerouting`` / ``nat-output`` (priority dstnat,
  ``jump services``) and ``nat-postrouting`` (``jump masquerading``), the filter chains, the sets
  ``cluster-ips`` / ``nodeport-ips`` and the verdict maps ``service-ips`` (``addr . proto . port
  : goto service-...``), ``service-nodeports`` (``proto . port : goto external-...``),
  ``no-endpoint-services`` / ``no-endpoint-nodeports`` / ``firewall-ips``; per Service port a
  chain ``service-<HASH>-<ns>/<name>/<proto>/<port>`` (``saddr != <clusterCIDR> jump
  mark-for-masquerade``, then ``numgen random mod N vmap { 0 : goto endpoint-..., ... }``), an
  ``external-<HASH>-...`` chain for NodePorts and external IPs, and per endpoint
  ``endpoint-<HASH>-<ns>/<name>/<proto>/<port>__<ip>/<port>`` (hairpin mark, ``dnat to
  ip:port``); ``mark-for-masquerade`` (``mark set mark or 0x4000``) and ``masquerading``.

:data:`DEFAULT_SERVICES` holds one example per family: ``default/kubernetes:https`` (a ClusterIP
with one endpoint inside the default keep list and one outside it), ``default/web:http`` (three
endpoints, a NodePort and an external IP) and ``kube-system/kube-dns:dns`` (UDP).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass

from masqd.testing.netns import NFT_FAMILY, nft, run

#: The pod network kube-proxy is told about (``--cluster-cidr``): sources outside it are masqueraded.
CLUSTER_CIDR = {4: "10.244.0.0/16", 6: "fd00:10:244::/56"}
#: The Service CIDR (``--service-cluster-ip-range``): unallocated ClusterIPs in it are dropped (nft mode).
SERVICE_CIDR = {4: "10.96.0.0/12", 6: "fd00:10:96::/108"}
#: kube-proxy's masquerade mark bit (``--iptables-masquerade-bit`` 14).
MASQ_MARK = "0x4000"

#: Comments kube-proxy writes on its fixed rules.
PORTALS_COMMENT = "kubernetes service portals"
POSTROUTING_COMMENT = "kubernetes postrouting rules"
SNAT_COMMENT = "kubernetes service traffic requiring SNAT"
NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


@dataclass(frozen=True)
class Endpoint:
    """One endpoint (a pod, or any address an EndpointSlice names) of a Service port."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Service:
    """One port of one Service, as kube-proxy programs it (Cluster traffic policy, no session
    affinity, no load balancer). ``port_name`` is the Service port's name ("" when unnamed)."""

    namespace: str
    name: str
    cluster_ip: str
    port: int
    port_name: str = ""
    protocol: str = "tcp"
    endpoints: tuple[Endpoint, ...] = ()
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "udp", "sctp"):
            raise ValueError(f"protocol must be tcp, udp or sctp, not {self.protocol!r}")
        family = self.family
        for address in (*self.external_ips, *(e.ip for e in self.endpoints)):
            if ipaddress.ip_address(address).version != family:
                raise ValueError(f"{address} is not of the ClusterIP's family (IPv{family})")

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.cluster_ip).version

    @property
    def port_label(self) -> str:
        """``ns/name:port`` as kube-proxy prints a ServicePortName in its comments."""
        return f"{self.namespace}/{self.name}:{self.port_name}"

    # --- chain names, hashed as kube-proxy hashes them -----------------------------------------------

    def _port_id(self) -> str:  # kube-proxy's iptables hash input: ServicePortName + protocol
        return self.port_label + self.protocol

    def svc_chain(self) -> str:
        return "KUBE-SVC-" + _hash16(self._port_id())

    def ext_chain(self) -> str:
        return "KUBE-EXT-" + _hash16(self._port_id())

    def sep_chain(self, endpoint: Endpoint) -> str:
        return "KUBE-SEP-" + _hash16(self._port_id() + str(endpoint))

    def _nft_base(self) -> str:
        return f"{self.namespace}/{self.name}/{self.protocol}/{self.port_name}"

    def nft_service_chain(self) -> str:
        return "service-" + _hash8(self._nft_base())

    def nft_external_chain(self) -> str:
        return "external-" + _hash8(self._nft_base())

    def nft_endpoint_chain(self, endpoint: Endpoint) -> str:
        return "endpoint-" + _hash8(f"{self._nft_base()}__{endpoint.ip.replace(':', '.')}/{endpoint.port}")


def _digest(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def _hash16(text: str) -> str:
    return _digest(text)[:16]


def _hash8(name: str) -> str:
    """``HASH-name``: kube-proxy's nftables chain-name base (8 characters of the hash, then the name)."""
    return f"{_digest(name)[:8]}-{name}"


DEFAULT_SERVICES: dict[int, tuple[Service, ...]] = {
    4: (
        Service("default", "kubernetes", "10.96.0.1", 443, "https",
                endpoints=(Endpoint("10.244.1.5", 6443), Endpoint("198.51.100.10", 6443))),
        Service("default", "web", "10.96.0.20", 80, "http", node_port=30080, external_ips=("203.0.113.50",),
                endpoints=(Endpoint("10.244.1.5", 8080), Endpoint("10.244.2.7", 8080),
                           Endpoint("198.51.100.20", 8080))),
        Service("kube-system", "kube-dns", "10.96.0.10", 53, "dns", "udp", endpoints=(Endpoint("10.244.2.3", 53),)),
    ),
    6: (
        Service("default", "kubernetes", "fd00:10:96::1", 443, "https",
                endpoints=(Endpoint("fd00:10:244:1::5", 6443), Endpoint("2001:db8:100::10", 6443))),
        Service("default", "web", "fd00:10:96::20", 80, "http", node_port=30080, external_ips=("2001:db8:113::50",),
                endpoints=(Endpoint("fd00:10:244:1::5", 8080), Endpoint("fd00:10:244:2::7", 8080),
                           Endpoint("2001:db8:100::20", 8080))),
        Service("kube-system", "kube-dns", "fd00:10:96::a", 53, "dns", "udp",
                endpoints=(Endpoint("fd00:10:244:2::3", 53),)),
    ),
}


def _of_family(services, family: int) -> list[Service]:
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    return [s for s in services if s.family == family]


def _probability(remaining: int) -> str:
    return f"{1.0 / remaining:0.10f}"


# --- iptables mode -----------------------------------------------------------------------------------


def iptables_restore_text(services=None, family: int = 4, *, cluster_cidr: str | None = None) -> str:
    """The nat table kube-proxy's iptables mode writes for ``services`` (default
    :data:`DEFAULT_SERVICES`; those of another family are left out), for ``iptables-restore
    --noflush`` (``ip6tables-restore`` for family 6). ``cluster_cidr``: default :data:`CLUSTER_CIDR`."""
    services = _of_family(DEFAULT_SERVICES[family] if services is None else services, family)
    cidr = cluster_cidr or CLUSTER_CIDR[family]
    chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    rules = [
        f'-I PREROUTING 1 -m comment --comment "{PORTALS_COMMENT}" -j KUBE-SERVICES',
        f'-I OUTPUT 1 -m comment --comment "{PORTALS_COMMENT}" -j KUBE-SERVICES',
        f'-I POSTROUTING 1 -m comment --comment "{POSTROUTING_COMMENT}" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        f'-A KUBE-POSTROUTING -m comment --comment "{SNAT_COMMENT}" -j MASQUERADE --random-fully',
    ]
    for svc in services:
        if not svc.endpoints:
            continue  # kube-proxy rejects these in the filter table; nothing in nat
        label, proto = svc.port_label, svc.protocol
        match = f"-m {proto} -p {proto}"
        svc_chain, ext_chain = svc.svc_chain(), svc.ext_chain()
        chains.append(svc_chain)
        rules.append(f'-A KUBE-SERVICES -m comment --comment "{label} cluster IP" {match} -d {svc.cluster_ip} '
                     f"--dport {svc.port} -j {svc_chain}")
        if svc.external_ips or svc.node_port:
            chains.append(ext_chain)
            for address in svc.external_ips:
                rules.append(f'-A KUBE-SERVICES -m comment --comment "{label} external IP" {match} -d {address} '
                             f"--dport {svc.port} -j {ext_chain}")
            if svc.node_port:
                rules.append(f'-A KUBE-NODEPORTS -m comment --comment "{label}" {match} --dport {svc.node_port} '
                             f"-j {ext_chain}")
            rules.append(f'-A {ext_chain} -m comment --comment "masquerade traffic for {label} external destinations" '
                         "-j KUBE-MARK-MASQ")
            rules.append(f"-A {ext_chain} -j {svc_chain}")
        rules.append(f'-A {svc_chain} -m comment --comment "{label} cluster IP" {match} -d {svc.cluster_ip} '
                     f"--dport {svc.port} ! -s {cidr} -j KUBE-MARK-MASQ")
        count = len(svc.endpoints)
        for index, endpoint in enumerate(svc.endpoints):
            sep = svc.sep_chain(endpoint)
            chains.append(sep)
            statistic = (f" -m statistic --mode random --probability {_probability(count - index)}"
                         if index < count - 1 else "")
            rules.append(f'-A {svc_chain} -m comment --comment "{label} -> {endpoint}"{statistic} -j {sep}')
            rules.append(f'-A {sep} -m comment --comment "{label}" -s {endpoint.ip} -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -m comment --comment "{label}" {match} -j DNAT --to-destination {endpoint}')
    rules.append(f'-A KUBE-SERVICES -m comment --comment "{NODEPORTS_COMMENT}" -m addrtype --dst-type LOCAL '
                 "-j KUBE-NODEPORTS")
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in chains), *rules, "COMMIT"]
    return "".join(line + "\n" for line in lines)


def load_iptables(ns: str, services=None, family: int = 4, *, cluster_cidr: str | None = None) -> str:
    """Load :func:`iptables_restore_text` into the nat table of namespace ``ns`` with
    ``iptables-restore --noflush`` (other chains stay; load it once: the jumps are inserted, not
    checked). Returns the text loaded."""
    text = iptables_restore_text(services, family, cluster_cidr=cluster_cidr)
    run(ns, "iptables-restore" if family == 4 else "ip6tables-restore", "--noflush", input=text)
    return text


# --- nftables mode -----------------------------------------------------------------------------------


def nft_text(services=None, family: int = 4, *, cluster_cidr: str | None = None, service_cidr: str | None = None,
             node_ips: tuple[str, ...] = ()) -> str:
    """The ``kube-proxy`` table kube-proxy's nftables mode writes for ``services`` (default
    :data:`DEFAULT_SERVICES`; other families left out), as an ``nft -f`` script that creates the
    table afresh (it deletes an existing ``kube-proxy`` table of that family first).
    ``node_ips``: the addresses that accept NodePorts (the ``nodeport-ips`` set)."""
    services = _of_family(DEFAULT_SERVICES[family] if services is None else services, family)
    ip = NFT_FAMILY[family]  # the family name is also the match keyword (ip daddr, ip6 daddr)
    addr_type = "ipv4_addr" if family == 4 else "ipv6_addr"
    cidr = cluster_cidr or CLUSTER_CIDR[family]
    svc_cidr = service_cidr or SERVICE_CIDR[family]
    t = f"{ip} kube-proxy"
    key3 = f"{addr_type} . inet_proto . inet_service : verdict"
    out = [
        f'add table {t} {{ comment "rules for kube-proxy" ; }}',
        f"delete table {t}",
        f'add table {t} {{ comment "rules for kube-proxy" ; }}',
        f'add set {t} cluster-ips {{ type {addr_type} ; comment "Active ClusterIPs" ; }}',
        f'add set {t} nodeport-ips {{ type {addr_type} ; comment "IPs that accept NodePort traffic" ; }}',
        f'add map {t} firewall-ips {{ type {key3} ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}',
        f"add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; "
        'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
        f'add map {t} no-endpoint-services {{ type {key3} ; comment "vmap to drop or reject packets to services with no endpoints" ; }}',
        f'add map {t} service-ips {{ type {key3} ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}',
        f'add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }}',
    ]
    for chain in ("cluster-ips-check", "firewall-check", "mark-for-masquerade", "masquerading",
                  "nodeport-endpoints-check", "services", "service-endpoints-check"):
        out.append(f"add chain {t} {chain}")
    out += [
        f"add chain {t} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}",
        f"add chain {t} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}",
        f"add chain {t} filter-forward {{ type filter hook forward priority 0 ; }}",
        f"add chain {t} filter-input {{ type filter hook input priority 0 ; }}",
        f"add chain {t} filter-output {{ type filter hook output priority 0 ; }}",
        f"add chain {t} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f'add chain {t} reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}',
        f'add rule {t} cluster-ips-check {ip} daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
        f'add rule {t} cluster-ips-check {ip} daddr {{ {svc_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"',
        f"add rule {t} filter-prerouting-pre-dnat ct state new jump firewall-check",
        f"add rule {t} filter-forward ct state new jump service-endpoints-check",
        f"add rule {t} filter-forward ct state new jump cluster-ips-check",
        f"add rule {t} filter-input ct state new jump nodeport-endpoints-check",
        f"add rule {t} filter-input ct state new jump service-endpoints-check",
        f"add rule {t} filter-output ct state new jump service-endpoints-check",
        f"add rule {t} filter-output-pre-dnat ct state new jump firewall-check",
        f"add rule {t} filter-output ct state new jump cluster-ips-check",
        f"add rule {t} firewall-check {ip} daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}",
        f"add rule {t} masquerading mark and {MASQ_MARK} == 0 return",
        f"add rule {t} masquerading mark set mark xor {MASQ_MARK}",
        f"add rule {t} masquerading masquerade fully-random",
        f"add rule {t} nat-output jump services",
        f"add rule {t} nat-postrouting jump masquerading",
        f"add rule {t} nat-prerouting jump services",
        f"add rule {t} nodeport-endpoints-check {ip} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        f"add rule {t} reject-chain reject",
        f"add rule {t} services {ip} daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} services {ip} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        f"add rule {t} service-endpoints-check {ip} daddr . meta l4proto . th dport vmap @no-endpoint-services",
    ]
    for address in node_ips:
        out.append(f"add element {t} nodeport-ips {{ {address} }}")
    for svc in services:
        out.append(f"# {svc.port_label}")
        out += _nft_service(t, ip, svc, cidr)
    return "".join(line + "\n" for line in out)


def _nft_service(t: str, ip: str, svc: Service, cidr: str) -> list[str]:
    label, proto = f"{svc.namespace}/{svc.name}:{svc.port_name}", svc.protocol
    out = [f"add element {t} cluster-ips {{ {svc.cluster_ip} }}"]
    if not svc.endpoints:
        out.append(f'add element {t} no-endpoint-services {{ {svc.cluster_ip} . {proto} . {svc.port} comment "{label}" '
                   ": goto reject-chain }")
        for address in svc.external_ips:
            out.append(f'add element {t} no-endpoint-services {{ {address} . {proto} . {svc.port} comment "{label}" '
                       ": goto reject-chain }")
        if svc.node_port:
            out.append(f'add element {t} no-endpoint-nodeports {{ {proto} . {svc.node_port} comment "{label}" '
                       ": goto reject-chain }")
        return out
    chain, ext = svc.nft_service_chain(), svc.nft_external_chain()
    external = bool(svc.external_ips or svc.node_port)
    # every chain exists before a rule refers to it (kube-proxy's transaction adds chains first)
    for name in (chain, *([ext] if external else []), *(svc.nft_endpoint_chain(e) for e in svc.endpoints)):
        out.append(f"add chain {t} {name}")
    out.append(f"add rule {t} {chain} {ip} daddr {svc.cluster_ip} {ip} saddr != {cidr} jump mark-for-masquerade")
    vmap = " , ".join(f"{i} : goto {svc.nft_endpoint_chain(e)}" for i, e in enumerate(svc.endpoints))
    out.append(f"add rule {t} {chain} numgen random mod {len(svc.endpoints)} vmap {{ {vmap} }}")
    if external:
        out += [f"add rule {t} {ext} jump mark-for-masquerade", f"add rule {t} {ext} goto {chain}"]
    for endpoint in svc.endpoints:
        ep_chain = svc.nft_endpoint_chain(endpoint)
        out += [f"add rule {t} {ep_chain} {ip} saddr {endpoint.ip} jump mark-for-masquerade",
                f"add rule {t} {ep_chain} meta l4proto {proto} dnat to {endpoint}"]
    out.append(f"add element {t} service-ips {{ {svc.cluster_ip} . {proto} . {svc.port} : goto {chain} }}")
    for address in svc.external_ips:
        out.append(f"add element {t} service-ips {{ {address} . {proto} . {svc.port} : goto {ext} }}")
    if svc.node_port:
        out.append(f"add element {t} service-nodeports {{ {proto} . {svc.node_port} : goto {ext} }}")
    return out


def load_nft(ns: str, services=None, family: int = 4, *, cluster_cidr: str | None = None,
             service_cidr: str | None = None, node_ips: tuple[str, ...] = ()) -> str:
    """Load :func:`nft_text` into namespace ``ns`` (``nft -f -``), replacing any ``kube-proxy``
    table of that family. Returns the script loaded."""
    text = nft_text(services, family, cluster_cidr=cluster_cidr, service_cidr=service_cidr, node_ips=node_ips)
    nft(ns, "-f", "-", input=text)
    return text
