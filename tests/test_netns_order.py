"""masqd's rules in a fixed order beside kube-proxy's (issue 17, part 2), against the real kernel.

In a pod -> node -> dest topology (:mod:`masqd.testing.topology`) the node holds kube-proxy's
rules as kube-proxy writes them (:mod:`masqd.testing.kube_proxy`): one UDP Service whose
external IP is a destination address, so a datagram from the pod to it is marked 0x4000 (an
external destination is always masqueraded) and DNATed to that same address and port. masqd's
config SNATs to a second node address (``snatToAddress``), so the source the destination sees
tells who decided: the node's own address is kube-proxy's MASQUERADE, the second address is
masqd's rule. A test-owned filter chain after every nat chain (postrouting priority 300) counts
the datagrams that still carry the mark: kube-proxy clears it in the chain that masquerades.

- nftables backend: kube-proxy's ``nat-postrouting`` chain hooks at ``srcnat``; masqd's chain at
  ``srcnat + 10`` by default runs after it whichever table was created last (at equal priorities
  the kernel runs the chain registered last first: the control case shows masqd at ``srcnat``,
  created after kube-proxy's table, taking kube-proxy's traffic). ``--nftables-priority`` moves
  the chain, and a chain found at another priority is rewritten.
- iptables backend: ``--postrouting-jump=append`` (the default) leaves masqd's jump after
  kube-proxy's ``KUBE-POSTROUTING`` jump, ``insert`` puts it first; a jump found in the other place
  is moved, never duplicated.
"""

from __future__ import annotations

import json

import pytest

from masqd_proc import MASQD, log_events, writes_logged

from masqd.testing import kube_proxy as kp
from masqd.testing import netns
from masqd.testing import topology as layout
from masqd.testing.netns import CHAIN, nft

pytestmark = pytest.mark.netns

SNAT_V4 = "172.30.0.5"  # a second node address on the dest-facing link: masqd's SNAT target
DEST = "192.0.2.2"  # a destination masqd masquerades (not in the default keep list)
PORT = 30053
SERVICE = kp.Service("default", "edge", "10.96.0.53", PORT, "dns", "udp", external_ips=(DEST,),
                     endpoints=(kp.Endpoint(DEST, PORT),))
CONFIG = f"snatToAddress: {SNAT_V4}\n"
KUBE_JUMP = f'-A POSTROUTING -m comment --comment "{kp.POSTROUTING_COMMENT}" -j KUBE-POSTROUTING'
#: Counts, after every nat chain, the datagrams to the Service port and those still marked.
MARK_CHECK = f"""\
table ip mqmark {{
\tchain post {{
\t\ttype filter hook postrouting priority 300; policy accept;
\t\tudp dport {PORT} counter
\t\tudp dport {PORT} meta mark & {kp.MASQ_MARK} == {kp.MASQ_MARK} counter
\t}}
}}
"""


@pytest.fixture
def node(topology):
    """The topology, its node holding a second address and the mark-counting chain."""
    topology.add_node_address(SNAT_V4)
    nft(topology.node, "-f", "-", input=MARK_CHECK)
    return topology


def counters(ns: str) -> tuple[int, int]:
    """(datagrams to the Service port, those of them still marked 0x4000) after the nat chains."""
    doc = json.loads(nft(ns, "--json", "list", "table", "ip", "mqmark").stdout)
    counts = [item["counter"]["packets"] for entry in doc["nftables"] if "rule" in entry
              for item in entry["rule"]["expr"] if "counter" in item]
    assert len(counts) == 2, doc
    return counts[0], counts[1]


def through_service(topology) -> str | None:
    """The source the destination saw for one datagram the Service's rules mark and DNAT."""
    return topology.source_seen(DEST, port=PORT)


def chain_line(ns: str, table: str, chain: str) -> str:
    """The ``type ... hook ... priority ...;`` line of an nft base chain, as ``nft list`` prints it."""
    listing = nft(ns, "list", "chain", "ip", table, chain).stdout
    (line,) = [line.strip() for line in listing.splitlines() if line.strip().startswith("type ")]
    return line


def postrouting(ns: str) -> list[str]:
    save = netns.iptables_save(ns, 4)
    return [line for line in save.splitlines() if line.startswith("-A POSTROUTING ")]


def written(result) -> list[str]:
    return [reason for event in writes_logged(result.stderr) for reason in event.get("reason", [])]


# --- nftables ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_proxy_last", [pytest.param(False, id="masqd-table-created-last"),
                                             pytest.param(True, id="kube-proxy-table-created-last")])
