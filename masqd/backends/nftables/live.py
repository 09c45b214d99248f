"""Reading the kernel back (pure): ``nft --json`` listings into the model, and what the kernel
does with traffic.

:func:`parse_listing` turns ``nft --json list table`` output into the same
:class:`~masqd.backends.nftables.render.TableState` model that
:func:`~masqd.backends.nftables.render.desired_state` builds, so drift detection is a comparison
of two values (:func:`why_rewritten` says what differs). :func:`live_family` reads masqd's chain the way
the kernel walks it, and :func:`other_nat_chains` finds the other tables' nat chains that may
masquerade too (``explain --live`` and the drift check).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

import orjson

from masqd.backends.base import AFTER, BEFORE, EITHER, INSIDE, KEEPS, MASQUERADES, ForeignRule, LiveFamily
from masqd.cidrs import Network
from masqd.backends.nftables.render import (NFT_FAMILY, CHAIN, DEFAULT_PRIORITY, LOCAL_RETURN, TABLE, MasqRule,
                                            SourceReturn, TableState, _element_texts, _merge, _render_rule,
                                            iptables_interface, priority_text, set_name, set_return)


def parse_listing(text: str, family: int) -> TableState | None:
    """masqd's table of ``family`` in ``nft --json list ...`` output, as a :class:`TableState`
    (``None``: no such table). Other tables in the output are ignored; a terse listing (``-t``)
    has no set elements, so ``intervals`` is then empty.

    Anything masqd would not have written (an extra rule, an unknown expression) becomes a value
    that never equals a desired rule, so it is replaced on the next sync.
    """
    nft_family = NFT_FAMILY[family]
    objects = [
        (kind, body)
        for kind, body in (next(iter(o.items())) for o in orjson.loads(text).get("nftables", []))
        if body.get("family") == nft_family and (body.get("table") or body.get("name")) == TABLE
        and (kind != "table" or body.get("name") == TABLE)
    ]
    if not any(kind == "table" for kind, _ in objects):
        return None
    chain = None
    set_type = None
    intervals: tuple[tuple[int, int], ...] = ()
    rules = []
    foreign = []
    for kind, body in objects:
        if kind == "table":
            if _flags(body.get("flags")):  # e.g. dormant (nft 1.0.6 prints it oddly, so any flag counts)
                foreign.append(f"table flags {body['flags']}")
        elif kind == "chain" and body.get("name") == CHAIN:
            chain = (body.get("type"), body.get("hook"), body.get("prio"), body.get("policy"))
        elif kind == "set" and body.get("name") == set_name(family):
            set_type = body.get("type") if "interval" in _flags(body.get("flags")) else f"{body.get('type')} (no interval flag)"
            intervals = _parse_elements(body.get("elem", []), family)
        elif kind == "rule" and body.get("chain") == CHAIN:
            rules.append(_parse_rule(body.get("expr", []), family))
        elif kind != "rule":  # rules elsewhere come with their (foreign) chain
            foreign.append(f"{kind} {body.get('name')}")
    return TableState(family, chain, set_type, intervals, tuple(rules), tuple(sorted(foreign)))


def _parse_elements(elements: list[Any], family: int) -> tuple[tuple[int, int], ...]:
    bits = 32 if family == 4 else 128
    to_int = _address_int(family)
    ranges = []
    append = ranges.append
    for element in elements:
        if isinstance(element, dict) and "elem" in element:  # an element with options (comment...)
            element = element["elem"]["val"]
        if isinstance(element, str):
            value = to_int(element)
            append((value, value))
        elif "prefix" in element:  # the usual element: {"prefix": {"addr": ..., "len": ...}}
            prefix = element["prefix"]
            first = to_int(prefix["addr"])
            append((first, first | ((1 << (bits - prefix["len"])) - 1)))
        elif "range" in element:
            append((to_int(element["range"][0]), to_int(element["range"][1])))
    return _merge(ranges)


def _address_int(family: int):
    inet = socket.AF_INET if family == 4 else socket.AF_INET6
    return lambda text: int.from_bytes(socket.inet_pton(inet, text), "big")


def _parse_rule(expr: list[dict], family: int) -> object:
    """One rule's JSON expressions as a model value (or an opaque tuple for anything else)."""
    kinds = [next(iter(e)) for e in expr]
    if kinds == ["match", "return"]:
        match = expr[0]["match"]
        left, right = match.get("left", {}), match.get("right")
        fib = left.get("fib") or {}
        if (match.get("op") == "==" and fib.get("result") == "type" and _flags(fib.get("flags")) == ["daddr"]
                and right == "local"):
            return LOCAL_RETURN
        if (match.get("op") == "==" and left.get("payload") == {"protocol": NFT_FAMILY[family], "field": "daddr"}
                and right == f"@{set_name(family)}"):
            return set_return(family)
        if match.get("op") in ("==", "!=") and left.get("payload") == {"protocol": NFT_FAMILY[family], "field": "saddr"}:
            intervals = _parse_addresses(right, family)
            if intervals:
                return SourceReturn(match["op"] == "!=", intervals)
    if kinds and kinds[-1] in ("masquerade", "snat"):
        rule = _parse_masquerade(expr, family)
        if rule is not None:
            return rule
    return ("unrecognised", json.dumps(expr, sort_keys=True))


