"""``masqd explain``: what happens to traffic to an address, and why. Pure: no I/O.

For each address: whether traffic to it keeps the pod source address or is masqueraded, every
non-masquerade CIDR that matches it (most specific first) and where each came from
(:mod:`masqd.provenance`). With the rules the kernel holds (:class:`~masqd.backends.base.LiveRules`,
``--live``) the verdict is the kernel's, and every difference from the desired state is named:
per address when the kernel decides otherwise, per family for the rules themselves. Rules masqd
does not write that may act on an address (:class:`~masqd.backends.base.ForeignRule`: ahead of
masqd's chain, inside it, after it) are walked in the kernel's order: one that surely matches
decides the verdict, one that only may (other matches, a jump) makes it uncertain when it could
decide otherwise. An IPv4-mapped IPv6 address (``::ffff:10.1.1.1``) is explained as its IPv4
address: traffic to it leaves as IPv4.
"""

from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass, field, replace

from masqd.backends.base import AFTER, BEFORE, INSIDE, KEEPS, MASQUERADES, ForeignRule, LiveFamily, LiveRules
from masqd.cidrs import LINK_LOCAL_V4, LINK_LOCAL_V6, Network
from masqd.provenance import Origin
from masqd.ruleset import RuleSet

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Verdicts: the pod address is kept (a non-masquerade CIDR matches), the address is masqueraded,
#: masqd's rules do not act on it (IPv6 not enabled; in the kernel: its rules are not there), or
#: (``--live``) rules masqd does not write may decide either way.
KEEP, MASQUERADE, UNMANAGED, UNCERTAIN = "keep", "masquerade", "unmanaged", "uncertain"
_HEADLINES = {
    KEEP: "keeps the pod source address (not masqueraded)",
    MASQUERADE: "masqueraded to the node's address",
    UNMANAGED: "not masqueraded by masqd",
    UNCERTAIN: "uncertain: rules masqd does not write may decide",
}
_STAGES = {BEFORE: "ahead of its chain", INSIDE: "in its chain", AFTER: "after its chain"}
_MAY_ACT = {BEFORE: "may act first", INSIDE: "may act first, in masqd's chain", AFTER: "may act after masqd's chain"}
_EFFECTS = {MASQUERADES: "it may masquerade", KEEPS: "it may end nat processing: not masqueraded",
            "either": "it may masquerade or end nat processing"}
_NO_DESIRED = "no desired state to compare with: the config is invalid"
_IPV6_UNMANAGED = ("IPv6 is not managed by masqd (it runs without --enable-ipv6): it writes no IPv6 rules, so masqd "
                   "does not masquerade it")
LOCAL_NOTE = "unless it is an address of this node: traffic to the node's own addresses is never masqueraded"
#: At most this many CIDRs are listed in one difference line (the count of the rest follows).
_LISTED = 20


