"""The pod -> node -> destination topology of the kernel-facing tests and benchmarks: three
network namespaces joined by veth pairs (:class:`Topology`), and sending real datagrams through
the node to see which source address the destination receives. Built and removed with the
helpers of :mod:`masqd.testing.netns`; no pytest here.

Contents: :class:`Topology`: pod -> node -> dest, and :meth:`Topology.source_seen` to send through it
  (:meth:`Topology.sources_seen` for many datagrams at once, from chosen pod sources); more
  addresses with :meth:`Topology.add_destination`, :meth:`Topology.add_pod_address`,
  :meth:`Topology.add_node_address`.

Topology shape (addresses are the ones the tests assert on)::

    pod (eth0)                     node (vpod | vdst)                      dest (eth0, lo)
    10.244.1.2/24   <-- veth -->   10.244.1.1/24  |  172.30.0.1/24  <-- veth -->  172.30.0.2/24
    fd00:244::2/64                 fd00:244::1/64 |  fd00:30::1/64                fd00:30::2/64
                                   forwarding on (v4 + v6)                    lo: the destinations

The node routes every destination prefix to the dest namespace; pod and dest use the node as
their default gateway. A masqueraded packet therefore arrives at dest from 172.30.0.1 /
fd00:30::1 (the node's address on the dest-facing link), a kept one from the pod's address.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import secrets
import subprocess
import sys
import time

#: Seconds any single helper command may take before it is treated as hung.

from masqd.testing.netns import (COMMAND_TIMEOUT, CommandError, LineReader, create_namespace, delete_namespace, run,
                                  wait_for)

POD_V4, POD_V6 = "10.244.1.2", "fd00:244::2"
NODE_POD_SIDE_V4, NODE_POD_SIDE_V6 = "10.244.1.1", "fd00:244::1"
NODE_V4, NODE_V6 = "172.30.0.1", "fd00:30::1"  # the node's address towards dest: the masquerade source
DEST_LINK_V4, DEST_LINK_V6 = "172.30.0.2", "fd00:30::2"

#: Destination addresses owned by the dest namespace (on its loopback).
DEST_V4 = ("192.0.2.2", "198.51.100.2", "203.0.113.2", "10.99.0.2")
DEST_V6 = ("2001:db8:1::2", "2001:db8:2::2")
#: What the node routes to dest for them.
DEST_ROUTES_V4 = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "10.99.0.0/24")
DEST_ROUTES_V6 = ("2001:db8::/32",)


_RECEIVER = r"""
import socket, sys
addr, family, port, timeout, token = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5].encode()
sock = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((addr, port))
sock.settimeout(timeout)
print("ready", flush=True)
while True:
    try:
        data, peer = sock.recvfrom(2048)
    except socket.timeout:
        print("timeout", flush=True)
        sys.exit(1)
    if data == token:
        print("from %s %d" % (peer[0], peer[1]), flush=True)
        sys.exit(0)
"""

_SENDER = r"""
import socket, sys
addr, family, port, token = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
sock = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_DGRAM)
if len(sys.argv) > 5:
    sock.bind((sys.argv[5], 0))
sock.sendto(token, (addr, port))
"""


_BATCH_RECEIVER = r"""
import json, selectors, socket, sys
timeout, probes = float(sys.argv[1]), json.loads(sys.argv[2])
selector = selectors.DefaultSelector()
for addr, family, port, token in probes:
    sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ, token.encode())
print("ready", flush=True)
waiting = {token.encode() for *_, token in probes}
while waiting:
    events = selector.select(timeout)
    if not events:
        print("timeout", flush=True)
        sys.exit(1)
    for key, _ in events:
        data, peer = key.fileobj.recvfrom(2048)
        if data == key.data and data in waiting:
            waiting.discard(data)
            print("%s from %s %d" % (data.decode(), peer[0], peer[1]), flush=True)
