"""Small interpreters for the rule texts masqd renders, written from the iptables and nftables
rule languages, not from masqd's renderers: they read an ``iptables-restore`` text or an nft
script and say what the kernel would do with one packet leaving the node.

The packet model (:class:`Packet`): IPv4 or IPv6 source and destination, the output interface,
and the layer-4 protocol (``tcp``, ``udp``, ``sctp`` or anything else, e.g. ``icmp``). Every
destination is taken as non-local (``-m addrtype ! --dst-type LOCAL`` matches; ``fib daddr type
local`` does not): the decision model only speaks of traffic leaving the node.

Random matches (``-m statistic --mode random --probability P``, ``numgen random mod M < K``) are
followed both ways, each branch weighted by its probability, so the result is the distribution of
what may happen to the packet: :class:`Outcome` -> probability (the probabilities add up to 1). A
decision is well defined when every outcome of the distribution keeps the packet, or every one
rewrites it to the same address; the ports are what ``--to-ports`` spreads.

Anything the interpreters do not know (an unknown option, match, statement or target) raises
:class:`RuleSyntaxError`, so a new rule form cannot be silently misread.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from fractions import Fraction

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: What may happen to the packet.
KEEP = "keep"  # not rewritten: RETURN, falling off the chain, ``return``, policy accept
MASQUERADE = "masquerade"  # rewritten to the address of the output interface
SNAT = "snat"  # rewritten to a given address


class RuleSyntaxError(ValueError):
    """A rule text the interpreter does not understand."""


@dataclass(frozen=True, slots=True)
class Packet:
    src: Address
    dst: Address
    oif: str
    proto: str = "tcp"

    @property
    def family(self) -> int:
        return self.dst.version


@dataclass(frozen=True, slots=True)
class Outcome:
    """``action``: :data:`KEEP`, :data:`MASQUERADE` or :data:`SNAT`; ``address``: the SNAT address
    (text of an ``ipaddress`` address), ``None`` otherwise; ``ports``: the ``(first, last)`` source
    ports the rewrite maps to (``None``: the kernel's choice); ``fully_random``: ``--random-fully``
    / ``fully-random``."""

    action: str
    address: str | None = None
    ports: tuple[int, int] | None = None
    fully_random: bool = False

    @property
    def decision(self) -> tuple[str, str | None]:
        """What the decision model decides: the action and the address (not the ports)."""
        return self.action, self.address


KEPT = Outcome(KEEP)


def _ports(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    return int(first), int(last or first)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=True)


def interface_matches(pattern: str, name: str, wildcard: str) -> bool:
    """iptables ``-o eth+`` / nft ``oifname "eth*"``: a trailing ``wildcard`` matches any name
    starting with the rest; otherwise the exact name."""
    if pattern.endswith(wildcard):
        return name.startswith(pattern[: -len(wildcard)])
    return name == pattern


# --- iptables ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IptRule:
    chain: str
    src: object = None  # network
    dst: object = None
    oif: str | None = None
    proto: str | None = None
    probability: Fraction | None = None  # -m statistic --mode random
    dst_not_local: bool = False  # -m addrtype ! --dst-type LOCAL
    target: str = ""
    target_options: tuple[str, ...] = ()


def parse_ipt_rule(line: str) -> IptRule:
    """One ``-A CHAIN ...`` line in ``iptables-save`` form."""
    words = shlex.split(line)
    if len(words) < 2 or words[0] != "-A":
        raise RuleSyntaxError(f"not an -A line: {line!r}")
    fields: dict = {"chain": words[1]}
    i = 2
    while i < len(words):
        word = words[i]
        if word in ("-s", "-d"):
            fields["src" if word == "-s" else "dst"] = _network(words[i + 1])
            i += 2
        elif word == "-o":
            fields["oif"] = words[i + 1]
            i += 2
        elif word == "-p":
            fields["proto"] = words[i + 1]
            i += 2
        elif word == "-m" and words[i + 1] == "comment" and words[i + 2] == "--comment":
            i += 4
        elif word == "-m" and words[i + 1 : i + 5] == ["statistic", "--mode", "random", "--probability"]:
            fields["probability"] = Fraction(words[i + 5])
            i += 6
        elif word == "-m" and words[i + 1 : i + 5] == ["addrtype", "!", "--dst-type", "LOCAL"]:
            fields["dst_not_local"] = True
            i += 5
        elif word == "-j":
            fields["target"] = words[i + 1]
            fields["target_options"] = tuple(words[i + 2 :])
            break
        else:
            raise RuleSyntaxError(f"unknown option {word!r} in {line!r}")
    if not fields.get("target"):
        raise RuleSyntaxError(f"no target in {line!r}")
    return IptRule(**fields)


def _ipt_terminal(rule: IptRule, family: int) -> Outcome | None:
    """The outcome of a NAT target (``None`` for RETURN or a jump)."""
    options = list(rule.target_options)
    fully_random = "--random-fully" in options
    if fully_random:
        options.remove("--random-fully")
    if rule.target == "MASQUERADE":
        ports = None
        if options[:1] == ["--to-ports"]:
            ports = _ports(options[1])
            options = options[2:]
        if options:
            raise RuleSyntaxError(f"unknown MASQUERADE options {options}")
        return Outcome(MASQUERADE, None, ports, fully_random)
    if rule.target == "SNAT":
        if options[:1] != ["--to-source"] or len(options) != 2:
            raise RuleSyntaxError(f"unknown SNAT options {rule.target_options}")
        address, ports = _split_address_ports(options[1], family)
        return Outcome(SNAT, address, ports, fully_random)
    if rule.target_options:
        raise RuleSyntaxError(f"options for {rule.target}: {rule.target_options}")
    return None


def _split_address_ports(text: str, family: int) -> tuple[str, tuple[int, int] | None]:
    """``1.2.3.4``, ``1.2.3.4:1024-2000``, ``2001:db8::1``, ``[2001:db8::1]:1024-2000``."""
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise RuleSyntaxError(f"bad address {text!r}")
        ports = _ports(rest[1:])
    elif family == 4 and ":" in text:
        address, _, port_text = text.partition(":")
        ports = _ports(port_text)
    else:
        address, ports = text, None
    parsed = ipaddress.ip_address(address)
    if parsed.version != family:
        raise RuleSyntaxError(f"IPv{parsed.version} address {text!r} in an IPv{family} rule")
    return str(parsed), ports


class IptablesProgram:
    """The nat rules an ``iptables-restore`` text (``render_ruleset``'s) writes, per family."""

    def __init__(self, text: str):
        self.chains: dict[int, dict[str, list[IptRule]]] = {}
        family = None
        table = None
        for line in text.splitlines():
            if line == "# iptables-restore --noflush":
                family, table = 4, None
            elif line == "# ip6tables-restore --noflush":
                family, table = 6, None
            elif family is None:
                raise RuleSyntaxError(f"text before a restore header: {line!r}")
            elif line.startswith("*"):
                table = line[1:]
                if table != "nat":
                    raise RuleSyntaxError(f"table {table!r}")
                self.chains.setdefault(family, {"POSTROUTING": []})
            elif table is None:
                raise RuleSyntaxError(f"a line outside a table: {line!r}")
            elif line == "COMMIT":
                table = None
            elif line.startswith(":"):
                name, policy, counters = line[1:].split(" ")
                if (policy, counters) != ("-", "[0:0]"):
                    raise RuleSyntaxError(line)
                self.chains[family][name] = []
            elif line.startswith("-A "):
                rule = parse_ipt_rule(line)
                if rule.chain not in self.chains[family]:
                    raise RuleSyntaxError(f"rule for an undeclared chain: {line!r}")
                self.chains[family][rule.chain].append(rule)
            else:
                raise RuleSyntaxError(f"unknown line {line!r}")

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(sorted(self.chains))

    def outcomes(self, packet: Packet) -> dict[Outcome, Fraction]:
        """What the nat POSTROUTING hook does with ``packet``: outcome -> probability."""
        result: dict[Outcome, Fraction] = {}
        for outcome, weight in self._walk("POSTROUTING", packet, Fraction(1)):
            result[outcome] = result.get(outcome, Fraction(0)) + weight
        return result

    def _matches(self, rule: IptRule, packet: Packet) -> bool:
        return ((rule.src is None or packet.src in rule.src)
                and (rule.dst is None or packet.dst in rule.dst)
                and (rule.oif is None or interface_matches(rule.oif, packet.oif, "+"))
                and (rule.proto is None or rule.proto == packet.proto))

    def _walk(self, chain: str, packet: Packet, weight: Fraction, start: int = 0):
        """Yield (outcome, weight); ``None`` as outcome: returned from ``chain`` / fell off it."""
        chains = self.chains[packet.family]
        rules = chains[chain]
        for index in range(start, len(rules)):
            rule = rules[index]
            if not self._matches(rule, packet):
                continue
            if rule.probability is not None:  # the branch where the random match fails goes on
                yield from self._continue(chain, packet, weight * (1 - rule.probability), index + 1)
                weight *= rule.probability
                if not weight:
                    return
            terminal = _ipt_terminal(rule, packet.family)
            if terminal is not None:
                yield terminal, weight
                return
            if rule.target == "RETURN":
                yield from self._returned(chain, weight)
                return
            if rule.target in chains:  # a jump: the chain, then (when it returns) the rest of this one
                for outcome, branch in self._walk(rule.target, packet, weight):
                    if outcome is None:
                        yield from self._continue(chain, packet, branch, index + 1)
                    else:
                        yield outcome, branch
                return
            raise RuleSyntaxError(f"unknown target {rule.target!r}")
        yield from self._returned(chain, weight)

    def _continue(self, chain, packet, weight, start):
        if weight:
            yield from self._walk(chain, packet, weight, start)

    @staticmethod
    def _returned(chain: str, weight: Fraction):
        # Leaving POSTROUTING: its policy (ACCEPT in the nat table): the packet is not rewritten.
        yield (KEPT if chain == "POSTROUTING" else None), weight


# --- nftables ---------------------------------------------------------------------------------------


def _words(line: str) -> list[str]:
    return shlex.split(line.replace("{", " { ").replace("}", " } ").replace(",", " , "))


def _parse_elements(words: list[str], family: int) -> tuple[list[tuple[int, int]], int]:
    """``{ a , b }`` or a single value from ``words[0]``: ranges of addresses, and words used."""
    def one(text: str) -> tuple[int, int]:
        if "/" in text:
            net = _network(text)
            if net.version != family:
                raise RuleSyntaxError(f"IPv{net.version} element {text!r} in an IPv{family} table")
            return int(net.network_address), int(net.broadcast_address)
        if "-" in text:
            first, last = (ipaddress.ip_address(part) for part in text.split("-"))
            return int(first), int(last)
        address = ipaddress.ip_address(text)
        if address.version != family:
            raise RuleSyntaxError(f"IPv{address.version} element {text!r} in an IPv{family} table")
        return int(address), int(address)

    if words[0] != "{":
        return [one(words[0])], 1
    end = words.index("}")
    items = [w for w in words[1:end] if w != ","]
    if any(w == "," for w in (words[1], words[end - 1])) or not items:
        raise RuleSyntaxError(f"bad set literal {words[: end + 1]}")
    return [one(w) for w in items], end + 1


@dataclass
class NftRule:
    """A rule as a list of match callables (packet -> probability of matching) and a verdict."""

    matches: list
    verdict: str  # "return" or "nat"
    outcome: Outcome | None = None


class NftablesProgram:
    """The tables an nft script (``render_ruleset``'s) defines: per family, the sets and the nat
    postrouting chain's rules."""

    def __init__(self, text: str):
        self.sets: dict[int, dict[str, list[tuple[int, int]]]] = {}
        self.rules: dict[int, list[NftRule]] = {}
        families = {"ip": 4, "ip6": 6}
        lines = iter(text.splitlines())
        for line in lines:
            words = line.split()
            if words[:2] in (["add", "table"], ["delete", "table"]) and len(words) == 4 and words[3] == "masqd":
                continue
            if len(words) == 4 and words[0] == "table" and words[3] == "{" and words[1] in families:
                family = families[words[1]]
                if family in self.rules:
                    raise RuleSyntaxError(f"table {words[1]} defined twice")
                self._table(family, lines)
                continue
            raise RuleSyntaxError(f"unknown line {line!r}")

    def _table(self, family: int, lines) -> None:
        self.sets[family] = {}
        chain_seen = False
        for line in lines:
            text = line.strip()
            if text == "}":
                if not chain_seen:
                    raise RuleSyntaxError("a table without its chain")
                return
            if text.startswith("comment "):
                continue
            words = text.split()
            if words[0] == "set" and words[-1] == "{":
                self.sets[family][words[1]] = self._set(family, lines)
            elif words[0] == "chain" and words[-1] == "{":
                self.rules[family] = self._chain(family, lines)
                chain_seen = True
            else:
                raise RuleSyntaxError(f"unknown table line {line!r}")
        raise RuleSyntaxError("unterminated table")

    def _set(self, family: int, lines) -> list[tuple[int, int]]:
        elements: list[tuple[int, int]] = []
        want = {4: "type ipv4_addr", 6: "type ipv6_addr"}[family]
        typed = False
        for line in lines:
            text = line.strip()
            if text == "}":
                if not typed:
                    raise RuleSyntaxError("a set without its type")
                return elements
            if text == want:
                typed = True
            elif text == "flags interval" or text.startswith("comment "):
                continue
            elif text.startswith("elements = "):
                words = _words(text[len("elements = "):])
                elements, used = _parse_elements(words, family)
                if used != len(words) or words[0] != "{":
                    raise RuleSyntaxError(f"bad elements line {line!r}")
            else:
                raise RuleSyntaxError(f"unknown set line {line!r}")
        raise RuleSyntaxError("unterminated set")

    def _chain(self, family: int, lines) -> list[NftRule]:
        rules: list[NftRule] = []
        hooked = False
        for line in lines:
            text = line.strip()
            if text == "}":
                if not hooked:
                    raise RuleSyntaxError("the chain is not a nat postrouting base chain")
                return rules
            if text.startswith("comment "):
                continue
            # any priority: it orders masqd's chain among other tables' nat chains, not modelled here
            if re.fullmatch(r"type nat hook postrouting priority [^;]+; policy accept;", text):
                hooked = True
                continue
            rules.append(self._rule(family, _words(text)))
        raise RuleSyntaxError("unterminated chain")

    def _rule(self, family: int, words: list[str]) -> NftRule:
        keyword = {4: "ip", 6: "ip6"}[family]
        matches = []
        i = 0
        while i < len(words):
            word = words[i]
            if words[i : i + 4] == ["fib", "daddr", "type", "local"]:
                matches.append(lambda packet: Fraction(0))  # every destination here is non-local
                i += 4
            elif word in ("ip", "ip6") and words[i + 1] in ("saddr", "daddr"):
                if word != keyword:
                    raise RuleSyntaxError(f"{word} match in the IPv{family} table: {words}")
                field = words[i + 1]
                i += 2
                negated = words[i] == "!="
                if negated:
                    i += 1
                if words[i].startswith("@"):
                    name = words[i][1:]
                    if name not in self.sets[family]:
                        raise RuleSyntaxError(f"no set {name!r}")
                    ranges = self.sets[family][name]
                    i += 1
                else:
                    ranges, used = _parse_elements(words[i:], family)
                    i += used
                matches.append(_address_match(field, ranges, negated))
            elif word == "oifname":
                pattern = words[i + 1]
                if pattern == "*":  # nft 1.0.6 refuses the script: "All-wildcard strings are not supported"
                    raise RuleSyntaxError(f'nft refuses oifname "*": {" ".join(words)!r}')
                matches.append(lambda packet, p=pattern: Fraction(int(interface_matches(p, packet.oif, "*"))))
                i += 2
            elif words[i : i + 2] == ["meta", "l4proto"]:
                proto = words[i + 2]
                matches.append(lambda packet, p=proto: Fraction(int(packet.proto == p)))
                i += 3
            elif words[i : i + 3] == ["numgen", "random", "mod"] and words[i + 4] == "<":
                modulus, below = int(words[i + 3]), int(words[i + 5])
                matches.append(lambda packet, m=modulus, b=below: Fraction(min(b, m), m))
                i += 6
            elif word == "return":
                if i != len(words) - 1:
                    raise RuleSyntaxError(f"words after return: {words}")
                return NftRule(matches, "return")
            elif word == "masquerade":
                rest = words[i + 1 :]
                ports = None
                if rest[:1] == ["to"]:
                    if not rest[1].startswith(":"):
                        raise RuleSyntaxError(f"bad masquerade ports {words}")
                    ports = _ports(rest[1][1:])
                    rest = rest[2:]
                fully = rest == ["fully-random"]
                if rest and not fully:
                    raise RuleSyntaxError(f"unknown masquerade flags {rest}")
                return NftRule(matches, "nat", Outcome(MASQUERADE, None, ports, fully))
            elif words[i : i + 2] == ["snat", "to"]:
                address, ports = _split_address_ports(words[i + 2], family)
                rest = words[i + 3 :]
                fully = rest == ["fully-random"]
                if rest and not fully:
                    raise RuleSyntaxError(f"unknown snat flags {rest}")
                return NftRule(matches, "nat", Outcome(SNAT, address, ports, fully))
            else:
                raise RuleSyntaxError(f"unknown expression {word!r} in {' '.join(words)!r}")
        raise RuleSyntaxError(f"a rule without a verdict or statement: {' '.join(words)!r}")

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(sorted(self.rules))

    def outcomes(self, packet: Packet) -> dict[Outcome, Fraction]:
        """What the chain does with ``packet``: outcome -> probability. A random match
        (``numgen``) is evaluated anew for each rule, as the kernel does."""
        result: dict[Outcome, Fraction] = {}
        weight = Fraction(1)  # of the packets still walking the chain
        for rule in self.rules[packet.family]:
            chance = Fraction(1)
            for match in rule.matches:
                chance *= match(packet)
                if not chance:
                    break
            if not chance:
                continue
            taken = weight * chance
            outcome = KEPT if rule.verdict == "return" else rule.outcome
            result[outcome] = result.get(outcome, Fraction(0)) + taken
            weight -= taken
            if not weight:
                return result
        result[KEPT] = result.get(KEPT, Fraction(0)) + weight  # policy accept: not rewritten
        return result


def _address_match(field: str, ranges: list[tuple[int, int]], negated: bool):
    def match(packet: Packet) -> Fraction:
        value = int(packet.src if field == "saddr" else packet.dst)
        inside = any(first <= value <= last for first, last in ranges)
        return Fraction(int(inside != negated))

    return match
