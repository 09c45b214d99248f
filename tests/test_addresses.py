"""The addresses of masqd's network namespace (:mod:`masqd.sources.addresses`): rtnetlink address
messages parsed from hand-built bytes (and fuzzed: garbage is a ``ValueError``, never anything
else), and against the real kernel, inside throw-away namespaces: the dump lists exactly what is
assigned (the local end of a point-to-point link, not tentative or dadfailed addresses, every
address of a dump that spans many datagrams), and the source reports each address added or
removed, never an IPv6 link-local one, says when events were lost, and closes its socket when
cancelled. The reader and the source act on their own process's namespace, so the kernel tests
run them in a child started with ``ip netns exec``."""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqd.sources import addresses
from masqd.sources.addresses import AddressChange, parse_address_messages
from masqd.testing import netns

#: Seconds a test waits for the child or the kernel before failing (a hang guard, not a timing claim).
WAIT = 20

# The kernel's numbers, written out here rather than taken from the module under test.
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE = 20, 21, 24
NLM_F_MULTI, NLM_F_DUMP_INTR = 0x2, 0x10
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_CACHEINFO, IFA_FLAGS = 1, 2, 3, 6, 8
IFA_F_NODAD, IFA_F_OPTIMISTIC, IFA_F_DADFAILED, IFA_F_TENTATIVE, IFA_F_PERMANENT = 0x02, 0x04, 0x08, 0x40, 0x80
IFA_F_NOPREFIXROUTE = 0x200
AF_MCTP = 45


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --- messages built by hand ---------------------------------------------------------------------


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def nlmsg(kind: int, payload: bytes = b"", flags: int = NLM_F_MULTI, seq: int = 7) -> bytes:
    """struct nlmsghdr + payload, its length unpadded and the padding after it (as the kernel does)."""
    length = 16 + len(payload)
    return struct.pack("=IHHII", length, kind, flags, seq, 0) + payload + _pad(length)


def rtattr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + _pad(length)


def addr_msg(address: str, *, local: str | None = None, kind: int = RTM_NEWADDR, ifindex: int = 3,
             flags: int = IFA_F_PERMANENT, flags_attr: int | None = None, label: bytes | None = None,
             msg_flags: int = NLM_F_MULTI, family: int | None = None) -> bytes:
    """An RTM_NEWADDR / RTM_DELADDR message: ``address`` as IFA_ADDRESS, ``local`` as IFA_LOCAL
    (first, as the kernel orders them), a label, cache info and ``flags_attr`` as IFA_FLAGS."""
    parsed = ip(address)
    family = family if family is not None else (socket.AF_INET if parsed.version == 4 else socket.AF_INET6)
    body = struct.pack("=BBBBI", family, 32 if parsed.version == 4 else 128, flags & 0xFF, 0, ifindex)
    if local is not None:
        body += rtattr(IFA_LOCAL, ip(local).packed)
    body += rtattr(IFA_ADDRESS, parsed.packed)
    if label is not None:
        body += rtattr(IFA_LABEL, label + b"\0")
    body += rtattr(IFA_CACHEINFO, struct.pack("=IIII", 0xFFFFFFFF, 0xFFFFFFFF, 100, 100))
    if flags_attr is not None:
        body += rtattr(IFA_FLAGS, struct.pack("=I", flags_attr))
    return nlmsg(kind, body, msg_flags)


def done(error: int = 0, flags: int = NLM_F_MULTI) -> bytes:
    return nlmsg(NLMSG_DONE, struct.pack("=i", error), flags)


def error_msg(error: int, request: bytes = b"") -> bytes:
    return nlmsg(NLMSG_ERROR, struct.pack("=i", error) + (request or struct.pack("=IHHII", 24, 22, 0x301, 7, 0)), 0)


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("message, expected", [
    pytest.param(addr_msg("192.0.2.10", local="192.0.2.10", label=b"lo"), AddressChange(True, ip("192.0.2.10"), 3, 0x80),
                 id="ipv4-local-and-address"),
    pytest.param(addr_msg("192.0.2.31", local="192.0.2.30"), AddressChange(True, ip("192.0.2.30"), 3, 0x80),
                 id="ipv4-point-to-point-peer-is-not-ours"),
    pytest.param(addr_msg("198.51.100.7"), AddressChange(True, ip("198.51.100.7"), 3, 0x80), id="ipv4-address-only"),
    pytest.param(addr_msg("2001:db8::10", ifindex=1), AddressChange(True, ip("2001:db8::10"), 1, 0x80), id="ipv6"),
    pytest.param(addr_msg("2001:db8::31", local="2001:db8::30"), AddressChange(True, ip("2001:db8::30"), 3, 0x80),
                 id="ipv6-point-to-point-peer-is-not-ours"),
    pytest.param(addr_msg("203.0.113.9", local="203.0.113.9", kind=RTM_DELADDR, ifindex=70000, msg_flags=0),
                 AddressChange(False, ip("203.0.113.9"), 70000, 0x80), id="deleted"),
    pytest.param(addr_msg("2001:db8::10", flags=IFA_F_TENTATIVE, flags_attr=IFA_F_TENTATIVE | IFA_F_NOPREFIXROUTE),
                 AddressChange(True, ip("2001:db8::10"), 3, IFA_F_TENTATIVE | IFA_F_NOPREFIXROUTE),
                 id="ifa-flags-attribute-has-the-high-bits"),
])
def test_one_address_message(message, expected):
    assert parse_address_messages(message) == [expected]


