"""The iptables backend's pure part: rule texts, ``iptables-restore`` input, and what
``iptables-save`` shows of masqd's chain.

Rules are rendered in ``iptables-save`` canonical form (option order, quoting, and the
11-decimal probability the kernel stores), so read-back is a plain comparison of lines: a sync
writes only when the chain or the POSTROUTING jump differs from the desired ones
(:func:`plan_restore`).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from fractions import Fraction

from masqd.cidrs import Network, cidr_text
from masqd.config import PortRange
from masqd.ruleset import PORT_PROTOCOLS, FamilyRules, Masquerade, RuleSet

JUMP_COMMENT = "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {chain} chain"
NONMASQ_COMMENT = "ip-masq-agent: local traffic is not subject to MASQUERADE"
MASQ_COMMENT = "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)"
#: The rules of the decision model beyond upstream (only written when the config asks for them).
SOURCE_COMMENT = "masqd: traffic from this source is not subject to MASQUERADE"
SNAT_COMMENT = "masqd: outbound traffic is subject to SNAT (must be last in chain)"
#: ``--postrouting-jump``: where the jump goes in POSTROUTING. ``append`` (upstream's): at the end,
#: after kube-proxy's jump to :data:`KUBE_POSTROUTING` (which kube-proxy inserts first); a jump
#: found ahead of that one is moved to the end. ``insert``: first; a jump found elsewhere is moved
#: there (so masqd decides before any other POSTROUTING rule, kube-proxy's included).
APPEND, INSERT = "append", "insert"
JUMP_PLACEMENTS = (APPEND, INSERT)
#: kube-proxy's (iptables mode) nat chain: masquerades the traffic it marked 0x4000, clearing the mark.
KUBE_POSTROUTING = "KUBE-POSTROUTING"


def jump_rule(chain: str) -> str:
    """The POSTROUTING rule sending non-local traffic to ``chain`` (``-A`` line, save form)."""
    comment = JUMP_COMMENT.format(chain=chain)
    return f'-A POSTROUTING -m comment --comment "{comment}" -m addrtype ! --dst-type LOCAL -j {chain}'


def destination_match(net: Network) -> str:
    """``-d CIDR `` as iptables-save prints it: nothing for a /0 (it matches everything), and IPv6
    addresses with an embedded IPv4 (``::ffff:a.b.c.d``, ``::a.b.c.d``) in dotted form, as the C
    library's inet_ntop writes them; otherwise Python's compressed form, which is the same."""
    if net.prefixlen == 0:
        return ""
    if net.version == 6:
        packed = net.network_address.packed
        words = struct.unpack("!8H", packed)
        if words[:5] == (0,) * 5 and (words[5] == 0xFFFF or (words[5] == 0 and words[6] != 0)):
            head = "::ffff:" if words[5] == 0xFFFF else "::"
            return f"-d {head}{ipaddress.IPv4Address(packed[12:])}/{net.prefixlen} "
    return f"-d {cidr_text(net)} "


def source_match(net: Network) -> str:
    """``-s CIDR `` as iptables-save prints it (see :func:`destination_match`)."""
    return "-s" + destination_match(net)[2:] if net.prefixlen else ""


def chain_rules(family: FamilyRules, chain: str, masquerade: Masquerade, random_fully: bool,
                interfaces: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The ``-A`` lines of ``chain`` for one family, in order, exactly as ``iptables-save`` prints them.

    Upstream's chain is RETURN per kept destination, then MASQUERADE. The decision model's keys
    add, only when set: RETURN per ``nonMasqueradeSourceCIDRs`` source first; and the masquerade
    rules once per ``masqueradeSourceCIDRs`` source (``-s``) and ``outputInterfaces`` name
    (``-o``), so traffic from other sources or through other interfaces falls off the end of the
    chain unmasqueraded; SNAT instead of MASQUERADE with ``snatToAddress``."""
    rules = [f'-A {chain} {source_match(net)}-m comment --comment "{SOURCE_COMMENT}" -j RETURN'
             for net in family.keep_sources]
    rules += [
        f'-A {chain} {destination_match(net)}-m comment --comment "{NONMASQ_COMMENT}" -j RETURN'
        for net in family.nonmasq
    ]
    suffix = " --random-fully" if random_fully else ""
    comment = MASQ_COMMENT if family.snat_to is None else SNAT_COMMENT
    sources = (None,) if family.masq_sources is None else family.masq_sources
    for source in sources:
        for interface in interfaces or (None,):
            scope = (source_match(source) if source is not None else "") + (f"-o {interface} " if interface else "")
            for protocol in PORT_PROTOCOLS if masquerade.to_ports else ():
                for share in masquerade.port_shares():
                    statistic = "" if share.probability is None else f" -m statistic --mode random --probability {format_probability(share.probability)}"
                    rules.append(
                        f'-A {chain} {scope}-p {protocol} -m comment --comment "{comment}"{statistic}'
                        f" -j {_target(family, share.ports)}{suffix}"
                    )
            rules.append(f'-A {chain} {scope}-m comment --comment "{comment}" -j {_target(family, None)}{suffix}')
    return tuple(rules)


