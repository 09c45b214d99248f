"""Shadowing: rules masqd does not write that may masquerade traffic masqd keeps. Pure: no I/O.

masqd keeps the pod address of traffic to a non-masquerade CIDR by not rewriting it: its rules
return. A nat rule of someone else's on the way out can still masquerade that traffic, and then
the keep list is a lie (upstream ip-masq-agent #35): a CNI bridge plugin's ``ipMasq`` rule,
OpenShift's ``OPENSHIFT-MASQUERADE``, another agent's nft table. It may act before masqd's rules
(an earlier nat POSTROUTING rule, another table's chain at the same or an earlier priority) or
after them (a later rule or chain: masqd's return leaves kept traffic to it); a rule inside
masqd's chain is drift instead, which the next sync rewrites.

A :class:`~masqd.backends.base.ForeignRule` shadows masqd (:func:`shadows`) when it acts before or
after masqd's rules, may masquerade (MASQUERADE, SNAT, a jump to a chain that may), requires no
packet mark, and may match a destination masqd keeps (:func:`family_shadowing`): any destination,
one overlapping a kept CIDR, or (negated) one leaving part of a kept CIDR outside it. An iptables
rule that surely ends nat processing for a destination (an ``ACCEPT``) takes it away from the
rules after it.

A rule that requires a packet mark (:attr:`~masqd.backends.base.ForeignRule.mark`) masquerades
only what another component marked, not pod traffic as such: kube-proxy's ``KUBE-POSTROUTING``
(iptables) and ``masquerading`` chain (nftables) masquerade the traffic kube-proxy marked with
0x4000 (hairpin and external traffic to a Service). That is kube-proxy's business, not a
contradiction of the keep list: :func:`mark_meaning` says what it means, for ``explain``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from masqd.backends.base import AFTER, BEFORE, KEEPS, ForeignRule
from masqd.cidrs import Network
from masqd.ruleset import RuleSet

#: kube-proxy's masquerade mark (``--iptables-masquerade-bit`` 14, its default), as ``VALUE/MASK``.
KUBE_PROXY_MARK = "0x4000/0x4000"
#: A message lists at most this many of the kept CIDRs a rule may masquerade (the count follows).
LISTED = 5


@dataclass(frozen=True, slots=True)
class Shadowing:
    """A rule masqd does not write that may masquerade traffic masqd keeps. ``kept``: the
    non-masquerade CIDRs of the applied rules it may match, in rule order."""

    family: int
    rule: ForeignRule
    kept: tuple[Network, ...]

    @property
    def label(self) -> str:
        return f"ipv{self.family}"

    @property
    def key(self) -> tuple[int, str]:
        """What makes two findings the same rule (one warning per rule, however often it is seen)."""
        return self.family, self.rule.text

    @property
    def where(self) -> str:
        """The table and chain it is in, and when it acts relative to masqd's rules."""
        rule = self.rule
        if rule.kind == "chain":
            place = "another table's chain hooked at nat postrouting"
        else:
            words = rule.text.split()
            place = f"table nat chain {words[1]}" if words[:1] == ["-A"] and len(words) > 1 else "table nat"
        when = ("before masqd's rules" if rule.stage == BEFORE
                else "after masqd's rules, which leave the traffic they keep to it")
        return f"{place}, {when}"

    def kept_text(self, listed: int = LISTED) -> str:
        shown = ", ".join(map(str, self.kept[:listed]))
        return shown + (f" and {len(self.kept) - listed} more" if len(self.kept) > listed else "")

    def describe(self) -> str:
        return f"{self.label} {self.rule.text} ({self.where}) may masquerade traffic masqd keeps: {self.kept_text()}"


def shadows(rule: ForeignRule) -> bool:
    """Whether ``rule`` may masquerade traffic masqd keeps, destinations aside: it acts before or
    after masqd's rules, may masquerade, and requires no packet mark."""
    return rule.stage in (BEFORE, AFTER) and rule.effect != KEEPS and rule.mark is None