@dataclass(frozen=True, slots=True)
class Match:
    """A non-masquerade CIDR containing the address, and its origins (empty: a CIDR of the
    kernel's that the desired state does not hold). ``merged_from``: when the kernel holds a
    merged block, the desired CIDRs behind it that contain the address."""

    cidr: Network
    origins: tuple[Origin, ...]
    merged_from: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a rule set does with traffic to one address. ``reason``: why, when no CIDR says it
    (masqd's rules absent, IPv6 not enabled, masqLinkLocal: true).

    With ``--live``: ``masqd``, what masqd's own rules in the kernel do (``matches`` and ``reason``
    are theirs); ``foreign``, the rules masqd does not write that may act on the address, in the
    kernel's order; ``decided_by``, the last of them when it surely matches and so decides
    ``action`` (then ``matches`` is empty)."""

    action: str  # KEEP, MASQUERADE, UNMANAGED or UNCERTAIN
    matches: tuple[Match, ...] = ()
    reason: str | None = None
    masqd: str | None = None
    foreign: tuple[ForeignRule, ...] = ()
    decided_by: ForeignRule | None = None

    @property
    def masquerades(self) -> bool:
        return self.action == MASQUERADE


@dataclass(frozen=True, slots=True)
class Explanation:
    """One address: the desired state's verdict (``None``: the config is invalid, the kernel alone
    is explained) and, with ``--live``, the kernel's. ``as_ipv4``: the IPv4 address an
    IPv4-mapped ``address`` was explained as."""

    address: Address
    desired: Verdict | None
    live: Verdict | None = None
    as_ipv4: ipaddress.IPv4Address | None = None

    @property
    def family(self) -> int:
        return (self.as_ipv4 or self.address).version

    @property
    def shown_address(self) -> str:
        """The address as given; an IPv4-mapped one in its dotted form (``::ffff:10.1.1.1``)."""
        return f"::ffff:{self.as_ipv4}" if self.as_ipv4 is not None else str(self.address)

    @property
    def drift(self) -> bool:
        """The kernel masquerades it and the desired state would not, or the other way round.
        An ``uncertain`` verdict (a rule masqd does not write *may* decide, depending on matches
        explain does not evaluate, such as kube-proxy's packet-mark MASQUERADE on every node)
        is shown but is not drift: otherwise ``--live`` would report drift on every such node."""
        if self.live is None or self.desired is None or self.live.action == UNCERTAIN:
            return False
        return self.live.masquerades != self.desired.masquerades


def parse_destination(text: str) -> Address:
    """An IPv4 or IPv6 address (``10.1.2.3``, ``2001:db8::1``); raises ``ValueError`` saying what is
    valid (a CIDR is not an address)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        hint = "; give one address of the network, e.g. its first" if "/" in text else ""
        raise ValueError(f"not an IPv4 or IPv6 address, e.g. 10.1.2.3 or 2001:db8::1{hint}") from None


@dataclass(frozen=True, slots=True)
class Report:
    """Every address explained; with ``--live`` the rules read back and, per family, what differs
    in them from the desired state (no entry, or an empty one: nothing)."""

    explanations: tuple[Explanation, ...]
    live: LiveRules | None = None
    differences: dict[int, tuple[str, ...]] = field(default_factory=dict)
    #: False: the config is invalid, so the kernel's rules are explained alone (no desired state).
    compared: bool = True

    @property
    def drift(self) -> bool:
        """Any address decided otherwise by the kernel, or any family whose rules differ."""
        return any(e.drift for e in self.explanations) or any(self.differences.values())


def explain(addresses: list[Address] | tuple[Address, ...], ruleset: RuleSet, origins: dict[Network, tuple[Origin, ...]],
            live: LiveRules | None = None, *, masq_link_local: bool = False,
            masq_link_local_ipv6: bool = False) -> Report:
    """Each address against the desired ``ruleset`` (and the kernel's ``live`` rules, if given).
    ``masq_link_local*``: the config's keys, so a masqueraded link-local address says why."""
    out = []
    for given in addresses:
        address, mapped = _explained_as(given)
        desired = _desired(address, ruleset, origins, masq_link_local, masq_link_local_ipv6)
        verdict = None
        if live is not None:
            # IPv6 without --enable-ipv6: masqd reads no IPv6 rules back; the verdict stays the same
            unmanaged = address.version == 6 and ruleset.ipv6 is None
            verdict = desired if unmanaged else _live(address, live, origins)
        out.append(Explanation(given, desired, verdict, mapped))
    if live is None:
        return Report(tuple(out))
    differences = {f.family: family_differences(ruleset, f, origins, live.where) for f in live.families}
    return Report(tuple(out), live, differences)


def explain_kernel(addresses: list[Address] | tuple[Address, ...], live: LiveRules) -> Report:
    """Each address from the kernel's ``live`` rules alone, when there is no desired state (the
    config is invalid: the kernel still holds the last good rules)."""
    out = []
    for given in addresses:
        address, mapped = _explained_as(given)
        out.append(Explanation(given, None, _live(address, live, {}), mapped))
    return Report(tuple(out), live, compared=False)


def _explained_as(address: Address) -> tuple[Address, ipaddress.IPv4Address | None]:
    """The address traffic really goes to: an IPv4-mapped IPv6 address leaves as IPv4."""
    mapped = address.ipv4_mapped if address.version == 6 else None
    return (mapped, mapped) if mapped is not None else (address, None)


def _desired(address: Address, ruleset: RuleSet, origins, masq_link_local: bool, masq_link_local_ipv6: bool) -> Verdict:
    family = ruleset.ipv4 if address.version == 4 else ruleset.ipv6
    if family is None:
        return Verdict(UNMANAGED, reason=_IPV6_UNMANAGED)
    matches = tuple(Match(net, origins.get(net, ())) for net in _containing(address, family.nonmasq))
    if matches:
        return Verdict(KEEP, matches)
    link_local = LINK_LOCAL_V4 if address.version == 4 else LINK_LOCAL_V6
    key = "masqLinkLocal" if address.version == 4 else "masqLinkLocalIPv6"
    if address in link_local and (masq_link_local if address.version == 4 else masq_link_local_ipv6):
        return Verdict(MASQUERADE, reason=f"{link_local} is masqueraded because the config sets {key}: true")
    return Verdict(MASQUERADE)


def _live(address: Address, live: LiveRules, origins) -> Verdict:
    """The kernel's verdict: masqd's own rules, and the rules masqd does not write around them
    (walked in the kernel's order: those ahead of masqd's chain, those inside it up to the
    non-masquerade CIDR that keeps the address, then, unless masqd masquerades it, those after)."""
    family = live.family(address.version)
    own = _own_live(address, family, live.where, origins)
    if family is None or not family.foreign:
        return replace(own, masqd=own.action)
    reached = family.present and family.hooked
    first_keep = next((index for index, net in enumerate(family.nonmasq) if address in net), len(family.nonmasq))
    outcomes: set[bool] = set()  # what the rules that may act on it may do: masquerade it (True) or not
    acting: list[ForeignRule] = []

    def walk(rules) -> ForeignRule | None:
        for rule in rules:
            if rule.may_match(address):
                acting.append(rule)
                if rule.certain:
                    return rule
                outcomes.update({MASQUERADES: (True,), KEEPS: (False,)}.get(rule.effect, (True, False)))
        return None

    decided = walk(rule for rule in family.foreign if rule.stage == BEFORE
                   or (reached and rule.stage == INSIDE and rule.position <= first_keep))
    masquerades = decided.effect == MASQUERADES if decided is not None else own.masquerades
    if not masquerades:
        # a masquerade ends nat processing; masqd's RETURN does not, nor (nftables) an accept in
        # another table's chain; an ACCEPT in iptables' POSTROUTING or masqd's chain does
        later = walk(rule for rule in family.foreign if rule.stage == AFTER and rule.effect != KEEPS
                     and (decided is None or rule.kind == "chain"))
        if later is not None:
            decided, masquerades = later, True
    outcomes.add(masquerades)
    if len(outcomes) > 1:
        return Verdict(UNCERTAIN, own.matches, own.reason, own.action, tuple(acting), decided)
    if decided is not None:
        return Verdict(MASQUERADE if masquerades else KEEP, masqd=own.action, foreign=tuple(acting), decided_by=decided)
    return replace(own, masqd=own.action, foreign=tuple(acting))


def _own_live(address: Address, family: LiveFamily | None, where: str, origins) -> Verdict:
    """What masqd's own rules in the kernel do with traffic to ``address``."""
    if family is None:  # explained from the kernel alone, without --enable-ipv6
        return Verdict(UNMANAGED, reason=_IPV6_UNMANAGED)
    if not family.present:
        return Verdict(UNMANAGED, reason=f"masqd's {where} is not in the kernel")
    if not family.hooked:
        return Verdict(UNMANAGED, reason=f"masqd's {where} is in the kernel, but traffic does not reach it "
                                         "(not hooked into nat POSTROUTING)")
    matches = tuple(_live_match(address, net, origins) for net in _containing(address, family.nonmasq))
    if matches:
        return Verdict(KEEP, matches)
    if not family.masquerade:
        return Verdict(UNMANAGED, reason=f"masqd's {where} has no final masquerade rule")
    return Verdict(MASQUERADE)


def _live_match(address: Address, net: Network, origins) -> Match:
    if net in origins:
        return Match(net, origins[net])
    behind = tuple(desired for desired in _containing(address, tuple(origins)) if desired.subnet_of(net))
    merged = tuple(dict.fromkeys(origin for desired in behind for origin in origins[desired]))
    return Match(net, merged, behind)


def _containing(address: Address, networks) -> list[Network]:
    """The networks holding ``address``, each once, most specific first (ties in rule order)."""
    found = dict.fromkeys(net for net in networks if net.version == address.version and address in net)
    return sorted(found, key=lambda net: -net.prefixlen)


# --- differences of the kernel's rules from the desired ones ---------------------------------------------


def family_differences(ruleset: RuleSet, live: LiveFamily, origins, where: str) -> tuple[str, ...]:
    """What differs between the kernel's rules of one family and the desired ones, one line each
    (empty: the kernel holds exactly the desired rules)."""
    desired = ruleset.ipv4 if live.family == 4 else ruleset.ipv6
    lines: list[str] = []
    if not live.present:
        lines.append(f"{where} is not in the kernel: nothing masqd writes is there, so masqd masquerades nothing")
    else:
        if not live.hooked:
            lines.append(f"{where} is there, but traffic does not reach it (not hooked into nat POSTROUTING)")
        elif not live.local_exempt and live.masquerade:
            lines.append("destinations local to the node are not exempted (the LOCAL exemption is missing), "
                         "so traffic to the node's own addresses is masqueraded too")
        if not live.masquerade:
            lines.append("the final masquerade rule is missing: traffic no CIDR keeps is not masqueraded")
        wanted = desired.nonmasq if desired is not None else ()
        missing = _uncovered(wanted, live.nonmasq)
        if missing:
            lines.append("missing from the kernel: " + _listing(missing, origins))
        extra = _uncovered(live.nonmasq, wanted)
        if extra:
            lines.append("in the kernel, not in the desired state: " + _listing(extra, {}))
        lines += [f"unexpected: {item}" for item in live.unexpected]
    if live.drift is not None:
        lines.append(f"a sync would rewrite it ({live.drift})")
    return tuple(lines)


def _uncovered(networks, cover) -> list[Network]:
    """The networks (each once, in order) not wholly inside the union of ``cover``."""
    blocks = sorted((int(n.network_address), int(n.broadcast_address), n.version)
                    for n in cover)
    merged: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for first, last, version in blocks:
        runs = merged[version]
        if runs and first <= runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], max(runs[-1][1], last))
        else:
            runs.append((first, last))
    starts = {version: [first for first, _ in runs] for version, runs in merged.items()}
    out = []
    for net in dict.fromkeys(networks):
        runs = merged[net.version]
        index = bisect.bisect_right(starts[net.version], int(net.network_address)) - 1
        if index < 0 or runs[index][1] < int(net.broadcast_address):
            out.append(net)
    return out


