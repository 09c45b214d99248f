"""The conntrack table of masqd's network namespace, read and pruned over ctnetlink.

:class:`ConntrackTable` dumps one family's entries and deletes chosen ones, over a
``NETLINK_NETFILTER`` socket awaited on the event loop (no thread, no ``conntrack`` process per
entry: a thousand deletes are a few datagrams). A dump is handed over datagram by datagram, so
its reader may stop early (a deadline) and still use what it read. Both need ``CAP_NET_ADMIN`` in the namespace;
without it the kernel answers ``EPERM``, raised as ``OSError``. The messages themselves are :mod:`.messages` (pure).

The dry-run backend's table is :class:`ConntrackTable` with ``read_only=True``: it lists what it
would delete and deletes nothing.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel
import structlog

from masqd.backends.conntrack.messages import Deleted, delete_requests, dump_request, parse_dump
from masqd.flows import Flow
from masqd.netlink import NETLINK_CAP_ACK, NETLINK_NETFILTER, SOL_NETLINK, acknowledgements, describe_errno, receive

log = structlog.get_logger("masqd.conntrack")

#: Bytes received at once: more than the kernel puts in one datagram of a dump.
RECEIVE_BYTES = 256 * 1024
#: Deletes sent in one datagram before their acknowledgements are read (each ack queued costs
#: the receive buffer about a kilobyte of the kernel's accounting).
DELETES_PER_DATAGRAM = 64


class ConntrackTable:
    """This network namespace's conntrack entries. ``read_only``: :meth:`delete` deletes nothing
    (the dry-run backend's), and says so in :attr:`read_only`.

    When the kernel refuses the ctnetlink dump (``EPERM``: masqd runs without CAP_NET_ADMIN, as
    the container image does), the table uses the ``conntrack`` tool from then on
    (:class:`.tool.ConntrackTool`; the image gives it the capability)."""

    batch = 512  # entries per delete call (the caller checks its deadline between calls)

    def __init__(self, *, read_only: bool = False, tool: str = "conntrack"):
        self.read_only = read_only
        self._tool_binary = tool
        self._tool = None  # the ConntrackTool in use once netlink was refused

    async def scan(self, family: int, protocol: int | None, each: Callable[[list[Flow]], object]) -> bool:
        """Read every entry of ``family`` (4 or 6) now, of IP ``protocol`` only when given, handing
        each datagram's entries to ``each`` as it arrives; ``each`` returning ``False`` stops the
        reading. True when the whole table was read. (A dump the kernel marks as interrupted, by
        the table changing under it, may miss entries that came or went meanwhile: the next pass
        sees them.)"""
        if self._tool is not None:
            return await self._tool.scan(family, protocol, each)
        try:
            return await self._scan(family, protocol, each)
        except PermissionError:
            from masqd.backends.conntrack.tool import ConntrackTool

            log.info("the kernel refuses masqd's own conntrack socket (no CAP_NET_ADMIN in this process); "
                     "using the conntrack tool", tool=self._tool_binary)
            self._tool = ConntrackTool(self._tool_binary, read_only=self.read_only)
            self.batch = self._tool.batch
            return await self._tool.scan(family, protocol, each)

    async def _scan(self, family: int, protocol: int | None, each: Callable[[list[Flow]], object]) -> bool:
        with _socket() as sock:
            sock.send(dump_request(family, 1, protocol))
            while True:
                data = await receive(sock, RECEIVE_BYTES)
                try:
                    batch, done, _interrupted = parse_dump(data, family, protocol)
                except ValueError as exc:
                    raise OSError(errno.EPROTO, f"unreadable answer to the conntrack dump: {exc}") from exc
                if batch and each(batch) is False:
                    return False
                if done:
                    return True
                await anyio.lowlevel.checkpoint()  # a table of 100k entries does not hold up the loop

    async def delete(self, flows: Sequence[Flow]) -> Deleted:
        """Delete each of ``flows`` (each named by its tuple, zone and id)."""
        if self._tool is not None:
            return await self._tool.delete(flows)
        result = Deleted()
        if self.read_only or not flows:
            return result
        with _socket() as sock:
            for start in range(0, len(flows), DELETES_PER_DATAGRAM):
                chunk = flows[start:start + DELETES_PER_DATAGRAM]
                datagram, sent = delete_requests(chunk, start + 1)  # a fresh socket: numbers of its own
                sock.send(datagram)
                while sent:
                    acked, failed = acknowledgements(await receive(sock, RECEIVE_BYTES))
                    refused = {seq: code for seq, code, _said in failed}
                    for seq in acked:
                        flow = sent.pop(seq, None)
                        if flow is None:
                            continue
                        code = refused.get(seq)
                        if code is None:
                            result.deleted.append(flow)
                        elif code == errno.ENOENT:
                            result.gone += 1
                        else:
                            result.refused.append((flow, describe_errno(code)))
        return result


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         NETLINK_NETFILTER)
    try:
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acknowledgements without the message
        except OSError:
            pass  # older kernels: acknowledgements carry the message; still read correctly
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock
