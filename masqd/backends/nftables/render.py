"""The nftables backend's model and rendering (pure).

Per family masqd owns one table (``ip masqd``, and ``ip6 masqd`` with IPv6) holding a set of the
non-masquerade destinations and a ``nat`` chain hooked at postrouting (by default at priority
``srcnat + 10``, after kube-proxy's and iptables' nat chains at ``srcnat``; ``--nftables-priority``):

    fib daddr type local return          # like -m addrtype ! --dst-type LOCAL
    ip daddr @nonmasq4 return            # one O(log n) interval-set lookup, not a linear scan
    [meta l4proto P numgen random mod M < K masquerade to :A-B]   # --to-ports, spread evenly
    masquerade [fully-random]

:func:`desired_state` builds that table as a :class:`TableState` value; :func:`render_replace`
writes the nft transaction that replaces the tables whole.

The set has ``flags interval`` but not ``auto-merge``: masqd collapses the CIDRs itself and always
rewrites the whole set, so auto-merge would merge nothing, while it makes nft 1.0.6 fetch every
existing element before a replace, which makes every apply of a large set slower (apply times:
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from masqd.cidrs import Network
from masqd.errors import FlagError
from masqd.ruleset import PORT_PROTOCOLS, FamilyRules, Masquerade, RuleSet

TABLE = "masqd"
CHAIN = "nat"
#: nft's ``srcnat``: where iptables' nat POSTROUTING (legacy and nft) and kube-proxy's nftables
#: ``nat-postrouting`` chain hook.
SRCNAT_PRIORITY = 100
#: masqd's chain runs after theirs, as upstream's jump comes after kube-proxy's ``KUBE-POSTROUTING``:
#: nat chains at one hook run in priority order (equal ones in the order they were created), and
#: the first to give a new connection a source NAT decides it; later ones are not consulted.
DEFAULT_PRIORITY = SRCNAT_PRIORITY + 10
#: The kernel refuses a nat chain at conntrack's priority (-200) or earlier.
MIN_NAT_PRIORITY = -199
_MAX_PRIORITY = 2**31 - 1
TABLE_COMMENT = "masqd: masquerade decisions for traffic leaving this node (managed by masqd, do not edit)"
CHAIN_COMMENT = "masqd: masquerade traffic that is not local and not in the non-masquerade set"
SET_COMMENT = "masqd: destinations that keep the pod source address"

NFT_FAMILY = {4: "ip", 6: "ip6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}


def set_name(family: int) -> str:
    return f"nonmasq{family}"


def parse_priority(text: str) -> int:
    """``--nftables-priority``: an integer, ``srcnat``, ``srcnat + N`` or ``srcnat - N`` (spaces
    optional), as nft takes a chain's priority; raises :class:`~masqd.errors.FlagError` for anything
    else, or a priority the kernel refuses for a nat chain (:data:`MIN_NAT_PRIORITY` or later)."""
    words = text.replace("+", " + ").replace("-", " - ").split()
    if words[:1] == ["srcnat"] and (len(words) == 1 or (len(words) == 3 and words[1] in "+-" and words[2].isdigit())):
        offset = 0 if len(words) == 1 else int(words[2])
        priority = SRCNAT_PRIORITY + (offset if words[1:2] != ["-"] else -offset)
    elif re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        priority = int(text)
    else:
        raise FlagError("nftables-priority", text, "expected an integer, srcnat, 'srcnat + N' or 'srcnat - N' "
                                                   f"(default '{priority_text(DEFAULT_PRIORITY)}')")
    if not MIN_NAT_PRIORITY <= priority <= _MAX_PRIORITY:
        raise FlagError("nftables-priority", text, f"is {priority}: a nat chain's priority must be from "
                                                   f"{MIN_NAT_PRIORITY} (after conntrack) to {_MAX_PRIORITY}")
    return priority


def priority_text(priority: int) -> str:
    """A chain priority as ``nft list`` prints it at the postrouting hook near ``srcnat``
    (``srcnat``, ``srcnat + 10``, ``srcnat - 5``); farther away, the number."""
    offset = priority - SRCNAT_PRIORITY
    if offset == 0:
        return "srcnat"
    if abs(offset) <= 10:
        return f"srcnat {'+' if offset > 0 else '-'} {abs(offset)}"
    return str(priority)


# --- the model -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MasqRule:
    """``[oifname I] [meta l4proto P] [numgen random mod M < K] masquerade [to :A-B] [fully-random]``,
    or ``snat to ADDRESS[:A-B]`` instead of ``masquerade`` (``snat``: the address as nft prints it)."""

    protocol: str | None = None
    modulus: int | None = None  # with ``below``: taken when numgen random mod M < K
    below: int | None = None
    ports: tuple[int, int] | None = None
    fully_random: bool = False
    interface: str | None = None  # nft's form: a trailing "*" is a prefix wildcard
    snat: str | None = None


@dataclass(frozen=True, slots=True)
class SourceReturn:
    """``ip saddr [!=] { CIDRs } return``: traffic from (``negated``: not from) these sources is
    not masqueraded (``nonMasqueradeSourceCIDRs``; ``masqueradeSourceCIDRs``)."""

    negated: bool
    intervals: tuple[tuple[int, int], ...]


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
    return _merge([(first, first | ((1 << (n.max_prefixlen - n.prefixlen)) - 1))
                   for n in networks for first in (int(n.network_address),)])


def _merge(ranges) -> tuple[tuple[int, int], ...]:
    """``ranges`` (``(first, last)`` pairs) sorted, overlapping and adjacent ones merged. One pass
    over the sorted list: 100k ranges (the kernel lists them sorted already) take milliseconds."""
    ordered = sorted(ranges)
    merged: list[tuple[int, int]] = []
    append = merged.append
    if not ordered:
        return ()
    start, end = ordered[0]
    for first, last in ordered:
        if first <= end + 1:
            if last > end:
                end = last
        else:
            append((start, end))
            start, end = first, last
    append((start, end))
    return tuple(merged)


def _element_texts(intervals: tuple[tuple[int, int], ...], family: int) -> list[str]:
    """The set's elements: each interval as one CIDR when it is one (the usual case, fast), else
    as the fewest CIDRs covering it."""
    address = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    bits = 32 if family == 4 else 128
    # IPv4 text straight from inet_ntop (a third of the time); IPv6 as ipaddress writes it
    # (inet_ntop would write an IPv4-mapped address in dotted form)
    text = (lambda value: socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))) if family == 4 else \
        (lambda value: str(address(value)))
    texts: list[str] = []
    append = texts.append
    for first, last in intervals:
        size = last - first + 1
        if size & (size - 1) == 0 and first % size == 0:
            append(f"{text(first)}/{bits - size.bit_length() + 1}")
        else:
            texts.extend(map(str, ipaddress.summarize_address_range(address(first), address(last))))
    return texts


def cidr_pieces(intervals: list[tuple[int, int]], family: int) -> list[tuple[int, int]]:
    """Each interval as the elements ``nft -f`` writes it as (:func:`_element_texts`: one CIDR, or
    the fewest CIDRs covering it), each a ``(first, last)`` range: an element change over netlink
    adds and deletes exactly those, so it finds (and later leaves) what either writer wrote."""
    pieces: list[tuple[int, int]] = []
    address = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    for first, last in intervals:
        size = last - first + 1
        if size & (size - 1) == 0 and first % size == 0:
            pieces.append((first, last))
        else:
            pieces += [(int(net.network_address), int(net.broadcast_address))
                       for net in ipaddress.summarize_address_range(address(first), address(last))]
    return pieces


def _masq_rules(masquerade: Masquerade, family: FamilyRules, interfaces: tuple[str, ...]) -> tuple[MasqRule, ...]:
    """The masquerade rules: the ``--to-ports`` shares, then the final one; once per
    ``outputInterfaces`` name (traffic through others falls off the chain unmasqueraded); none
    when ``masqueradeSourceCIDRs`` lists no source of this family."""
    if not family.masquerades_any:
        return ()
    snat = None if family.snat_to is None else str(family.snat_to)
    rules = []
    for interface in interfaces or (None,):
        named = None if interface is None else nft_interface(interface)
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
                    interface=named,
                    snat=snat,
                ))
                remaining -= ports.size
        rules.append(MasqRule(fully_random=masquerade.random_fully, interface=named, snat=snat))
    return tuple(rules)


def nft_interface(name: str) -> str:
    """An ``outputInterfaces`` name as ``oifname`` takes it: iptables' ``eth+`` is nft's ``eth*``."""
    return name[:-1] + "*" if name.endswith("+") else name


def iptables_interface(name: str) -> str:
    """An ``oifname`` as ``outputInterfaces`` (and iptables) writes it: the reverse of :func:`nft_interface`."""
    return name[:-1] + "+" if name.endswith("*") else name


def _source_rules(family: FamilyRules) -> tuple[SourceReturn, ...]:
    rules = []
    if family.keep_sources:
        rules.append(SourceReturn(False, intervals_of(family.keep_sources)))
    if family.masq_sources:  # none of this family: no masquerade rule at all (see _masq_rules)
        rules.append(SourceReturn(True, intervals_of(family.masq_sources)))
    return tuple(rules)


def desired_state(family: FamilyRules, masquerade: Masquerade, interfaces: tuple[str, ...] = (),
                  priority: int = DEFAULT_PRIORITY) -> TableState:
    """The table masqd wants for one family, its chain at ``priority``. Not cached: hashing 100k
    networks to look it up would cost more than computing it (milliseconds; ``benchmarks/RESULTS.md``)."""
    return TableState(
        family=family.family,
        chain=("nat", "postrouting", priority, "accept"),
        set_type=_ADDR_TYPE[family.family],
        intervals=intervals_of(family.nonmasq),
        rules=(LOCAL_RETURN, *_source_rules(family), set_return(family.family),
               *_masq_rules(masquerade, family, interfaces)),
    )


def ruleset_states(ruleset: RuleSet, priority: int = DEFAULT_PRIORITY) -> list[TableState]:
    """:func:`desired_state` of each family of ``ruleset``."""
    return [desired_state(family, ruleset.masquerade, ruleset.interfaces, priority) for family in ruleset.families]


# --- rendering ---------------------------------------------------------------------------------------


def _render_rule(rule: object, family: int) -> str:
    if rule == LOCAL_RETURN:
        return "fib daddr type local return"
    if rule == set_return(family):
        return f"{NFT_FAMILY[family]} daddr @{set_name(family)} return"
    if isinstance(rule, SourceReturn):
        elements = _element_texts(rule.intervals, family)
        listed = elements[0] if len(elements) == 1 else "{ " + ", ".join(elements) + " }"
        return f"{NFT_FAMILY[family]} saddr {'!= ' if rule.negated else ''}{listed} return"
    assert isinstance(rule, MasqRule)
    words = []
    if rule.interface:
        words.append(f'oifname "{rule.interface}"')
    if rule.protocol:
        words.append(f"meta l4proto {rule.protocol}")
    if rule.modulus is not None:
        words.append(f"numgen random mod {rule.modulus} < {rule.below}")
    ports = ""
    if rule.ports:
        first, last = rule.ports
        ports = f":{first}" if first == last else f":{first}-{last}"
    if rule.snat is None:
        words.append("masquerade")
        if ports:
            words.append(f"to {ports}")
    else:
        address = f"[{rule.snat}]" if family == 6 and ports else rule.snat
        words.append(f"snat to {address}{ports}")
    if rule.fully_random:
        words.append("fully-random")
    return " ".join(words)


def render_table(state: TableState) -> str:
    """The ``table ... { }`` block for one family (elements as the fewest CIDRs)."""
    family = state.family
    elements = ", ".join(_element_texts(state.intervals, family))
    lines = [
        f"table {NFT_FAMILY[family]} {TABLE} {{",
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
        f"\t\ttype nat hook postrouting priority {priority_text(state.chain[2])}; policy accept;",
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
        name = f"{NFT_FAMILY[state.family]} {TABLE}"
        parts.append(f"add table {name}\ndelete table {name}\n" + render_table(state))
    return "".join(parts)


def render_delete(families: tuple[int, ...]) -> str:
    """A transaction removing masqd's tables, whether they exist or not."""
    return "".join(f"add table {NFT_FAMILY[f]} {TABLE}\ndelete table {NFT_FAMILY[f]} {TABLE}\n" for f in families)


def render_ruleset(ruleset: RuleSet, priority: int = DEFAULT_PRIORITY) -> str:
    return render_replace(ruleset_states(ruleset, priority))
