"""The addresses assigned in masqd's network namespace: read once, and followed with rtnetlink.

``snatToAddress`` rewrites sources to one chosen address, which must be assigned to an interface
in the agent's namespace when the rules are applied; a state naming one that is not is refused,
and checked again when the addresses change (a VIP that keepalived moves here arrives later, or
leaves). :func:`local_addresses` is that check: one ``RTM_GETADDR`` dump over a fresh
``NETLINK_ROUTE`` socket, bounded by :data:`DUMP_TIMEOUT_SECONDS`. :class:`AddressSource` is the
event source that says when to check again: it subscribes to the kernel's IPv4 and IPv6 address
groups and asks for a reconcile per address added or removed. Nothing here wakes while nothing
changes: the socket is non-blocking and awaited on the event loop (``anyio.wait_readable``), as
:mod:`masqd.sources.inotify` awaits its descriptor; no thread, no timer.

The messages are parsed by :func:`parse_address_messages` (pure; the stdlib ``socket`` and
``struct``, no ctypes). An address counts as assigned unless IPv6 duplicate address detection
has not finished (``tentative``, and not ``optimistic``) or has failed (``dadfailed``): the
kernel does not accept packets for it either. Failures are ``OSError``: with the kernel's errno
when it refused the dump, ``TimeoutError`` when it did not finish it in time, ``EBUSY`` when the
addresses kept changing while it was read (:data:`DUMP_ATTEMPTS` interrupted dumps in a row).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

import anyio
import anyio.lowlevel
import structlog

from masqd.events import Notify
from masqd.netlink import HEADER, NLM_F_DUMP, NLM_F_REQUEST, attributes, dump_messages, receive

#: Seconds one dump may take before :func:`local_addresses` gives up (the kernel answers at once).
DUMP_TIMEOUT_SECONDS = 5.0
#: Dumps tried before giving up when each is interrupted by a change (``NLM_F_DUMP_INTR``).
DUMP_ATTEMPTS = 5
#: Bytes received at once: more than the kernel puts in one datagram (at most 32 KiB for a dump).
RECEIVE_BYTES = 64 * 1024
#: Receive buffer asked for the subscription, so a burst of changes (a node starting hundreds of
#: pods, each veth adding its link-local address) is not lost; the kernel caps it at
#: ``net.core.rmem_max``. Overflowing it loses events, which the source reports (ENOBUFS).
SUBSCRIPTION_BUFFER_BYTES = 1024 * 1024

# Message types and groups (<linux/rtnetlink.h>).
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
# Attributes and flags of an address (<linux/if_addr.h>).
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40

_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags (low 8 bits), scope, interface index
_U32 = struct.Struct("=I")
_ADDRESS_SIZE = {socket.AF_INET: 4, socket.AF_INET6: 16}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

log = structlog.get_logger("masqd.sources.addresses")


@dataclass(frozen=True, slots=True)
class AddressChange:
    """One address message: ``address`` was ``added`` to (or removed from) the interface with index
    ``ifindex``. ``flags``: its ``IFA_F_*`` bits (the ``IFA_FLAGS`` attribute when present, which
    has all of them, else the header's low eight)."""

    added: bool
    address: IPAddress
    ifindex: int
    flags: int = 0

    @property
    def usable(self) -> bool:
        """Whether the address is assigned for traffic: not ``dadfailed``, and not ``tentative``
        unless ``optimistic`` (the kernel's own rule for accepting packets to it)."""
        if self.flags & IFA_F_DADFAILED:
            return False
        return not (self.flags & IFA_F_TENTATIVE and not self.flags & IFA_F_OPTIMISTIC)


class _Batch(NamedTuple):
    changes: list[AddressChange]
    done: bool  # NLMSG_DONE seen: the dump is complete
    interrupted: bool  # NLM_F_DUMP_INTR seen: the addresses changed while they were dumped


def parse_address_messages(data: bytes) -> list[AddressChange]:
    """The address changes in what one ``recv`` of a ``NETLINK_ROUTE`` socket returned, in order.

    ``RTM_NEWADDR`` is an address added (or its flags changed), ``RTM_DELADDR`` one removed. The
    address is ``IFA_LOCAL`` when present, else ``IFA_ADDRESS`` (on a point-to-point link
    ``IFA_ADDRESS`` is the peer's; the kernel sends both there, for IPv4 and IPv6 alike). Messages
    of other types (``NLMSG_DONE``, an ack, ``RTM_NEWROUTE``...) and addresses of families other
    than IPv4 and IPv6 are skipped. An ``NLMSG_ERROR`` (or a dump's ``NLMSG_DONE``) carrying an
    error raises ``OSError`` with its errno; anything malformed (truncated, a length that does not
    fit, an address of the wrong size) raises ``ValueError`` saying what and where.
    """
    return _parse(data).changes


def _parse(data: bytes) -> _Batch:
    changes: list[AddressChange] = []
    dump = dump_messages(data, "the address dump")
    for offset, kind, payload in dump.messages:
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            change = _address_change(kind == RTM_NEWADDR, payload, offset)
            if change is not None:
                changes.append(change)
    return _Batch(changes, dump.done, dump.interrupted)


def _address_change(added: bool, payload: bytes, offset: int) -> AddressChange | None:
    what = f"netlink: {'RTM_NEWADDR' if added else 'RTM_DELADDR'} at byte {offset}"
    if len(payload) < _IFADDRMSG.size:
        raise ValueError(f"{what}: {len(payload)} bytes, too short for its ifaddrmsg ({_IFADDRMSG.size})")
    family, _prefixlen, flags, _scope, ifindex = _IFADDRMSG.unpack_from(payload)
    size = _ADDRESS_SIZE.get(family)
    if size is None:
        return None  # not an IP address (AF_MCTP, say)
    found = attributes(payload, _IFADDRMSG.size, what)
    raw = found.get(IFA_LOCAL, found.get(IFA_ADDRESS))
    if raw is None:
        raise ValueError(f"{what}: carries neither IFA_LOCAL nor IFA_ADDRESS")
    if len(raw) != size:
        raise ValueError(f"{what}: an address of {len(raw)} bytes for family {family}; expected {size}")
    if IFA_FLAGS in found:
        if len(found[IFA_FLAGS]) != _U32.size:
            raise ValueError(f"{what}: IFA_FLAGS of {len(found[IFA_FLAGS])} bytes; expected {_U32.size}")
        (flags,) = _U32.unpack(found[IFA_FLAGS])
    address = ipaddress.IPv4Address(raw) if family == socket.AF_INET else ipaddress.IPv6Address(raw)
    return AddressChange(added, address, ifindex, flags)


# --- the kernel ----------------------------------------------------------------------------------

_sequence = itertools.count(1)


async def local_addresses() -> frozenset[IPAddress]:
    """The IPv4 and IPv6 addresses assigned to interfaces in this process's network namespace now
    (loopback and link-local ones included), without those still tentative or that failed
    duplicate address detection (:attr:`AddressChange.usable`).

    A dump the kernel marks as interrupted (an address changed while it was read) is read again,
    up to :data:`DUMP_ATTEMPTS` times. Raises ``TimeoutError`` when a dump does not complete
    within :data:`DUMP_TIMEOUT_SECONDS`, other ``OSError`` when the socket cannot be had, the
    kernel refuses the dump, its answer cannot be parsed (``EPROTO``), or every attempt was
    interrupted (``EBUSY``).
    """
    for _attempt in range(DUMP_ATTEMPTS):
        try:
            with anyio.fail_after(DUMP_TIMEOUT_SECONDS):
                changes, interrupted = await _dump()
        except TimeoutError:
            raise TimeoutError(errno.ETIMEDOUT, "netlink: no complete answer to the address dump (RTM_GETADDR) "
                                                f"within {DUMP_TIMEOUT_SECONDS:g} s") from None
        if not interrupted:
            return frozenset(change.address for change in changes if change.added and change.usable)
        log.debug("the address dump was interrupted by a change; reading it again")
    raise OSError(errno.EBUSY, f"netlink: the addresses kept changing while they were read "
                               f"({DUMP_ATTEMPTS} address dumps in a row were interrupted)")


async def _dump() -> tuple[list[AddressChange], bool]:
    """One ``RTM_GETADDR`` dump of every family: its addresses, and whether it was interrupted."""
    seq = next(_sequence) & 0xFFFFFFFF
    request = HEADER.pack(HEADER.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    request += _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    changes: list[AddressChange] = []
    interrupted = False
    with _netlink_socket(0) as sock:
        sock.sendto(request, (0, 0))
        while True:
            data = await receive(sock, RECEIVE_BYTES)
            try:
                batch = _parse(data)
            except ValueError as exc:
                raise OSError(errno.EPROTO, f"unreadable answer to the address dump: {exc}") from exc
            changes += batch.changes
            interrupted = interrupted or batch.interrupted
            if batch.done:
                return changes, interrupted


def _netlink_socket(groups: int) -> socket.socket:
    """A non-blocking, close-on-exec ``NETLINK_ROUTE`` socket, bound to the multicast ``groups``."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setblocking(False)
        if groups:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SUBSCRIPTION_BUFFER_BYTES)
            except OSError:
                pass  # the default buffer still works; an overflow is reported as lost events
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


async def _drain(sock: socket.socket) -> int:
    """Discard every datagram queued on ``sock``; returns how many. After an overflow the kernel
    drops messages silently until the queue has been emptied (only then is a new overflow reported
    again), so what was queued is stale anyway and a reconcile must come after it is gone."""
    discarded = 0
    while True:
        try:
            sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return discarded
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
        discarded += 1
        if discarded % 64 == 0:
            await anyio.lowlevel.checkpoint()  # a flood of changes does not hold up the event loop


class AddressSource:
    """Asks for a reconcile whenever an IPv4 or IPv6 address is added to or removed from an
    interface in this network namespace (the reason names it: ``address 192.0.2.10 added``), and
    once when it starts listening (``listening for address changes``), for whatever changed
    before. IPv6 link-local addresses (``fe80::/10``) are left out: every new pod's veth adds
    one (and each finishes duplicate address detection later), and none can be an SNAT target.

    Idle while nothing changes (a multicast ``NETLINK_ROUTE`` subscription awaited on the event
    loop). When the kernel drops messages because the receive buffer overflowed (``ENOBUFS``),
    the changes are unknown: it discards what is still queued (the kernel reports no further loss
    until the queue is empty), then asks once with ``address events lost`` and goes on. The socket
    is closed when :meth:`run` is cancelled. There is no ``read_once``: the source holds nothing;
    the reconciler reads the addresses itself (:func:`local_addresses`).
    """

    name = "addresses"

    def __init__(self, wanted: Callable[[], Collection[IPAddress]] | None = None):
        """``wanted``: returns the addresses whose changes matter now (the agent's SNAT
        addresses); changes of other addresses, and the start and lost events, are then not
        reported while it returns none. ``None``: every change matters."""
        self.wanted = wanted

    def _matters(self, address: IPAddress | None = None) -> bool:
        if self.wanted is None:
            return True
        wanted = self.wanted()
        return bool(wanted) if address is None else address in wanted

    async def run(self, notify: Notify) -> None:
        """Follow the addresses until cancelled. Returns (and is not restarted) when the kernel
        refuses the subscription (a sandbox without rtnetlink): a refused ``snatToAddress`` is
        then checked again at each resync only."""
        try:
            subscription = _netlink_socket(RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        except OSError as exc:
            log.warning("cannot follow address changes; a snatToAddress not yet assigned here is checked again at "
                        "each resync only", error=str(exc))
            return
        with subscription as sock:
            log.debug("following the addresses of this network namespace")
            if self._matters():
                notify("listening for address changes")
            while True:
                try:
                    data = await receive(sock, RECEIVE_BYTES)
                except OSError as exc:
                    if exc.errno not in (errno.ENOBUFS, errno.EMSGSIZE):
                        raise
                    discarded = await _drain(sock)
                    if self._matters():
                        log.warning("address change events were lost; asking for a reconcile", error=str(exc),
                                    discarded=discarded)
                        notify("address events lost")
                    continue
                try:
                    changes = parse_address_messages(data)
                except (ValueError, OSError) as exc:
                    if self._matters():
                        log.warning("unreadable address change event; asking for a reconcile", error=str(exc))
                        notify("address event unreadable")
                    continue
                for change in changes:
                    if change.address.version == 6 and change.address.is_link_local:
                        continue
                    if not self._matters(change.address):
                        continue
                    reason = f"address {change.address} {'added' if change.added else 'removed'}"
                    if change.added and not change.usable:
                        reason += " (dadfailed)" if change.flags & IFA_F_DADFAILED else " (tentative)"
                    log.debug("address changed", change=reason, ifindex=change.ifindex)
                    notify(reason)
