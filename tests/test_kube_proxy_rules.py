"""The kube-proxy rule fixture (:mod:`masqd.testing.kube_proxy`): its chain names are the ones
kube-proxy computes, and what it writes loads into a fresh namespace with the real
``iptables-restore`` / ``nft`` and reads back as kube-proxy's layout (``iptables-save``, ``nft
list``). Expected texts are written out here as the tools print them."""

from __future__ import annotations

import json

import pytest

from masqd.testing import kube_proxy as kp
from masqd.testing import netns

KUBERNETES = kp.Service("default", "kubernetes", "10.96.0.1", 443, "https",
                        endpoints=(kp.Endpoint("10.244.1.5", 6443), kp.Endpoint("198.51.100.10", 6443)))


def test_chain_names_are_the_ones_kube_proxy_computes():
    # names from kube-proxy's own test expectations and from live clusters
    svc1 = kp.Service("ns1", "svc1", "172.30.0.41", 80, "p80", endpoints=(kp.Endpoint("10.180.0.1", 80),))
    assert svc1.svc_chain() == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert svc1.sep_chain(svc1.endpoints[0]) == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert svc1.nft_service_chain() == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert svc1.nft_endpoint_chain(svc1.endpoints[0]) == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert KUBERNETES.svc_chain() == "KUBE-SVC-NPX46M4PTMTKRN6Y"
    dns = kp.Service("kube-system", "kube-dns", "10.96.0.10", 53, "dns", "udp")
    assert dns.svc_chain() == "KUBE-SVC-TCOU7JCQXEZGVUNU"
    v6 = kp.Service("ns", "s", "fd00:10:96::1", 80, "p", endpoints=(kp.Endpoint("fd00:10:244::5", 80),))
    assert v6.nft_endpoint_chain(v6.endpoints[0]).endswith("-ns/s/tcp/p__fd00.10.244..5/80")


def test_services_reject_mixed_families_and_unknown_protocols():
    with pytest.raises(ValueError, match="not of the ClusterIP's family"):
        kp.Service("a", "b", "10.96.0.1", 80, endpoints=(kp.Endpoint("fd00::1", 80),))
    with pytest.raises(ValueError, match="protocol"):
        kp.Service("a", "b", "10.96.0.1", 80, protocol="icmp")


def test_probabilities_spread_evenly_over_the_endpoints():
    web = kp.DEFAULT_SERVICES[4][1]
    text = kp.iptables_restore_text([web], 4)
    assert "--probability 0.3333333333 -j" in text and "--probability 0.5000000000 -j" in text
    assert text.count("-m statistic") == 2  # the last endpoint takes what is left


def test_text_holds_only_the_family_asked_for():
    services = (*kp.DEFAULT_SERVICES[4], *kp.DEFAULT_SERVICES[6])
    assert "fd00:10:96::1" not in kp.iptables_restore_text(services, 4)
    assert "10.96.0.1 " not in kp.nft_text(services, 6)
    with pytest.raises(ValueError):
        kp.nft_text(services, 5)


