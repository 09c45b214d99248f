"""``masqd explain``'s output: the text report and the JSON objects. Pure: no I/O."""

from __future__ import annotations

from dataclasses import replace

from masqd.backends.base import MASQUERADES, ForeignRule
from masqd.explain.model import (
    EFFECTS,
    HEADLINES,
    KEEP,
    LISTED,
    LOCAL_NOTE,
    MASQUERADE,
    MAY_ACT,
    NO_DESIRED,
    STAGES,
    UNCERTAIN,
    Explanation,
    Match,
    Report,
    Verdict,
)
from masqd.explain.services import headline as services_headline
from masqd.explain.services import other_ports_prefix, route_lines, routes_json
from masqd.explain.verdicts import rewrite_text
from masqd.provenance import MASQUERADE_SOURCES, NON_MASQUERADE_SOURCES, SNAT_KEYS
from masqd.shadowing import mark_meaning, shadows


def format_text(report: Report) -> str:
    """The human-readable report: one block per address; with ``--live``, a header and a summary."""
    live = report.live
    lines: list[str] = []
    if live is not None and report.compared:
        lines.append(f"explained from the rules the kernel holds ({live.backend} backend, {live.where}), compared with the "
                     "desired state")
    elif live is not None:
        lines.append(f"explained from the rules the kernel holds alone ({live.backend} backend, {live.where}): "
                     f"{NO_DESIRED}")
    for explanation in report.explanations:
        block = _block(replace(explanation, services=()), report.compared)
        if explanation.services:  # kube-proxy DNATs it: its endpoints first, its own verdict for other ports
            block = [services_headline(explanation),
                     *route_lines(explanation, lambda endpoint: _block(endpoint, report.compared)),
                     f"  {other_ports_prefix(explanation)}{block[0].split(': ', 1)[1]}", *block[1:]]
        lines += block
    if live is not None and report.compared:
        lines += _summary(report)
    return "\n".join(lines) + "\n"


def _block(explanation: Explanation, compared: bool) -> list[str]:
    """One address's lines: its verdict, and why."""
    lines: list[str] = []
    shown = explanation.live or explanation.desired
    where = " in the kernel" if explanation.live is not None else ""
    own = shown.masqd if shown.action == UNCERTAIN else shown.action
    lines.append(f"{explanation.shown_address}: {_headline(shown, shown.action)}")
    if explanation.as_ipv4 is not None:
        lines.append(f"  note: an IPv4-mapped IPv6 address: traffic to it leaves as IPv4, so it is explained as "
                     f"{explanation.as_ipv4}")
    if shown.action == UNCERTAIN:
        lines.append(f"  masqd's rules: {_headline(shown, own)}")
    lines += _rule_lines(shown, explanation.family)
    lines += _destination_lines(shown, compared)
    if shown.reason:
        lines.append(f"  {shown.reason}")
    elif own == MASQUERADE and shown.decided_by is None and shown.deciding is None:
        lines.append(f"  no non-masquerade CIDR{where} matches it")
    if own == MASQUERADE and shown.decided_by is None:
        lines += [f"  {line}" for line in _conditions(shown)]
    desired = explanation.desired
    if explanation.live is not None and desired is not None and _masquerade_entry_matches(desired) \
            and not desired.rule_keeps and own in (KEEP, MASQUERADE) and shown.decided_by is None:
        lines.append(f"  in the desired state decided by {_entry_text(desired.deciding, short=True)} (the kernel "
                     "holds the longest-prefix result flattened)")
    lines += [f"  {_foreign_text(rule, rule is shown.decided_by)}" for rule in shown.foreign]
    if shown.masqd == KEEP and any(shadows(rule) for rule in shown.foreign):
        lines.append("  shadowing: masqd keeps it, but a rule named above may masquerade it all the same "
                     "(counted in masqd_shadowing_rules)")
    if shown.action == MASQUERADE:
        lines.append(f"  note: {LOCAL_NOTE}")
    if explanation.drift:
        lines.append(f"  DRIFT: {_drift_text(explanation)}")
    return lines


def _headline(verdict: Verdict, action: str) -> str:
    if action == MASQUERADE and verdict.rewrite is not None:
        key = _snat_key(verdict.snat_to)
        return f"masqueraded: SNAT to {verdict.snat_to} ({key}{_origins_suffix(verdict.snat_origins)})"
    return HEADLINES[action]


def _snat_key(address: str) -> str:
    return SNAT_KEYS[6 if ":" in address else 4]


def _origins_text(origins) -> str:
    return ", ".join(dict.fromkeys(map(str, origins)))