def _listing(networks: list[Network], origins) -> str:
    shown = [f"{net} (from {', '.join(map(str, origins[net]))})" if origins.get(net) else str(net)
             for net in networks[:_LISTED]]
    more = f", and {len(networks) - _LISTED} more" if len(networks) > _LISTED else ""
    return ", ".join(shown) + more


# --- output ------------------------------------------------------------------------------------------------


def format_text(report: Report) -> str:
    """The human-readable report: one block per address; with ``--live``, a header and a summary."""
    live = report.live
    lines: list[str] = []
    if live is not None and report.compared:
        lines.append(f"explained from the rules the kernel holds ({live.backend} backend, {live.where}), compared with the "
                     "desired state")
    elif live is not None:
        lines.append(f"explained from the rules the kernel holds alone ({live.backend} backend, {live.where}): "
                     f"{_NO_DESIRED}")
    for explanation in report.explanations:
        shown = explanation.live or explanation.desired
        where = " in the kernel" if explanation.live is not None else ""
        own = shown.masqd if shown.action == UNCERTAIN else shown.action
        lines.append(f"{explanation.shown_address}: {_HEADLINES[shown.action]}")
        if explanation.as_ipv4 is not None:
            lines.append(f"  note: an IPv4-mapped IPv6 address: traffic to it leaves as IPv4, so it is explained as "
                         f"{explanation.as_ipv4}")
        if shown.action == UNCERTAIN:
            lines.append(f"  masqd's rules: {_HEADLINES[own]}")
        lines += [f"  matched {_match_text(match, report.compared)}" for match in shown.matches]
        if shown.reason:
            lines.append(f"  {shown.reason}")
        elif own == MASQUERADE and shown.decided_by is None:
            lines.append(f"  no non-masquerade CIDR{where} matches it")
        lines += [f"  {_foreign_text(rule, rule is shown.decided_by)}" for rule in shown.foreign]
        if shown.action == MASQUERADE:
            lines.append(f"  note: {LOCAL_NOTE}")
        if explanation.drift:
            lines.append(f"  DRIFT: {_drift_text(explanation)}")
    if live is not None and report.compared:
        lines += _summary(report)
    return "\n".join(lines) + "\n"


