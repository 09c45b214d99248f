"""Netlink framing, written once (pure: bytes in, bytes out).

masqd speaks three netlink families itself, each in its own module: rtnetlink for the node's
addresses (:mod:`masqd.sources.addresses`), nf_tables for in-place set edits
(:mod:`masqd.backends.nftables.netlink`) and ctnetlink for live flows
(:mod:`masqd.backends.conntrack.messages`). This module holds what they share: the message and
attribute headers (``<linux/netlink.h>``), the nfnetlink header (``nfgenmsg``), reading a
datagram into messages (:func:`dump_messages` with a dump's end and errors) and a payload into
attributes, the kernel's acknowledgements, all pure (the stdlib ``struct``; no ctypes); and
:func:`receive`, the one wait for a datagram from the kernel on the event loop.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
#: extended ACK attributes: the kernel's own words for an error.
NLMSGERR_ATTR_MSG = 1
#: The netlink protocol number of nfnetlink (nf_tables, ctnetlink); not in the socket module.
NETLINK_NETFILTER = 12
#: Socket options of netlink sockets (``<linux/netlink.h>``; not in the socket module): their
#: level, acknowledgements without a copy of the message acknowledged, errors with the kernel's words.
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length (header included), type, flags, sequence, port id
ATTR = struct.Struct("=HH")  # nlattr / rtattr: length (header included), type; then the value
NFGEN = struct.Struct(">BBH")  # nfgenmsg: family, version, resource id (big endian)
_INT = struct.Struct("=i")
ATTR_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER


def align(length: int) -> int:
    return (length + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to four bytes."""
    data = ATTR.pack(ATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def nested(kind: int, parts: Iterable[bytes]) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def nfnl_message(kind: int, flags: int, seq: int, family: int, payload: bytes, resource: int = 0) -> bytes:
    """One nfnetlink message: ``nlmsghdr``, ``nfgenmsg`` (``family``, version 0, ``resource``), payload."""
    body = NFGEN.pack(family, 0, resource) + payload
    return HEADER.pack(HEADER.size + len(body), kind, flags, seq, 0) + body


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """``(offset, type, flags, payload)`` for each netlink message in ``data`` (what one ``recv``
    returned). ``ValueError`` saying where when a header is truncated or a length does not fit."""
    offset = 0
    while offset < len(data):
        left = len(data) - offset
        if left < HEADER.size:
            raise ValueError(f"netlink: truncated message header at byte {offset}: "
                             f"{left} bytes left, a header takes {HEADER.size}")
        length, kind, flags, _seq, _port = HEADER.unpack_from(data, offset)
        if not HEADER.size <= length <= left:
            raise ValueError(f"netlink: message at byte {offset} says it is {length} bytes long; "
                             f"expected {HEADER.size} to {left}")
        yield offset, kind, flags, data[offset + HEADER.size:offset + length]
        offset += align(length)


class Dump(NamedTuple):
    """What one datagram of a dump held: its ``messages`` other than the end and errors, each as
    ``(offset, type, payload)``; ``done``: the dump's ``NLMSG_DONE`` was among them;
    ``interrupted``: the kernel flagged a message ``NLM_F_DUMP_INTR`` (what was dumped changed
    meanwhile)."""

    messages: list[tuple[int, int, bytes]]
    done: bool
    interrupted: bool


def dump_messages(data: bytes, what: str) -> Dump:
    """The messages in what one ``recv`` of a dump (or of a subscription) returned. An
    ``NLMSG_ERROR`` carrying an error, or an ``NLMSG_DONE`` ending the dump with one, raises
    ``OSError`` with the kernel's errno (``what`` names the request); malformed framing raises
    ``ValueError`` (:func:`messages`)."""
    found: list[tuple[int, int, bytes]] = []
    done = interrupted = False
    for offset, kind, flags, payload in messages(data):
        interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
        if kind == NLMSG_ERROR:
            code = error_code(payload, offset, "NLMSG_ERROR")
            if code:
                raise OSError(code, f"netlink: the kernel refused {what}: {strerror(code)}")
        elif kind == NLMSG_DONE:
            if len(payload) >= _INT.size:  # a dump's status; absent on older kernels' acks
                code = error_code(payload, offset, "NLMSG_DONE")
                if code:
                    raise OSError(code, f"netlink: {what} ended with an error: {strerror(code)}")
            done = True
        else:
            found.append((offset, kind, payload))
    return Dump(found, done, interrupted)


async def receive(sock: socket.socket, size: int) -> bytes:
    """The next datagram the kernel sent to the non-blocking netlink socket ``sock``, waiting on
    the event loop until there is one (datagrams from other senders are skipped). ``OSError``:
    ``ENOBUFS`` when the kernel dropped messages because the receive buffer was full,
    ``EMSGSIZE`` when one was longer than ``size`` bytes."""
    import anyio  # here: the framing above is pure, and imported by pure modules alone

    while True:
        await anyio.wait_readable(sock)
        try:
            data, _ancillary, flags, sender = sock.recvmsg(size)
        except BlockingIOError:
            continue
        if sender[0] != 0:
            continue  # not from the kernel (another privileged process): ignored
        if flags & socket.MSG_TRUNC:
            raise OSError(errno.EMSGSIZE, f"netlink: a message longer than {size} bytes was truncated")
        return data


def attributes(payload: bytes, offset: int, what: str) -> dict[int, bytes]:
    """The attributes of ``payload`` from ``offset`` on, by type (flags masked off; a repeated
    one: the last). ``what`` names the message in the ``ValueError`` raised when they do not fit.
    (A conntrack dump reads seven attribute lists per entry: this loop is its hot path.)"""
    found = {}
    end = len(payload)
    unpack = ATTR.unpack_from
    while offset < end:
        if end - offset < 4:
            raise ValueError(f"{what}: {end - offset} stray bytes after its attributes")
        length, kind = unpack(payload, offset)
        if length < 4 or length > end - offset:
            raise ValueError(f"{what}: an attribute says it is {length} bytes long; expected 4 to {end - offset}")
        found[kind & ATTR_TYPE_MASK] = payload[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


def error_code(payload: bytes, offset: int, kind: str) -> int:
    """The errno in an ``NLMSG_ERROR`` / ``NLMSG_DONE`` payload (the kernel sends it negated)."""
    if len(payload) < _INT.size:
        raise ValueError(f"netlink: {kind} at byte {offset}: {len(payload)} bytes, too short for its error code")
    (error,) = _INT.unpack_from(payload)
    return -error


def strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except (ValueError, OverflowError):
        return f"error {code}"


def describe_errno(code: int) -> str:
    """``No such file or directory (ENOENT)``."""
    return f"{strerror(code)} ({errno.errorcode.get(code, code)})"


def acknowledgements(replies: bytes) -> tuple[list[int], list[tuple[int, int, str]]]:
    """Read acknowledgements: the sequence numbers acknowledged (success or not), and for each
    failed message ``(seq, errno, the kernel's message or "")``. Other messages are skipped."""
    acked: list[int] = []
    failed: list[tuple[int, int, str]] = []
    offset = 0
    while offset + HEADER.size <= len(replies):
        length, kind, flags, _seq, _port = HEADER.unpack_from(replies, offset)
        if length < HEADER.size:
            break
        if kind == NLMSG_ERROR and length >= HEADER.size + _INT.size + HEADER.size:
            (code,) = _INT.unpack_from(replies, offset + HEADER.size)
            inner_length, _, _, inner_seq, _ = HEADER.unpack_from(replies, offset + HEADER.size + _INT.size)
            acked.append(inner_seq)
            if code != 0:
                failed.append((inner_seq, -code, _extack(replies, offset, length, flags, inner_length)))
        offset += align(length)
    return acked, failed


def _extack(replies: bytes, offset: int, length: int, flags: int, inner_length: int) -> str:
    """The kernel's error text (``NLMSGERR_ATTR_MSG``) when it sent one."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    start = offset + HEADER.size + _INT.size + (HEADER.size if flags & NLM_F_CAPPED else inner_length)
    end = offset + length
    while start + ATTR.size <= end:
        size, kind = ATTR.unpack_from(replies, start)
        if size < ATTR.size:
            break
        if kind & ATTR_TYPE_MASK == NLMSGERR_ATTR_MSG:
            return replies[start + ATTR.size:start + size].rstrip(b"\0").decode(errors="replace")
        start += align(size)
    return ""