def test_a_dump_buffer_holds_many_messages_and_only_address_messages_count():
    data = (addr_msg("127.0.0.1", local="127.0.0.1", ifindex=1, label=b"lo")
            + nlmsg(RTM_NEWROUTE, b"\x02" * 28)  # not an address: skipped
            + addr_msg("192.0.2.10", local="192.0.2.10", ifindex=1, label=b"lo:vip1")  # label of odd length
            + addr_msg("2001:db8::10", ifindex=1)
            + nlmsg(999, b"")  # unknown type
            + addr_msg("2001:db8::10", ifindex=1, kind=RTM_DELADDR)
            + done())
    assert parse_address_messages(data) == [
        AddressChange(True, ip("127.0.0.1"), 1, 0x80),
        AddressChange(True, ip("192.0.2.10"), 1, 0x80),
        AddressChange(True, ip("2001:db8::10"), 1, 0x80),
        AddressChange(False, ip("2001:db8::10"), 1, 0x80),
    ]


def test_other_families_and_acks_are_skipped():
    mctp = nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", AF_MCTP, 0, 0, 0, 4) + rtattr(IFA_LOCAL, b"\x08"))
    assert parse_address_messages(mctp + error_msg(0) + done() + b"") == []
    assert parse_address_messages(b"") == []


@pytest.mark.parametrize("flags, flags_attr, usable", [
    pytest.param(IFA_F_PERMANENT, None, True, id="permanent"),
    pytest.param(IFA_F_PERMANENT | IFA_F_NODAD, None, True, id="nodad"),
    pytest.param(IFA_F_TENTATIVE, None, False, id="tentative-in-the-header"),
    pytest.param(0, IFA_F_TENTATIVE, False, id="tentative-in-ifa-flags"),
    pytest.param(IFA_F_TENTATIVE, IFA_F_TENTATIVE | IFA_F_OPTIMISTIC, True, id="optimistic-dad"),
    pytest.param(IFA_F_TENTATIVE | IFA_F_DADFAILED, None, False, id="dadfailed"),
    pytest.param(IFA_F_DADFAILED | IFA_F_TENTATIVE | IFA_F_OPTIMISTIC, None, False, id="optimistic-dadfailed"),
])
def test_tentative_and_dadfailed_addresses_are_not_usable(flags, flags_attr, usable):
    (change,) = parse_address_messages(addr_msg("2001:db8::10", flags=flags, flags_attr=flags_attr))
    assert change.usable is usable


@pytest.mark.parametrize("code, exception", [
    pytest.param(-errno.EPERM, PermissionError, id="eperm"),
    pytest.param(-errno.EINVAL, OSError, id="einval"),
    pytest.param(-(2 ** 31), OSError, id="out-of-range-errno"),
])
def test_an_error_message_raises_its_errno(code, exception):
    with pytest.raises(exception) as caught:
        parse_address_messages(addr_msg("192.0.2.10") + error_msg(code))
    assert caught.value.errno == -code
    assert "netlink" in str(caught.value)


def test_a_dump_that_ends_with_an_error_raises_it():
    with pytest.raises(OSError) as caught:
        parse_address_messages(addr_msg("192.0.2.10") + done(-errno.EMSGSIZE))
    assert caught.value.errno == errno.EMSGSIZE


@pytest.mark.parametrize("data, says", [
    pytest.param(b"\x10\0\0", "truncated message header at byte 0", id="short-header"),
    pytest.param(struct.pack("=IHHII", 8, RTM_NEWADDR, 0, 0, 0), "8 bytes long", id="length-below-header"),
    pytest.param(struct.pack("=IHHII", 400, RTM_NEWADDR, 0, 0, 0) + b"\0" * 8, "400 bytes long", id="length-past-end"),
    pytest.param(nlmsg(RTM_NEWADDR, b"\x02\x20\0\0"), "too short for its ifaddrmsg", id="short-ifaddrmsg"),
    pytest.param(nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 1)), "neither IFA_LOCAL",
                 id="no-address"),
    pytest.param(nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 1) + rtattr(IFA_LOCAL, b"\xc0\0\2")),
                 "3 bytes", id="short-address"),
    pytest.param(nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET6, 128, 0, 0, 1)
                       + rtattr(IFA_ADDRESS, ip("192.0.2.1").packed)), "expected 16", id="ipv4-sized-ipv6"),
    pytest.param(nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 1)
                       + struct.pack("=HH", 2, IFA_LOCAL) + b"\0\0\0\0"), "attribute says it is 2", id="attribute-length"),
    pytest.param(nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 1)
                       + rtattr(IFA_LOCAL, b"\xc0\0\2\1") + rtattr(IFA_FLAGS, b"\0\0")), "IFA_FLAGS of 2",
                 id="short-ifa-flags"),
    pytest.param(nlmsg(NLMSG_ERROR, b"\xff\xff"), "too short for its error code", id="short-error"),
])
def test_malformed_input_is_a_value_error_saying_what(data, says):
    with pytest.raises(ValueError, match=says):
        parse_address_messages(data)


def test_every_truncation_of_a_buffer_is_a_value_error_or_its_whole_messages():
    messages = [addr_msg("192.0.2.10", local="192.0.2.10", label=b"lo"), addr_msg("2001:db8::10"),
                addr_msg("203.0.113.9", kind=RTM_DELADDR), done()]
    data = b"".join(messages)
    boundaries = {sum(map(len, messages[:n])): n for n in range(len(messages) + 1)}
    for cut in range(len(data)):
        if cut in boundaries:
            assert len(parse_address_messages(data[:cut])) == min(boundaries[cut], 3)
        else:
            with pytest.raises(ValueError):
                parse_address_messages(data[:cut])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_a_value_error_or_parses(data):
    try:
        parse_address_messages(data)
    except ValueError:
        pass
    except OSError as exc:  # an NLMSG_ERROR / NLMSG_DONE with an error code: the kernel's errno
        assert exc.errno


VALID = (addr_msg("192.0.2.10", local="192.0.2.10", label=b"lo") + addr_msg("2001:db8::31", local="2001:db8::30",
         flags_attr=IFA_F_TENTATIVE) + addr_msg("198.51.100.7", kind=RTM_DELADDR) + done())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_corrupted_messages_are_a_value_error_or_parse(edits):
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    try:
        changes = parse_address_messages(bytes(data))
    except ValueError:
        return
    except OSError as exc:
        assert exc.errno
        return
    assert all(isinstance(change.address, ipaddress.IPv4Address | ipaddress.IPv6Address) for change in changes)


async def test_an_interrupted_dump_is_read_again_and_one_always_interrupted_fails(monkeypatch):
    answers = [([AddressChange(True, ip("192.0.2.1"), 1)], True), ([AddressChange(True, ip("192.0.2.2"), 1)], False)]

    async def dump():
        return answers.pop(0)

    monkeypatch.setattr(addresses, "_dump", dump)
    assert await addresses.local_addresses() == {ip("192.0.2.2")}

    async def always_interrupted():
        return [], True

    monkeypatch.setattr(addresses, "_dump", always_interrupted)
    with pytest.raises(OSError, match="kept changing") as caught:
        await addresses.local_addresses()
    assert caught.value.errno == errno.EBUSY


async def test_a_dump_that_never_completes_is_a_timeout_error(monkeypatch):
    async def stuck():
        await anyio.sleep_forever()

    monkeypatch.setattr(addresses, "_dump", stuck)
    monkeypatch.setattr(addresses, "DUMP_TIMEOUT_SECONDS", 0.05)
    with pytest.raises(TimeoutError, match="no complete answer to the address dump"):
        await addresses.local_addresses()


# --- the kernel, in a namespace of our own ------------------------------------------------------

#: Runs in the namespace: ``list`` prints local_addresses() as JSON; ``watch`` runs AddressSource
#: and prints each reason (``stall``: and blocks on stdin after the reason for 203.0.113.99);
#: ``cancel`` starts and cancels the source and prints the sockets it left open.
CHILD = r"""
import json, os, sys
import anyio, structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from masqd.sources.addresses import AddressSource, local_addresses

def sockets():
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found

async def main(mode):
    if mode == "list":
        print(json.dumps(sorted(str(a) for a in await local_addresses())), flush=True)
    elif mode == "cancel":
        before, listening = sockets(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(AddressSource().run, lambda reason="": listening.set())
            with anyio.fail_after(20):
                await listening.wait()
            during = sockets()
            tg.cancel_scope.cancel()
        print(json.dumps({"opened": len(during - before), "left": sorted(sockets() - before)}), flush=True)
    else:
        def notify(reason=""):
            print("notify:", reason, flush=True)
            if mode == "stall" and reason == "address 203.0.113.99 added":
                sys.stdin.readline()
        await AddressSource().run(notify)

anyio.run(main, sys.argv[1])
"""


