"""ctnetlink messages: a dump of the conntrack table, and deletes of single entries (pure).

The encoding is the kernel's (``<linux/netfilter/nfnetlink_conntrack.h>``), the one the
``conntrack`` tool sends: ``IPCTNL_MSG_CT_GET`` with ``NLM_F_DUMP`` for a family lists every
entry as an ``IPCTNL_MSG_CT_NEW`` message, and ``IPCTNL_MSG_CT_DELETE`` removes the entry whose
original tuple, zone and id it names (the id makes a delete miss an entry that has meanwhile
been replaced by a new one for the same addresses and ports: the kernel answers ``ENOENT``).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from masqd.flows import Flow
from masqd.netlink import (NFGEN, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, attr, attributes, dump_messages,
                           nested, nfnl_message)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
# enum ctattr_type, ctattr_tuple, ctattr_ip, ctattr_l4proto
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_ID, CTA_ZONE, CTA_FILTER = 1, 2, 3, 12, 18, 25
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_FLAG_PROTO_NUM = 1 << 3  # CTA_FILTER_FLAG(CTA_PROTO_NUM)
CTA_TUPLE_IP, CTA_TUPLE_PROTO, CTA_TUPLE_ZONE = 1, 2, 3
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
#: Protocols whose tuples carry ports (the others: ICMP's id/type/code, GRE's keys...).
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})

FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_ADDRESS_ATTRS = {4: (CTA_IP_V4_SRC, CTA_IP_V4_DST), 6: (CTA_IP_V6_SRC, CTA_IP_V6_DST)}
_ADDRESS_TYPE = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}
_PORT = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HOST_U32 = struct.Struct("=I")  # CTA_FILTER's flags are in host order

_TYPE_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_TYPE_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
_TYPE_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE


def dump_request(family: int, seq: int, protocol: int | None = None) -> bytes:
    """Ask for every conntrack entry of ``family`` (4 or 6), only those of IP ``protocol`` when
    given: the kernel filters (``CTA_FILTER``, Linux 5.8 and later; an older kernel ignores it and
    sends everything, which :func:`parse_dump` filters then)."""
    payload = b""
    if protocol is not None:
        payload = (nested(CTA_TUPLE_ORIG, [nested(CTA_TUPLE_PROTO, [attr(CTA_PROTO_NUM, bytes([protocol]))])])
                   + nested(CTA_FILTER, [attr(CTA_FILTER_ORIG_FLAGS, _HOST_U32.pack(CTA_FILTER_FLAG_PROTO_NUM))]))
    return nfnl_message(_TYPE_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, FAMILY[family], payload)


def parse_dump(data: bytes, family: int, protocol: int | None = None) -> tuple[list[Flow], bool, bool]:
    """The entries in what one ``recv`` of a dump returned: ``(flows, done, interrupted)``; only
    those of IP ``protocol`` when given.
    ``OSError`` with the kernel's errno when it refused or ended the dump with an error;
    ``ValueError`` saying where when a message is malformed."""
    flows: list[Flow] = []
    dump = dump_messages(data, "the conntrack dump")
    for offset, kind, payload in dump.messages:
        if kind == _TYPE_NEW:
            flow = _flow(payload, family, f"ctnetlink: entry at byte {offset}")
            if flow is not None and (protocol is None or flow.protocol == protocol):
                flows.append(flow)
    return flows, dump.done, dump.interrupted


def _flow(payload: bytes, family: int, what: str) -> Flow | None:
    if len(payload) < NFGEN.size:
        raise ValueError(f"{what}: {len(payload)} bytes, too short for its nfgenmsg")
    found = attributes(payload, NFGEN.size, what)
    if CTA_TUPLE_ORIG not in found or CTA_TUPLE_REPLY not in found:
        raise ValueError(f"{what}: no original or reply tuple")
    original = _tuple(found[CTA_TUPLE_ORIG], family, f"{what}, original tuple")
    reply = _tuple(found[CTA_TUPLE_REPLY], family, f"{what}, reply tuple")
    if original is None or reply is None:
        return None  # another family's entry (the kernel filters by family; never seen)
    status = _U32.unpack(found[CTA_STATUS])[0] if len(found.get(CTA_STATUS, b"")) == 4 else 0
    zone = max(_zone(found.get(CTA_ZONE)), original[5], reply[5])
    key = attr(CTA_TUPLE_ORIG | NLA_F_NESTED, found[CTA_TUPLE_ORIG])
    for kind in (CTA_ID, CTA_ZONE):
        if kind in found:
            key += attr(kind, found[kind])
    return Flow(family=family, protocol=original[0], source=original[1], destination=original[2],
                reply_source=reply[1], reply_destination=reply[2], status=status, source_port=original[3],
                destination_port=original[4], zone=zone, key=key)


def _zone(data: bytes | None) -> int:
    return _PORT.unpack(data)[0] if data is not None and len(data) == 2 else 0


def _tuple(data: bytes, family: int, what: str):
    """``(protocol, source, destination, source port, destination port, zone)`` of a tuple, or
    ``None`` when its addresses are not of ``family``."""
    found = attributes(data, 0, what)
    ip = attributes(found.get(CTA_TUPLE_IP, b""), 0, what)
    proto = attributes(found.get(CTA_TUPLE_PROTO, b""), 0, what)
    source_attr, destination_attr = _ADDRESS_ATTRS[family]
    if source_attr not in ip or destination_attr not in ip:
        return None
    width = 4 if family == 4 else 16
    if len(ip[source_attr]) != width or len(ip[destination_attr]) != width:
        raise ValueError(f"{what}: an address of the wrong size for IPv{family}")
    if len(proto.get(CTA_PROTO_NUM, b"")) != 1:
        raise ValueError(f"{what}: no protocol number")
    number = proto[CTA_PROTO_NUM][0]
    ports = [None, None]
    if number in PORT_PROTOCOLS:
        for index, kind in enumerate((CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT)):
            if len(proto.get(kind, b"")) == 2:
                ports[index] = _PORT.unpack(proto[kind])[0]
    make = _ADDRESS_TYPE[family]
    return (number, make(ip[source_attr]), make(ip[destination_attr]), ports[0], ports[1],
            _zone(found.get(CTA_TUPLE_ZONE)))


def delete_requests(flows: Sequence[Flow], first_seq: int) -> tuple[bytes, dict[int, Flow]]:
    """One datagram deleting each of ``flows`` (each message acknowledged), and the flow each
    sequence number deletes."""
    parts = []
    sent: dict[int, Flow] = {}
    for seq, flow in enumerate(flows, first_seq):
        seq &= 0xFFFFFFFF
        parts.append(nfnl_message(_TYPE_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, FAMILY[flow.family], flow.key))
        sent[seq] = flow
    return b"".join(parts), sent


@dataclass(slots=True)
class Deleted:
    """What a delete did: the flows deleted, how many had gone already (expired or replaced:
    ``ENOENT``), and the ones the kernel refused with its reason."""

    deleted: list[Flow] = field(default_factory=list)
    gone: int = 0
    refused: list[tuple[Flow, str]] = field(default_factory=list)