"""

_BATCH_SENDER = r"""
import json, socket, sys
for addr, family, port, token, source in json.loads(sys.argv[1]):
    sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    if source is not None:
        sock.bind((source, 0))
    sock.sendto(token.encode(), (addr, port))
    sock.close()
"""


class Topology:
    """Three namespaces, pod -> node -> dest, wired as the module docstring shows.

    Use as a context manager or call :meth:`close`; a failure half-way through construction
    deletes whatever was already created.
    """

    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.pod = f"mq-{suffix}-pod"
        self.node = f"mq-{suffix}-node"
        self.dest = f"mq-{suffix}-dest"
        self._ports = itertools.count(40000)
        self._extra_destinations: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.pod, self.node, self.dest)

    def close(self) -> None:
        for name in self.namespaces:
            delete_namespace(name)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _build(self) -> None:
        for name in self.namespaces:
            create_namespace(name)
        # veth pairs are created inside a test namespace, the peer moved straight into another:
        # no interface ever appears in the root namespace.
        run(self.pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "vpod", "netns", self.node)
        run(self.node, "ip", "link", "add", "vdst", "type", "veth", "peer", "name", "eth0", "netns", self.dest)
        run(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        for ns, link in self._links():
            # no duplicate address detection: link-local and global v6 addresses usable at once
            run(ns, "sysctl", "-qw", f"net.ipv6.conf.{link}.accept_dad=0")
        for ns, link in self._links():
            run(ns, "ip", "link", "set", link, "up")  # early: the carrier comes up while we configure
        self._address(self.pod, "eth0", f"{POD_V4}/24", f"{POD_V6}/64")
        self._address(self.node, "vpod", f"{NODE_POD_SIDE_V4}/24", f"{NODE_POD_SIDE_V6}/64")
        self._address(self.node, "vdst", f"{NODE_V4}/24", f"{NODE_V6}/64")
        self._address(self.dest, "eth0", f"{DEST_LINK_V4}/24", f"{DEST_LINK_V6}/64")
        for addr in DEST_V4:
            run(self.dest, "ip", "addr", "add", f"{addr}/32", "dev", "lo")
        for addr in DEST_V6:
            run(self.dest, "ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
        run(self.pod, "ip", "route", "add", "default", "via", NODE_POD_SIDE_V4)
        run(self.pod, "ip", "-6", "route", "add", "default", "via", NODE_POD_SIDE_V6)
        for prefix in DEST_ROUTES_V4:
            run(self.node, "ip", "route", "add", prefix, "via", DEST_LINK_V4)
        for prefix in DEST_ROUTES_V6:
            run(self.node, "ip", "-6", "route", "add", prefix, "via", DEST_LINK_V6)
        run(self.dest, "ip", "route", "add", "default", "via", NODE_V4)
        run(self.dest, "ip", "-6", "route", "add", "default", "via", NODE_V6)
        self._wait_operational()

    def _links(self) -> tuple[tuple[str, str], ...]:
        return ((self.pod, "eth0"), (self.node, "vpod"), (self.node, "vdst"), (self.dest, "eth0"))

    def _wait_operational(self, timeout: float = 10.0) -> None:
        """Wait until every veth is operationally up and has a usable IPv6 link-local address.

        The kernel reports a veth's carrier through linkwatch, which is rate-limited (up to a
        second, shared by all namespaces); until then IPv6 has no link-local address on it and
        the first neighbour solicitation is lost, delaying the first IPv6 packet by a second.
        """
        def ready() -> bool:
            for ns, link in self._links():
                state = run(ns, "ip", "-o", "link", "show", "dev", link).stdout
                if "state UP" not in state or "NO-CARRIER" in state:
                    return False
                addrs = run(ns, "ip", "-o", "-6", "addr", "show", "dev", link).stdout
                if "scope link" not in addrs or "tentative" in addrs:
                    return False
            return True

        if not wait_for(ready, timeout):
            raise CommandError(f"veth links of {self.namespaces} not operational after {timeout} s")

    def add_destination(self, address: str, route: str | None = None) -> None:
        """Give the dest namespace one more address (on its loopback; IPv4 or IPv6) and, when
        ``route`` is given, route that prefix to it from the node (``None``: a route the node
        already has covers the address, e.g. 203.0.113.100), so :meth:`datagram_seen` may send
        to it (e.g. a link-local address)."""
        if ":" in address:
            run(self.dest, "ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
            if route is not None:
                run(self.node, "ip", "-6", "route", "add", route, "via", DEST_LINK_V6)
        else:
            run(self.dest, "ip", "addr", "add", f"{address}/32", "dev", "lo")
            if route is not None:
                run(self.node, "ip", "route", "add", route, "via", DEST_LINK_V4)
        self._extra_destinations.append(address)

    def add_pod_address(self, address: str, prefixlen: int | None = None) -> None:
        """Give the pod one more source address on its ``eth0`` (IPv6 without duplicate address
        detection), to send from with ``datagram_seen(..., source=address)``.

        ``prefixlen`` ``None``: the pod link's own prefix (/24, /64), for an address on that link
        (e.g. 10.244.1.3). Otherwise the address is outside the link's prefix (e.g. 10.245.0.3 with
        32) and the node routes it to the pod, so the node's reverse-path filter accepts what the
        pod sends from it. An IPv6 address on the link may become what the pod sends from when it
        binds none; pass ``source=`` to choose."""
        v6 = ":" in address
        link_prefix = 64 if v6 else 24
        family_flag = ["-6"] if v6 else []
        run(self.pod, "ip", *family_flag, "addr", "add", f"{address}/{prefixlen or link_prefix}", "dev", "eth0",
            *(["nodad"] if v6 else []))
        if prefixlen is not None:
            pod = POD_V6 if v6 else POD_V4
            net = ipaddress.ip_network(f"{address}/{prefixlen}", strict=False)
            run(self.node, "ip", *family_flag, "route", "add", str(net), "via", pod)

    def add_node_address(self, address: str, link: str = "vdst") -> None:
        """Give the node one more address on ``link`` (default ``vdst``, the dest-facing link),
        with that link's prefix (/24, /64; IPv6 without duplicate address detection), e.g. a
        second address to SNAT to.

        An IPv6 address added later is preferred by the kernel's source address selection, so
        MASQUERADE towards dest may then pick it rather than :data:`NODE_V6`."""
        v6 = ":" in address
        if v6:
            run(self.node, "ip", "-6", "addr", "add", f"{address}/64", "dev", link, "nodad")
        else:
            run(self.node, "ip", "addr", "add", f"{address}/24", "dev", link)

    @staticmethod
    def _address(ns: str, link: str, v4: str, v6: str) -> None:
        run(ns, "ip", "addr", "add", v4, "dev", link)
        run(ns, "ip", "-6", "addr", "add", v6, "dev", link, "nodad")

    def source_seen(self, dest_addr: str, family: int | None = None, *, source: str | None = None,
                    port: int | None = None) -> str | None:
        """Send one UDP datagram from the pod to ``dest_addr`` and return the source address the
        receiver in the dest namespace saw (``None`` if nothing arrived). ``source``: the pod
        address to send from (bound before sending; ``None``: the kernel chooses). ``port``: as
        for :meth:`datagram_seen`."""
        seen = self.datagram_seen(dest_addr, family, source=source, port=port)
        return None if seen is None else seen[0]

    def datagram_seen(self, dest_addr: str, family: int | None = None, *, attempts: int = 3,
                      source: str | None = None, port: int | None = None) -> tuple[str, int] | None:
        """Like :meth:`source_seen`, but returns ``(source address, source port)``.

        Every call uses a fresh destination port, so a conntrack entry left by an earlier call
        (created before the rules changed) can never decide this packet's fate. The datagram is
        re-sent (from a new socket) up to ``attempts`` times if it does not arrive promptly.
        ``port``: this destination port instead (e.g. a Service port that a DNAT rule matches);
        each datagram still comes from a new socket, so from a new source port and connection.
        """
        if family is None:
            family = 6 if ":" in dest_addr else 4
        self._check_owned(dest_addr, family)
        port = str(next(self._ports) if port is None else port)
        token = secrets.token_hex(8)
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", self.dest, sys.executable, "-c", _RECEIVER, dest_addr, str(family), port,
             str(COMMAND_TIMEOUT), token],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        lines = LineReader(receiver.stdout)
        try:
            ready = lines.readline(COMMAND_TIMEOUT)
            if ready != "ready":
                raise CommandError(f"UDP receiver on {dest_addr} in {self.dest} did not start: {ready!r}")
            for _ in range(attempts):
                run(self.pod, sys.executable, "-c", _SENDER, dest_addr, str(family), port, token,
                    *([source] if source is not None else []))
                line = lines.readline(2.0)
                if line is not None:
                    if not line.startswith("from "):
                        return None
                    source, source_port = line.split()[1:]
                    return source, int(source_port)
            return None
        finally:
            _stop(receiver, lines)


    def sources_seen(self, probes, *, attempts: int = 3) -> dict[tuple[str | None, str], tuple[str, int] | None]:
        """Many :meth:`datagram_seen` at once, with two processes in all instead of two per datagram.

        ``probes``: ``(source, destination)`` pairs, ``source`` the pod address to send from
        (``None``: the kernel chooses); each pair is sent once, to a fresh destination port. Returns
        ``{(source, destination): (source address, source port) the receiver saw, or None}``.
        Datagrams that have not arrived within two seconds are re-sent (from new sockets), up to
        ``attempts`` times in all."""
        pairs = list(dict.fromkeys(probes))
        planned = {}
        for source, dest in pairs:
            family = 6 if ":" in dest else 4
            self._check_owned(dest, family)
            planned[secrets.token_hex(8)] = (source, dest, family, next(self._ports))
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", self.dest, sys.executable, "-c", _BATCH_RECEIVER, str(COMMAND_TIMEOUT),
             json.dumps([[dest, family, port, token] for token, (_, dest, family, port) in planned.items()])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        lines = LineReader(receiver.stdout)
        seen: dict[str, tuple[str, int]] = {}
        try:
            ready = lines.readline(COMMAND_TIMEOUT)
            if ready != "ready":
                raise CommandError(f"UDP receiver in {self.dest} did not start: {ready!r}")
            for _ in range(attempts):
                missing = [[dest, family, port, token, source]
                           for token, (source, dest, family, port) in planned.items() if token not in seen]
                if not missing:
                    break
                run(self.pod, sys.executable, "-c", _BATCH_SENDER, json.dumps(missing))
                deadline = time.monotonic() + 2.0
                while len(seen) < len(planned) and (remaining := deadline - time.monotonic()) > 0:
                    line = lines.readline(remaining)
                    if line is None or " from " not in line:
                        break
                    token, _, address, port = line.split()
                    seen[token] = (address, int(port))
        finally:
            _stop(receiver, lines)
        return {(source, dest): seen.get(token) for token, (source, dest, _, _) in planned.items()}

    def _check_owned(self, dest_addr: str, family: int) -> None:
        extra = tuple(a for a in self._extra_destinations if (":" in a) == (family == 6))
        owned = (*(DEST_V4 if family == 4 else DEST_V6), *extra)
        if dest_addr not in owned:
            raise ValueError(f"{dest_addr} is not owned by the dest namespace; use one of {owned}")


def _stop(receiver, lines: LineReader) -> None:
    """Kill and reap a receiver started in the dest namespace, and close what reads it."""
    receiver.kill()
    receiver.wait(timeout=COMMAND_TIMEOUT)
    receiver.stdout.close()
    receiver.stderr.close()
    lines.close()