def _foreign_text(rule: ForeignRule, decides: bool) -> str:
    if rule.kind == "chain":
        return f"may also act ({rule.text}): {_EFFECTS[rule.effect]}"
    if decides:
        done = "masqueraded" if rule.effect == MASQUERADES else "kept"
        return f"{done} by a rule masqd does not write, {_STAGES[rule.stage]}: {rule.text}"
    return f"{_MAY_ACT[rule.stage]}: {rule.text} ({_EFFECTS[rule.effect]})"


def _match_text(match: Match, compared: bool = True) -> str:
    merged = f" (the kernel's merge of {', '.join(map(str, match.merged_from))})" if match.merged_from else ""
    if not compared:
        return f"{match.cidr}"
    if not match.origins:
        return f"{match.cidr}{merged}: not in the desired state (added outside masqd?)"
    return f"{match.cidr}{merged} from {', '.join(map(str, match.origins))}"


def _drift_text(explanation: Explanation) -> str:
    live, desired = explanation.live, explanation.desired
    if live.action == UNCERTAIN:
        kernel = "rules masqd does not write may decide otherwise"
    else:
        kernel = "the kernel masquerades it" if live.masquerades else "the kernel does not masquerade it"
    if desired.masquerades:
        return f"{kernel}; the desired state masquerades it"
    return f"{kernel}; the desired state keeps the pod address ({'; '.join(map(_match_text, desired.matches))})"