def _parse_addresses(right: object, family: int) -> tuple[tuple[int, int], ...]:
    """The right side of an address match (one address, a prefix, a range, or an anonymous set
    of them) as merged intervals; empty when it is anything else (a named set, a map...)."""
    items = right["set"] if isinstance(right, dict) and isinstance(right.get("set"), list) else [right]
    if not all(isinstance(item, str) or (isinstance(item, dict) and ("prefix" in item or "range" in item))
               for item in items):
        return ()
    if any(isinstance(item, str) and item.startswith("@") for item in items):
        return ()
    try:
        return _parse_elements(items, family)
    except (OSError, ValueError, KeyError, TypeError):
        return ()


def _flags(value: object) -> list:
    """nft's JSON prints a set of flags as a list, or (newer versions) one flag as a string."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _parse_masquerade(expr: list[dict], family: int) -> MasqRule | None:
    protocol = modulus = below = interface = None
    for item in expr[:-1]:
        match = item.get("match", {})
        left = match.get("left", {})
        if match.get("op") == "==" and left.get("meta") == {"key": "l4proto"} and protocol is None:
            protocol = match["right"]
        elif (match.get("op") == "==" and left.get("meta") == {"key": "oifname"} and interface is None
              and isinstance(match.get("right"), str)):
            interface = match["right"]
        elif (match.get("op") == "<" and "numgen" in left and left["numgen"].get("mode") == "random"
              and left["numgen"].get("offset", 0) == 0 and modulus is None):
            modulus, below = left["numgen"]["mod"], match["right"]
        else:
            return None
    kind, body = next(iter(expr[-1].items()))
    body = body or {}
    flags = _flags(body.get("flags"))
    port = body.get("port")
    ports = None
    if isinstance(port, int):
        ports = (port, port)
    elif isinstance(port, dict) and "range" in port:
        ports = tuple(port["range"])
    elif port is not None:
        return None
    if set(flags) - {"fully-random"}:
        return None
    snat = None
    if kind == "snat":
        snat = body.get("addr")
        if not isinstance(snat, str) or set(body) - {"addr", "port", "flags", "family"}:
            return None
    return MasqRule(protocol, modulus, below, ports, "fully-random" in flags, interface, snat)


_SOURCE_NAT = frozenset({"masquerade", "snat"})
_XT_SOURCE_NAT = frozenset({"MASQUERADE", "SNAT", "NETMAP"})  # iptables-nft's targets, as nft shows them


def other_nat_chains(structure: str, family: int, priority: int = DEFAULT_PRIORITY) -> tuple[ForeignRule, ...]:
    """The chains of other tables hooked at nat postrouting for ``family`` (``ip``/``ip6`` and
    ``inet`` tables) in ``nft --json list ruleset`` output (terse is enough) that may masquerade:
    a masquerade or snat statement in the chain or a chain it jumps to. In nftables an accept in one
    nat chain does not stop the next, so a chain that cannot masquerade cannot decide anything.
    ``priority``: masqd's chain's; a chain at the same or an earlier one acts first, a later one
    only on traffic masqd keeps. Ordered by priority; dormant tables are left out."""
    nft_family = NFT_FAMILY[family]
    objects = [next(iter(o.items())) for o in json.loads(structure).get("nftables", [])]
    dormant = {(body.get("family"), body.get("name")) for kind, body in objects
               if kind == "table" and "dormant" in _flags(body.get("flags"))}
    rules: dict[tuple[str, str, str], list[list]] = {}
    for kind, body in objects:
        if kind == "rule":
            rules.setdefault((body.get("family"), body.get("table"), body.get("chain")), []).append(body.get("expr", []))
    found = []
    for kind, body in objects:
        where = (body.get("family"), body.get("table"))
        if (kind != "chain" or body.get("type") != "nat" or body.get("hook") != "postrouting"
                or where[0] not in (nft_family, "inet") or where == (nft_family, TABLE) or where in dormant):
            continue
        if not _may_source_nat(rules, (*where, body.get("name"))):
            continue
        prio = body.get("prio")
        stage = AFTER if isinstance(prio, int) and prio > priority else BEFORE
        text = f"table {where[0]} {where[1]} chain {body.get('name')} priority {prio}"
        mark = _required_mark(rules, (*where, body.get("name")))
        found.append((prio if isinstance(prio, int) else priority,
                      ForeignRule(text, stage, MASQUERADES, kind="chain", mark=mark)))
    return tuple(rule for _, rule in sorted(found, key=lambda item: item[0]))


def _may_source_nat(rules: dict[tuple[str, str, str], list[list]], chain: tuple[str, str, str]) -> bool:
    """Whether ``chain`` or a chain of its table it jumps to (verdict maps too) holds a
    masquerade or snat statement."""
    pending, seen = [chain], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for expr in rules.get(current, ()):
            keys, targets = _scan(expr)
            if keys & _SOURCE_NAT or targets[1] & _XT_SOURCE_NAT:
                return True
            pending += [(*current[:2], target) for target in targets[0]]
    return False


def _required_mark(rules: dict[tuple[str, str, str], list[list]], chain: tuple[str, str, str],
                   seen: frozenset = frozenset()) -> str | None:
    """The packet mark every way ``chain`` may masquerade requires (as ``VALUE/MASK``): a mark
    match on each masquerading rule, or a ``meta mark & M == 0 return`` ahead of it (kube-proxy's
    ``masquerading`` chain; iptables-nft's ``KUBE-POSTROUTING``); ``None``: some way requires none."""
    required = found = None
    for expr in rules.get(chain, ()):
        tests = [test for item in expr if (test := _mark_test(item)) is not None]
        others = [item for item in expr[:-1] if _mark_test(item) is None and not _passive(item)]
        if expr and isinstance(expr[-1], dict) and "return" in expr[-1] and len(tests) == 1 and not others:
            required = required or _mark_text(*tests[0], returns=True)
            continue
        keys, (jumps, xt) = _scan(expr)
        targets = [(*chain[:2], target) for target in jumps if _may_source_nat(rules, (*chain[:2], target))]
        if not (keys & _SOURCE_NAT or xt & _XT_SOURCE_NAT or targets):
            continue
        own = required or next((text for test in tests if (text := _mark_text(*test, returns=False))), None)
        if own is None and (keys & _SOURCE_NAT or xt & _XT_SOURCE_NAT):
            return None
        for target in [] if own is not None else targets:
            inner = None if target in seen or target == chain else _required_mark(rules, target, seen | {chain})
            if inner is None:
                return None
            own = own or inner
        found = found or own
    return found


def _mark_test(item: object) -> tuple[int, str, int] | None:
    """(mask, op, value) of a ``meta mark [& MASK] ==|!= VALUE`` match."""
    match = item.get("match") if isinstance(item, dict) else None
    if not isinstance(match, dict) or match.get("op") not in ("==", "!=") or not isinstance(match.get("right"), int):
        return None
    left, mark = match.get("left"), {"meta": {"key": "mark"}}
    if left == mark:
        return 0xFFFFFFFF, match["op"], match["right"]
    both = left.get("&") if isinstance(left, dict) else None
    if isinstance(both, list) and len(both) == 2 and both[0] == mark and isinstance(both[1], int):
        return both[1], match["op"], match["right"]
    return None


def _mark_text(mask: int, op: str, value: int, returns: bool) -> str | None:
    """The mark the packets a mark test lets on carry (``returns``: the test returns, so those
    failing it go on), as ``VALUE/MASK``; ``None`` when an unmarked packet goes on too."""
    if (op == "==") != returns:  # those going on have mark & mask == value
        return f"{value:#x}/{mask:#x}" if value & mask else None
    if value:  # mark & mask != value: mark 0 too
        return None
    return f"{mask:#x}/{mask:#x}" if mask & (mask - 1) == 0 else f"!0x0/{mask:#x}"


def _passive(item: object) -> bool:
    """An expression that neither matches nor decides (a counter, a log, iptables-nft's comment)."""
    return isinstance(item, dict) and (set(item) <= {"counter", "log"} or item.get("xt", {}).get("name") == "comment")


def _scan(value, keys=None, jumps=None, xt=None) -> tuple[set, tuple[set, set]]:
    """Every key of a rule's JSON, the chains it jumps or goes to, and its xt target names."""
    keys, jumps, xt = (set() if keys is None else keys), (set() if jumps is None else jumps), (set() if xt is None else xt)
    if isinstance(value, dict):
        for key, item in value.items():
            keys.add(key)
            if key in ("jump", "goto") and isinstance(item, dict):
                jumps.add(item.get("target"))
            if key == "xt" and isinstance(item, dict) and item.get("type") == "target":
                xt.add(item.get("name"))
            _scan(item, keys, jumps, xt)
    elif isinstance(value, list):
        for item in value:
            _scan(item, keys, jumps, xt)
    return keys, (jumps, xt)


def _inside_rule(rule: object, family: int, position: int) -> ForeignRule | None:
    """A rule masqd does not write in its chain (as :func:`_parse_rule` kept it) as a
    :class:`ForeignRule`: its verdict, and its ``daddr`` match when it has one (any other match
    makes it conditional); ``None`` when it has no verdict that decides (a counter, a log)."""
    if not (isinstance(rule, tuple) and rule[:1] == ("unrecognised",)):
        return None  # a masquerade share with an odd shape: masqd's own kind of rule
    expr = json.loads(rule[1])
    if not expr:
        return None
    last = expr[-1]
    kind = next(iter(last)) if isinstance(last, dict) and last else None
    if kind in _SOURCE_NAT or (kind == "xt" and last["xt"].get("name") in _XT_SOURCE_NAT):
        effect = MASQUERADES
    elif kind in ("accept", "return"):
        effect = KEEPS
    elif kind in ("jump", "goto"):
        effect = EITHER
    else:
        return None
    destination, negated, conditional = None, False, False
    for item in expr[:-1]:
        match = item.get("match") if isinstance(item, dict) else None
        if isinstance(item, dict) and (set(item) <= {"counter", "log"}
                                       or item.get("xt", {}).get("name") == "comment"):
            continue
        if (match is not None and destination is None and match.get("op") in ("==", "!=")
                and match.get("left") == {"payload": {"protocol": NFT_FAMILY[family], "field": "daddr"}}):
            right = match.get("right")
            try:
                if isinstance(right, str):
                    destination = ipaddress.ip_network(right)
                elif isinstance(right, dict) and "prefix" in right:
                    destination = ipaddress.ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}")
                else:
                    conditional = True
                    continue
            except (ValueError, KeyError, TypeError):
                conditional = True
                continue
            negated = match["op"] == "!="
        else:
            conditional = True
    return ForeignRule(_describe(rule, family), INSIDE, effect, destination, negated,
                       not conditional and effect != EITHER, position)