def _target(family: FamilyRules, ports: PortRange | None) -> str:
    """``MASQUERADE [--to-ports P]`` or ``SNAT --to-source ADDRESS[:P]`` (IPv6: ``[ADDRESS]:P``)."""
    if family.snat_to is None:
        return "MASQUERADE" if ports is None else f"MASQUERADE --to-ports {ports}"
    if ports is None:
        return f"SNAT --to-source {family.snat_to}"
    address = f"[{family.snat_to}]" if family.family == 6 else str(family.snat_to)
    return f"SNAT --to-source {address}:{ports}"


def format_probability(probability: Fraction) -> str:
    """The probability as the kernel stores it (fixed point, 2**31 = 1) and iptables-save prints it."""
    stored = round(probability * 0x80000000)
    return f"{stored / 0x80000000:.11f}"


def render_restore(rules: tuple[str, ...], chain: str, *, jumps_present: int, placement: str = APPEND,
                   move: bool = False) -> str:
    """iptables-restore input that replaces ``chain`` with ``rules`` and leaves exactly one jump.

    ``:CHAIN - [0:0]`` flushes only that chain (with ``--noflush``); the jump is appended
    (``placement`` :data:`INSERT`: inserted first) when missing and extra copies are deleted, so it
    is never duplicated. ``move``: the jumps present are in the wrong place: all are deleted and
    one is written where ``placement`` puts it.
    """
    lines = ["*nat", f":{chain} - [0:0]", *rules]
    jump = jump_rule(chain)
    deleted = jumps_present if move else max(jumps_present - 1, 0)
    lines.extend("-D" + jump[2:] for _ in range(deleted))
    if jumps_present == 0 or move:
        lines.append(jump if placement == APPEND else "-I POSTROUTING 1" + jump[len("-A POSTROUTING"):])
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class NatState:
    """What ``iptables-save -t nat`` shows of masqd's chain and jump. ``other_jumps``: POSTROUTING
    rules sending traffic to the chain that are not masqd's jump (someone edited it).
    ``jump_first``: masqd's (first) jump is the first POSTROUTING rule; ``before_kube``: it comes
    before a jump to kube-proxy's :data:`KUBE_POSTROUTING`."""

    chain_exists: bool
    rules: tuple[str, ...]
    jumps: int
    other_jumps: tuple[str, ...] = ()
    jump_first: bool = False
    before_kube: bool = False

    def misplaced(self, placement: str) -> str | None:
        """Why masqd's jump is not where ``placement`` keeps it (``None``: it is, or there is none)."""
        if not self.jumps:
            return None
        if placement == INSERT and not self.jump_first:
            return "POSTROUTING jump is not the first rule (--postrouting-jump=insert)"
        if placement == APPEND and self.before_kube:
            return f"POSTROUTING jump comes before the one to {KUBE_POSTROUTING} (--postrouting-jump=append)"
        return None


def parse_nat_state(save_text: str, chain: str) -> NatState:
    """Extract ``chain`` and the count of masqd's POSTROUTING jumps from iptables-save output (what
    :func:`parse_nat_chains` would find, without sorting every rule into its chain: each sync
    reads the chain back, and at 10k rules that costs more than the two chains needed)."""
    prefix, declared, jump = f"-A {chain} ", f":{chain} ", jump_rule(chain)
    to_chain = re.compile(rf"(?:^| )-[jg] {re.escape(chain)}(?: |$)")
    lines = _nat_lines(save_text)
    rules = tuple(line for line in lines if line.startswith(prefix))
    postrouting = [line for line in lines if line.startswith("-A POSTROUTING ")]
    first = postrouting.index(jump) if jump in postrouting else None
    to_kube = re.compile(rf"(?:^| )-[jg] {KUBE_POSTROUTING}(?: |$)")
    return NatState(bool(rules) or any(line.startswith(declared) for line in lines), rules, postrouting.count(jump),
                    tuple(line for line in postrouting if line != jump and to_chain.search(line)),
                    jump_first=first == 0,
                    before_kube=first is not None and any(to_kube.search(line) for line in postrouting[first + 1:]))