@pytest.mark.netns
def test_iptables_rules_load_and_read_back_as_kube_proxy_writes_them(node_ns):
    kp.load_iptables(node_ns, [KUBERNETES], 4)
    save = netns.iptables_save(node_ns, 4).splitlines()
    svc, seps = KUBERNETES.svc_chain(), [KUBERNETES.sep_chain(e) for e in KUBERNETES.endpoints]
    label = "default/kubernetes:https"
    expected = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        f'-A {seps[0]} -s 10.244.1.5/32 -m comment --comment "{label}" -j KUBE-MARK-MASQ',
        f'-A {seps[0]} -p tcp -m comment --comment "{label}" -m tcp -j DNAT --to-destination 10.244.1.5:6443',
        f'-A {seps[1]} -s 198.51.100.10/32 -m comment --comment "{label}" -j KUBE-MARK-MASQ',
        f'-A {seps[1]} -p tcp -m comment --comment "{label}" -m tcp -j DNAT --to-destination 198.51.100.10:6443',
        f'-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "{label} cluster IP" -m tcp --dport 443 -j {svc}',
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this '
        'chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        f'-A {svc} ! -s 10.244.0.0/16 -d 10.96.0.1/32 -p tcp -m comment --comment "{label} cluster IP" -m tcp --dport 443 '
        "-j KUBE-MARK-MASQ",
        f'-A {svc} -m comment --comment "{label} -> 10.244.1.5:6443" -m statistic --mode random --probability '
        f"0.50000000000 -j {seps[0]}",
        f'-A {svc} -m comment --comment "{label} -> 198.51.100.10:6443" -j {seps[1]}',
    ]
    # iptables-save lists chains by name; within a chain the order is the rules' order
    def by_chain(lines):
        chains: dict[str, list[str]] = {}
        for line in lines:
            chains.setdefault(line.split()[1], []).append(line)
        return chains
    assert by_chain(line for line in save if line.startswith("-A")) == by_chain(expected)
    declared = {line.split()[0][1:] for line in save if line.startswith(":")}
    assert {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-POSTROUTING", svc, *seps} <= declared


@pytest.mark.netns
def test_iptables_default_services_load_for_both_families_with_nodeports_and_external_ips(node_ns):
    for family in (4, 6):
        kp.load_iptables(node_ns, family=family)
        save = netns.iptables_save(node_ns, family)
        web = kp.DEFAULT_SERVICES[family][1]
        ext = web.ext_chain()
        prefix = "/32" if family == 4 else "/128"
        assert (f'-A KUBE-SERVICES -d {web.external_ips[0]}{prefix} -p tcp -m comment --comment '
                f'"default/web:http external IP" -m tcp --dport 80 -j {ext}') in save
        assert f'-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j {ext}' in save
        assert f"-A {ext} -j {web.svc_chain()}" in save
        assert save.count("-j DNAT --to-destination") == sum(len(s.endpoints) for s in kp.DEFAULT_SERVICES[family])
        if family == 6:
            assert "-j DNAT --to-destination [2001:db8:100::10]:6443" in save
        # a kube-proxy-shaped chain of the other family's table never leaks in
        assert ("10.96.0.1" in save) == (family == 4)


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
def test_nft_table_loads_and_lists_as_kube_proxy_writes_it(node_ns, family):
    node_ip = "172.30.0.1" if family == 4 else "fd00:30::1"
    kp.load_nft(node_ns, family=family, node_ips=(node_ip,))
    kp.load_nft(node_ns, family=family, node_ips=(node_ip,))  # a second load replaces the table
    ip = netns.NFT_FAMILY[family]
    doc = json.loads(netns.nft(node_ns, "-j", "list", "table", ip, "kube-proxy").stdout)["nftables"]
    chains = {o["chain"]["name"]: o["chain"] for o in doc if "chain" in o}
    assert {chains[name].get("hook") for name in ("nat-prerouting", "nat-output", "nat-postrouting")} == {
        "prerouting", "output", "postrouting"}
    maps = {o["map"]["name"]: o["map"] for o in doc if "map" in o}
    services = kp.DEFAULT_SERVICES[family]
    assert len(maps["service-ips"]["elem"]) == len(services) + 1  # + web's external IP
    assert len(maps["service-nodeports"]["elem"]) == 1
    kube = services[0]
    for endpoint in kube.endpoints:
        assert kube.nft_endpoint_chain(endpoint) in chains
    listing = netns.nft(node_ns, "list", "table", ip, "kube-proxy").stdout
    assert f"{kube.cluster_ip} . tcp . 443 : goto {kube.nft_service_chain()}" in listing
    assert f"{ip} daddr {kube.cluster_ip} {ip} saddr != {kp.CLUSTER_CIDR[family]} jump mark-for-masquerade" in listing
    first, second = (kube.nft_endpoint_chain(e) for e in kube.endpoints)
    assert f"numgen random mod 2 vmap {{ 0 : goto {first}, 1 : goto {second} }}" in listing
    assert f"meta l4proto tcp dnat to {kube.endpoints[1]}" in listing
    assert "meta mark & 0x00004000 == 0x00000000 return" in listing and "masquerade fully-random" in listing
    assert listing.count(f"table {ip} kube-proxy") == 1
