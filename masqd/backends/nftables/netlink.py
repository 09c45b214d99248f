"""nf_tables netlink messages for changing a set's elements in place (pure: bytes in, bytes out).

``nft`` 1.0.6 reads every element of an interval set back into its cache before it adds or
deletes a single one: a two-element change to a 100k-element set costs about as much as writing
the whole set (0.8 s here; ``benchmarks/RESULTS.md``). The kernel itself needs no such thing, so
when only the non-masquerade set changed, masqd sends the additions and removals to nf_tables
directly, as one batch (one transaction: all of it or none of it, like ``nft -f``). Everything
else (the table, its chain and rules, a first write, a repair) still goes through ``nft -f``.

The encoding is the one ``nft`` itself sends (``nft --debug=netlink,mnl``): an interval set holds
each range ``[first, last]`` as two keys, ``first`` and ``last + 1`` with the *interval end* flag;
a range reaching the top of the address space has no end key. Keys are addresses in network byte
order. :func:`element_batch` builds the whole batch; :func:`masqd.netlink.acknowledgements` reads
the kernel's acknowledgements. The socket is the executor's (:mod:`.executor`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from masqd.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, attr as _attr, nested as _nested
from masqd.netlink import nfnl_message as _message

#: nfnetlink: the nf_tables subsystem, and the messages that open and close a batch.
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
#: nf_tables message types (linux/netfilter/nf_tables.h).
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14

NFTA_TABLE_NAME = 1
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_FLAGS = 3
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 0x1

NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
_WIDTH = {4: 4, 6: 16}  # key bytes

#: Elements per message: keeps each message well under a page-sized netlink skb limit multiple
#: (the batch as a whole is one transaction however many messages it holds).
ELEMENTS_PER_MESSAGE = 1024



def _name(text: str) -> bytes:
    return text.encode() + b"\0"


def interval_keys(intervals: Iterable[tuple[int, int]], family: int) -> list[tuple[bytes, bool]]:
    """The keys holding ``intervals`` in an interval set: ``(key, is_end)`` in order."""
    width = _WIDTH[family]
    top = (1 << (8 * width)) - 1
    keys: list[tuple[bytes, bool]] = []
    for first, last in intervals:
        keys.append((first.to_bytes(width, "big"), False))
        if last < top:
            keys.append(((last + 1).to_bytes(width, "big"), True))
    return keys


_END_FLAG = _attr(NFTA_SET_ELEM_FLAGS, struct.pack(">I", NFT_SET_ELEM_INTERVAL_END))


def _element(key: bytes, is_end: bool) -> bytes:
    key_attr = _nested(NFTA_SET_ELEM_KEY, (_attr(NFTA_DATA_VALUE, key),))
    return _nested(NFTA_LIST_ELEM, (_END_FLAG, key_attr) if is_end else (key_attr,))


#: One family's change: ``(family, intervals to remove, intervals to add)``.
Change = tuple[int, Sequence[tuple[int, int]], Sequence[tuple[int, int]]]


def element_batch(table: str, set_names: dict[int, str], changes: Sequence[Change], marker: str,
                  first_seq: int = 1) -> tuple[bytes, dict[int, str]]:
    """One nf_tables batch making every change of ``changes`` to the sets of ``table`` (named per
    family by ``set_names``), each family's removals before its additions (so a range may be
    replaced by an overlapping one), then adding and deleting a table named ``marker`` (how
    ``nft monitor`` tells masqd's transactions apart, see :mod:`.monitor`). Returns the batch and
    the sequence numbers the kernel will acknowledge, one per message, each with what its
    message does (``removing 3 intervals from set ip masqd nonmasq4``), for errors."""
    seq = first_seq
    messages = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, b"", NFNL_SUBSYS_NFTABLES)]
    acked: dict[int, str] = {}
    for family, remove, add in changes:
        head = _attr(NFTA_SET_ELEM_LIST_TABLE, _name(table)) + _attr(NFTA_SET_ELEM_LIST_SET, _name(set_names[family]))
        where = f"set {'ip' if family == 4 else 'ip6'} {table} {set_names[family]}"
        for kind, flags, intervals, what in ((NFT_MSG_DELSETELEM, 0, remove, f"removing {len(remove)} intervals from"),
                                             (NFT_MSG_NEWSETELEM, NLM_F_CREATE, add, f"adding {len(add)} intervals to")):
            keys = interval_keys(intervals, family)
            for start in range(0, len(keys), ELEMENTS_PER_MESSAGE):
                chunk = keys[start:start + ELEMENTS_PER_MESSAGE]
                seq += 1
                payload = head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, (_element(k, end) for k, end in chunk))
                messages.append(_message((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_ACK | flags,
                                         seq, NFPROTO[family], payload))
                acked[seq] = f"{what} {where}"
    for kind, flags in ((NFT_MSG_NEWTABLE, NLM_F_CREATE), (NFT_MSG_DELTABLE, 0)):
        seq += 1
        messages.append(_message((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq,
                                 NFPROTO[4], _attr(NFTA_TABLE_NAME, _name(marker))))
        acked[seq] = f"marking the transaction (table ip {marker})"
    seq += 1
    messages.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, b"", NFNL_SUBSYS_NFTABLES))
    return b"".join(messages), acked