def _foreign_drift(report: Report) -> tuple[list[str], list[str]]:
    """The addresses rules masqd does not write decide otherwise than desired, and those they
    may decide otherwise (an ``uncertain`` verdict: not drift, but worth saying)."""
    decided = [e.shown_address for e in report.explanations if e.drift and e.live.decided_by is not None]
    uncertain = [e.shown_address for e in report.explanations
                 if e.live is not None and e.desired is not None and e.live.action == UNCERTAIN]
    return decided, uncertain


def _summary(report: Report) -> list[str]:
    live = report.live
    decided, uncertain = _foreign_drift(report)
    notes = ([f"rules masqd does not write decide otherwise for {', '.join(decided)}"] if decided else []) + (
        [f"rules masqd does not write may decide otherwise for {', '.join(uncertain)} (matches explain does not "
         "evaluate: check them)"] if uncertain else [])
    if not any(report.differences.values()):
        labels = ", ".join(family.label for family in live.families)
        if notes:
            return [f"masqd's rules in the kernel are the desired ones ({live.backend} backend, {live.where}: {labels}), "
                    f"but {'; '.join(notes)}"]
        return [f"the kernel holds the desired state ({live.backend} backend, {live.where}: {labels})"]
    out = [f"the kernel differs from the desired state ({live.backend} backend, {live.where}):"]
    for family in live.families:
        out += [f"  {family.label}: {line}" for line in report.differences.get(family.family, ())]
    out += [f"  {note}" for note in notes]
    return out


def as_json(report: Report) -> list[dict]:
    """The report as JSON-ready objects, one per address (``--output json``)."""
    out = []
    for explanation in report.explanations:
        item = {"address": explanation.shown_address, "family": explanation.family,
                **_verdict_json(explanation.desired)}
        if explanation.as_ipv4 is not None:
            item["explained_as"] = str(explanation.as_ipv4)
        if explanation.live is not None:
            live = explanation.live
            item["live"] = {**_verdict_json(live), "drift": explanation.drift if report.compared else None,
                            "kernel_differences": list(report.differences.get(explanation.family, ())),
                            "masqd_verdict": live.masqd,
                            "foreign_rules": [{"rule": rule.text, "kind": rule.kind, "stage": rule.stage,
                                               "effect": rule.effect, "decides": rule is live.decided_by}
                                              for rule in live.foreign]}
        out.append(item)
    return out


def _verdict_json(verdict: Verdict | None) -> dict:
    if verdict is None:  # explained from the kernel alone
        return {"verdict": None, "matches": [], "reason": _NO_DESIRED}
    return {
        "verdict": verdict.action,
        "matches": [{"cidr": str(match.cidr),
                     "origins": [{"kind": o.kind, "name": o.name, "line": o.line, "detail": o.detail, "text": str(o)}
                                 for o in match.origins],
                     **({"merged_from": [str(n) for n in match.merged_from]} if match.merged_from else {})}
                    for match in verdict.matches],
        "reason": verdict.reason,
    }