def _origins_suffix(origins) -> str:
    """``, ORIGINS`` (nothing when there are none), inside a parenthesis that names a key."""
    return f", {_origins_text(origins)}" if origins else ""


def _entries_text(entries, key: str) -> str:
    """CIDRs of a source list with the list and where it was set: ``10.244.0.0/16 (KEY, from ...)``."""
    shown = ", ".join(str(entry.cidr) for entry in entries[:LISTED])
    more = f", and {len(entries) - LISTED} more" if len(entries) > LISTED else ""
    return f"{shown}{more} ({key}{_origins_suffix([o for entry in entries for o in entry.origins])})"


def _rule_lines(verdict: Verdict, family: int) -> list[str]:
    """The interface and source rules that applied (``--out-interface``, ``--from``), in the order
    the rules take them; a source list holding no source of the family keeps all of it."""
    lines = []
    rule = verdict.interface
    if rule is not None and rule.name is not None:
        names = ", ".join(name for name, _ in rule.patterns)
        if not rule.patterns:
            lines.append(f"leaves through {rule.name}: no outputInterfaces are set, so any interface may masquerade")
        elif rule.keeps:
            origins = _origins_text([o for _, found in rule.patterns for o in found])
            lines.append(f"leaves through {rule.name}, not in outputInterfaces [{names}]"
                         f"{f' ({origins})' if origins else ''}: not masqueraded")
        else:
            origins = _origins_text(dict(rule.patterns)[rule.matched])
            lines.append(f"leaves through {rule.name}: matches {rule.matched} in outputInterfaces"
                         f"{f' ({origins})' if origins else ''}: may be masqueraded")
    source = verdict.source
    if source is not None:
        given = f"from {source.address}: " if source.address is not None else ""
        held = source.held_by
        if source.keeps_by == NON_MASQUERADE_SOURCES:
            origins = _origins_text(held.origins)
            lines.append(f"{given}in nonMasqueradeSourceCIDRs {held.cidr}{f' ({origins})' if origins else ''}: "
                         "never masqueraded")
        elif source.keeps_by == MASQUERADE_SOURCES and not source.masq_sources:
            lines.append(f"{given}masqueradeSourceCIDRs lists no IPv{family} source: "
                         f"{'not masqueraded' if given else f'no IPv{family} traffic is masqueraded'}")
        elif source.keeps_by == MASQUERADE_SOURCES:
            listed = ", ".join(str(m.cidr) for m in source.masq_sources[:LISTED])
            more = f", and {len(source.masq_sources) - LISTED} more" if len(source.masq_sources) > LISTED else ""
            origins = _origins_text([o for m in source.masq_sources for o in m.origins])
            lines.append(f"{given}source not in masqueradeSourceCIDRs ({listed}{more}"
                         f"{f' from {origins}' if origins else ''}): not masqueraded")
        elif given and held is not None:
            origins = _origins_text(held.origins)
            lines.append(f"{given}in masqueradeSourceCIDRs {held.cidr}{f' ({origins})' if origins else ''}: "
                         "may be masqueraded")
        elif given:
            why = "not in nonMasqueradeSourceCIDRs" if source.keep_sources else "no source lists are set"
            lines.append(f"{given}no source rule applies ({why}): may be masqueraded")
    return [f"  {line}" for line in lines]


def _destination_lines(verdict: Verdict, compared: bool) -> list[str]:
    """The destination's entries: the non-masquerade CIDRs that keep it (upstream's lines), or,
    when a masquerade entry holds it, the deciding prefix and the ones it overrides; after an
    interface or source rule that kept the pod address, what the destination alone would do."""
    if verdict.rule_keeps:
        if verdict.decided_by is not None:
            return []
        deciding = verdict.deciding
        if deciding is None:
            return ["  the destination alone would be masqueraded (no entry holds it)"]
        if deciding.masquerade:
            return [f"  the destination alone would be masqueraded: decided by {_entry_text(deciding)}"]
        return [f"  the destination alone would keep it too: {_entry_text(deciding)}"]
    if _masquerade_entry_matches(verdict):
        return [f"  decided by {_entry_text(verdict.deciding)}"] + [
            f"  also matches (shorter, overridden): {_entry_text(match, short=True)}" for match in verdict.overridden]
    return [f"  matched {_match_text(match, compared)}" for match in verdict.matches]


def _masquerade_entry_matches(verdict: Verdict) -> bool:
    return verdict.deciding is not None and (verdict.deciding.masquerade
                                             or any(match.masquerade for match in verdict.overridden))


