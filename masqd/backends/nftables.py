"""The nftables backend: native interval sets, one atomic transaction per apply.

Per family masqd owns one table (``ip masqd``, and ``ip6 masqd`` with IPv6) holding a set of the
non-masquerade destinations and a ``nat`` chain hooked at postrouting (priority srcnat):

    fib daddr type local return          # like -m addrtype ! --dst-type LOCAL
    ip daddr @nonmasq4 return            # one O(log n) interval-set lookup, not a linear scan
    [meta l4proto P numgen random mod M < K masquerade to :A-B]   # --to-ports, spread evenly
    masquerade [fully-random]

Rendering and reading back are pure: :func:`render_replace` writes the nft transaction and
:func:`parse_listing` turns ``nft --json list table`` output into the same :class:`TableState`
model that :func:`desired_state` builds, so drift detection is a comparison of two values.

The set has ``flags interval`` but not ``auto-merge``: masqd collapses the CIDRs itself and always
rewrites the whole set, so auto-merge would merge nothing, while it makes nft 1.0.6 fetch every
existing element before a replace (100k elements: 1.0 s instead of 0.6 s per apply).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import re
import secrets
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from anyio.abc import ByteReceiveStream

from masqd.backends.base import (AFTER, BEFORE, EITHER, INSIDE, KEEPS, MASQUERADES, ForeignRule, LiveFamily,
                                 LiveRules, SyncResult)
from masqd.backends.tools import run_tool, script_line, tool_output
from masqd.cidrs import Network
from masqd.errors import ApplyError, BackendError, ReadBackError
from masqd.ruleset import PORT_PROTOCOLS, FamilyRules, Masquerade, RuleSet

TABLE = "masqd"
CHAIN = "nat"
SRCNAT_PRIORITY = 100
TABLE_COMMENT = "masqd: masquerade decisions for traffic leaving this node (managed by masqd, do not edit)"
CHAIN_COMMENT = "masqd: masquerade traffic that is not local and not in the non-masquerade set"
SET_COMMENT = "masqd: destinations that keep the pod source address"

_NFT_FAMILY = {4: "ip", 6: "ip6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}


def set_name(family: int) -> str:
    return f"nonmasq{family}"


# --- the model -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MasqRule:
    """``[meta l4proto P] [numgen random mod M < K] masquerade [to :A-B] [fully-random]``."""

    protocol: str | None = None
    modulus: int | None = None  # with ``below``: taken when numgen random mod M < K
    below: int | None = None
    ports: tuple[int, int] | None = None
    fully_random: bool = False


#: The two return rules, as model values.
LOCAL_RETURN = ("return", "fib-daddr-local")


def set_return(family: int) -> tuple[str, str]:
    return ("return", f"@{set_name(family)}")


@dataclass(frozen=True, slots=True)
class TableState:
    """What matters of one family's table, rendered or read back; ``None`` fields mean missing."""

    family: int
    chain: tuple[str, str, int, str] | None  # (type, hook, priority, policy)
    set_type: str | None
    intervals: tuple[tuple[int, int], ...]  # merged, sorted [first, last] address ranges
    rules: tuple[object, ...]
    #: Anything else in the table (another chain, set, map...) and table flags such as dormant:
    #: masqd's table holds only what masqd writes, so any of these means it must be rewritten.
    foreign: tuple[str, ...] = ()


def intervals_of(networks: list[Network] | tuple[Network, ...]) -> tuple[tuple[int, int], ...]:
    """Sorted address ranges covering ``networks``, overlapping and adjacent ones merged."""
    return _merge(
        (first, first | ((1 << (n.max_prefixlen - n.prefixlen)) - 1))
        for n in networks
        for first in (int(n.network_address),)
    )


def _merge(ranges) -> tuple[tuple[int, int], ...]:
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1][1] = last
        else:
            merged.append([first, last])
    return tuple((a, b) for a, b in merged)


def _element_texts(intervals: tuple[tuple[int, int], ...], family: int) -> list[str]:
    """The set's elements: each interval as one CIDR when it is one (the usual case, fast), else
    as the fewest CIDRs covering it."""
    address = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    bits = 32 if family == 4 else 128
    texts: list[str] = []
    for first, last in intervals:
        size = last - first + 1
        if size & (size - 1) == 0 and first % size == 0:
            texts.append(f"{address(first)}/{bits - size.bit_length() + 1}")
        else:
            texts.extend(map(str, ipaddress.summarize_address_range(address(first), address(last))))
    return texts