@pytest.fixture
def ns(netns_supported) -> Iterator[str]:
    with netns.namespace("addr") as name:
        yield name


@pytest.fixture
def other_ns(netns_supported) -> Iterator[str]:
    with netns.namespace("peer") as name:
        yield name


def listed(ns: str) -> set[str]:
    """local_addresses() as a child in ``ns`` sees it."""
    out = netns.run(ns, sys.executable, "-c", CHILD, "list", timeout=WAIT).stdout
    return set(json.loads(out))


def sh(ns: str, *command: str) -> None:
    netns.run(ns, *command)


def add_many(ns: str, count: int, prefix: str = "10.200") -> list[str]:
    """``count`` /32 addresses on ``lo`` in one ``ip -batch``; returns them."""
    added = [f"{prefix}.{n // 250}.{n % 250 + 1}" for n in range(count)]
    netns.run(ns, "ip", "-batch", "-", input="".join(f"addr add {a}/32 dev lo\n" for a in added), timeout=120)
    return added


@pytest.mark.netns
def test_local_addresses_lists_what_is_assigned(ns):
    assert listed(ns) == {"127.0.0.1", "::1"}
    sh(ns, "ip", "addr", "add", "192.0.2.10/32", "dev", "lo")
    sh(ns, "ip", "-6", "addr", "add", "2001:db8::10/128", "dev", "lo", "nodad")
    assert listed(ns) == {"127.0.0.1", "::1", "192.0.2.10", "2001:db8::10"}
    sh(ns, "ip", "addr", "del", "192.0.2.10/32", "dev", "lo")
    assert listed(ns) == {"127.0.0.1", "::1", "2001:db8::10"}