def _entry_text(match: Match, short: bool = False) -> str:
    """``10.99.0.0/16, a masquerade entry (the longest matching prefix), from cfg line 5``."""
    what = "a masquerade entry" if match.masquerade else "a non-masquerade entry"
    if match.part_of is not None:
        what += f" flattened from {match.part_of}"
    origins = f" from {_origins_text(match.origins)}" if match.origins else ""
    if short:
        return f"{match.cidr} ({what[2:]}){origins}"
    return f"{match.cidr}, {what} (the longest matching prefix){',' if origins else ''}{origins}"


def _conditions(verdict: Verdict) -> list[str]:
    """Without ``--out-interface`` / ``--from``: the interfaces and sources the masquerade verdict
    holds for, and those that keep the pod address instead."""
    lines = []
    rule = verdict.interface
    if rule is not None and rule.name is None and rule.patterns:
        origins = _origins_text([o for _, found in rule.patterns for o in found])
        lines.append(f"holds only for traffic leaving through {', '.join(name for name, _ in rule.patterns)} "
                     f"(outputInterfaces{', ' + origins if origins else ''}); through other interfaces it keeps the "
                     "pod address (--out-interface NAME explains one)")
    source = verdict.source
    if source is not None and source.address is None and not source.keeps:
        keep = _entries_text(source.keep_sources, NON_MASQUERADE_SOURCES) if source.keep_sources else None
        if source.masq_sources:
            lines.append(f"holds only for traffic from {_entries_text(source.masq_sources, MASQUERADE_SOURCES)}"
                         f"{f' but not from {keep}' if keep else ''}; from other sources it keeps the pod address "
                         "(--from SOURCE explains one)")
        elif keep:
            lines.append(f"holds for traffic from any source but {keep}, which keeps the pod address "
                         "(--from SOURCE explains one)")
    return lines


def _foreign_text(rule: ForeignRule, decides: bool) -> str:
    if rule.mark is not None:
        return f"{MAY_ACT[rule.stage]} on marked traffic ({rule.text}, mark {rule.mark}): {mark_meaning(rule.mark)}"
    if rule.kind == "chain":
        return f"may also act ({rule.text}): {EFFECTS[rule.effect]}"
    if decides:
        done = "masqueraded" if rule.effect == MASQUERADES else "kept"
        return f"{done} by a rule masqd does not write, {STAGES[rule.stage]}: {rule.text}"
    return f"{MAY_ACT[rule.stage]}: {rule.text} ({EFFECTS[rule.effect]})"


def _match_text(match: Match, compared: bool = True) -> str:
    merged = f" (the kernel's merge of {', '.join(map(str, match.merged_from))})" if match.merged_from else ""
    if match.part_of is not None:
        merged = f" (flattened from {match.part_of}: masquerade entries cut the ranges kept)"
    if not compared:
        return f"{match.cidr}"
    if not match.origins:
        return f"{match.cidr}{merged}: not in the desired state (added outside masqd?)"
    return f"{match.cidr}{merged} from {', '.join(map(str, match.origins))}"


def _drift_text(explanation: Explanation) -> str:
    live, desired = explanation.live, explanation.desired
    if live.action == UNCERTAIN:
        kernel = "rules masqd does not write may decide otherwise"
    elif live.masquerades and desired.masquerades:
        return (f"the kernel rewrites the source to {rewrite_text(live.snat_to)}; the desired state to "
                f"{rewrite_text(desired.snat_to)}")
    else:
        kernel = "the kernel masquerades it" if live.masquerades else "the kernel does not masquerade it"
    if desired.masquerades:
        return f"{kernel}; the desired state masquerades it"
    return f"{kernel}; the desired state keeps the pod address ({_why_kept(desired)})"


