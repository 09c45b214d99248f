"""``masqd explain --live`` follows kube-proxy's Services (issue 17, part 4), against the real
kernel: kube-proxy-shaped rules (:mod:`masqd.testing.kube_proxy`: iptables ``KUBE-SERVICES`` /
``KUBE-SVC-*`` / ``KUBE-SEP-*`` / ``KUBE-POSTROUTING``, or the nftables ``kube-proxy`` table) are
loaded into a namespace next to masqd's own rules, and explain must say that a ClusterIP is DNATed
to its endpoints and give each endpoint's verdict; one test sends real packets to ClusterIPs from
a pod namespace and checks, at the destination, that what explain said is what happened."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from masqd.backends.iptables.render import parse_nat_chains
from masqd.backends.iptables.services import parse_services
from masqd.testing import kube_proxy as kp
from masqd.testing import netns
from masqd.testing import topology as layout

MASQD = Path(sys.executable).parent / "masqd"
BACKENDS = [pytest.param("iptables", id="iptables"), pytest.param("nftables", id="nftables")]
#: IPv4 defaults keep 10.0.0.0/8; for IPv6 the config keeps the ULA range the pod network is in.
CONFIG = "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fd00::/8]\n"


#: An older kube-proxy's nat table (1.2x): the masquerade mark for outside sources in KUBE-SERVICES
#: itself, NodePorts marked in KUBE-NODEPORTS and served on one node address.
OLDER_SAVE = """*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SEP-B - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-X - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x8000/0x8000
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:" -m tcp --dport 30001 -j KUBE-MARK-MASQ
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:" -m tcp --dport 30001 -j KUBE-SVC-X
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -m mark --mark 0x8000/0x8000 -j MASQUERADE
-A KUBE-SEP-A -s 10.244.2.9/32 -m comment --comment "default/web:" -j KUBE-MARK-MASQ
-A KUBE-SEP-A -p tcp -m comment --comment "default/web:" -m tcp -j DNAT --to-destination 10.244.2.9:80
-A KUBE-SEP-B -s 192.0.2.77/32 -m comment --comment "default/web:" -j KUBE-MARK-MASQ
-A KUBE-SEP-B -p tcp -m comment --comment "default/web:" -m tcp -j DNAT --to-destination 192.0.2.77:80
-A KUBE-SERVICES ! -s 10.244.0.0/16 -d 10.96.103.220/32 -p tcp -m comment --comment "default/web: cluster IP" -m tcp --dport 4000 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -d 10.96.103.220/32 -p tcp -m comment --comment "default/web: cluster IP" -m tcp --dport 4000 -j KUBE-SVC-X
-A KUBE-SERVICES -d 192.0.2.10/32 -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -j KUBE-NODEPORTS
-A KUBE-SVC-X -m comment --comment "default/web:" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-A
-A KUBE-SVC-X -m comment --comment "default/web:" -j KUBE-SEP-B
COMMIT
"""


def test_an_older_kube_proxys_layout_is_read_too():
    services = parse_services(parse_nat_chains(OLDER_SAVE), 4)
    cluster, node_port = services.frontends
    assert (cluster.service, cluster.kind, str(cluster.address), cluster.port) == ("default/web:", "cluster IP",
                                                                                  "10.96.103.220", 4000)
    assert [str(e) for e in cluster.endpoints] == ["10.244.2.9:80", "192.0.2.77:80"]
    assert [str(n) for n in cluster.marks_unless_from] == ["10.244.0.0/16"] and not cluster.marks_all
    assert (node_port.kind, node_port.port, node_port.marks_all) == ("nodePort", 30001, True)
    assert [str(a) for a in services.nodeport_addresses] == ["192.0.2.10"] and not services.nodeports_local
    assert services.mark == 0x8000 and services.masquerades_marked
    assert services.requires_mark("0x8000/0x8000") and not services.requires_mark("0x4000/0x4000")
    assert services.at(ipaddress.ip_address("192.0.2.10")) == (node_port,)
    source = ipaddress.ip_address
    assert cluster.marked(source("10.244.3.3")) is False and cluster.marked(source("192.168.1.1")) is True
    assert cluster.marked(None) is None
    assert cluster.marked(source("10.244.2.9"), cluster.endpoints[0]) is True  # hairpin


def test_no_kube_proxy_rules_no_services():
    assert parse_services(parse_nat_chains("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"), 4).frontends == ()


def load(ns: str, backend: str, family: int, services=None) -> None:
    """kube-proxy's rules of the backend's kind for ``services`` (default: the fixture's examples)."""
    if backend == "iptables":
        kp.load_iptables(ns, services, family)
    else:
        kp.load_nft(ns, services, family)


def masqd(ns: str, tmp_path: Path, backend: str, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config"
    config.write_text(CONFIG)
    return netns.run(ns, str(MASQD), command, "--backend", backend, "--config", str(config), "--enable-ipv6", *args,
                     check=False, timeout=60)


def apply_and_explain(ns: str, tmp_path: Path, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    applied = masqd(ns, tmp_path, backend, "run", "--once")
    assert applied.returncode == 0, applied.stderr
    return masqd(ns, tmp_path, backend, "explain", "--live", *args)


@pytest.mark.netns
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", [4, 6])
def test_a_cluster_ip_is_explained_as_dnat_to_its_endpoints_each_with_its_verdict(node_ns, tmp_path, backend, family):
    load(node_ns, backend, family)
    kubernetes = kp.DEFAULT_SERVICES[family][0]
    kept, masqueraded = kubernetes.endpoints
    other = "10.1.2.3" if family == 4 else "fd00:1::3"
    result = apply_and_explain(node_ns, tmp_path, backend, kubernetes.cluster_ip, other)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"{kubernetes.cluster_ip}: "))
    assert lines[head].startswith(f"{kubernetes.cluster_ip}: DNATed by kube-proxy (")
    chain = kubernetes.svc_chain() if backend == "iptables" else kubernetes.nft_service_chain()
    assert lines[head + 1] == f"  default/kubernetes:https cluster IP, tcp/443 ({chain}) -> 2 endpoints:"
    assert f"    {kept}: keeps the pod source address (not masqueraded)" in lines
    assert f"    {masqueraded}: masqueraded to the node's address" in lines
    assert any(line.startswith(f"  from sources outside {kp.CLUSTER_CIDR[family]} (the cluster CIDR) it is "
                               "masqueraded by kube-proxy") for line in lines)
    # an address that is no Service's is explained as before
    assert f"{other}: keeps the pod source address (not masqueraded)" in lines
    follows = lines[lines.index(f"{other}: keeps the pod source address (not masqueraded)") + 1]
    assert follows.startswith("  matched ") and "DNATed" not in result.stdout.split(f"{other}:")[1]

    as_json = json.loads(masqd(node_ns, tmp_path, backend, "explain", "--live", "--output", "json",
                               kubernetes.cluster_ip, other).stdout)
    (route,) = as_json[0]["services"]
    assert (route["service"], route["kind"], route["port"]) == ("default/kubernetes:https", "cluster IP", 443)
    assert [(e["endpoint"], e["live"]["verdict"]) for e in route["endpoints"]] == [
        (str(kept), "keep"), (str(masqueraded), "masquerade")]
    assert route["masquerade_unless_from"] == [kp.CLUSTER_CIDR[family]]
    assert "services" not in as_json[1]


@pytest.mark.netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_outside_the_cluster_cidr_kube_proxy_masquerades_every_endpoint_and_it_is_not_drift(
        node_ns, tmp_path, backend):
    load(node_ns, backend, 4)
    kubernetes = kp.DEFAULT_SERVICES[4][0]
    result = apply_and_explain(node_ns, tmp_path, backend, kubernetes.cluster_ip, "--from", "192.168.7.7")
    assert result.returncode == 0, result.stdout + result.stderr  # kube-proxy's masquerade is no drift of masqd's
    assert "  from this source (outside 10.244.0.0/16, the cluster CIDR) it is masqueraded by kube-proxy" \
        in result.stdout
    postrouting = "KUBE-POSTROUTING" if backend == "iptables" else "chain masquerading"
    assert (f"      kube-proxy marks it 0x4000, so {postrouting} masquerades it; masqd's rules alone: keeps the pod "
            "source address (not masqueraded)") in result.stdout.splitlines()
    inside = masqd(node_ns, tmp_path, backend, "explain", "--live", "--output", "json", kubernetes.cluster_ip,
                   "--from", "10.244.3.3")
    (route,) = json.loads(inside.stdout)[0]["services"]
    assert route["kube_proxy_masquerades"] is False
    assert [e["live"]["verdict"] for e in route["endpoints"]] == ["keep", "masquerade"]


@pytest.mark.netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_external_ips_and_node_ports_are_followed_and_marked_for_kube_proxys_masquerade(node_ns, tmp_path, backend):
    netns.run(node_ns, "ip", "link", "add", "mq0", "type", "veth", "peer", "name", "mq1")
    netns.run(node_ns, "ip", "addr", "add", "192.0.2.10/24", "dev", "mq0")
    netns.run(node_ns, "ip", "link", "set", "mq0", "up")
    if backend == "iptables":
        kp.load_iptables(node_ns, None, 4)
    else:
        kp.load_nft(node_ns, None, 4, node_ips=("192.0.2.10",))
    web = kp.DEFAULT_SERVICES[4][1]
    result = apply_and_explain(node_ns, tmp_path, backend, "--output", "json", web.external_ips[0], "192.0.2.10")
    external, node = json.loads(result.stdout)
    (route,) = external["services"]
    assert (route["kind"], route["masquerades_all"], route["kube_proxy_masquerades"]) == ("external IP", True, True)
    assert [e["endpoint"] for e in route["endpoints"]] == [str(e) for e in web.endpoints]
    (route,) = node["services"]
    assert (route["kind"], route["port"], route["address"]) == ("nodePort", 30080, None)
    assert all(e["live"]["verdict"] == "masquerade" and e["kube_proxy_masquerades"] for e in route["endpoints"])


@pytest.mark.netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_what_explain_says_of_a_cluster_ips_endpoints_is_what_packets_from_a_pod_meet(topology, tmp_path, backend):
    """A pod sends to two ClusterIPs, one DNATed to an endpoint the default keep list holds
    (10.200.0.2), one to an endpoint outside it (198.51.100.2); at the destination namespace the
    first arrives from the pod's address and the second from the node's, as explain said. (Not
    10.99.0.2: it is in the Service CIDR, whose unallocated addresses kube-proxy's nft table drops.)"""
    topology.add_destination("10.200.0.2", "10.200.0.0/24")
    kept = kp.Service("default", "kept", "10.96.0.50", 5353, "p", "udp", endpoints=(kp.Endpoint("10.200.0.2", 7001),))
    masq = kp.Service("default", "masq", "10.96.0.51", 5353, "p", "udp",
                      endpoints=(kp.Endpoint("198.51.100.2", 7002),))
    load(topology.node, backend, 4, (kept, masq))
    result = apply_and_explain(topology.node, tmp_path, backend, "--output", "json", "--from", layout.POD_V4,
                               kept.cluster_ip, masq.cluster_ip)
    said = {item["address"]: item["services"][0]["endpoints"][0]["live"]["verdict"] for item in json.loads(result.stdout)}
    assert said == {kept.cluster_ip: "keep", masq.cluster_ip: "masquerade"}
    seen = {svc.cluster_ip: _source_seen(topology, svc) for svc in (kept, masq)}
    expected = {"keep": layout.POD_V4, "masquerade": layout.NODE_V4}
    assert seen == {address: expected[verdict] for address, verdict in said.items()}


_RECEIVE = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.settimeout(float(sys.argv[3]))
print("ready", flush=True)
try:
    print(sock.recvfrom(64)[1][0], flush=True)
except socket.timeout:
    print("timeout", flush=True)
"""
_SEND = """
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


def _source_seen(topology: layout.Topology, service: kp.Service) -> str | None:
    """Send one datagram from the pod to ``service``'s ClusterIP; the source address its endpoint
    (in the dest namespace) saw, ``None`` when nothing arrived."""
    (endpoint,) = service.endpoints  # an address the dest namespace holds
    receiver = netns.popen(topology.dest, sys.executable, "-c", _RECEIVE, endpoint.ip, str(endpoint.port), "5",
                           stdout=subprocess.PIPE, text=True)
    try:
        reader = netns.LineReader(receiver.stdout)
        assert reader.readline(netns.COMMAND_TIMEOUT) == "ready"
        netns.run(topology.pod, sys.executable, "-c", _SEND, service.cluster_ip, str(service.port))
        line = reader.readline(10)
        reader.close()
        return None if line in (None, "timeout") else line
    finally:
        receiver.kill()
        receiver.wait(timeout=netns.COMMAND_TIMEOUT)
