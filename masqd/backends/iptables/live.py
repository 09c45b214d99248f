"""What the kernel does with traffic, read from ``iptables-save -t nat`` (pure): masqd's chain
as the kernel walks it, and the rules masqd did not write that may decide whether traffic is
masqueraded (in POSTROUTING around masqd's jump, or inside masqd's chain). ``explain --live``
and the drift check read it.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from masqd.backends.base import AFTER, BEFORE, EITHER, INSIDE, KEEPS, MASQUERADES, ForeignRule, LiveFamily
from masqd.backends.iptables.render import APPEND, SOURCE_COMMENT, NatState, plan_restore
from masqd.cidrs import Network

_COMMENT = r'(?:-m comment --comment "(?:[^"\\]|\\.)*" )?'
_KEEP_RULE = re.compile(rf"(?:-d (?P<net>\S+) )?{_COMMENT}-j RETURN")
_SOURCE_RULE = re.compile(rf"-s (?P<net>\S+) {_COMMENT}-j RETURN")
_MASQ_RULE = re.compile(rf"(?:-s (?P<source>\S+) )?(?:-o (?P<interface>\S+) )?(?:-p (?P<protocol>\S+) )?{_COMMENT}"
                        r"(?:-m statistic --mode random --probability [0-9.]+ )?"
                        r"-j (?:MASQUERADE(?: --to-ports [0-9]+(?:-[0-9]+)?)?|SNAT --to-source (?P<snat>\S+))"
                        r"(?: --random-fully)?")


@dataclass(frozen=True, slots=True)
class _RuleMatch:
    """What :func:`_read_rule` makes of one ``-A`` line: its ``-d`` (and whether negated), whether
    it has any other match (``conditional``: not evaluated here), and its target. ``mark``: its
    ``-m mark [!] --mark VALUE`` (VALUE, negated); ``only_mark``: that is its one match."""

    destination: Network | None
    negated: bool
    conditional: bool
    target: str | None
    goto: bool
    mark: tuple[str, bool] | None = None
    only_mark: bool = False


#: Targets that rewrite the source address.
_SOURCE_NAT_TARGETS = frozenset({"MASQUERADE", "SNAT", "NETMAP"})
#: Targets that do not end the chain, so cannot decide whether a packet is masqueraded.
_PASSING_TARGETS = frozenset({"LOG", "NFLOG", "ULOG", "MARK", "CONNMARK", "TRACE", "AUDIT", "SET", "CLASSIFY",
                              "DSCP", "TOS", "TTL", "HL", "TCPMSS", "CHECKSUM", "SECMARK", "CONNSECMARK",
                              "IDLETIMER", "LED", "RATEEST", "TEE", "NOTRACK", "CT"})


def _read_rule(line: str, family: int) -> _RuleMatch:
    """Tokens of an iptables-save ``-A`` line, as far as deciding on a destination goes."""
    try:
        tokens = shlex.split(line)
    except ValueError:  # an unbalanced quote: keep only the target
        target = re.search(r" -([jg]) (\S+)", line)
        return _RuleMatch(None, False, True, target and target[2], bool(target) and target[1] == "g")
    destination, negated, conditional, negate, mark = None, False, False, False, None
    index = 2  # after -A CHAIN
    while index < len(tokens):
        token = tokens[index]
        if token == "!":
            negate = True
            index += 1
            continue
        if token in ("-j", "-g"):
            target = tokens[index + 1] if index + 1 < len(tokens) else None
            return _RuleMatch(destination, negated, conditional or mark is not None, target, token == "-g", mark,
                              mark is not None and not conditional and destination is None)
        if token == "-d" and index + 1 < len(tokens) and destination is None:
            try:
                destination = ipaddress.ip_network(tokens[index + 1], strict=False)
                negated = negate
            except ValueError:
                conditional = True
            index += 2
        elif token == "-m" and tokens[index + 1:index + 3] == ["comment", "--comment"]:
            index += 4
        elif token == "-m" and mark is None and (tokens[index + 1:index + 3] == ["mark", "--mark"]
                                                 or tokens[index + 1:index + 4] == ["mark", "!", "--mark"]):
            negated_mark = tokens[index + 2] == "!"
            index += 3 + negated_mark
            mark = (tokens[index], negated_mark) if index < len(tokens) else None
            conditional |= mark is None
            index += 1
        else:
            conditional = True
            index += 1
        negate = False
    if destination is not None and destination.version != family:
        conditional = True
    return _RuleMatch(destination, negated, conditional or mark is not None, None, False, mark)


def _effects(rule: _RuleMatch, chains: Mapping[str, tuple[str, ...]], family: int, returns_keep: bool,
             seen: frozenset[str] = frozenset()) -> frozenset[str]:
    """What a rule may do to the source address: a set of :data:`MASQUERADES` / :data:`KEEPS`
    (empty: it cannot decide). ``returns_keep``: RETURN leaves the packet unmasqueraded here (in
    POSTROUTING it ends nat processing; in masqd's chain it leaves masqd's rules without a
    masquerade) instead of going back to a chain that goes on deciding."""
    target = rule.target
    if target is None or target in _PASSING_TARGETS:
        return frozenset()
    if target in _SOURCE_NAT_TARGETS:
        return frozenset({MASQUERADES})
    if target == "ACCEPT" or (target == "RETURN" and returns_keep):
        return frozenset({KEEPS})
    if target == "RETURN":
        return frozenset()
    if target not in chains or target in seen:  # an extension masqd does not know, or a loop
        return frozenset({MASQUERADES, KEEPS})
    # falling off (or RETURN from) a goto'd chain returns where the goto's chain would have
    found = frozenset({KEEPS}) if rule.goto and returns_keep else frozenset()
    for line in chains[target]:
        found |= _effects(_read_rule(line, family), chains, family, returns_keep and rule.goto, seen | {target})
    return found


def _required_mark(rule: _RuleMatch, chains: Mapping[str, tuple[str, ...]], family: int,
                   seen: frozenset[str] = frozenset()) -> str | None:
    """The packet mark every way ``rule`` may masquerade requires: its own ``-m mark --mark M``,
    or, in the chain it jumps to, that of each masquerading rule, or a ``-m mark ! --mark M -j
    RETURN`` ahead of it (kube-proxy's ``KUBE-POSTROUTING``); ``None``: some way requires none."""
    if rule.mark is not None and not rule.mark[1] and _marked(rule.mark[0]):
        return rule.mark[0]
    target = rule.target
    if target not in chains or target in seen:
        return None
    required = found = None
    for line in chains[target]:
        inner = _read_rule(line, family)
        if inner.target == "RETURN" and inner.only_mark and inner.mark[1] and _marked(inner.mark[0]):
            required = required or inner.mark[0]
        elif MASQUERADES in _effects(inner, chains, family, False, seen | {target}):
            mark = required or _required_mark(inner, chains, family, seen | {target})
            if mark is None:
                return None
            found = found or mark
    return found


def _marked(mark: str) -> bool:
    """Whether ``-m mark --mark VALUE[/MASK]`` leaves out unmarked packets (mark 0)."""
    value, _, mask = mark.partition("/")
    try:
        return int(value, 0) & int(mask or "0xffffffff", 0) != 0
    except ValueError:
        return False


def _foreign(line: str, stage: str, chains: Mapping[str, tuple[str, ...]], family: int,
             position: int = 0) -> ForeignRule | None:
    """``line`` (in POSTROUTING or masqd's chain) as a :class:`ForeignRule`; ``None`` when it
    cannot decide anything."""
    rule = _read_rule(line, family)
    effects = _effects(rule, chains, family, True)
    if not effects:
        return None
    effect = EITHER if len(effects) > 1 else next(iter(effects))
    certain = not rule.conditional and rule.target not in chains and effect != EITHER
    mark = _required_mark(rule, chains, family) if MASQUERADES in effects else None
    return ForeignRule(line, stage, effect, rule.destination, rule.negated, certain, position, mark=mark)


def postrouting_rules(chains: Mapping[str, tuple[str, ...]], chain: str, family: int) -> tuple[ForeignRule, ...]:
    """The nat POSTROUTING rules (of :func:`.render.parse_nat_chains`) that may decide whether
    traffic is masqueraded: those before the first rule sending traffic to masqd's ``chain`` (all
    of them when there is none) act first; those after it act on what masqd's chain returns."""
    rules = chains.get("POSTROUTING", ())
    to_chain = re.compile(rf"(?:^| )-[jg] {re.escape(chain)}(?: |$)")
    first = next((index for index, line in enumerate(rules) if to_chain.search(line)), len(rules))
    found = [_foreign(line, BEFORE, chains, family) for line in rules[:first]]
    found += [_foreign(line, AFTER, chains, family) for line in rules[first + 1:] if not to_chain.search(line)]
    return tuple(rule for rule in found if rule is not None)


def live_family(state: NatState, family: int, desired: tuple[str, ...], chain: str,
                nat_chains: Mapping[str, tuple[str, ...]] | None = None, placement: str = APPEND) -> LiveFamily:
    """What the kernel does with traffic in one family, from masqd's chain and jumps as
    :func:`.render.parse_nat_state` found them; ``desired`` (the chain's rules as a sync would
    write them) decides ``drift``. Rules are read the way the kernel walks them: RETURN rules (any
    comment, none, or ``-d`` omitted for 0/0) keep their destination, the first MASQUERADE without
    ``-p`` ends the chain; anything else is ``unexpected`` (and, when it may decide, ``foreign``).
    ``nat_chains`` (:func:`.render.parse_nat_chains` of the same text): the other nat rules, so
    the POSTROUTING rules around masqd's jump are ``foreign`` too. ``placement``:
    ``--postrouting-jump``; a jump elsewhere is ``unexpected`` and drift."""
    text, reason = plan_restore(desired, state, chain, placement)
    drift = None if text is None else reason
    chains = nat_chains or {}
    outside = postrouting_rules(chains, chain, family) if nat_chains is not None else ()
    if not state.chain_exists:
        return LiveFamily(family, present=False, drift=drift, foreign=outside)
    unexpected: list[str] = []
    inside: list[ForeignRule] = []
    if state.jumps > 1:
        unexpected.append(f"POSTROUTING jump to {chain} present {state.jumps} times")
    if (misplaced := state.misplaced(placement)) is not None:
        unexpected.append(misplaced)
    unexpected += [f"POSTROUTING rule masqd does not write sends traffic to {chain}: {line}" for line in state.other_jumps]
    nonmasq: list[Network] = []
    keep_sources: list[Network] = []
    finals: list[re.Match] = []  # the final rule of each (source, interface) the masquerade is limited to
    masquerade = False
    prefix = f"-A {chain} "
    for rule in state.rules:
        body = rule.removeprefix(prefix)
        if masquerade:
            unexpected.append(f"after the final MASQUERADE, never reached: {rule}")
        elif keep := _KEEP_RULE.fullmatch(body):
            if keep["net"] is None and f'"{SOURCE_COMMENT}"' in body and not nonmasq:  # -s 0/0: iptables omits it
                keep_sources.append(ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0"))
                continue
            try:
                nonmasq.append(ipaddress.ip_network(keep["net"] or ("0.0.0.0/0" if family == 4 else "::/0"), strict=False))
            except ValueError:
                unexpected.append(f"rule masqd does not write: {rule}")
        elif (source := _SOURCE_RULE.fullmatch(body)) and not nonmasq and _network(source["net"]) is not None:
            keep_sources.append(_network(source["net"]))
        elif (masq := _MASQ_RULE.fullmatch(body)) and (masq["source"] is None or _network(masq["source"]) is not None):
            if masq["protocol"] is None:  # a -p rule is one --to-ports share; the last has none
                finals.append(masq)
                masquerade = masq["source"] is None and masq["interface"] is None
        else:
            unexpected.append(f"rule masqd does not write: {rule}")
            if (found := _foreign(rule, INSIDE, chains, family, len(nonmasq))) is not None:
                inside.append(found)
    local = state.jumps > 0 or any("! --dst-type LOCAL" in line for line in state.other_jumps)
    before = tuple(rule for rule in outside if rule.stage == BEFORE)
    after = tuple(rule for rule in outside if rule.stage == AFTER)
    rewrites = dict.fromkeys(_snat_address(m["snat"], family) for m in finals)
    if len(rewrites) > 1:
        unexpected.append("final rules rewrite to different addresses: "
                          + ", ".join(f"SNAT to {address}" if address else "MASQUERADE" for address in rewrites))
    sources = tuple(dict.fromkeys(_network(m["source"]) for m in finals if m["source"] is not None))
    interfaces = tuple(dict.fromkeys(m["interface"] for m in finals if m["interface"] is not None))
    limited = finals and not masquerade
    return LiveFamily(family, present=True, hooked=state.jumps > 0 or bool(state.other_jumps), local_exempt=local,
                      nonmasq=tuple(nonmasq), masquerade=bool(finals), unexpected=tuple(unexpected), drift=drift,
                      foreign=(*before, *inside, *after), keep_sources=tuple(keep_sources),
                      masq_sources=sources if limited and all(m["source"] is not None for m in finals) else None,
                      interfaces=interfaces if limited and all(m["interface"] is not None for m in finals) else (),
                      snat_to=_snat_address(finals[-1]["snat"], family) if finals else None)


def _snat_address(text: str | None, family: int) -> str | None:
    """The address of ``--to-source`` (``192.0.2.10:1024-2000``, ``[2001:db8::10]:1024-2000``)."""
    if text is None:
        return None
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.split(":", 1)[0] if family == 4 else text


def _network(text: str) -> Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