def _masq_rules(masquerade: Masquerade) -> tuple[MasqRule, ...]:
    rules = []
    for protocol in PORT_PROTOCOLS if masquerade.to_ports else ():
        remaining = sum(r.size for r in masquerade.to_ports)
        for index, ports in enumerate(masquerade.to_ports):
            last = index == len(masquerade.to_ports) - 1
            rules.append(MasqRule(
                protocol=protocol,
                modulus=None if last else remaining,
                below=None if last else ports.size,
                ports=(ports.first, ports.last),
                fully_random=masquerade.random_fully,
            ))
            remaining -= ports.size
    rules.append(MasqRule(fully_random=masquerade.random_fully))
    return tuple(rules)


@functools.lru_cache(maxsize=4)
def desired_state(family: FamilyRules, masquerade: Masquerade) -> TableState:
    """The table masqd wants for one family (cached: every resync asks again for the same one)."""
    return TableState(
        family=family.family,
        chain=("nat", "postrouting", SRCNAT_PRIORITY, "accept"),
        set_type=_ADDR_TYPE[family.family],
        intervals=intervals_of(family.nonmasq),
        rules=(LOCAL_RETURN, set_return(family.family), *_masq_rules(masquerade)),
    )


# --- rendering ---------------------------------------------------------------------------------------


def _render_rule(rule: object, family: int) -> str:
    if rule == LOCAL_RETURN:
        return "fib daddr type local return"
    if rule == set_return(family):
        return f"{_NFT_FAMILY[family]} daddr @{set_name(family)} return"
    assert isinstance(rule, MasqRule)
    words = []
    if rule.protocol:
        words.append(f"meta l4proto {rule.protocol}")
    if rule.modulus is not None:
        words.append(f"numgen random mod {rule.modulus} < {rule.below}")
    words.append("masquerade")
    if rule.ports:
        first, last = rule.ports
        words.append(f"to :{first}" if first == last else f"to :{first}-{last}")
    if rule.fully_random:
        words.append("fully-random")
    return " ".join(words)


