"""CIDR parsing and algebra. Pure: no I/O.

Parsing is as strict as Go's ``net.ParseCIDR`` plus the upstream agent's alignment check, so that a
config accepted by masqd is accepted by ``ip-masq-agent`` and the other way round: an address, a
``/`` and a decimal prefix length, nothing else (no netmask form, no zone, no spaces). Only values
that went through :func:`parse_cidr` ever reach a rule text.

Networks are ``ipaddress`` networks (plugins receive and return them), but ``ipaddress`` is slow in
bulk: constructing one parses its text again, hashing one calls three Python methods, ``str``
formats each octet. A 100k-CIDR config pays for each of those 100k times, so this module builds
IPv4 networks without the constructor's re-parsing (:func:`parse_cidr`), identifies networks by a
plain int (:func:`network_key`) where a set or dict of them is needed, and formats them directly
(:func:`cidr_text`); each gives exactly what ``ipaddress`` itself gives (checked at import, with
the plain ``ipaddress`` way as the fallback).
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import TypeAlias

from masqd.errors import safe_repr

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

LINK_LOCAL_V4 = ipaddress.IPv4Network("169.254.0.0/16")
LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")

# Only the characters an IPv4 or IPv6 CIDR can contain; anything else (spaces, newlines, quotes,
# "-j ACCEPT") is refused before ipaddress sees it.
_CIDR_SHAPE = re.compile(r"[0-9A-Fa-f:.]+/[0-9]{1,3}")


class CIDRError(ValueError):
    """``value`` is not a usable CIDR; ``reason`` says why and what would be valid."""

    def __init__(self, value: object, reason: str):
        self.value = value
        self.reason = reason
        super().__init__(f"{safe_repr(value)}: {reason}")


def parse_cidr(value: object) -> Network:
    """Parse one CIDR string into an ``ipaddress`` network, refusing anything upstream refuses.

    Raises :class:`CIDRError` for a non-string, a malformed value, or one with host bits set
    (``10.0.0.1/8``); the latter names the aligned form (``10.0.0.0/8``).
    """
    (net,), _ = parse_cidrs((value,))
    if isinstance(net, CIDRError):
        raise net
    return net


def parse_cidrs(values: Iterable[object], known: Mapping[str, Network] | None = None
                ) -> tuple[list[Network | CIDRError], bool]:
    """:func:`parse_cidr` of each value, in order, the :class:`CIDRError` in place of each value
    it refuses; and whether every value is an IPv4 CIDR written exactly as ``str`` writes its
    network, so that distinct values are distinct networks (and duplicates can be found among
    the strings, which hash far faster than networks).

    ``known``: such texts -> their networks, parsed before (only texts this call would find
    canonical, e.g. those of an earlier call that returned ``True``): those are taken as they are.
    """
    if isinstance(values, Sized) and len(values) >= _BULK:
        with _cyclic_gc_paused():
            return _parse_each(values, known)
    return _parse_each(values, known)


#: From this many values on, :func:`parse_cidrs` pauses the cyclic garbage collector.
_BULK = 1000


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused. Making 100k networks allocates 200k objects it tracks,
    which set it off again and again, each full pass walking every object alive: 40% of the time
    of parsing 100k CIDRs. Networks and their addresses form no reference cycles: memory is freed by
    reference counting as always, and a collection runs as usual once the collector is back."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _parse_each(values: Iterable[object], known: Mapping[str, Network] | None) -> tuple[list[Network | CIDRError], bool]:
    results: list[Network | CIDRError] = []
    append = results.append
    canonical = True
    known_get = (known or {}).get
    for value in values:
        if type(value) is str and (net := known_get(value)) is not None:
            append(net)
            continue
        # The common case first, inline (100k CIDRs: a fifth of the time of the general path): an
        # aligned IPv4 CIDR of at most /30 (a /31 or /32 network has a hosts() of its own, which
        # the constructor makes) written as str() writes it. ASCII digits only (isdigit() alone
        # takes "²"); inet_pton accepts exactly the dotted quads ipaddress does (four parts, each
        # 0-255, no leading zeros) and nothing but them. Anything else goes the general way,
        # which names the reason it refuses a value.
        if type(value) is str and value.isascii():
            address, slash, prefix = value.partition("/")
            if slash and prefix.isdigit() and len(prefix) <= 2 and (prefix[0] != "0" or prefix == "0"):
                length = int(prefix)
                if length <= 30:
                    try:
                        ip = _from_bytes(_inet_pton(_AF_INET, address))
                    except (OSError, ValueError):
                        ip = -1
                    if ip >= 0 and not ip & _V4_HOSTMASKS[length]:
                        append(_v4_network(ip, length))
                        continue
        canonical = False
        try:
            append(_parse_cidr(value))
        except CIDRError as exc:
            append(exc.with_traceback(None))  # its traceback would hold this frame, and so the list
    return results, canonical


def _parse_cidr(value: object) -> Network:
    if not isinstance(value, str):
        raise CIDRError(value, f"expected a CIDR string such as '10.0.0.0/8', got {_type_name(value)}")
    if not _CIDR_SHAPE.fullmatch(value):
        raise CIDRError(value, "not a CIDR: expected an IPv4 or IPv6 address, '/', and a prefix length, e.g. '10.0.0.0/8' or 'fd00::/8'")
    address, _, prefix = value.partition("/")
    length = int(prefix)  # "/08" -> 8, as Go reads it
    canonical = f"{address}/{length}"
    try:
        return ipaddress.ip_network(canonical)  # strict: host bits set is an error
    except ValueError as exc:
        try:
            aligned = ipaddress.ip_network(canonical, strict=False)
        except ValueError:
            raise CIDRError(value, f"not a CIDR ({exc}); expected e.g. '10.0.0.0/8' or 'fd00::/8'") from None
    raise CIDRError(value, f"not aligned to a CIDR block: host bits are set; did you mean '{aligned}'?")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "a mapping"}.get(
        type(value), type(value).__name__
    )


def split_families(networks: Iterable[Network]) -> tuple[tuple[ipaddress.IPv4Network, ...], tuple[ipaddress.IPv6Network, ...]]:
    """Split networks into (IPv4, IPv6), each keeping the input order."""
    networks = tuple(networks)
    if not any(issubclass(kind, ipaddress.IPv6Network) for kind in set(map(type, networks))):
        return networks, ()  # type: ignore[return-value]  # IPv4 only (the common case, found in C)
    v4 = tuple(net for net in networks if net.version == 4)
    return v4, tuple(net for net in networks if net.version == 6)  # type: ignore[return-value]


def duplicates(networks: Iterable[Network]) -> list[Network]:
    """Networks that appear more than once, each listed once, in order of first repeat."""
    seen: set[int] = set()
    repeated: dict[int, Network] = {}
    for net in networks:
        key = network_key(net)
        if key in seen:
            repeated.setdefault(key, net)
        else:
            seen.add(key)
    return list(repeated.values())


def unique(networks: Iterable[Network]) -> dict[int, Network]:
    """Each distinct network once, in order of first appearance, by its :func:`network_key`."""
    keyed: dict[int, Network] = {}
    for net in networks:
        keyed.setdefault(network_key(net), net)
    return keyed


# --- longest-prefix match -----------------------------------------------------------------------------


def longest_prefix_ranges(keep: Iterable[Network], masq: Iterable[Network]) -> list[tuple[int, int]]:
    """The addresses of one family whose longest matching prefix among ``keep`` and ``masq`` is a
    ``keep`` one, as sorted, merged ``(first, last)`` ranges. A prefix in both lists counts as
    ``masq`` (callers refuse that before). Prefixes either nest or are disjoint, so one sweep
    over them in address order, innermost last, decides every address."""
    entries = sorted(
        [(int(n.network_address), -int(n.broadcast_address), False) for n in keep]
        + [(int(n.network_address), -int(n.broadcast_address), True) for n in masq]
    )
    ranges: list[tuple[int, int]] = []
    open_: list[tuple[int, bool]] = []  # (last address, kept) of the prefixes holding the sweep's position
    position = 0  # the first address not decided yet

    def decide(upto: int) -> None:
        nonlocal position
        if upto >= position:
            if open_ and open_[-1][1]:
                if ranges and ranges[-1][1] + 1 == position:
                    ranges[-1] = (ranges[-1][0], upto)
                else:
                    ranges.append((position, upto))
            position = upto + 1

    for first, negative_last, masqueraded in entries:
        while open_ and open_[-1][0] < first:
            decide(open_[-1][0])
            open_.pop()
        decide(first - 1)
        open_.append((-negative_last, not masqueraded))
    while open_:
        decide(open_[-1][0])
        open_.pop()
    return ranges


def range_networks(ranges: Iterable[tuple[int, int]], version: int) -> tuple[Network, ...]:
    """The fewest networks covering each ``(first, last)`` range, in order."""
    address = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return tuple(net for first, last in ranges
                 for net in ipaddress.summarize_address_range(address(first), address(last)))


# --- ipaddress without its per-object overhead -----------------------------------------------------

_inet_pton = socket.inet_pton
_inet_ntoa = socket.inet_ntoa
_from_bytes = int.from_bytes
_AF_INET = socket.AF_INET
_new = object.__new__
# The netmask objects ipaddress itself shares between the networks it makes from (int, length).
_V4_NETMASKS = tuple(ipaddress.IPv4Network((0, length)).netmask for length in range(33))
_V4_HOSTMASKS = tuple((1 << (32 - length)) - 1 for length in range(33))


def _v4_network_direct(ip: int, length: int) -> ipaddress.IPv4Network:
    """``IPv4Network((ip, length))`` for an aligned ``ip`` and a length up to 30, built as its
    constructor leaves it (the same attributes, the shared netmask) without parsing anything."""
    address = _new(ipaddress.IPv4Address)
    address._ip = ip
    net = _new(ipaddress.IPv4Network)
    net.network_address = address
    net.netmask = _V4_NETMASKS[length]
    net._prefixlen = length
    return net


def _v4_network_portable(ip: int, length: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((ip, length))


def network_key(net: Network) -> int:
    """An int identifying ``net`` among networks of both families: equal keys exactly when the
    networks are equal (an IPv6 scope id aside: ``parse_cidr`` accepts none), and within one family
    keys sort as (address, prefix length). Hashing it is about ten times cheaper than hashing the
    network."""
    return net.network_address._ip << 9 | net._prefixlen << 1 | (net._version == 6)


def _network_key_portable(net: Network) -> int:
    return int(net.network_address) << 9 | net.prefixlen << 1 | (net.version == 6)


def cidr_text(net: Network) -> str:
    """``str(net)`` (``10.0.0.0/8``, ``fd00::/8``), IPv4 formatted by the C library."""
    if net._version == 4:
        return f"{_inet_ntoa(net.network_address._ip.to_bytes(4))}/{net._prefixlen}"
    return str(net)


def _cidr_text_portable(net: Network) -> str:
    return str(net)



def _fast_paths_agree() -> bool:
    """Whether the shortcuts above give what ``ipaddress`` gives on this Python (they read its
    private attributes; a Python whose ``ipaddress`` differs gets the plain, slower way)."""
    try:
        for text in ("10.0.0.0/8", "0.0.0.0/0", "192.0.2.4/30", "255.255.255.0/24"):
            expected = ipaddress.IPv4Network(text)
            ip, length = int(expected.network_address), expected.prefixlen
            built = _v4_network_direct(ip, length)
            if type(built) is not type(expected) or vars(built) != vars(expected) or built != expected:
                return False
            if hash(built) != hash(expected) or str(built) != str(expected) or cidr_text(built) != str(expected):
                return False
        for net in (ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv6Network("::a00:0/104"), LINK_LOCAL_V6):
            if network_key(net) != _network_key_portable(net) or cidr_text(net) != str(net):
                return False
    except Exception:  # noqa: BLE001 - any difference at all means: do not use them
        return False
    return True


if _fast_paths_agree():
    _v4_network = _v4_network_direct
else:  # pragma: no cover - another Python's ipaddress
    _v4_network = _v4_network_portable
    network_key = _network_key_portable
    cidr_text = _cidr_text_portable