def test_kube_proxy_masquerades_its_marked_traffic_whichever_table_is_created_last(node, masqd, kube_proxy_last):
    ns = node.node
    if kube_proxy_last:
        masqd.ok(ns, config=CONFIG, backend="nftables")
        kp.load_nft(ns, [SERVICE], 4)
    else:
        kp.load_nft(ns, [SERVICE], 4)
        masqd.ok(ns, config=CONFIG, backend="nftables")
    assert chain_line(ns, "masqd", "nat") == "type nat hook postrouting priority srcnat + 10; policy accept;"
    assert chain_line(ns, "kube-proxy", "nat-postrouting") == "type nat hook postrouting priority srcnat; policy accept;"

    assert through_service(node) == layout.NODE_V4  # kube-proxy's MASQUERADE, not masqd's SNAT
    total, marked = counters(ns)
    assert total >= 1 and marked == 0  # kube-proxy's masquerading chain ran and cleared its mark
    # what kube-proxy leaves alone is still masqd's to decide
    assert node.source_seen(DEST) == SNAT_V4
    assert node.source_seen("198.51.100.2") == SNAT_V4


@pytest.mark.parametrize(("kube_proxy_last", "expected", "marked"), [
    pytest.param(False, SNAT_V4, True, id="masqd-table-created-last-runs-first"),
    pytest.param(True, layout.NODE_V4, False, id="kube-proxy-table-created-last-runs-first"),
])
def test_at_srcnat_the_table_created_last_decides(node, masqd, kube_proxy_last, expected, marked):
    """The problem the default priority solves: at kube-proxy's own priority the order depends on
    which table was created last, and masqd created last masquerades kube-proxy's traffic itself
    (kube-proxy's chain never runs for it, so its mark stays)."""
    ns = node.node
    steps = [lambda: masqd.ok(ns, "--nftables-priority=srcnat", config=CONFIG, backend="nftables"),
             lambda: kp.load_nft(ns, [SERVICE], 4)]
    for step in steps if kube_proxy_last else steps[::-1]:
        step()
    assert chain_line(ns, "masqd", "nat") == "type nat hook postrouting priority srcnat; policy accept;"
    assert through_service(node) == expected
    total, still_marked = counters(ns)
    assert total >= 1 and (still_marked > 0) == marked


def test_priority_flag_moves_the_chain_and_a_chain_at_another_priority_is_rewritten(node, masqd):
    ns = node.node
    kp.load_nft(ns, [SERVICE], 4)
    masqd.ok(ns, config=CONFIG, backend="nftables")
    assert nft_prio(ns) == 110

    moved = masqd.ok(ns, "--nftables-priority", "srcnat - 5", config=CONFIG, backend="nftables")
    assert written(moved) == ["table ip masqd: chain priority (110, masqd writes 95) differ"], moved.stderr
    assert chain_line(ns, "masqd", "nat") == "type nat hook postrouting priority srcnat - 5; policy accept;"
    assert nft_prio(ns) == 95
    # before kube-proxy's chain now (the user's choice): masqd's SNAT takes the marked traffic
    assert through_service(node) == SNAT_V4
    assert writes_logged(masqd.ok(ns, "--nftables-priority=95", config=CONFIG, backend="nftables").stderr) == []

    # someone re-creates masqd's chain at kube-proxy's priority: the next pass puts it back
    nft(ns, "-f", "-", input="flush chain ip masqd nat\ndelete chain ip masqd nat\n"
                             "add chain ip masqd nat { type nat hook postrouting priority srcnat ; }\n")
    repaired = masqd.ok(ns, config=CONFIG, backend="nftables")
    assert written(repaired) == ["table ip masqd: chain priority (100, masqd writes 110), rules differ"], \
        repaired.stderr
    assert nft_prio(ns) == 110
    netns.run(ns, "conntrack", "-F", check=False)  # the Service's flows start anew
    assert through_service(node) == layout.NODE_V4
    assert writes_logged(masqd.ok(ns, config=CONFIG, backend="nftables").stderr) == []


def nft_prio(ns: str) -> int:
    (chain,) = [entry["chain"] for entry in netns.nft_table(ns, 4)["nftables"] if "chain" in entry]
    return chain["prio"]