def render_table(state: TableState) -> str:
    """The ``table ... { }`` block for one family (elements as the fewest CIDRs)."""
    family = state.family
    elements = ", ".join(_element_texts(state.intervals, family))
    lines = [
        f"table {_NFT_FAMILY[family]} {TABLE} {{",
        f'\tcomment "{TABLE_COMMENT}"',
        f"\tset {set_name(family)} {{",
        f"\t\ttype {state.set_type}",
        "\t\tflags interval",
        f'\t\tcomment "{SET_COMMENT}"',
    ]
    if elements:
        lines.append(f"\t\telements = {{ {elements} }}")
    lines += [
        "\t}",
        f"\tchain {CHAIN} {{",
        f'\t\tcomment "{CHAIN_COMMENT}"',
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        *(f"\t\t{_render_rule(rule, family)}" for rule in state.rules),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_replace(states: list[TableState]) -> str:
    """One transaction replacing each table whole: ``add`` (so ``delete`` cannot fail), ``delete``,
    then the new definition. nft applies the script atomically: packets see the old rules or the
    new ones, never a mix, and a failing script changes nothing."""
    parts = []
    for state in states:
        name = f"{_NFT_FAMILY[state.family]} {TABLE}"
        parts.append(f"add table {name}\ndelete table {name}\n" + render_table(state))
    return "".join(parts)


def render_delete(families: tuple[int, ...]) -> str:
    """A transaction removing masqd's tables, whether they exist or not."""
    return "".join(f"add table {_NFT_FAMILY[f]} {TABLE}\ndelete table {_NFT_FAMILY[f]} {TABLE}\n" for f in families)


def render_ruleset(ruleset: RuleSet) -> str:
    return render_replace([desired_state(family, ruleset.masquerade) for family in ruleset.families])


# --- reading back --------------------------------------------------------------------------------------


def parse_listing(text: str, family: int) -> TableState | None:
    """masqd's table of ``family`` in ``nft --json list ...`` output, as a :class:`TableState`
    (``None``: no such table). Other tables in the output are ignored; a terse listing (``-t``)
    has no set elements, so ``intervals`` is then empty.

    Anything masqd would not have written (an extra rule, an unknown expression) becomes a value
    that never equals a desired rule, so it is replaced on the next sync.
    """
    nft_family = _NFT_FAMILY[family]
    objects = [
        (kind, body)
        for kind, body in (next(iter(o.items())) for o in json.loads(text).get("nftables", []))
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
    for element in elements:
        if isinstance(element, dict) and "elem" in element:  # an element with options (comment...)
            element = element["elem"]["val"]
        if isinstance(element, str):
            value = to_int(element)
            ranges.append((value, value))
        elif "prefix" in element:
            first = to_int(element["prefix"]["addr"])
            ranges.append((first, first | ((1 << (bits - element["prefix"]["len"])) - 1)))
        elif "range" in element:
            ranges.append((to_int(element["range"][0]), to_int(element["range"][1])))
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
        if (match.get("op") == "==" and left.get("payload") == {"protocol": _NFT_FAMILY[family], "field": "daddr"}
                and right == f"@{set_name(family)}"):
            return set_return(family)
    if kinds and kinds[-1] == "masquerade":
        rule = _parse_masquerade(expr, family)
        if rule is not None:
            return rule
    return ("unrecognised", json.dumps(expr, sort_keys=True))


def _flags(value: object) -> list:
    """nft's JSON prints a set of flags as a list, or (newer versions) one flag as a string."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _parse_masquerade(expr: list[dict], family: int) -> MasqRule | None:
    protocol = modulus = below = None
    for item in expr[:-1]:
        match = item.get("match", {})
        left = match.get("left", {})
        if match.get("op") == "==" and left.get("meta") == {"key": "l4proto"} and protocol is None:
            protocol = match["right"]
        elif (match.get("op") == "<" and "numgen" in left and left["numgen"].get("mode") == "random"
              and left["numgen"].get("offset", 0) == 0 and modulus is None):
            modulus, below = left["numgen"]["mod"], match["right"]
        else:
            return None
    body = expr[-1]["masquerade"] or {}
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
    return MasqRule(protocol, modulus, below, ports, "fully-random" in flags)


_SOURCE_NAT = frozenset({"masquerade", "snat"})
_XT_SOURCE_NAT = frozenset({"MASQUERADE", "SNAT", "NETMAP"})  # iptables-nft's targets, as nft shows them


def other_nat_chains(structure: str, family: int, priority: int = SRCNAT_PRIORITY) -> tuple[ForeignRule, ...]:
    """The chains of other tables hooked at nat postrouting for ``family`` (``ip``/``ip6`` and
    ``inet`` tables) in ``nft --json list ruleset`` output (terse is enough) that may masquerade:
    a masquerade or snat statement in the chain or a chain it jumps to. In nftables an accept in one
    nat chain does not stop the next, so a chain that cannot masquerade cannot decide anything.
    ``priority``: masqd's chain's; a chain at the same or an earlier one acts first, a later one
    only on traffic masqd keeps. Ordered by priority; dormant tables are left out."""
    nft_family = _NFT_FAMILY[family]
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
        found.append((prio if isinstance(prio, int) else priority, ForeignRule(text, stage, MASQUERADES, kind="chain")))
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
                and match.get("left") == {"payload": {"protocol": _NFT_FAMILY[family], "field": "daddr"}}):
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
        return LiveFamily(family, present=False, drift=_why(None, desired), foreign=(*before, *after))
    drift = None if state == desired else _why(state, desired)
    unexpected = [f"table flags masqd does not set ({item}; a dormant table does nothing)" if item.startswith("table flags")
                  else f"object masqd does not write: {item}" for item in state.foreign]
    hooked = state.chain is not None and state.chain[:2] == ("nat", "postrouting") \
        and not any(item.startswith("table flags") for item in state.foreign)  # e.g. dormant: the table does nothing
    if state.chain is not None:
        kind, hook, priority, policy = state.chain
        if (kind, hook) != ("nat", "postrouting"):
            unexpected.append(f"chain {CHAIN} is type {kind} hook {hook}, not nat postrouting")
        if priority != SRCNAT_PRIORITY:
            unexpected.append(f"chain {CHAIN} at priority {priority}, masqd writes srcnat ({SRCNAT_PRIORITY})")
        if policy != "accept":
            unexpected.append(f"chain {CHAIN} policy {policy}: traffic no rule returns or masquerades is {policy}ed")
    if state.set_type != desired.set_type:
        unexpected.append(f"set {set_name(family)} is {state.set_type or 'missing'}, masqd writes {desired.set_type}")
    local = lookup = masquerade = False
    inside: list[tuple[bool, object]] = []  # (after the set lookup, rule)
    for rule in state.rules:
        if masquerade:
            unexpected.append(f"after the final masquerade, never reached: {_describe(rule, family)}")
        elif rule == LOCAL_RETURN:
            local = True
        elif rule == set_return(family):
            lookup = True
        elif isinstance(rule, MasqRule):
            masquerade = rule.protocol is None and rule.modulus is None  # else one --to-ports share
        else:
            unexpected.append(f"rule masqd does not write: {_describe(rule, family)}")
            inside.append((lookup, rule))
    nonmasq = tuple(ipaddress.ip_network(text) for text in _element_texts(state.intervals, family)) if lookup else ()
    foreign = tuple(found for after_lookup, rule in inside
                    if (found := _inside_rule(rule, family, len(nonmasq) if after_lookup else 0)) is not None)
    return LiveFamily(family, present=True, hooked=hooked, local_exempt=local, nonmasq=nonmasq,
                      masquerade=masquerade, unexpected=tuple(unexpected), drift=drift,
                      foreign=(*before, *foreign, *after))


def _describe(rule: object, family: int) -> str:
    if isinstance(rule, tuple) and rule[:1] == ("unrecognised",):
        text = str(rule[1])
        return text if len(text) <= 200 else text[:200] + "..."
    return _render_rule(rule, family)


# --- executor: the only code here that runs nft --------------------------------------------------------


class NftExecutor(Protocol):
    async def list_table(self, family: int) -> str | None: ...  # JSON text, None: no such table

    async def list_structure(self) -> str: ...  # JSON of every table without set elements (cheap)

    async def check(self, script: str) -> None: ...

    async def apply(self, script: str) -> None: ...


@runtime_checkable
class NftMonitor(Protocol):
    """An executor that can also follow the kernel's changes (``nft monitor``)."""

    #: the name of the table each ``apply`` adds and deletes again, marking the transaction as masqd's
    write_marker: str

    def monitor(self) -> AbstractAsyncContextManager[ByteReceiveStream]: ...  # nft monitor's output


class NftSubprocessExecutor:
    """Runs the real ``nft`` binary through anyio."""

    def __init__(self, binary: str = "nft"):
        self.binary = binary
        self.write_marker = f"{TABLE}_write_{secrets.token_hex(6)}"

    async def list_table(self, family: int) -> str | None:
        command = [self.binary, "--json", "list", "table", _NFT_FAMILY[family], TABLE]
        result = await run_tool(command, None)
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            if "No such file or directory" in stderr:  # ENOENT (LC_ALL=C)
                return None
            raise ReadBackError(command, stderr or f"exit {result.returncode}")
        return result.stdout.decode()

    async def list_structure(self) -> str:
        command = [self.binary, "--terse", "--json", "list", "ruleset"]
        result = await run_tool(command, None)
        if result.returncode != 0:
            raise ReadBackError(command, result.stderr.decode(errors="replace") or f"exit {result.returncode}")
        return result.stdout.decode()

    async def check(self, script: str) -> None:
        await self._load([self.binary, "--check", "-f", "-"], script)

    async def apply(self, script: str) -> None:
        """Apply ``script`` as one transaction, marked as masqd's by a table added and deleted at
        its end (after the script, so nft's line numbers in errors stay those of ``script``)."""
        await self._load([self.binary, "-f", "-"], script + _marker_lines(self.write_marker), script)

    def monitor(self) -> AbstractAsyncContextManager[ByteReceiveStream]:
        return tool_output([self.binary, "monitor"])

    async def _load(self, command: list[str], text: str, script: str | None = None) -> None:
        """Run ``command`` on ``text``; ``script``: the part of it errors are quoted from."""
        result = await run_tool(command, text.encode())
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            raise ApplyError(command, result.returncode, _first_error(stderr), _failed_line(stderr, script or text))


def _first_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if "Error" in line), lines[0] if lines else stderr)