def family_shadowing(family: int, kept: Sequence[Network], foreign: Iterable[ForeignRule]) -> tuple[Shadowing, ...]:
    """The rules of ``foreign`` (one family's, in the order the kernel walks them) that may
    masquerade traffic to one of ``kept`` (the family's non-masquerade CIDRs)."""
    ended: list[Network] = []  # destinations an earlier rule surely ends nat processing for (iptables)
    found = []
    for rule in foreign:
        if rule.stage not in (BEFORE, AFTER):
            continue
        if rule.kind == "rule" and rule.effect == KEEPS and rule.certain and not rule.negated:
            ended.append(_any(family) if rule.destination is None else rule.destination)
        if not shadows(rule):
            continue
        reached = kept if rule.kind == "chain" or not ended else [
            net for net in kept if not any(_inside(net, end) for end in ended)]
        matched = tuple(reached) if rule.destination is None else tuple(net for net in reached if _may_match(rule, net))
        if matched:
            found.append(Shadowing(family, rule, matched))
    return tuple(found)


def find_shadowing(ruleset: RuleSet, foreign: Mapping[int, Sequence[ForeignRule]]) -> tuple[Shadowing, ...]:
    """Per family of ``ruleset`` (the rules applied), the rules of ``foreign`` (per family, as a
    backend read them) that may masquerade traffic it keeps."""
    return tuple(found for family in ruleset.families
                 for found in family_shadowing(family.family, family.nonmasq, foreign.get(family.family, ())))


def mark_meaning(mark: str) -> str:
    """What a masquerade that requires packet mark ``mark`` (``VALUE/MASK``) means for masqd."""
    value = mark.partition("/")[0]
    try:
        kube_proxy = int(value, 0) == int(KUBE_PROXY_MARK.partition("/")[0], 0)
    except ValueError:
        kube_proxy = False
    if kube_proxy:
        return ("traffic kube-proxy marked (0x4000: e.g. hairpin and external traffic to a Service) is masqueraded "
                "by kube-proxy, not by masqd")
    return f"only traffic carrying packet mark {mark} (set by another component) is masqueraded by it, not by masqd"


#: Rules ``/readyz`` names at most (the rest are counted; the log names each once).
SUMMARY_RULES = 10


def summary(found: Sequence[Shadowing]) -> str:
    """One line naming each rule of ``found`` (for ``/readyz``; past :data:`SUMMARY_RULES`, the
    rest counted); empty when there is none."""
    if not found:
        return ""
    rules = "; ".join(item.describe() for item in found[:SUMMARY_RULES])
    if len(found) > SUMMARY_RULES:
        rules += f"; and {len(found) - SUMMARY_RULES} more (named in the log)"
    return f"{len(found)} rule(s) masqd does not write may masquerade traffic it keeps (shadowing): {rules}"


class Reported:
    """The shadowing rules already reported, so that each distinct rule is warned about once
    while it stays (and again if it comes back after it was gone)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, str], Shadowing] = {}

    def update(self, found: Sequence[Shadowing]) -> tuple[tuple[Shadowing, ...], tuple[Shadowing, ...]]:
        """The rules of ``found`` not reported yet, and those reported that are gone; remembers ``found``."""
        now = {item.key: item for item in found}
        new = tuple(item for key, item in now.items() if key not in self._seen)
        gone = tuple(item for key, item in self._seen.items() if key not in now)
        self._seen = now
        return new, gone


def _any(family: int) -> Network:
    return ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0")


def _inside(net: Network, outer: Network) -> bool:
    return net.version == outer.version and net.subnet_of(outer)


def _may_match(rule: ForeignRule, net: Network) -> bool:
    """Whether traffic to some address of ``net`` may match ``rule``'s destination."""
    destination = rule.destination
    if destination is None:
        return True
    if destination.version != net.version:
        return False
    return not net.subnet_of(destination) if rule.negated else net.overlaps(destination)
