"""Config changes reach live flows (``--conntrack-reconcile``), with real flows through the
kernel: a pod -> node -> dest topology (:mod:`masqd.testing.topology`), ``masqd run`` as a daemon
in the node namespace on each kernel backend, and flows that keep their 5-tuple (one socket, one
source port), so a datagram after a config change belongs to the conntrack entry made before it.

- a UDP flow masqueraded before ``nonMasqueradeCIDRs`` gains its destination reaches the
  destination from the pod's address after the apply, and masqueraded again after the change is
  undone (IPv4 and IPv6, both backends); the write's log line counts what was deleted;
- with ``none`` the same flow stays masqueraded (the kernel's behaviour, and upstream's);
- with ``udp`` a live TCP connection keeps its NAT and goes on working, with ``all`` its entry goes;
- a flow from the node's own address is never touched.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from masqd_proc import MASQD, DaemonProcess

from masqd.testing import netns
from masqd.testing import topology as layout
from masqd.testing.netns import LineReader

pytestmark = pytest.mark.netns

DEST = {4: "203.0.113.2", 6: "2001:db8:1::2"}
POD = {4: layout.POD_V4, 6: layout.POD_V6}
NODE = {4: layout.NODE_V4, 6: layout.NODE_V6}
NODE_POD_SIDE = {4: layout.NODE_POD_SIDE_V4, 6: layout.NODE_POD_SIDE_V6}
BEFORE = "resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8']\n"
AFTER = "resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8', 203.0.113.0/24, '2001:db8::/32']\n"

_SERVER = r"""
import socket, sys, threading
proto, addr, family, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
af = socket.AF_INET6 if family == "6" else socket.AF_INET
if proto == "udp":
    sock = socket.socket(af, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        print("from %s %d %s" % (peer[0], peer[1], data.decode()), flush=True)
server = socket.socket(af, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((addr, port))
server.listen()
print("ready", flush=True)
conn, peer = server.accept()
for line in conn.makefile():
    print("from %s %d %s" % (peer[0], peer[1], line.strip()), flush=True)
print("closed", flush=True)
"""

_CLIENT = r"""
import socket, sys
proto, addr, family, port, source, sport = sys.argv[1:7]
af = socket.AF_INET6 if family == "6" else socket.AF_INET
sock = socket.socket(af, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((source, int(sport)))
if proto == "tcp":
    sock.connect((addr, int(port)))
print("ready", flush=True)
for line in sys.stdin:
    try:
        if proto == "udp":
            sock.sendto(line.strip().encode(), (addr, int(port)))
        else:
            sock.sendall(line.encode())
        print("sent", flush=True)
    except OSError as exc:
        print("error %s" % exc, flush=True)
"""


class LiveFlow:
    """One flow with a fixed 5-tuple: a server in ``dest`` printing the source of what arrives, a
    client in ``ns`` (the pod, or the node) sending a line whenever :meth:`seen` is called."""

    def __init__(self, topo: layout.Topology, protocol: str, family: int, port: int, *, ns: str | None = None,
                 source: str | None = None):
        self.processes: list[tuple[subprocess.Popen, LineReader]] = []
        dest = DEST[family]
        self.server = self._start(topo.dest, _SERVER, protocol, dest, str(family), str(port))
        self.client = self._start(ns or topo.pod, _CLIENT, protocol, dest, str(family), str(port),
                                  source or POD[family], str(port + 1000))
        self.count = 0

    def _start(self, ns: str, script: str, *args: str) -> tuple[subprocess.Popen, LineReader]:
        proc = netns.popen(ns, sys.executable, "-c", script, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
        lines = LineReader(proc.stdout)
        self.processes.append((proc, lines))
        assert lines.readline(netns.COMMAND_TIMEOUT) == "ready", f"{script.split()[1]} did not start"
        return proc, lines

    def seen(self) -> str | None:
        """Send one more line on the flow; the source address the destination saw (``None``: it
        did not arrive within a few seconds)."""
        self.count += 1
        proc, lines = self.client
        proc.stdin.write(f"{self.count}\n".encode())
        proc.stdin.flush()
        assert lines.readline(netns.COMMAND_TIMEOUT) == "sent"
        line = self.server[1].readline(3.0)
        return None if line is None or not line.startswith("from ") else line.split()[1]

    def close(self) -> None:
        for proc, lines in self.processes:
            proc.kill()
            proc.wait(timeout=10)
            lines.close()
            for pipe in (proc.stdin, proc.stdout):
                pipe.close()


@pytest.fixture(scope="module")
def topo():
    with layout.Topology() as built:
        yield built


@pytest.fixture
def flows():
    made: list[LiveFlow] = []
    yield lambda *args, **kwargs: made.append(LiveFlow(*args, **kwargs)) or made[-1]
    for flow in made:
        flow.close()


@pytest.fixture
def start(topo, tmp_path):
    """``start(backend, *flags)``: masqd running in the node namespace on the ``BEFORE`` config,
    its first apply done; its rules removed afterwards."""
    running: list[tuple[DaemonProcess, str]] = []
    config = tmp_path / "config"
    config.write_text(BEFORE)

    def begin(backend: str, *flags: str) -> tuple[DaemonProcess, object]:
        daemon = DaemonProcess(topo.node, config, "--enable-ipv6", "--http-address=", *flags, backend=backend)
        running.append((daemon, backend))
        daemon.next_event(lambda e: e.get("event") == "rules applied")
        return daemon, config

    yield begin
    for daemon, backend in running:
        daemon.kill()
        netns.run(topo.node, str(MASQD), "cleanup", "--backend", backend, "--enable-ipv6", check=False)
    netns.run(topo.node, "conntrack", "-F", check=False)


def _apply(daemon: DaemonProcess, config, text: str) -> dict:
    staged = config.with_name("staged")
    staged.write_text(text)
    staged.replace(config)
    return daemon.next_event(lambda e: e.get("event") == "rules updated")


def _conntrack(ns: str, *args: str) -> str:
    return netns.run(ns, "conntrack", "-L", *args, check=False).stdout


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_live_udp_flow_follows_the_keep_list_there_and_back(topo, start, flows, backend, family):
    daemon, config = start(backend)
    flow = flows(topo, "udp", family, 41000 + family)
    assert flow.seen() == NODE[family]  # masqueraded: 203.0.113.0/24 is not kept yet
    written = _apply(daemon, config, AFTER)
    assert written["conntrack_deleted"] >= 1
    assert flow.seen() == POD[family]  # the same 5-tuple, now kept
    written = _apply(daemon, config, BEFORE)
    assert written["conntrack_deleted"] >= 1
    assert flow.seen() == NODE[family]


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_with_none_a_live_flow_keeps_the_nat_it_started_with(topo, start, flows, backend):
    daemon, config = start(backend, "--conntrack-reconcile=none")
    flow = flows(topo, "udp", 4, 42000)
    assert flow.seen() == NODE[4]
    assert "conntrack_deleted" not in _apply(daemon, config, AFTER)
    assert flow.seen() == NODE[4]  # the stale entry still decides: what --conntrack-reconcile is for


def test_udp_mode_leaves_tcp_connections_and_flows_from_the_node_alone(topo, start, flows):
    daemon, config = start("nftables")
    tcp = flows(topo, "tcp", 4, 43000)
    local = flows(topo, "udp", 4, 43001, ns=topo.node, source=NODE_POD_SIDE[4])
    pod = flows(topo, "udp", 4, 43002)
    assert (tcp.seen(), local.seen(), pod.seen()) == (NODE[4], NODE[4], NODE[4])
    assert _apply(daemon, config, AFTER)["conntrack_deleted"] == 1  # the pod's UDP flow alone
    assert pod.seen() == POD[4]
    assert tcp.seen() == NODE[4]  # the connection goes on with its NAT
    assert f"src={NODE_POD_SIDE[4]}" in _conntrack(topo.node, "-p", "udp", "--dst", DEST[4])
    assert local.seen() == NODE[4]  # a local process's flow: still the NAT it had


def test_all_mode_deletes_a_tcp_connections_stale_entry_too(topo, start, flows):
    daemon, config = start("iptables", "--conntrack-reconcile=all")
    tcp = flows(topo, "tcp", 4, 44000)
    assert tcp.seen() == NODE[4]
    assert f"src={POD[4]}" in _conntrack(topo.node, "-p", "tcp", "--dst", DEST[4])
    written = _apply(daemon, config, AFTER)
    assert written["conntrack_deleted"] == 1
    assert "sport=45000" not in _conntrack(topo.node, "-p", "tcp", "--dst", DEST[4])


def test_the_dry_run_backend_lists_the_flows_it_would_delete_and_deletes_none(topo, start, flows):
    daemon, config = start("dry-run")
    flow = flows(topo, "udp", 4, 45000)
    netns.nft(topo.node, "-f", "-", input="table ip masqtest {\n chain post {\n"
              "  type nat hook postrouting priority srcnat; policy accept;\n  ip daddr 203.0.113.0/24 masquerade\n"
              " }\n}\n")  # dry-run writes nothing: this stands in for the rules the flow was made under
    try:
        assert flow.seen() == NODE[4]
        written = _apply(daemon, config, AFTER)
        [listed] = [e for e in daemon.events if e.get("event") == "dry-run: would delete stale conntrack entries"]
        assert listed["count"] == 1 and listed["flows"][0].startswith(f"udp {POD[4]}:46000 -> {DEST[4]}:45000")
        assert "conntrack_deleted" not in written
        assert "sport=46000" in _conntrack(topo.node, "-p", "udp", "--dst", DEST[4])  # still there
    finally:
        netns.nft(topo.node, "delete", "table", "ip", "masqtest", check=False)