def _failed_line(stderr: str, script: str) -> str | None:
    """nft names errors as ``/dev/stdin:LINE:COL-COL: Error: ...``; return that script line."""
    match = re.search(r":(\d+):\d+(?:-\d+)?: Error", stderr)
    return script_line(script, int(match.group(1))) if match else None


def _marker_lines(marker: str) -> str:
    return f"add table ip {marker}\ndelete table ip {marker}\n"


#: What ``nft monitor`` prints after the changes of each transaction.
_GENERATION = "# new generation "
#: What it prints when the kernel dropped events it could not deliver (``ENOBUFS``); it goes on.
_LOST = "# ERROR"


class ChangeFilter:
    """Reads ``nft monitor`` output, a line at a time, and says when a transaction made by another
    process has changed masqd's tables. Pure: no I/O.

    The monitor prints one line per object a transaction added or removed (``delete element ip
    masqd nonmasq4 { 10.0.0.0/8 }``), then ``# new generation N by process PID (COMM)``. masqd's
    own writes are told apart by the table named ``marker`` that each of them adds and deletes
    (the PID would not do: the kernel reports it as the host sees it, not as masqd's container does).
    """

    def __init__(self, marker: str):
        self._marker = marker
        self._change: str | None = None  # the first line of this transaction touching masqd's tables
        self._own = False  # this transaction is masqd's

    def feed(self, line: str) -> str | None:
        """Take one line; returns the first change of a foreign transaction that changed masqd's
        tables, and who made it (``...; by process PID (COMM)``, the PID as the host sees it),
        when ``line`` ends it, else ``None``."""
        if line.startswith(_GENERATION):
            change = None if self._own or self._change is None else f"{self._change}; {_writer(line)}"
            self._change, self._own = None, False
            return change
        if line.startswith(_LOST):  # the kernel dropped events (socket buffer full): anything may have changed
            self._change, self._own = None, False
            return f"nft monitor: {line[2:].strip()}"
        words = line.split(" ", 4)
        if len(words) >= 4 and words[2] in ("ip", "ip6"):
            if words[3] == TABLE:
                self._change = self._change or (line if len(line) <= 200 else line[:200] + "...")
            elif words[:2] == ["add", "table"] and words[3] == self._marker:
                self._own = True
        return None


