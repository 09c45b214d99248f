"""kube-proxy's Services from its nftables-mode table (``ip kube-proxy`` / ``ip6 kube-proxy``), as
``nft --json list table`` prints it, into a :class:`~masqd.backends.services.ServiceMap`: the
``service-ips`` map (address . protocol . port -> ``goto service-...`` / ``external-...``), the
``service-nodeports`` map on the ``nodeport-ips`` set (or, in older releases, ``fib daddr type
local``), the chains they lead to (``numgen random mod N vmap`` over ``endpoint-...`` chains, each
with a ``dnat to``), the jumps to ``mark-for-masquerade`` on the way, and the ``masquerading``
chain that masquerades marked traffic. Pure: no I/O (the backend reads the listing).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import orjson

from masqd.backends.services import (CLUSTER_IP, DEFAULT_MARK, EXTERNAL_IP, NODE_PORT, ServiceEndpoint,
                                     ServiceFrontend, ServiceMap, endpoint)

TABLE = "kube-proxy"
MARK_CHAIN = "mark-for-masquerade"
_CHAIN_NAME = re.compile(r"^(?:service|external|firewall)-[A-Z0-9]{8}-(?P<ns>[^/]+)/(?P<name>[^/]+)/[a-z]+/(?P<port>.*)$")


def parse_services(listing: str | None, family: int) -> ServiceMap:
    """kube-proxy's Services in ``nft --json list table ip|ip6 kube-proxy`` output (``None``: no
    such table: an empty map)."""
    if not listing:
        return ServiceMap()
    objects = [obj for obj in orjson.loads(listing).get("nftables", []) if isinstance(obj, dict)]
    rules: dict[str, list[list]] = {}
    chains: dict[str, dict] = {}
    maps: dict[str, list] = {}
    for obj in objects:
        if "rule" in obj:
            rules.setdefault(obj["rule"].get("chain", ""), []).append(obj["rule"].get("expr", []))
        elif "chain" in obj:
            chains[obj["chain"].get("name", "")] = obj["chain"]
        elif "map" in obj or "set" in obj:
            body = obj.get("map") or obj.get("set")
            maps[body.get("name", "")] = body.get("elem", [])
    frontends = []
    for key, verdict in _elements(maps.get("service-ips", [])):
        if len(key) == 3:
            address = _address(key[0], family)
            if address is not None:
                frontends.append(_frontend(rules, family, verdict, key[1], key[2], address))
    for key, verdict in _elements(maps.get("service-nodeports", [])):
        if len(key) == 2:
            frontends.append(_frontend(rules, family, verdict, key[0], key[1], None))
    nodeport_addresses = tuple(a for a in (_address(e, family) for e in maps.get("nodeport-ips", [])) if a)
    local = any("fib" in str(expr) and "@service-nodeports" in str(expr) for expr in rules.get("services", []))
    hooked = any(c.get("hook") == "postrouting" and c.get("type") == "nat" for c in chains.values())
    masquerades = hooked and any("masquerade" in item or "snat" in item for expr in rules.get("masquerading", [])
                                 for item in expr if isinstance(item, dict))
    return ServiceMap(f"nftables table {'ip' if family == 4 else 'ip6'} {TABLE}", tuple(frontends),
                      nodeport_addresses, local, _mark(rules), masquerades, "chain masquerading")


def _elements(elements: list) -> list[tuple[list, str]]:
    """``(key parts, target chain)`` of each ``key : goto|jump CHAIN`` element of a verdict map."""
    out = []
    for element in elements:
        if not (isinstance(element, list) and len(element) == 2 and isinstance(element[1], dict)):
            continue
        key, verdict = element
        if isinstance(key, dict) and "elem" in key:  # an element with a comment
            key = key["elem"].get("val")
        parts = key.get("concat") if isinstance(key, dict) else None
        target = (verdict.get("goto") or verdict.get("jump") or {}).get("target")
        if isinstance(parts, list) and isinstance(target, str):
            out.append((parts, target))
    return out


def _address(value: Any, family: int):
    try:
        address = ipaddress.ip_address(value)
    except (TypeError, ValueError):
        return None
    return address if address.version == family else None


def _frontend(rules, family: int, chain: str, protocol: Any, port: Any, address) -> ServiceFrontend:
    """What the chain a map element sends to does: the endpoints it DNATs to (through ``numgen``
    vmaps, gotos and jumps), and the jumps to ``mark-for-masquerade`` on the way."""
    endpoints: dict[ServiceEndpoint, None] = {}
    marks_all, marks_unless = False, []
    pending, seen = [chain], set()
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.add(current)
        for expr in rules.get(current, []):
            targets = _targets(expr)
            matches = [item["match"] for item in expr if isinstance(item, dict) and "match" in item]
            if MARK_CHAIN in targets:
                saddr = [m for m in matches if _field(m) == "saddr"]
                others = [m for m in matches if _field(m) not in ("saddr", "daddr") and not _l4proto(m)]
                if not others and not saddr:
                    marks_all = True
                elif not others and len(saddr) == 1 and saddr[0].get("op") == "!=":
                    net = _prefix(saddr[0].get("right"))
                    if net is not None:
                        marks_unless.append(net)
                continue
            for item in expr:
                if isinstance(item, dict) and isinstance(item.get("dnat"), dict):
                    dnat = item["dnat"]
                    port_text = f":{dnat['port']}" if isinstance(dnat.get("port"), int) else ""
                    host = str(dnat.get("addr"))
                    found = endpoint(f"[{host}]{port_text}" if family == 6 else f"{host}{port_text}", family, current)
                    if found is not None:
                        endpoints[found] = None
            pending += [t for t in targets if t != MARK_CHAIN]
    name = _CHAIN_NAME.match(chain)
    service = f"{name['ns']}/{name['name']}:{name['port']}" if name else chain
    kind = NODE_PORT if address is None else (CLUSTER_IP if chain.startswith("service-") else EXTERNAL_IP)
    return ServiceFrontend(service, kind, str(protocol), int(port) if isinstance(port, int) else 0, chain, address,
                           tuple(endpoints), marks_all, tuple(dict.fromkeys(marks_unless)))


def _targets(value: Any) -> list[str]:
    """Every chain a rule's jumps, gotos and verdict maps name, in order."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in ("jump", "goto") and isinstance(inner, dict) and isinstance(inner.get("target"), str):
                found.append(inner["target"])
            else:
                found += _targets(inner)
    elif isinstance(value, list):
        for inner in value:
            found += _targets(inner)
    return found


def _field(match: dict) -> str | None:
    left = match.get("left")
    payload = left.get("payload") if isinstance(left, dict) else None
    return payload.get("field") if isinstance(payload, dict) and payload.get("protocol") in ("ip", "ip6") else None


def _l4proto(match: dict) -> bool:
    return match.get("left") == {"meta": {"key": "l4proto"}}


def _prefix(right: Any):
    try:
        if isinstance(right, dict) and "prefix" in right:
            return ipaddress.ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}")
        return ipaddress.ip_network(str(right))
    except (KeyError, TypeError, ValueError):
        return None


def _mark(rules) -> int:
    """The bit ``mark-for-masquerade`` sets (``meta mark set meta mark | 0x4000``)."""
    for expr in rules.get(MARK_CHAIN, []):
        for item in expr:
            value = item.get("mangle", {}).get("value") if isinstance(item, dict) else None
            if isinstance(value, dict) and isinstance(value.get("|"), list) and isinstance(value["|"][-1], int):
                return value["|"][-1]
    return DEFAULT_MARK