def test_daemon_restores_the_configured_priority(node_ns, daemon):
    kp.load_nft(node_ns, [SERVICE], 4)
    d = daemon("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "--nftables-priority=srcnat + 20", backend="nftables")
    assert chain_line(node_ns, "masqd", "nat") == "type nat hook postrouting priority 120; policy accept;"
    nft(node_ns, "-f", "-", input="flush chain ip masqd nat\ndelete chain ip masqd nat\n"
                                  "add chain ip masqd nat { type nat hook postrouting priority srcnat ; }\n")
    restored = d.next_event(lambda e: e.get("event") == "rules restored after outside change")
    assert restored["written"] == ["ipv4"]
    assert "chain priority (100, masqd writes 120)" in restored["reason"][0]
    assert chain_line(node_ns, "masqd", "nat") == "type nat hook postrouting priority 120; policy accept;"
    assert d.stop() == 0


def test_a_priority_the_kernel_would_refuse_is_a_usage_error(node_ns, masqd):
    result = masqd(node_ns, "--nftables-priority=-200", config=CONFIG, backend="nftables")
    assert result.returncode == 2
    assert "--nftables-priority: '-200'" in result.stderr and "from -199" in result.stderr, result.stderr
    assert netns.nft_table(node_ns, 4) is None


# --- iptables ----------------------------------------------------------------------------------------


def masqd_jump() -> str:
    return netns.jump_rule(CHAIN)


@pytest.mark.parametrize(("flags", "order", "expected", "marked"), [
    pytest.param((), "kube-first", layout.NODE_V4, False, id="default-append"),
    pytest.param(("--postrouting-jump=append",), "kube-first", layout.NODE_V4, False, id="append"),
    pytest.param(("--postrouting-jump", "insert"), "masqd-first", SNAT_V4, True, id="insert"),
])
def test_postrouting_jump_beside_kube_postrouting(node, masqd, flags, order, expected, marked):
    ns = node.node
    kp.load_iptables(ns, [SERVICE], 4)
    first = masqd.ok(ns, *flags, config=CONFIG)
    assert postrouting(ns) == ([KUBE_JUMP, masqd_jump()] if order == "kube-first" else [masqd_jump(), KUBE_JUMP])
    assert through_service(node) == expected
    total, still_marked = counters(ns)
    assert total >= 1 and (still_marked > 0) == marked
    assert node.source_seen("198.51.100.2") == SNAT_V4
    assert writes_logged(first.stderr)
    assert writes_logged(masqd.ok(ns, *flags, config=CONFIG).stderr) == []  # in sync: nothing written


@pytest.mark.parametrize(("before", "after", "reason"), [
    pytest.param("insert", "append", "POSTROUTING jump comes before the one to KUBE-POSTROUTING "
                                     "(--postrouting-jump=append)", id="insert-then-append"),
    pytest.param("append", "insert", "POSTROUTING jump is not the first rule (--postrouting-jump=insert)",
                 id="append-then-insert"),
])
def test_a_jump_in_the_other_place_is_moved_not_duplicated(node, masqd, before, after, reason):
    ns = node.node
    kp.load_iptables(ns, [SERVICE], 4)
    masqd.ok(ns, f"--postrouting-jump={before}", config=CONFIG)
    chain_before = netns.chain_lines(ns)
    moved = masqd.ok(ns, f"--postrouting-jump={after}", config=CONFIG)
    assert written(moved) == [reason], moved.stderr
    assert postrouting(ns) == ([KUBE_JUMP, masqd_jump()] if after == "append" else [masqd_jump(), KUBE_JUMP])
    assert netns.jumps(ns) == 1
    assert netns.chain_lines(ns) == chain_before
    netns.run(ns, "conntrack", "-F", check=False)
    assert through_service(node) == (layout.NODE_V4 if after == "append" else SNAT_V4)
    assert writes_logged(masqd.ok(ns, f"--postrouting-jump={after}", config=CONFIG).stderr) == []


def test_insert_takes_the_first_place_back_after_kube_proxy_prepends(node, masqd):
    """kube-proxy inserts its jump first when it is missing (a node's first start, after a flush):
    with ``insert`` the next pass moves masqd's back in front; with ``append`` that order is the
    one wanted, and nothing is written."""
    ns = node.node
    masqd.ok(ns, "--postrouting-jump=insert", config=CONFIG)
    kp.load_iptables(ns, [SERVICE], 4)
    assert postrouting(ns) == [KUBE_JUMP, masqd_jump()]
    assert writes_logged(masqd.ok(ns, config=CONFIG).stderr) == []  # append: in place already
    again = masqd.ok(ns, "--postrouting-jump=insert", config=CONFIG)
    assert written(again) == ["POSTROUTING jump is not the first rule (--postrouting-jump=insert)"], again.stderr
    assert postrouting(ns) == [masqd_jump(), KUBE_JUMP]


def test_explain_live_names_a_misplaced_jump(node, masqd):
    ns = node.node
    kp.load_iptables(ns, [SERVICE], 4)
    masqd.ok(ns, "--postrouting-jump=insert", config=CONFIG)
    result = netns.run(ns, str(MASQD), "explain", "--live", DEST, "--config", str(masqd.config_path),
                       check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "POSTROUTING jump comes before the one to KUBE-POSTROUTING" in result.stdout, result.stdout
    assert [e for e in log_events(result.stderr) if e.get("level") == "error"] == []