def _writer(generation: str) -> str:
    """``by process 4242 (nft)`` from ``# new generation 7 by process 4242 (nft)``."""
    at = generation.find(" by ")
    return generation[at + 1:] if at >= 0 else "by an unknown process"


# --- the backend ---------------------------------------------------------------------------------------


class NftablesBackend:
    """masqd's own ``ip``/``ip6`` ``masqd`` tables, written with ``nft -f -`` in one transaction."""

    name = "nftables"

    def __init__(self, executor: NftExecutor | None = None):
        self.executor: NftExecutor = executor or NftSubprocessExecutor()
        # per family, the set elements of the last table written and verified by this process
        self._written: dict[int, tuple[tuple[int, int], ...]] = {}

    async def probe(self) -> None:
        """Nothing to learn: every nft that has ``fully-random`` and ``fib`` is good enough."""

    def render(self, ruleset: RuleSet) -> str:
        return render_ruleset(ruleset)

    async def current(self, family: int) -> TableState | None:
        text = await self.executor.list_table(family)
        return None if text is None else parse_listing(text, family)

    async def sync(self, ruleset: RuleSet) -> SyncResult:
        stale: list[TableState] = []
        reasons: list[str] = []
        for family in ruleset.families:
            desired = desired_state(family, ruleset.masquerade)
            if self._written.get(family.family, desired.intervals) != desired.intervals:
                # the elements changed since this process wrote them, so the table is rewritten
                # anyway: reading 100k elements back first would cost as much as the write
                stale.append(desired)
                reasons.append(f"table {_NFT_FAMILY[family.family]} {TABLE}: set elements differ")
                continue
            current = await self.current(family.family)
            if current != desired:
                stale.append(desired)
                reasons.append(_why(current, desired))
        # a family no longer managed (IPv6 turned off) must not keep masquerading from an old table
        managed = {family.family for family in ruleset.families}
        unmanaged = tuple([f for f in (4, 6) if f not in managed and await self.executor.list_table(f) is not None])
        if not stale and not unmanaged:
            return SyncResult()
        script = render_replace(stale) + render_delete(unmanaged)
        await self.executor.check(script)
        await self.executor.apply(script)
        await self._verify(stale)
        self._written.update((state.family, state.intervals) for state in stale)
        for family in unmanaged:
            self._written.pop(family, None)
        return SyncResult(
            tuple(f"ipv{s.family}" for s in stale) + tuple(f"ipv{f}" for f in unmanaged),
            tuple(reasons) + tuple(f"table {_NFT_FAMILY[f]} {TABLE} removed: that family is not enabled" for f in unmanaged),
        )

    async def _verify(self, written: list[TableState]) -> None:
        """Read the tables just written back, without their elements (a terse listing costs
        nothing even at 100k elements; a full one as much as the write), so that a table the
        kernel keeps in another form is an error, not a rewrite on every resync. The elements
        are compared by the next resync."""
        structure = await self.executor.list_structure()
        for desired in written:
            after = parse_listing(structure, desired.family)
            if after is None or dataclasses.replace(after, intervals=desired.intervals) != desired:
                raise BackendError(
                    f"{_NFT_FAMILY[desired.family]} {TABLE}: nft accepted the table but reads it back differently"
                )

    async def read_back(self, ruleset: RuleSet) -> LiveRules:
        """What the kernel holds of masqd's table for each family of ``ruleset``; reads only."""
        structure = await self.executor.list_structure()
        families = []
        for family in ruleset.families:
            desired = desired_state(family, ruleset.masquerade)
            state = await self.current(family.family)
            priority = state.chain[2] if state is not None and state.chain is not None else SRCNAT_PRIORITY
            others = other_nat_chains(structure, family.family, priority if isinstance(priority, int) else SRCNAT_PRIORITY)
            families.append(live_family(state, desired, others))
        return LiveRules(self.name, f"table {TABLE}", tuple(families))

    async def monitor(self, notify: Callable[[str], None]) -> None:
        """Until cancelled, call ``notify(change)`` soon after another process changes masqd's
        tables (``change``: the first thing it did, as ``nft monitor`` prints it), so that drift
        is healed at once instead of at the next resync. masqd's own writes are not reported.
        Raises :class:`~masqd.errors.BackendError` when ``nft monitor`` cannot run or exits."""
        executor = self.executor
        if not isinstance(executor, NftMonitor):
            raise BackendError(f"{type(executor).__name__} cannot follow nftables changes (it has no monitor())")
        changes = ChangeFilter(executor.write_marker)
        rest = b""
        async with executor.monitor() as output:
            async for chunk in output:
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    if (change := changes.feed(line.decode(errors="replace"))) is not None:
                        notify(change)

    async def cleanup(self, chain: str = "", families: tuple[int, ...] = (4, 6)) -> tuple[str, ...]:
        """Delete masqd's tables (``chain`` is the iptables backend's concern and is ignored).
        Returns what was removed (e.g. ``("ip masqd",)``)."""
        present = [f for f in families if await self.executor.list_table(f) is not None]
        if present:
            await self.executor.apply(render_delete(tuple(present)))
        for family in present:
            self._written.pop(family, None)
        return tuple(f"{_NFT_FAMILY[f]} {TABLE}" for f in present)


def _why(current: TableState | None, desired: TableState) -> str:
    name = f"{_NFT_FAMILY[desired.family]} {TABLE}"
    if current is None:
        return f"table {name} missing"
    diffs = [part for part, differs in (
        ("chain", current.chain != desired.chain),
        ("set type", current.set_type != desired.set_type),
        ("set elements", current.intervals != desired.intervals),
        ("rules", current.rules != desired.rules),
        (f"foreign objects ({', '.join(current.foreign)})", current.foreign != desired.foreign),
    ) if differs]
    return f"table {name}: {', '.join(diffs)} differ"