@pytest.mark.netns
def test_local_addresses_lists_the_local_end_of_a_point_to_point_link_and_not_the_peer(ns):
    sh(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    sh(ns, "ip", "addr", "add", "192.0.2.30", "peer", "192.0.2.31/32", "dev", "v0")
    sh(ns, "ip", "-6", "addr", "add", "2001:db8::30", "peer", "2001:db8::31/128", "dev", "v0", "nodad")
    shown = netns.run(ns, "ip", "addr", "show", "dev", "v0").stdout
    assert "peer 192.0.2.31" in shown and "peer 2001:db8::31" in shown  # the kernel holds them as peers
    assert listed(ns) == {"127.0.0.1", "::1", "192.0.2.30", "2001:db8::30"}


@pytest.mark.netns
def test_local_addresses_leaves_out_tentative_and_dadfailed_addresses(ns, other_ns):
    # tentative for as long as the link is down: duplicate address detection has not started
    sh(ns, "ip", "link", "add", "vdown", "type", "veth", "peer", "name", "vdown1")
    sh(ns, "ip", "-6", "addr", "add", "2001:db8::50/64", "dev", "vdown")
    assert "tentative" in netns.run(ns, "ip", "-6", "addr", "show", "dev", "vdown").stdout
    # dadfailed: the namespace at the other end of the link already has the address
    sh(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", other_ns)
    sh(other_ns, "ip", "-6", "addr", "add", "2001:db8::60/64", "dev", "v1", "nodad")
    sh(other_ns, "ip", "link", "set", "v1", "up")
    sh(ns, "ip", "link", "set", "v0", "up")
    sh(ns, "ip", "-6", "addr", "add", "2001:db8::60/64", "dev", "v0")
    failed = netns.wait_for(lambda: "dadfailed" in netns.run(ns, "ip", "-6", "addr", "show", "dev", "v0").stdout,
                            timeout=WAIT)
    assert failed, netns.run(ns, "ip", "-6", "addr", "show", "dev", "v0").stdout
    assert listed(ns) & {"2001:db8::50", "2001:db8::60"} == set()
    sh(ns, "ip", "-6", "addr", "add", "2001:db8::70/64", "dev", "vdown", "nodad")  # the same link, no DAD
    assert "2001:db8::70" in listed(ns)


@pytest.mark.netns
def test_local_addresses_reads_a_dump_that_spans_many_datagrams(ns):
    added = add_many(ns, 1500)
    assert listed(ns) == {"127.0.0.1", "::1", *added}


class Watch:
    """The child running AddressSource in ``ns``: its reasons read one by one under a deadline;
    killed by :meth:`close`."""

    def __init__(self, ns: str, stderr: Path, mode: str = "watch"):
        self.stderr_path = stderr
        self._stderr = stderr.open("wb")
        self.proc = netns.popen(ns, sys.executable, "-c", CHILD, mode, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=self._stderr)
        self.lines = netns.LineReader(self.proc.stdout)

    def next_reason(self, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            line = self.lines.readline(remaining)
            if line is None:
                break
            if line.startswith("notify: "):
                return line.removeprefix("notify: ")
        pytest.fail(f"no reason from AddressSource within {timeout} s (exit code {self.proc.poll()}); "
                    f"stderr: {self.stderr_path.read_text()[-2000:]}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=WAIT)
        self.lines.close()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        self._stderr.close()


@pytest.fixture
def watch(ns, tmp_path) -> Iterator[Watch]:
    child = Watch(ns, tmp_path / "stderr")
    try:
        assert child.next_reason() == "listening for address changes"
        yield child
    finally:
        child.close()


@pytest.mark.netns
def test_the_source_reports_each_address_added_or_removed(ns, watch):
    sh(ns, "ip", "addr", "add", "192.0.2.10/32", "dev", "lo")
    assert watch.next_reason() == "address 192.0.2.10 added"
    sh(ns, "ip", "-6", "addr", "add", "2001:db8::10/128", "dev", "lo", "nodad")
    assert watch.next_reason() == "address 2001:db8::10 added"
    sh(ns, "ip", "addr", "del", "192.0.2.10/32", "dev", "lo")
    assert watch.next_reason() == "address 192.0.2.10 removed"
    sh(ns, "ip", "link", "add", "vdown", "type", "veth", "peer", "name", "vdown1")
    sh(ns, "ip", "-6", "addr", "add", "2001:db8::50/64", "dev", "vdown")
    assert watch.next_reason() == "address 2001:db8::50 added (tentative)"
    sh(ns, "ip", "-6", "addr", "del", "2001:db8::10/128", "dev", "lo")
    assert watch.next_reason() == "address 2001:db8::10 removed"


@pytest.mark.netns
def test_the_source_says_nothing_of_ipv6_link_local_addresses(ns, watch):
    # a link coming up adds a link-local address on each end (tentative, then again when DAD ends)
    sh(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    sh(ns, "ip", "link", "set", "v0", "up")
    sh(ns, "ip", "link", "set", "v1", "up")
    sh(ns, "ip", "-6", "addr", "add", "fe80::10/64", "dev", "v0", "nodad")
    sh(ns, "ip", "-6", "addr", "del", "fe80::10/64", "dev", "v0")

    def settled() -> bool:
        shown = netns.run(ns, "ip", "-6", "addr", "show", "scope", "link").stdout
        return shown.count("inet6 fe80::") == 2 and "tentative" not in shown

    assert netns.wait_for(settled, timeout=WAIT), netns.run(ns, "ip", "-6", "addr", "show").stdout
    sh(ns, "ip", "addr", "add", "198.51.100.7/32", "dev", "lo")
    assert watch.next_reason() == "address 198.51.100.7 added"  # the first reason since it listened


@pytest.mark.netns
def test_the_source_says_when_events_were_lost_and_goes_on(ns, tmp_path):
    # the child stops reading after the sentinel; more changes than its receive buffer holds follow
    buffer = 2 * min(int(Path("/proc/sys/net/core/rmem_max").read_text()), addresses.SUBSCRIPTION_BUFFER_BYTES)
    child = Watch(ns, tmp_path / "stderr", mode="stall")
    try:
        assert child.next_reason() == "listening for address changes"
        sh(ns, "ip", "addr", "add", "203.0.113.99/32", "dev", "lo")
        assert child.next_reason() == "address 203.0.113.99 added"
        add_many(ns, max(2000, buffer // 256))
        child.proc.stdin.write(b"go\n")
        child.proc.stdin.flush()
        assert child.next_reason() == "address events lost"
        # what was queued was stale and is gone: the next change is reported, and next
        sh(ns, "ip", "addr", "del", "203.0.113.99/32", "dev", "lo")
        assert child.next_reason() == "address 203.0.113.99 removed"
    finally:
        child.close()


@pytest.mark.netns
def test_the_source_closes_its_socket_when_cancelled(ns):
    result = json.loads(netns.run(ns, sys.executable, "-c", CHILD, "cancel", timeout=WAIT).stdout)
    assert result == {"opened": 1, "left": []}
