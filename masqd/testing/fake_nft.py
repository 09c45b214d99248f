"""An in-memory ``nft`` that tracks table contents, like kubernetes-sigs/knftables' ``Fake``.

:class:`FakeNft` is an :class:`~masqd.backends.nftables.executor.NftExecutor` that applies the
transactions masqd writes, all or nothing, keeps the tables as a model (:attr:`FakeNft.tables`),
and lists them byte for byte as nft 1.0.6 does (``--json list table``, ``--terse --json list
ruleset``, handles included). It models ``add table``, ``delete table`` and ``table ip|ip6 NAME
{ ... }`` blocks of comments, sets (``type``, ``flags interval``, ``comment``, ``elements``) and
chains (``comment``, ``type ... hook ... priority ...; policy ...;``, and the rules masqd
writes), one statement a line. It refuses, as nft does (an :class:`~masqd.errors.ApplyError`
from ``/dev/stdin:LINE:COL-COL: Error: ...`` and the failing line), anything else, deleting a
missing table, elements of another family or overlapping, a rule naming a missing set, and a
block for a table that exists (nft would merge into it). Element changes sent over netlink
(:meth:`FakeNft.change_elements`) are applied all or nothing too. Its ``monitor()`` prints
each transaction, as ``nft monitor`` does in short.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import itertools
import json
import math
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from masqd.backends.nftables.executor import load_error, marker_lines
from masqd.backends.nftables.netlink import Change
from masqd.netlink import describe_errno
from masqd.backends.nftables.render import NFT_FAMILY, TABLE, set_name
from masqd.errors import ApplyError, ElementsRefusedError, ToolExitedError
from masqd.testing.nft_listing import dump, table_json

_SET_TYPES = {"ipv4_addr": "ip", "ipv6_addr": "ip6"}  # set type -> the family of its addresses
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
_PROTOCOLS = frozenset({"tcp", "udp", "sctp", "udplite", "dccp", "icmp", "icmpv6"})
_NAT_FLAGS = frozenset({"fully-random", "random", "persistent"})
_TOKEN = re.compile(r'"[^"]*"|[{};,=<]|[^\s{};,=<"]+')


@dataclass
class Set:
    """A named set: ``elements`` are sorted, disjoint ``(first, last)`` address ranges, one per
    element as written (adjacent elements are not merged: the kernel keeps them apart too)."""

    name: str
    handle: int
    type: str
    flags: list[str] = field(default_factory=list)
    comment: str | None = None
    elements: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Rule:
    handle: int
    expr: list[Any]  # as ``nft --json`` prints it


@dataclass
class Chain:
    name: str
    handle: int
    hook: tuple[str, str, int, str] | None = None  # (type, hook, priority, policy); None: a regular chain
    comment: str | None = None
    rules: list[Rule] = field(default_factory=list)


@dataclass
class Table:
    family: str
    name: str
    handle: int
    comment: str | None = None
    flags: object = None  # as listed (nft 1.0.6 prints a dormant table's flag as "ip")
    sets: dict[str, Set] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)
    last_handle: int = 0  # the table's own handle counter (chains, sets and rules share it)

    def new_handle(self) -> int:
        self.last_handle += 1
        return self.last_handle


class _Token(NamedTuple):
    text: str
    line: int  # 1-based
    start: int  # 1-based columns, inclusive
    end: int


class _Refused(Exception):
    """nft refuses the script: ``message``, about ``token``."""

    def __init__(self, token: _Token, message: str):
        self.token, self.message = token, message


class FakeNft:
    """An in-memory nft: see the module docstring."""

    def __init__(self, write_marker: str = f"{TABLE}_write_fake"):
        #: (family, name) -> table, in the order the kernel lists them (creation)
        self.tables: dict[tuple[str, str], Table] = {}
        #: ("list", family), ("list-structure", None), ("apply", script), ("elements", changes)
        self.calls: list[tuple[str, object]] = []
        #: the table each :meth:`apply` adds and deletes again, as the real executor's
        self.write_marker = write_marker
        self._table_handles = 0  # the network namespace's table handle counter
        self._monitors: list[MemoryObjectSendStream[bytes]] = []  # what nft monitor would print to
        self._generation = 0

    @property
    def writes(self) -> list[str]:
        """The scripts applied, in order."""
        return [script for kind, script in self.calls if kind == "apply"]

    # --- the executor -----------------------------------------------------------------------------

    async def list_table(self, family: int) -> str | None:
        self.calls.append(("list", family))
        return self.listing("ip" if family == 4 else "ip6")

    async def list_structure(self) -> str:
        self.calls.append(("list-structure", None))
        return self.ruleset_listing(terse=True)

    async def apply(self, script: str) -> None:
        self.calls.append(("apply", script))
        self.tables, self._table_handles = self._transaction(
            ["nft", "-f", "-"], script + marker_lines(self.write_marker), script)
        self._report(script + marker_lines(self.write_marker))

    @asynccontextmanager
    async def monitor(self) -> AsyncIterator[MemoryObjectReceiveStream[bytes]]:
        """What ``nft monitor`` prints, as nft 1.0.6 does in short: each transaction's statements
        that name a table, then ``# new generation N by process 1 (nft)``. Ends, like the real
        monitor exiting, with :class:`~masqd.errors.ToolExitedError` after :meth:`stop_monitors`."""
        send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=math.inf)
        self._monitors.append(send)
        try:
            async with receive:
                yield receive
        finally:
            self._monitors.remove(send)
        raise ToolExitedError(["nft", "monitor"], 1, "fake nft: monitor stopped")

    def stop_monitors(self) -> None:
        list(map(MemoryObjectSendStream.close, self._monitors))

    def lose_events(self) -> None:
        """What nft monitor prints when the kernel dropped events it could not deliver."""
        self._print(b"# ERROR: Could not receive netlink event: No buffer space available\n")

    def _report(self, text: str) -> None:
        self._generation += 1
        lines = [line for line in text.splitlines() if len(line.split()) >= 4 and line.split()[2] in ("ip", "ip6")]
        self._print("".join(f"{line}\n" for line in lines).encode()
                    + f"# new generation {self._generation} by process 1 (nft)\n".encode())

    def _print(self, output: bytes) -> None:
        for send in self._monitors:
            send.send_nowait(output)

    async def change_elements(self, changes: list[Change]) -> None:
        """As nf_tables does with the batch masqd sends over netlink: every change or none.
        Removing an interval the set does not hold as one element, or adding one that overlaps
        another, is refused."""
        self.calls.append(("elements", tuple((f, tuple(r), tuple(a)) for f, r, a in changes)))
        tables = copy.deepcopy(self.tables)
        for family, remove, add in changes:
            table = tables.get((NFT_FAMILY[family], TABLE))
            named = None if table is None else table.sets.get(set_name(family))
            where = f"set {NFT_FAMILY[family]} {TABLE} {set_name(family)}"
            held = set(named.elements) if named is not None else set()
            if named is None or not held.issuperset(remove):
                raise ElementsRefusedError(f"removing {len(remove)} intervals from {where}", describe_errno(errno.ENOENT))
            elements = sorted((held - set(remove)) | set(add))
            if any(first <= last for (_, last), (first, _) in zip(elements, elements[1:])):
                raise ElementsRefusedError(f"adding {len(add)} intervals to {where}", describe_errno(errno.EEXIST))
            named.elements = elements
        self.tables = tables
        self._report("".join(f"delete element {NFT_FAMILY[f]} {TABLE} {set_name(f)}\n"
                             f"add element {NFT_FAMILY[f]} {TABLE} {set_name(f)}\n"
                             for f, _, _ in changes) + marker_lines(self.write_marker))

    # --- setting up and looking -------------------------------------------------------------------

    def run(self, script: str) -> None:
        """What ``nft -f -`` does with ``script`` (not recorded): all of it, or raise
        :class:`~masqd.errors.ApplyError` and change nothing."""
        self.tables, self._table_handles = self._transaction(["nft", "-f", "-"], script, script)
        self._report(script)

    def load_listing(self, text: str) -> None:
        """Make the tables ``nft --json list`` output ``text`` shows what the fake holds, each in
        place of the table of that name: the state another process (or a captured kernel) left.
        Rules are kept as listed, whatever their expressions."""
        for item in json.loads(text)["nftables"]:
            kind, body = next(iter(item.items()))
            if kind == "table":
                key = (body["family"], body["name"])
                self.tables[key] = Table(body["family"], body["name"], body["handle"], flags=body.get("flags"))
                self._table_handles = max(self._table_handles, body["handle"])
                self._report(f"add table {body['family']} {body['name']}")
                continue
            if kind == "metainfo":
                continue
            table = self.tables[(body["family"], body["table"])]
            if kind == "set":
                flags = body.get("flags", [])
                table.sets[body["name"]] = Set(body["name"], body["handle"], body["type"],
                                               [flags] if isinstance(flags, str) else list(flags), body.get("comment"),
                                               sorted(_listed_range(e, body["family"]) for e in body.get("elem", [])))
            elif kind == "chain":
                hook = (body["type"], body["hook"], body["prio"], body["policy"]) if "type" in body else None
                table.chains[body["name"]] = Chain(body["name"], body["handle"], hook)
            elif kind == "rule":
                table.chains[body["chain"]].rules.append(Rule(body["handle"], body["expr"]))
            else:
                raise ValueError(f"fake nft: cannot load a {kind}")
            table.last_handle = max(table.last_handle, body["handle"])

    def listing(self, family: str, name: str = TABLE) -> str | None:
        """``nft --json list table FAMILY NAME`` output; ``None`` when there is no such table."""
        table = self.tables.get((family, name))
        return None if table is None else dump(table_json(table, terse=False))

    def ruleset_listing(self, terse: bool = False) -> str:
        """``nft [--terse] --json list ruleset`` output (terse: sets without their elements)."""
        return dump([item for table in self.tables.values() for item in table_json(table, terse)])

    # --- interpreting a script --------------------------------------------------------------------

    def _transaction(self, command: list[str], text: str, script: str) -> tuple[dict[tuple[str, str], Table], int]:
        """The tables and table handle counter after ``text``, from copies: the fake keeps its
        own until the caller assigns them. ``script``: the part of ``text`` errors quote."""
        run = _Transaction(copy.deepcopy(self.tables), self._table_handles, text)
        try:
            run.run()
        except _Refused as refused:
            raise _refusal(command, text.splitlines(), refused, script) from None
        return run.tables, run.table_handles


def _refusal(command: list[str], lines: list[str], refused: _Refused, script: str) -> ApplyError:
    """The error nft prints: where, what, the line, and a marker under the offending words."""
    token = refused.token
    line = lines[token.line - 1] if 0 < token.line <= len(lines) else ""
    under = "".join(c if c == "\t" else " " for c in line[:token.start - 1]) + "^" * (token.end - token.start + 1)
    stderr = f"/dev/stdin:{token.line}:{token.start}-{token.end}: Error: {refused.message}\n{line}\n{under}\n"
    return load_error(command, 1, stderr, script)


class _Transaction:
    """One script's run over copies of the tables, a line at a time."""

    def __init__(self, tables: dict[tuple[str, str], Table], table_handles: int, text: str):
        self.tables = tables
        self.table_handles = table_handles
        self._lines = [tokens for number, line in enumerate(text.splitlines(), 1)
                       if (tokens := [_Token(m[0], number, m.start() + 1, m.end()) for m in _TOKEN.finditer(line)])]
        self._at = 0
        self._end = _Token("", text.count("\n") or 1, 1, 1)  # where "unexpected end of file" points

    def _block(self, top: bool = False) -> Iterator[tuple[list[_Token], list[str]]]:
        """The lines (tokens, words) of the block just opened, up to its ``}`` (``top``: all)."""
        while self._at < len(self._lines):
            tokens = self._lines[self._at]
            self._at += 1
            if [t.text for t in tokens] == ["}"] and not top:
                return
            yield tokens, [t.text for t in tokens]
        if not top:
            raise _Refused(self._end, "syntax error, unexpected end of file")

    def run(self) -> None:
        for tokens, words in self._block(top=True):
            if words[:2] in (["add", "table"], ["delete", "table"]) and len(words) == 4:
                key = _table_key(tokens[2], tokens[3])
                if words[0] == "add" and key not in self.tables:
                    self._create(key)
                elif words[0] == "delete" and self.tables.pop(key, None) is None:
                    raise _Refused(tokens[3], "Could not process rule: No such file or directory")
            elif words[0] == "table" and len(words) == 4 and words[3] == "{":
                key = _table_key(tokens[1], tokens[2])
                if key in self.tables:
                    raise _Refused(tokens[2], f"fake nft: table {' '.join(key)} exists, and a block would merge "
                                              "into it (not modelled: delete it first)")
                self._table(self._create(key))
            else:
                raise _unexpected(tokens[0])

    def _create(self, key: tuple[str, str]) -> Table:
        self.table_handles += 1
        self.tables[key] = Table(*key, self.table_handles)
        return self.tables[key]

    def _table(self, table: Table) -> None:
        """``table F N { ... }``. Handles are given at its end, in the order nft sends the block:
        chains first, then sets, then rules."""
        references: list[tuple[_Token, str]] = []  # (@SET token, the family it is matched as)
        for tokens, words in self._block():
            if words[0] == "comment" and len(words) == 2:
                table.comment = _string(tokens[1])
            elif words[0] in ("set", "chain") and len(words) == 3 and words[2] == "{":
                if words[1] in table.sets or words[1] in table.chains:
                    raise _Refused(tokens[1], "Could not process rule: File exists")
                if words[0] == "set":
                    table.sets[words[1]] = self._set(tokens[1])
                else:
                    table.chains[words[1]] = self._chain(table, words[1], references)
            else:
                raise _unexpected(tokens[0])
        for token, family in references:
            target = table.sets.get(token.text[1:])
            if target is None:
                raise _Refused(token, "No such file or directory")
            if _SET_TYPES[target.type] != family:
                raise _Refused(token, f"datatype mismatch: {family} daddr against a set of type {target.type}")
        for item in [*table.chains.values(), *table.sets.values(),
                     *(rule for chain in table.chains.values() for rule in chain.rules)]:
            item.handle = table.new_handle()

    def _set(self, name: _Token) -> Set:
        found = Set(name.text, 0, "")
        written: list[_Token] = []
        for tokens, words in self._block():
            if words[0] == "type" and len(words) == 2:
                if words[1] not in _SET_TYPES:
                    raise _Refused(tokens[1], f"fake nft: models ipv4_addr and ipv6_addr sets only, not {words[1]}")
                found.type = words[1]
            elif words == ["flags", "interval"]:
                found.flags = ["interval"]
            elif words[0] == "comment" and len(words) == 2:
                found.comment = _string(tokens[1])
            elif words[:3] == ["elements", "=", "{"] and words[-1] == "}" and set(words[4:-1:2]) <= {","}:
                written = tokens[3:-1:2]
            else:
                raise _unexpected(tokens[0])
        if not found.type:
            raise _Refused(name, "set definition does not specify key")
        found.elements = _set_elements(found, written)
        return found

    def _chain(self, table: Table, name: str, references: list[tuple[_Token, str]]) -> Chain:
        found = Chain(name, 0)
        for tokens, _ in self._block():
            for statement in _statements(tokens):
                words = [t.text for t in statement]
                if words[0] == "comment" and len(words) == 2:
                    found.comment = _string(statement[1])
                elif words[0] == "type" and len(words) >= 6 and words[2] == "hook" and words[4] == "priority":
                    found.hook = (words[1], words[3], _priority(statement[5:]), "accept")
                elif words[0] == "policy" and len(words) == 2 and words[1] in ("accept", "drop") and found.hook:
                    found.hook = (*found.hook[:3], words[1])
                else:
                    found.rules.append(Rule(0, _rule(statement, table.family, references)))
        return found


def _table_key(family: _Token, name: _Token) -> tuple[str, str]:
    if family.text not in NFT_FAMILY.values():
        raise _Refused(family, f"fake nft: models ip and ip6 tables only, not {family.text}")
    return family.text, name.text


def _rule(tokens: list[_Token], family: str, references: list[tuple[_Token, str]]) -> list[Any]:
    """One rule's expressions, as ``nft --json`` prints them; ``@SET`` references are added to
    ``references`` (checked when the table is complete)."""
    expr: list[Any] = []
    words = [t.text for t in tokens]
    at = 0
    while at < len(words):
        if expr and next(iter(expr[-1])) in ("return", "accept", "drop", "masquerade"):
            raise _unexpected(tokens[at])  # nothing may follow a verdict or masquerade
        if words[at:at + 4] == ["fib", "daddr", "type", "local"]:
            expr.append(_match("==", {"fib": {"result": "type", "flags": ["daddr"]}}, "local"))
            at += 4
        elif words[at:at + 2] == [family, "daddr"] and words[at + 2:at + 3] and words[at + 2].startswith("@"):
            references.append((tokens[at + 2], family))
            expr.append(_match("==", {"payload": {"protocol": family, "field": "daddr"}}, words[at + 2]))
            at += 3
        elif words[at:at + 2] == ["meta", "l4proto"] and words[at + 2:at + 3] and words[at + 2] in _PROTOCOLS:
            expr.append(_match("==", {"meta": {"key": "l4proto"}}, words[at + 2]))
            at += 3
        elif (words[at:at + 3] == ["numgen", "random", "mod"] and len(words) >= at + 6 and words[at + 4] == "<"
              and words[at + 3].isdigit() and words[at + 5].isdigit()):
            numgen = {"numgen": {"mode": "random", "mod": int(words[at + 3]), "offset": 0}}
            expr.append(_match("<", numgen, int(words[at + 5])))
            at += 6
        elif words[at] in ("return", "accept", "drop"):
            expr.append({words[at]: None})
            at += 1
        elif words[at] == "masquerade":
            masquerade, at = _masquerade(tokens, at + 1)
            expr.append({"masquerade": masquerade})
        else:
            raise _unexpected(tokens[at])
    return expr


# --- pieces of the language ---------------------------------------------------------------------------


def _statements(tokens: list[_Token]) -> list[list[_Token]]:
    """A line's statements, split at ``;``."""
    return [list(group) for semicolon, group in itertools.groupby(tokens, lambda t: t.text == ";") if not semicolon]


def _unexpected(token: _Token) -> _Refused:
    return _Refused(token, f"syntax error, unexpected {token.text} (fake nft: models only what masqd writes)")


def _string(token: _Token) -> str:
    if len(token.text) < 2 or not token.text.startswith('"'):
        raise _Refused(token, "syntax error, a comment is a quoted string")
    return token.text[1:-1]


def _priority(tokens: list[_Token]) -> int:
    """``100``, ``srcnat``, ``srcnat - 1``, ``srcnat + 10``."""
    words = [t.text for t in tokens]
    base = int(words[0]) if re.fullmatch(r"-?\d+", words[0]) else _PRIORITIES.get(words[0])
    if base is None:
        raise _Refused(tokens[0], f"fake nft: unknown priority {words[0]}")
    if len(words) == 1:
        return base
    if len(words) == 3 and words[1] in "+-" and words[2].isdigit():
        return base + int(words[2]) if words[1] == "+" else base - int(words[2])
    raise _unexpected(tokens[1])