def live_family(state: TableState | None, desired: TableState, others: tuple[ForeignRule, ...] = ()) -> LiveFamily:
    """What the kernel does with traffic in one family, from masqd's table as
    :func:`parse_listing` read it (``None``: no table); ``desired`` decides ``drift``. The chain is
    read the way the kernel walks it: the local and set returns keep, the first masquerade
    without a protocol or numgen match ends it; anything else is ``unexpected`` (and, when it may
    decide, ``foreign``). ``others``: other tables' nat postrouting chains
    (:func:`other_nat_chains`), also ``foreign``."""
    family = desired.family
    before = tuple(rule for rule in others if rule.stage == BEFORE)
    after = tuple(rule for rule in others if rule.stage == AFTER)
    if state is None:
        return LiveFamily(family, present=False, drift=why_rewritten(None, desired), foreign=(*before, *after))
    drift = None if state == desired else why_rewritten(state, desired)
    unexpected = [f"table flags masqd does not set ({item}; a dormant table does nothing)" if item.startswith("table flags")
                  else f"object masqd does not write: {item}" for item in state.foreign]
    hooked = state.chain is not None and state.chain[:2] == ("nat", "postrouting") \
        and not any(item.startswith("table flags") for item in state.foreign)  # e.g. dormant: the table does nothing
    if state.chain is not None:
        kind, hook, priority, policy = state.chain
        if (kind, hook) != ("nat", "postrouting"):
            unexpected.append(f"chain {CHAIN} is type {kind} hook {hook}, not nat postrouting")
        wanted = desired.chain[2] if desired.chain is not None else DEFAULT_PRIORITY
        if priority != wanted:
            unexpected.append(f"chain {CHAIN} at priority {priority}, masqd writes {priority_text(wanted)} ({wanted})")
        if policy != "accept":
            unexpected.append(f"chain {CHAIN} policy {policy}: traffic no rule returns or masquerades is {policy}ed")
    if state.set_type != desired.set_type:
        unexpected.append(f"set {set_name(family)} is {state.set_type or 'missing'}, masqd writes {desired.set_type}")
    local = lookup = masquerade = False
    inside: list[tuple[bool, object]] = []  # (after the set lookup, rule)
    keep_sources: list[Network] = []
    masq_sources: list[Network] | None = None
    finals: list[MasqRule] = []  # the final masquerade rule of each outputInterfaces name
    for rule in state.rules:
        if masquerade:
            unexpected.append(f"after the final masquerade, never reached: {_describe(rule, family)}")
        elif rule == LOCAL_RETURN:
            local = True
        elif rule == set_return(family):
            lookup = True
        elif isinstance(rule, SourceReturn) and not lookup and not finals:
            nets = [ipaddress.ip_network(text) for text in _element_texts(rule.intervals, family)]
            if rule.negated:
                masq_sources = (masq_sources or []) + nets
            else:
                keep_sources += nets
        elif isinstance(rule, MasqRule):
            if rule.protocol is None and rule.modulus is None:  # else one --to-ports share
                finals.append(rule)
                masquerade = rule.interface is None  # one per interface: the chain goes on to the next
        else:
            unexpected.append(f"rule masqd does not write: {_describe(rule, family)}")
            inside.append((lookup, rule))
    if len({rule.snat for rule in finals}) > 1:
        unexpected.append("final rules rewrite to different addresses: " + ", ".join(
            dict.fromkeys(f"snat to {rule.snat}" if rule.snat else "masquerade" for rule in finals)))
    nonmasq = tuple(ipaddress.ip_network(text) for text in _element_texts(state.intervals, family)) if lookup else ()
    foreign = tuple(found for after_lookup, rule in inside
                    if (found := _inside_rule(rule, family, len(nonmasq) if after_lookup else 0)) is not None)
    return LiveFamily(family, present=True, hooked=hooked, local_exempt=local, nonmasq=nonmasq,
                      masquerade=bool(finals), unexpected=tuple(unexpected), drift=drift,
                      foreign=(*before, *foreign, *after), keep_sources=tuple(keep_sources),
                      masq_sources=None if masq_sources is None else tuple(masq_sources),
                      interfaces=tuple(iptables_interface(r.interface) for r in finals if r.interface is not None)
                      if not masquerade else (),
                      snat_to=finals[-1].snat if finals else None)


def _describe(rule: object, family: int) -> str:
    if isinstance(rule, tuple) and rule[:1] == ("unrecognised",):
        text = str(rule[1])
        return text if len(text) <= 200 else text[:200] + "..."
    return _render_rule(rule, family)


def why_rewritten(current: TableState | None, desired: TableState) -> str:
    """Why ``current`` (read back; ``None``: no table) is not ``desired``: what is missing or differs."""
    name = f"{NFT_FAMILY[desired.family]} {TABLE}"
    if current is None:
        return f"table {name} missing"
    chain = "chain"
    if current.chain is not None and desired.chain is not None and current.chain[:2] + current.chain[3:] \
            == desired.chain[:2] + desired.chain[3:]:
        chain = f"chain priority ({current.chain[2]}, masqd writes {desired.chain[2]})"
    diffs = [part for part, differs in (
        (chain, current.chain != desired.chain),
        ("set type", current.set_type != desired.set_type),
        ("set elements", current.intervals != desired.intervals),
        ("rules", current.rules != desired.rules),
        (f"foreign objects ({', '.join(current.foreign)})", current.foreign != desired.foreign),
    ) if differs]
    return f"table {name}: {', '.join(diffs)} differ"
