"""Live flows against the rules (``--conntrack-reconcile``), without a kernel: which conntrack
entries an apply leaves stale (:mod:`masqd.flows`), the reconciler's bounded step that deletes
them (:mod:`masqd.flow_cleanup`, against an in-memory table), the ctnetlink messages read and
written (:mod:`masqd.backends.conntrack.messages`), and what the metrics and audit events say.
The same against real flows in network namespaces: ``tests/test_netns_conntrack.py``."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import anyio
import pytest

from masqd.audit import AuditEvent
from masqd.backends.conntrack import Deleted
from masqd.backends.conntrack import messages as ct
from masqd.config import AgentOptions, parse_config
from masqd.flow_cleanup import FlowCleanup, flow_fields
from masqd.flows import IPS_DST_NAT, IPS_SRC_NAT, Flow, decisions_changed, stale_flows
from masqd.metrics import Metrics
from masqd.netlink import NLA_F_NESTED, NLMSG_DONE, HEADER, attr, nfnl_message
from masqd.ruleset import compute_ruleset
from masqd.status import AgentStatus

V6 = AgentOptions(enable_ipv6=True)
POD, POD6 = "10.244.1.2", "fd00:244::2"
NODE, NODE6 = "172.30.0.1", "fd00:30::1"  # the node's address: what MASQUERADE rewrites to


def rules(text: str = "{}", options: AgentOptions = V6):
    return compute_ruleset(parse_config(text, options).config, options)


DEFAULT = rules()  # keeps RFC 1918 (and link-local), masquerades the rest
KEEP_DOC = rules('{"nonMasqueradeCIDRs": ["10.0.0.0/8", "203.0.113.0/24", "2001:db8:1::/48"]}')


def ip(text: str):
    return ipaddress.ip_address(text)


def flow(src: str, dst: str, *, snat: str | None = None, dnat: str | None = None, protocol: int = 17) -> Flow:
    """A conntrack entry ``src`` -> ``dst``: source-NATed to ``snat``, DNATed to ``dnat``."""
    status = (IPS_SRC_NAT if snat else 0) | (IPS_DST_NAT if dnat else 0)
    return Flow(family=ip(src).version, protocol=protocol, source=ip(src), destination=ip(dst),
                reply_source=ip(dnat or dst), reply_destination=ip(snat or src), status=status,
                source_port=40000, destination_port=53, key=f"{src}>{dst}".encode())


def reasons(stale) -> list[tuple[str, str]]:
    return [(str(entry.flow.source) + ">" + str(entry.flow.destination), entry.reason) for entry in stale]


@pytest.mark.parametrize(("entry", "before", "after", "expected"), [
    pytest.param(flow(POD, "203.0.113.2", snat=NODE), DEFAULT, KEEP_DOC, "masqueraded, now kept", id="masq-now-kept"),
    pytest.param(flow(POD, "203.0.113.2"), KEEP_DOC, DEFAULT, "kept, now masqueraded", id="kept-now-masq"),
    pytest.param(flow(POD6, "2001:db8:1::2", snat=NODE6), DEFAULT, KEEP_DOC, "masqueraded, now kept", id="ipv6"),
    pytest.param(flow(POD, "198.51.100.2", snat=NODE), DEFAULT, KEEP_DOC, None, id="decision-unchanged"),
    pytest.param(flow(POD, "203.0.113.2"), DEFAULT, KEEP_DOC, None, id="already-as-the-rules-say"),
    pytest.param(flow(POD, "10.96.0.1", dnat="203.0.113.2", snat=NODE), DEFAULT, KEEP_DOC, "masqueraded, now kept",
                 id="service-endpoint-decides"),
    pytest.param(flow(POD, "203.0.113.2", dnat="10.244.2.7", snat=NODE), DEFAULT, KEEP_DOC, None,
                 id="dnat-to-a-pod-not-the-address"),
    pytest.param(flow("10.244.1.1", "203.0.113.2", snat=NODE), DEFAULT, KEEP_DOC, None, id="from-the-node"),
    pytest.param(flow("198.51.100.9", NODE, dnat="10.244.1.2"), KEEP_DOC, DEFAULT, None, id="inbound-nodeport"),
    pytest.param(flow(POD, "203.0.113.2", protocol=6, snat=NODE), DEFAULT, KEEP_DOC, None, id="tcp-not-in-udp-mode"),
])
def test_a_flow_is_stale_when_its_nat_contradicts_a_changed_decision(entry, before, after, expected):
    local = {ip("10.244.1.1"), ip(NODE), ip(NODE6)}
    stale = stale_flows([entry], after, (before,), local=local, protocols={"udp"})
    assert [s.reason for s in stale] == ([expected] if expected else [])


def test_without_earlier_rules_every_flow_is_compared_with_the_rules_alone():
    service = flow(POD, "10.96.0.1", dnat="10.244.2.7", snat=NODE)  # kube-proxy may have masqueraded it
    entries = [flow(POD, "203.0.113.2", snat=NODE), flow(POD, "198.51.100.2"), service]
    assert reasons(stale_flows(entries, KEEP_DOC)) == [
        ("10.244.1.2>203.0.113.2", "masqueraded, now kept"), ("10.244.1.2>198.51.100.2", "kept, now masqueraded")]
    # with the rules before known, a flow whose destination's decision did not change is not touched
    assert reasons(stale_flows(entries, KEEP_DOC, (DEFAULT,))) == [("10.244.1.2>203.0.113.2", "masqueraded, now kept")]
    # ... and a Service flow is judged by its endpoint when that endpoint's decision changed
    to_kept = rules('{"nonMasqueradeCIDRs": ["10.0.0.0/8"]}')
    to_masq = rules('{"nonMasqueradeCIDRs": ["10.244.1.0/24"]}')
    assert reasons(stale_flows([service], to_kept, (to_masq,))) == [("10.244.1.2>10.96.0.1", "masqueraded, now kept")]


@pytest.mark.parametrize("entry", [
    pytest.param(flow(POD, "10.96.0.1", dnat=POD, snat=NODE), id="hairpin: a pod to itself through a Service"),
    pytest.param(Flow(4, 17, ip(POD), ip("203.0.113.2"), ip("203.0.113.2"), ip(POD), IPS_SRC_NAT, 40000, 53),
                 id="only the source port was changed"),
    pytest.param(Flow(4, 17, ip(POD), ip("203.0.113.2"), ip("203.0.113.2"), ip(NODE), IPS_SRC_NAT, 40000, 53,
                      zone=5), id="another datapath's conntrack zone"),
])
def test_flows_that_are_never_masqds_to_delete(entry):
    assert stale_flows([entry], KEEP_DOC) == [] and stale_flows([entry], KEEP_DOC, (DEFAULT,)) == []


def test_snat_address_change_and_source_lists_and_interfaces():
    snat = rules('{"snatToAddress": "172.30.0.5"}')
    moved = flow(POD, "198.51.100.2", snat=NODE)
    assert reasons(stale_flows([moved], snat, (DEFAULT,))) == [("10.244.1.2>198.51.100.2",
                                                               "SNAT to 172.30.0.1, now 172.30.0.5")]
    scoped = rules('{"nonMasqueradeSourceCIDRs": ["10.244.1.0/24"]}')
    assert reasons(stale_flows([moved], scoped, (DEFAULT,))) == [("10.244.1.2>198.51.100.2", "masqueraded, now kept")]
    # conntrack does not know the interface: an unNATed flow may leave where the rules keep it
    eth = rules('{"outputInterfaces": ["eth0"]}')
    unnated = flow(POD, "203.0.113.2")
    assert stale_flows([unnated], eth, (KEEP_DOC,)) == []
    assert reasons(stale_flows([moved], rules('{"outputInterfaces": ["eth0"], "nonMasqueradeCIDRs": '
                                              '["198.51.100.0/24"]}'), (eth,))) == [
        ("10.244.1.2>198.51.100.2", "masqueraded, now kept")]


def test_decisions_changed_ignores_how_the_rules_are_written():
    assert not decisions_changed(DEFAULT, rules())
    assert not decisions_changed(DEFAULT, compute_ruleset(parse_config("{}", V6).config,
                                                          AgentOptions(enable_ipv6=True, masq_chain="OTHER")))
    assert decisions_changed(DEFAULT, KEEP_DOC)
    assert decisions_changed(DEFAULT, rules('{"snatToAddress": "172.30.0.5"}'))
    assert decisions_changed(DEFAULT, rules('{"outputInterfaces": ["eth0"]}'))


# --- the reconciler's step, against an in-memory table ----------------------------------------------


class Table:
    """An in-memory conntrack table: ``flows`` per family; ``delete`` removes them."""

    def __init__(self, entries, *, read_only: bool = False, fail: Exception | None = None, refuse: int = 0):
        self.entries = list(entries)
        self.read_only = read_only
        self.fail = fail
        self.refuse = refuse
        self.deletes: list[list[Flow]] = []
        self.asked: list[int | None] = []  # the protocol each dump asked the kernel for

    async def scan(self, family: int, protocol: int | None, each) -> bool:
        if self.fail is not None:
            raise self.fail
        self.asked.append(protocol)
        for entry in [f for f in self.entries if f.family == family and protocol in (None, f.protocol)]:
            if each([entry]) is False:  # one entry per "datagram"
                return False
        return True

    async def delete(self, flows):
        self.deletes.append(list(flows))
        result = Deleted()
        for entry in flows:
            if self.refuse:
                self.refuse -= 1
                result.refused.append((entry, "Operation not permitted (EPERM)"))
                continue
            self.entries.remove(entry)
            result.deleted.append(entry)
        return result


async def no_addresses():
    return frozenset({ip("10.244.1.1")})


def masqueraded(count: int, family: int = 4) -> list[Flow]:
    if family == 6:
        return [flow(f"fd00:244::{i + 2:x}", "2001:db8:1::2", snat=NODE6) for i in range(count)]
    return [flow(f"10.244.1.{i + 2}", "203.0.113.2", snat=NODE) for i in range(count)]


@pytest.mark.anyio
async def test_a_changed_decision_deletes_its_stale_flows_and_counts_them():
    table = Table([*masqueraded(3), *masqueraded(2, 6), flow(POD, "198.51.100.2", snat=NODE)])
    cleanup = FlowCleanup("udp", no_addresses)
    report = await cleanup.run(table, DEFAULT, KEEP_DOC, True)
    assert report.deleted == {("ipv4", "udp"): 3, ("ipv6", "udp"): 2} and report.error is None
    assert [str(f.destination) for f in table.entries] == ["198.51.100.2"]
    assert flow_fields(report) == {"conntrack_deleted": {"ipv4": {"udp": 3}, "ipv6": {"udp": 2}},
                                   "conntrack_error": None}
    # nothing changed: nothing read, nothing deleted
    assert await cleanup.run(table, KEEP_DOC, KEEP_DOC, False) is None


@pytest.mark.anyio
async def test_modes_and_passes_that_change_nothing():
    tcp = flow(POD, "203.0.113.2", snat=NODE, protocol=6)
    for mode, left, asked in (("none", 2, []), ("udp", 1, [17, 17]), ("all", 0, [None, None])):
        table = Table([tcp, *masqueraded(1)])
        await FlowCleanup(mode, no_addresses).run(table, DEFAULT, KEEP_DOC, True)
        assert (len(table.entries), table.asked) == (left, asked), mode
    assert await FlowCleanup("udp").run(None, DEFAULT, KEEP_DOC, True) is None  # a backend without a table
    table = Table(masqueraded(1))
    assert await FlowCleanup("udp").run(table, None, KEEP_DOC, False) is None  # first pass, kernel already in sync
    assert (await FlowCleanup("udp").run(table, None, KEEP_DOC, True)).total == 1  # first pass that wrote


@pytest.mark.anyio
async def test_the_cap_leaves_the_rest_for_the_next_pass_even_one_that_changes_nothing():
    table = Table(masqueraded(5))
    cleanup = FlowCleanup("udp", no_addresses, limit=2)
    first = await cleanup.run(table, DEFAULT, KEEP_DOC, True)
    assert first.total == 2 and first.remaining and cleanup.pending == (DEFAULT,)
    second = await cleanup.run(table, KEEP_DOC, KEEP_DOC, False)
    third = await cleanup.run(table, KEEP_DOC, KEEP_DOC, False)
    assert (second.total, third.total, third.remaining, cleanup.pending) == (2, 1, False, None)
    assert table.entries == []


@pytest.mark.anyio
async def test_a_failure_is_reported_and_tried_again_and_a_read_only_table_only_lists():
    table = Table(masqueraded(2), fail=PermissionError(errno.EPERM, "Operation not permitted"))
    cleanup = FlowCleanup("udp", no_addresses)
    report = await cleanup.run(table, DEFAULT, KEEP_DOC, True)
    assert "Operation not permitted" in report.error and report.remaining
    table.fail = None
    assert (await cleanup.run(table, KEEP_DOC, KEEP_DOC, False)).total == 2
    refusing = Table(masqueraded(2), refuse=1)
    report = await FlowCleanup("udp", no_addresses).run(refusing, DEFAULT, KEEP_DOC, True)
    assert report.total == 1 and "refused 1" in report.error and report.remaining
    listing = Table(masqueraded(2), read_only=True)
    report = await FlowCleanup("udp", no_addresses).run(listing, DEFAULT, KEEP_DOC, True)
    assert (report.listed, report.total, len(listing.entries), listing.deletes) == (2, 0, 2, [])


@pytest.mark.anyio
async def test_a_table_that_does_not_answer_stops_at_the_deadline():
    class Hung(Table):
        async def scan(self, family, protocol, each):
            await anyio.sleep_forever()

    cleanup = FlowCleanup("udp", no_addresses, read_timeout=0.05)
    report = await cleanup.run(Hung([]), DEFAULT, KEEP_DOC, True)
    assert "not read within 0.05 s" in report.error and cleanup.pending == (DEFAULT,)


@pytest.mark.anyio
async def test_deleting_stops_at_the_deadline_and_goes_on_at_the_next_pass():
    class Slow(Table):
        async def delete(self, flows):
            await anyio.sleep(0.06)
            return await super().delete(flows)

    table = Slow(masqueraded(3))
    cleanup = FlowCleanup("udp", no_addresses, deadline=0.05)
    first = await cleanup.run(table, DEFAULT, KEEP_DOC, True)
    assert (first.total, first.remaining, first.error) == (3, False, None)  # one call of up to 512: all of it
    table = Slow(masqueraded(3))
    cleanup = FlowCleanup("udp", no_addresses, deadline=0.05, batch=2)
    first = await cleanup.run(table, DEFAULT, KEEP_DOC, True)
    assert (first.total, first.remaining, first.error) == (2, True, None)
    second = await cleanup.run(table, KEEP_DOC, KEEP_DOC, False)
    assert (second.total, second.remaining, table.entries) == (1, False, [])


# --- ctnetlink messages -------------------------------------------------------------------------------


def _entry_message(src: bytes, dst: bytes, reply_src: bytes, reply_dst: bytes, family: int, status: int) -> bytes:
    v4 = family == socket.AF_INET
    def tuple_attr(kind, a, b):
        addresses = attr(ct.CTA_IP_V4_SRC if v4 else ct.CTA_IP_V6_SRC, a) + attr(ct.CTA_IP_V4_DST if v4 else ct.CTA_IP_V6_DST, b)
        proto = (attr(ct.CTA_PROTO_NUM, bytes([17])) + attr(ct.CTA_PROTO_SRC_PORT, struct.pack(">H", 40000))
                 + attr(ct.CTA_PROTO_DST_PORT, struct.pack(">H", 53)))
        return attr(kind | NLA_F_NESTED, attr(ct.CTA_TUPLE_IP | NLA_F_NESTED, addresses)
                    + attr(ct.CTA_TUPLE_PROTO | NLA_F_NESTED, proto))
    payload = (tuple_attr(ct.CTA_TUPLE_ORIG, src, dst) + tuple_attr(ct.CTA_TUPLE_REPLY, reply_src, reply_dst)
               + attr(ct.CTA_STATUS, struct.pack(">I", status)) + attr(ct.CTA_ID, struct.pack(">I", 7)))
    return nfnl_message((ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_NEW, 2, 1, family, payload)


def test_ctnetlink_entries_are_read_and_named_for_their_delete():
    a, b, node = (ipaddress.ip_address(x).packed for x in (POD, "203.0.113.2", NODE))
    data = _entry_message(a, b, b, node, socket.AF_INET, IPS_SRC_NAT) + HEADER.pack(20, NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    flows, done, interrupted = ct.parse_dump(data, 4)
    assert (done, interrupted) == (True, False)
    assert [str(f) for f in flows] == ["udp 10.244.1.2:40000 -> 203.0.113.2:53 (SNAT to 172.30.0.1)"]
    request, sent = ct.delete_requests(flows, 5)
    assert list(sent) == [5] and flows[0].key in request  # the original tuple and id, as dumped
    six = [ipaddress.ip_address(x).packed for x in (POD6, "2001:db8:1::2", NODE6)]
    flows, done, _ = ct.parse_dump(_entry_message(six[0], six[1], six[1], six[2], socket.AF_INET6, IPS_SRC_NAT), 6)
    assert not done and [str(f) for f in flows] == ["udp [fd00:244::2]:40000 -> [2001:db8:1::2]:53 (SNAT to fd00:30::1)"]
    assert ct.parse_dump(data, 4, protocol=6)[0] == []  # a kernel that ignored the filter: filtered here
    with pytest.raises(ValueError, match="entry at byte 0"):
        ct.parse_dump(_entry_message(a[:3], b, b, node, socket.AF_INET, 0), 4)


# --- metrics -----------------------------------------------------------------------------------------


def test_deleted_entries_are_counted_per_family_and_protocol_from_zero():
    metrics = Metrics(AgentStatus(), backend="nftables", options=V6, conntrack="udp")
    text = metrics.render().decode()
    assert 'masqd_conntrack_deleted_total{family="ipv4",protocol="udp"} 0.0' in text
    assert 'masqd_conntrack_deleted_total{family="ipv6",protocol="udp"} 0.0' in text
    assert "masqd_conntrack_errors_total 0.0" in text
    metrics.observe(AuditEvent(time=0, trigger="file", backend="nftables", result="applied",
                               conntrack_deleted={"ipv4": {"udp": 3}}, conntrack_error="refused"))
    text = metrics.render().decode()
    assert 'masqd_conntrack_deleted_total{family="ipv4",protocol="udp"} 3.0' in text
    assert "masqd_conntrack_errors_total 1.0" in text
    everything = Metrics(AgentStatus(), backend="nftables", options=V6, conntrack="all").render().decode()
    assert 'family="ipv4",protocol="tcp"' in everything and 'family="ipv6",protocol="icmpv6"' in everything
    assert 'family="ipv4",protocol="icmpv6"' not in everything
    assert "masqd_conntrack_deleted_total{" not in Metrics(AgentStatus(), backend="nftables", options=V6,
                                                           conntrack="none").render().decode()


# --- in the reconciler ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_reconciler_prunes_after_an_apply_and_a_failure_never_undoes_it(tmp_path):
    from masqd.backends.dryrun import DryRunBackend
    from masqd.reconcile import Reconciler

    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    table = Table(masqueraded(3))
    events: list[AuditEvent] = []
    reconciler = Reconciler(DryRunBackend(conntrack=table), AgentOptions(), config, on_audit=events.append,
                            addresses=no_addresses)
    await reconciler.reconcile()
    assert len(table.entries) == 3  # the first apply: these flows are as the rules say
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n")
    await reconciler.reconcile()
    assert table.entries == [] and events[-1].conntrack_deleted == {"ipv4": {"udp": 3}}
    assert events[-1].as_dict()["conntrack_deleted"] == {"ipv4": {"udp": 3}}

    table.entries = masqueraded(2)
    table.fail = OSError(errno.EPERM, "Operation not permitted")
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    await reconciler.reconcile()
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n")
    await reconciler.reconcile()  # the apply stands; the conntrack step failed and says so
    assert events[-1].result == "applied" and "Operation not permitted" in events[-1].conntrack_error
    assert [str(n) for n in reconciler.status.applied.ipv4.nonmasq] == ["169.254.0.0/16", "10.0.0.0/8",
                                                                        "203.0.113.0/24"]
    table.fail = None
    await reconciler.reconcile()  # nothing changed: the pending work is done on this pass
    assert table.entries == [] and events[-1].result == "unchanged"
    assert events[-1].conntrack_deleted == {"ipv4": {"udp": 2}}


# --- the conntrack tool's listing (masqd without CAP_NET_ADMIN) -----------------------------------


def test_the_tools_listing_is_read_into_the_same_flows():
    from masqd.backends.conntrack.listing import delete_command, parse_listing

    text = (
        "ipv4     2 udp      17 29 src=10.244.1.2 dst=203.0.113.2 sport=40000 dport=53 [UNREPLIED] "
        "src=203.0.113.2 dst=172.30.0.1 sport=53 dport=40000 mark=0 use=1\n"
        "ipv4     2 tcp      6 431999 ESTABLISHED src=10.244.1.2 dst=10.96.0.1 sport=5000 dport=443 "
        "src=10.244.2.7 dst=10.244.1.2 sport=6443 dport=5000 [ASSURED] mark=0 zone=5 use=1\n"
        "ipv4     2 icmp     1 29 src=10.244.1.2 dst=198.51.100.2 type=8 code=0 id=7 src=198.51.100.2 "
        "dst=172.30.0.1 type=0 code=0 id=7 mark=0 use=1\n"
        "ipv6     10 udp      17 29 src=fd00:244::2 dst=2001:db8:1::2 sport=40000 dport=53 "
        "src=2001:db8:1::2 dst=fd00:30::1 sport=53 dport=40000 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.\n")
    flows = parse_listing(text, 4)
    assert [str(f) for f in flows] == [
        "udp 10.244.1.2:40000 -> 203.0.113.2:53 (SNAT to 172.30.0.1)",
        "tcp 10.244.1.2:5000 -> 10.96.0.1:443 (DNAT to 10.244.2.7)",
        "icmp 10.244.1.2 -> 198.51.100.2 (SNAT to 172.30.0.1)"]
    assert [f.zone for f in flows] == [0, 5, 0]
    assert [str(f) for f in parse_listing(text, 6)] == [
        "udp [fd00:244::2]:40000 -> [2001:db8:1::2]:53 (SNAT to fd00:30::1)"]
    assert delete_command(flows[0]) == ["-D", "-f", "ipv4", "-w", "0", "-p", "17", "-s", "10.244.1.2", "-d",
                                        "203.0.113.2", "--sport", "40000", "--dport", "53"]
    assert "--sport" not in delete_command(flows[2])
    with pytest.raises(ValueError, match="line 1"):
        parse_listing("ipv4 2 udp 17 29 src=10.244.1.300 dst=203.0.113.2\n", 4)