def _match(op: str, left: dict[str, Any], right: object) -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _masquerade(tokens: list[_Token], at: int) -> tuple[dict[str, Any] | None, int]:
    """``[to :A[-B]] [FLAG[,FLAG]]`` after ``masquerade``, as nft prints the statement."""
    words = [t.text for t in tokens]
    body: dict[str, Any] = {}
    if words[at:at + 1] == ["to"]:
        ports = re.fullmatch(r":(\d+)(?:-(\d+))?", words[at + 1] if at + 1 < len(words) else "")
        if ports is None:
            raise _unexpected(tokens[min(at + 1, len(tokens) - 1)])
        first, last = int(ports[1]), int(ports[2] or ports[1])
        body["port"] = first if first == last else {"range": [first, last]}
        at += 2
    flags = []
    while at < len(words) and words[at] in _NAT_FLAGS:
        flags.append(words[at])
        at += 2 if words[at + 1:at + 2] == [","] else 1
    if flags:
        body["flags"] = flags[0] if len(flags) == 1 else flags
    return body or None, at


def _span(text: str, version: int) -> tuple[int, int]:
    """An element, ``ADDRESS``, ``PREFIX/LEN`` (nft masks its host bits) or ``FIRST-LAST`` (of two
    addresses), as a ``(first, last)`` range; ``ValueError`` for anything else."""
    ends = [ipaddress.ip_network(part, strict=False) for part in text.split("-", 1)]
    if any(net.version != version or (len(ends) == 2 and net.num_addresses != 1) for net in ends):
        raise ValueError(text)
    return int(ends[0].network_address), int(ends[-1].broadcast_address)


