"""How ``nft --json list`` (1.0.6) prints tables, for :class:`masqd.testing.fake_nft.FakeNft`."""

from __future__ import annotations

import copy
import json
import socket
from typing import Any

#: What nft 1.0.6 puts first in every JSON listing.
METAINFO = {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}

_FAMILIES = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}


def element_json(first: int, last: int, family: str) -> object:
    """An element as nft prints it: an address, a prefix, or a range."""
    bits = 32 if family == "ip" else 128
    text = socket.inet_ntop(_FAMILIES[family], first.to_bytes(bits // 8, "big"))
    size = last - first + 1
    if size == 1:
        return text
    if size & (size - 1) == 0 and first % size == 0:
        return {"prefix": {"addr": text, "len": bits - size.bit_length() + 1}}
    return {"range": [text, socket.inet_ntop(_FAMILIES[family], last.to_bytes(bits // 8, "big"))]}


def table_json(table: Any, terse: bool) -> list[dict[str, Any]]:
    """A table's (:class:`masqd.testing.fake_nft.Table`) objects as ``nft --json list`` prints them: the table, its sets, its chains, then
    the rules chain by chain. nft 1.0.6 does not print table and chain comments."""
    where = {"family": table.family, "table": table.name}
    head: dict[str, Any] = {"family": table.family, "name": table.name, "handle": table.handle}
    if table.flags is not None:
        head["flags"] = table.flags
    objects: list[dict[str, Any]] = [{"table": head}]
    for named in table.sets.values():
        body: dict[str, Any] = {"family": table.family, "name": named.name, "table": table.name, "type": named.type,
                                "handle": named.handle}
        if named.comment is not None:
            body["comment"] = named.comment
        if named.flags:
            body["flags"] = list(named.flags)
        if named.elements and not terse:
            body["elem"] = [element_json(first, last, table.family) for first, last in named.elements]
        objects.append({"set": body})
    for chain in table.chains.values():
        body = {**where, "name": chain.name, "handle": chain.handle}
        if chain.hook is not None:
            body.update(zip(("type", "hook", "prio", "policy"), chain.hook))
        objects.append({"chain": body})
    objects += [{"rule": {**where, "chain": chain.name, "handle": rule.handle, "expr": copy.deepcopy(rule.expr)}}
                for chain in table.chains.values() for rule in chain.rules]
    return objects


def dump(objects: list[dict[str, Any]]) -> str:
    return json.dumps({"nftables": [METAINFO, *objects]}) + "\n"