def _nat_lines(save_text: str) -> list[str]:
    """The lines of the nat table(s) in iptables-save output: those after a ``*nat`` line, up to
    the next ``*TABLE`` line (found with ``str.find`` on the rare ``*``, not line by line)."""
    headers = []
    at = save_text.find("*")
    while at != -1:
        if at == 0 or save_text[at - 1] == "\n":
            headers.append(at)
        at = save_text.find("*", at + 1)
    lines: list[str] = []
    for start, end in zip(headers, [*headers[1:], len(save_text)]):
        name, _, body = save_text[start:end].partition("\n")
        if name == "*nat":
            lines += body.split("\n")
    return lines


def plan_restore(desired: tuple[str, ...], state: NatState, chain: str,
                 placement: str = APPEND) -> tuple[str | None, str]:
    """The iptables-restore text to apply (``None`` when the kernel is in sync) and why.
    ``placement``: ``--postrouting-jump``; a jump elsewhere is moved (see :data:`APPEND`)."""
    reasons = []
    if not state.chain_exists:
        reasons.append(f"chain {chain} missing")
    elif state.rules != desired:
        reasons.append(f"chain {chain} differs")
    if state.jumps != 1:
        reasons.append(f"POSTROUTING jump count {state.jumps}, want 1")
    misplaced = state.misplaced(placement)
    if misplaced is not None:
        reasons.append(misplaced)
    if not reasons:
        return None, "in sync"
    # with insert, the one copy kept must be the first rule: every copy goes and one is inserted
    move = misplaced is not None or (placement == INSERT and state.jumps > 1)
    return render_restore(desired, chain, jumps_present=state.jumps, placement=placement, move=move), "; ".join(reasons)


def read_back_difference(wrote: tuple[str, ...], read: tuple[str, ...]) -> str:
    """What differs between the rules written and those read back, in a few hundred characters
    whatever the chain's length: the counts and the first rule that differs."""
    index = next((i for i, (a, b) in enumerate(zip(wrote, read)) if a != b), min(len(wrote), len(read)))
    first = (f"rule {index + 1} written as {_short(wrote[index]) if index < len(wrote) else '(none)'}, "
             f"read back as {_short(read[index]) if index < len(read) else '(none)'}")
    return f"wrote {len(wrote)} rules, read back {len(read)}; {first}"


def _short(rule: str, limit: int = 300) -> str:
    return repr(rule if len(rule) <= limit else rule[:limit] + "...")


def parse_nat_chains(save_text: str) -> dict[str, tuple[str, ...]]:
    """Every chain of the nat table in iptables-save output -> its ``-A`` lines, in order (a chain
    without rules is there with none)."""
    chains: dict[str, list[str]] = {}
    in_nat = False
    for line in save_text.splitlines():
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat:
            continue
        elif line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            chains.setdefault(line.split(" ", 2)[1], []).append(line)
    return {name: tuple(rules) for name, rules in chains.items()}


def render_ruleset(ruleset: RuleSet, *, random_fully_supported: bool = True, placement: str = APPEND) -> str:
    """The iptables-restore input for each family, as written to a kernel holding none of it."""
    parts = []
    for family in ruleset.families:
        rules = family_rules(ruleset, family, random_fully_supported)
        tool = "iptables-restore" if family.family == 4 else "ip6tables-restore"
        parts.append(f"# {tool} --noflush\n"
                     + render_restore(rules, ruleset.chain, jumps_present=0, placement=placement))
    return "".join(parts)


def family_rules(ruleset: RuleSet, family: FamilyRules, random_fully_supported: bool) -> tuple[str, ...]:
    """The chain's ``-A`` lines for one family of ``ruleset`` (``--random-fully`` only when both
    asked for and supported by the iptables binary)."""
    random_fully = ruleset.masquerade.random_fully and random_fully_supported
    return chain_rules(family, ruleset.chain, ruleset.masquerade, random_fully, ruleset.interfaces)


def render_removal(chain: str, state: NatState) -> str | None:
    """iptables-restore input deleting masqd's jumps and chain (``None``: nothing to remove)."""
    if not state.chain_exists and not state.jumps:
        return None
    lines = ["*nat", *("-D" + jump_rule(chain)[2:] for _ in range(state.jumps))]
    if state.chain_exists:
        lines += [f"-F {chain}", f"-X {chain}"]
    return "\n".join([*lines, "COMMIT"]) + "\n"


#: ``--random-fully`` needs iptables >= 1.6.2.
RANDOM_FULLY_MIN_VERSION = (1, 6, 2)


def parse_iptables_version(text: str) -> tuple[int, ...] | None:
    """``iptables v1.8.9 (nf_tables)`` -> ``(1, 8, 9)``; ``None`` when there is no version."""
    match = re.search(r"v(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return tuple(int(part or 0) for part in match.groups())