def _set_elements(named: Set, written: list[_Token]) -> list[tuple[int, int]]:
    """The sorted ranges of a set's elements; refuses addresses of another family, prefixes or
    ranges in a set without ``flags interval``, and elements that overlap."""
    found: list[tuple[int, int, _Token]] = []
    for token in written:
        try:
            first, last = _span(token.text, 4 if named.type == "ipv4_addr" else 6)
        except ValueError:
            raise _Refused(token, f"fake nft: {token.text} is not an element of a set of type {named.type}") from None
        if first > last or (first != last and "interval" not in named.flags):
            raise _Refused(token, "fake nft: a range needs a set with flags interval, first address first")
        found.append((first, last, token))
    found.sort(key=lambda item: item[:2])
    for (_, last, _), (first, _, token) in zip(found, found[1:]):
        if first <= last:
            raise _Refused(token, "conflicting intervals specified")
    return [(first, last) for first, last, _ in found]


def _listed_range(element: Any, family: str) -> tuple[int, int]:
    """One element of a JSON listing as a ``(first, last)`` range."""
    if isinstance(element, dict) and "elem" in element:  # an element with options (comment...)
        element = element["elem"]["val"]
    if isinstance(element, dict):
        element = "-".join(element["range"]) if "range" in element else "{addr}/{len}".format(**element["prefix"])
    return _span(element, 4 if family == "ip" else 6)