def _why_kept(verdict: Verdict) -> str:
    if verdict.interface is not None and verdict.interface.keeps:
        return f"it leaves through {verdict.interface.name}, not in outputInterfaces"
    if verdict.source is not None and verdict.source.keeps:
        if verdict.source.keeps_by == NON_MASQUERADE_SOURCES:
            return f"the source is in nonMasqueradeSourceCIDRs {verdict.source.held_by.cidr}"
        return "the source is not in masqueradeSourceCIDRs"
    if verdict.matches:
        return "; ".join(map(_match_text, verdict.matches))
    return verdict.reason or ""


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
    """The report as JSON-ready objects, one per address (``--output json``).

    When the decision model beyond upstream is in play (:attr:`Report.extended`), each verdict
    (the desired one, and ``live``) also holds: ``deciding_prefix`` (the destination's longest
    matching entry: ``cidr``, ``entry`` ``non-masquerade`` or ``masquerade``, ``kept``, ``origins``;
    ``null``: none holds it), ``overridden`` (the other entries holding it, longest first),
    ``source`` (``--from``'s ``address`` or ``null``, the list that ``keeps_by`` it or ``null``,
    the entry ``held_by``, both lists with origins), ``interface`` (``--out-interface``'s ``name``
    or ``null``, ``output_interfaces`` with origins, ``matched``, ``keeps``), ``rewrite`` (when
    masqd's rules masquerade it: ``target`` ``MASQUERADE``, ``address`` ``null``, the node's; or
    ``SNAT`` to ``address``, with its ``key`` and ``origins``; else ``null``), and ``conditions``
    (the text lines naming the interfaces and sources the verdict holds for)."""
    out = []
    for explanation in report.explanations:
        item = {"address": explanation.shown_address, "family": explanation.family,
                **_verdict_json(explanation.desired, report.extended)}
        if explanation.as_ipv4 is not None:
            item["explained_as"] = str(explanation.as_ipv4)
        if explanation.live is not None:
            live = explanation.live
            item["live"] = {**_verdict_json(live, report.extended),
                            "drift": explanation.drift if report.compared else None,
                            "kernel_differences": list(report.differences.get(explanation.family, ())),
                            "masqd_verdict": live.masqd,
                            "foreign_rules": [{"rule": rule.text, "kind": rule.kind, "stage": rule.stage,
                                               "effect": rule.effect, "decides": rule is live.decided_by,
                                               "mark": rule.mark}
                                              for rule in live.foreign]}
        if explanation.services:  # kube-proxy DNATs it (--live): its Service ports and their endpoints
            item["services"] = routes_json(explanation, lambda verdict: _verdict_json(verdict, report.extended))
        out.append(item)
    return out


def _origins_json(origins) -> list[dict]:
    return [{"kind": o.kind, "name": o.name, "line": o.line, "detail": o.detail, "text": str(o)} for o in origins]


def _verdict_json(verdict: Verdict | None, extended: bool = False) -> dict:
    if verdict is None:  # explained from the kernel alone
        return {"verdict": None, "matches": [], "reason": NO_DESIRED}
    out = {
        "verdict": verdict.action,
        "matches": [{"cidr": str(match.cidr), "origins": _origins_json(match.origins),
                     **({"merged_from": [str(n) for n in match.merged_from]} if match.merged_from else {}),
                     **({"part_of": str(match.part_of)} if match.part_of is not None else {})}
                    for match in verdict.matches],
        "reason": verdict.reason,
    }
    if extended:
        out.update(_decision_json(verdict))
    return out


def _entry_json(match: Match) -> dict:
    return {"cidr": str(match.cidr), "entry": "masquerade" if match.masquerade else "non-masquerade",
            "origins": _origins_json(match.origins),
            **({"part_of": str(match.part_of)} if match.part_of is not None else {})}


def _decision_json(verdict: Verdict) -> dict:
    deciding = verdict.deciding
    source, interface = verdict.source, verdict.interface
    own = verdict.masqd if verdict.action == UNCERTAIN else verdict.action
    rewrite = None
    if own == MASQUERADE and verdict.decided_by is None:
        rewrite = ({"target": "MASQUERADE", "address": None, "key": None, "origins": []} if verdict.snat_to is None else
                   {"target": "SNAT", "address": verdict.snat_to, "key": _snat_key(verdict.snat_to),
                    "origins": _origins_json(verdict.snat_origins)})

    def sources(matches) -> list[dict]:
        return [{"cidr": str(m.cidr), "origins": _origins_json(m.origins)} for m in matches]

    return {
        "deciding_prefix": None if deciding is None else {**_entry_json(deciding), "kept": not deciding.masquerade},
        "overridden": [_entry_json(match) for match in verdict.overridden],
        "source": None if source is None else {
            "address": None if source.address is None else str(source.address),
            "keeps_by": source.keeps_by, "keeps": source.keeps,
            "held_by": None if source.held_by is None else str(source.held_by.cidr),
            "non_masquerade_sources": sources(source.keep_sources),
            "masquerade_sources": None if source.masq_sources is None else sources(source.masq_sources)},
        "interface": None if interface is None else {
            "name": interface.name, "matched": interface.matched, "keeps": interface.keeps,
            "output_interfaces": [{"name": name, "origins": _origins_json(found)}
                                  for name, found in interface.patterns]},
        "rewrite": rewrite,
        "conditions": _conditions(verdict) if own == MASQUERADE and verdict.decided_by is None else [],
    }
