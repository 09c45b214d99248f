"""How traffic to an address is decided: by the desired rule set (:func:`explain`) and by the rules
the kernel holds (``--live``), step by step, and what differs between the two. Pure: no I/O."""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Mapping
from dataclasses import replace

from masqd.backends.base import (
    AFTER,
    BEFORE,
    INSIDE,
    KEEPS,
    MASQUERADES,
    ForeignRule,
    LiveFamily,
    LiveRules,
)
from masqd.cidrs import LINK_LOCAL_V4, LINK_LOCAL_V6, Network
from masqd.explain.services import service_routes
from masqd.explain.model import (
    IPV6_UNMANAGED,
    KEEP,
    LISTED,
    MASQUERADE,
    UNCERTAIN,
    UNMANAGED,
    Address,
    Explanation,
    InterfaceRule,
    Match,
    Report,
    SourceRule,
    Verdict,
    explained_as,
)
from masqd.provenance import (
    INTERFACES_KEY,
    MASQUERADE_SOURCES,
    NON_MASQUERADE_SOURCES,
    SNAT_KEYS,
    Origin,
    Provenance,
)
from masqd.ruleset import FamilyRules, RuleSet, interface_matches, source_rule


def explain(addresses: list[Address] | tuple[Address, ...], ruleset: RuleSet,
            origins: Mapping[Network, tuple[Origin, ...]] | Provenance, live: LiveRules | None = None, *,
            masq_link_local: bool = False, masq_link_local_ipv6: bool = False,
            source: Address | None = None, interface: str | None = None) -> Report:
    """Each address against the desired ``ruleset`` (and the kernel's ``live`` rules, if given).
    ``origins``: :func:`~masqd.provenance.decision_origins` (or only the non-masquerade entries',
    :func:`~masqd.provenance.cidr_origins`). ``masq_link_local*``: the config's keys, so a
    masqueraded link-local address says why. ``source`` / ``interface``: ``--from`` /
    ``--out-interface`` (the source must be of each address's family:
    :func:`source_family_problem`)."""
    provenance = _provenance(origins)
    source = explained_as(source)[0] if source is not None else None
    out = []
    for given in addresses:
        address, mapped = explained_as(given)
        desired = _desired(address, ruleset, provenance, masq_link_local, masq_link_local_ipv6, source, interface)
        verdict = None
        if live is not None:
            # IPv6 without --enable-ipv6: masqd reads no IPv6 rules back; the verdict stays the same
            unmanaged = address.version == 6 and ruleset.ipv6 is None
            verdict = desired if unmanaged else _live(address, live, provenance, ruleset, source, interface)
        routes = service_routes(address, live, source, lambda endpoint: (
            _desired(endpoint, ruleset, provenance, masq_link_local, masq_link_local_ipv6, source, interface),
            _live(endpoint, live, provenance, ruleset, source, interface)))
        out.append(Explanation(given, desired, verdict, mapped, routes))
    extended = (source is not None or interface is not None or _in_play(ruleset)
                or (live is not None and _live_in_play(live)))
    if live is None:
        return Report(tuple(out), extended=extended)
    differences = {f.family: family_differences(ruleset, f, provenance, live.where) for f in live.families}
    return Report(tuple(out), live, differences, extended=extended)


def explain_kernel(addresses: list[Address] | tuple[Address, ...], live: LiveRules, *,
                   source: Address | None = None, interface: str | None = None) -> Report:
    """Each address from the kernel's ``live`` rules alone, when there is no desired state (the
    config is invalid: the kernel still holds the last good rules)."""
    source = explained_as(source)[0] if source is not None else None
    out = []
    for given in addresses:
        address, mapped = explained_as(given)
        routes = service_routes(address, live, source, lambda endpoint: (
            None, _live(endpoint, live, Provenance({}), None, source, interface)))
        out.append(Explanation(given, None, _live(address, live, Provenance({}), None, source, interface), mapped,
                               routes))
    extended = source is not None or interface is not None or _live_in_play(live)
    return Report(tuple(out), live, compared=False, extended=extended)


def _provenance(origins) -> Provenance:
    return origins if isinstance(origins, Provenance) else Provenance(origins)


def _in_play(ruleset: RuleSet) -> bool:
    """Whether one of the decision model's keys beyond upstream acts in ``ruleset``."""
    return bool(ruleset.interfaces) or any(
        family.masq or family.keep_sources or family.masq_sources is not None or family.snat_to is not None
        for family in ruleset.families)


def _live_in_play(live: LiveRules) -> bool:
    return any(family.keep_sources or family.masq_sources is not None or family.interfaces or family.snat_to
               for family in live.families)


def _desired(address: Address, ruleset: RuleSet, provenance: Provenance, masq_link_local: bool,
             masq_link_local_ipv6: bool, source: Address | None, interface: str | None) -> Verdict:
    family = ruleset.family(address.version)
    if family is None:
        return Verdict(UNMANAGED, reason=IPV6_UNMANAGED)
    rules = dict(
        interface=_interface_rule(interface, ruleset.interfaces, provenance),
        source=_source_rule(source, family.keep_sources, family.masq_sources, provenance),
        **_snat(family.snat_to, provenance),
    )
    keep = tuple(Match(net, provenance.keep.get(net, ())) for net in _containing(address, family.listed))
    masq = tuple(Match(net, provenance.masquerade.get(net, ()), masquerade=True)
                 for net in _containing(address, family.masq))
    decided = family.deciding(address)  # the one longest-prefix decision every backend renders
    deciding = next((m for m in masq + keep if decided is not None and m.cidr == decided[0]
                     and m.masquerade != decided[1]), None)
    overridden = tuple(sorted((m for m in keep + masq if m is not deciding), key=lambda m: -m.cidr.prefixlen))
    steps = dict(deciding=deciding, overridden=overridden, **rules)
    if _rules_keep(rules):
        return Verdict(KEEP, **steps)
    if deciding is not None and not deciding.masquerade:
        return Verdict(KEEP, keep, **steps)
    link_local = LINK_LOCAL_V4 if address.version == 4 else LINK_LOCAL_V6
    key = "masqLinkLocal" if address.version == 4 else "masqLinkLocalIPv6"
    link_local_masqueraded = masq_link_local if address.version == 4 else masq_link_local_ipv6
    if deciding is None and address in link_local and link_local_masqueraded:
        return Verdict(MASQUERADE, reason=f"{link_local} is masqueraded because the config sets {key}: true", **steps)
    return Verdict(MASQUERADE, **steps)


def _rules_keep(rules: dict) -> bool:
    """The interface or the source rule of ``rules`` keeps the pod address."""
    return any(rules[step] is not None and rules[step].keeps for step in ("interface", "source"))


def _interface_rule(name: str | None, patterns: tuple[str, ...], provenance: Provenance) -> InterfaceRule | None:
    if name is None and not patterns:
        return None
    origins = provenance.settings.get(INTERFACES_KEY, {})
    matched = None if name is None else next((p for p in patterns if interface_matches(p, name)), None)
    return InterfaceRule(name, tuple((p, origins.get(p, ())) for p in patterns), matched)


def _source_rule(source: Address | None, keep_sources: tuple[Network, ...], masq_sources: tuple[Network, ...] | None,
                 provenance: Provenance) -> SourceRule | None:
    """The source rules as :func:`~masqd.ruleset.source_rule` decides them, with their origins."""
    if source is None and not keep_sources and masq_sources is None:
        return None
    kept_from = provenance.sources.get(NON_MASQUERADE_SOURCES, {})
    masq_from = provenance.sources.get(MASQUERADE_SOURCES, {})
    keep = tuple(Match(net, kept_from.get(net, ())) for net in keep_sources)
    masq = None if masq_sources is None else tuple(Match(net, masq_from.get(net, ()), masquerade=True)
                                                  for net in masq_sources)
    if source is None:
        return SourceRule(None, keep, masq, MASQUERADE_SOURCES if masq == () else None)
    decided = source_rule(source, keep_sources, masq_sources)  # the decision the rules make
    if decided is not None and decided[0] == NON_MASQUERADE_SOURCES:
        return SourceRule(source, keep, masq, NON_MASQUERADE_SOURCES, next(m for m in keep if m.cidr == decided[1]))
    inside = None if masq is None else next((m for m in masq if source in m.cidr), None)
    return SourceRule(source, keep, masq, None if decided is None else decided[0], inside)


def _snat(address, provenance: Provenance) -> dict:
    """``snat_to`` and ``snat_origins`` of a verdict for a family SNATing to ``address``."""
    if address is None:
        return {}
    try:
        parsed = ipaddress.ip_address(str(address))
    except ValueError:  # as the kernel printed it: shown as it is
        return {"snat_to": str(address)}
    return {"snat_to": str(parsed),
            "snat_origins": provenance.settings.get(SNAT_KEYS[parsed.version], {}).get(str(parsed), ())}


def _live(address: Address, live: LiveRules, provenance: Provenance, ruleset: RuleSet | None = None,
          source: Address | None = None, interface: str | None = None) -> Verdict:
    """The kernel's verdict: masqd's own rules, and the rules masqd does not write around them
    (walked in the kernel's order: those ahead of masqd's chain, those inside it up to the
    non-masquerade CIDR that keeps the address, then, unless masqd masquerades it, those after)."""
    family = live.family(address.version)
    desired = ruleset.family(address.version) if ruleset is not None else None
    own = _own_live(address, family, live.where, provenance, desired, source, interface)
    if family is None or not family.foreign:
        return replace(own, masqd=own.action)
    reached = family.present and family.hooked
    first_keep = next((index for index, net in enumerate(family.nonmasq) if address in net), len(family.nonmasq))
    if own.source is not None and own.source.keeps:
        first_keep = 0  # masqd's source rules come before its destination rules
    outcomes: set[bool] = set()  # what the rules that may act on it may do: masquerade it (True) or not
    acting: list[ForeignRule] = []

    def walk(rules) -> ForeignRule | None:
        for rule in rules:
            if rule.may_match(address):
                acting.append(rule)
                if rule.mark is not None:  # acts on marked traffic only (kube-proxy's): listed, not deciding
                    continue
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
        return replace(own, action=UNCERTAIN, masqd=own.action, foreign=tuple(acting), decided_by=decided)
    if decided is not None:
        return Verdict(MASQUERADE if masquerades else KEEP, masqd=own.action, foreign=tuple(acting), decided_by=decided)
    return replace(own, masqd=own.action, foreign=tuple(acting))


def _own_live(address: Address, family: LiveFamily | None, where: str, provenance: Provenance,
              desired: FamilyRules | None = None, source: Address | None = None,
              interface: str | None = None) -> Verdict:
    """What masqd's own rules in the kernel do with traffic to ``address`` (from ``source``,
    through ``interface``), from what the kernel holds alone: its interface and source rules, its
    non-masquerade CIDRs, its final rule (MASQUERADE or SNAT to an address)."""
    if family is None:  # explained from the kernel alone, without --enable-ipv6
        return Verdict(UNMANAGED, reason=IPV6_UNMANAGED)
    if not family.present:
        return Verdict(UNMANAGED, reason=f"masqd's {where} is not in the kernel")
    if not family.hooked:
        return Verdict(UNMANAGED, reason=f"masqd's {where} is in the kernel, but traffic does not reach it "
                                         "(not hooked into nat POSTROUTING)")
    rules = dict(
        interface=_interface_rule(interface, family.interfaces, provenance),
        source=_source_rule(source, family.keep_sources, family.masq_sources, provenance),
        **_snat(family.snat_to, provenance),
    )
    matches = tuple(_live_match(address, net, provenance.keep, desired) for net in _containing(address, family.nonmasq))
    steps = dict(deciding=matches[0] if matches else None, **rules)
    if _rules_keep(rules):
        return Verdict(KEEP, **steps)
    if matches:
        return Verdict(KEEP, matches, **steps)
    if not family.masquerade:
        if desired is not None and not desired.masquerades_any:
            return Verdict(KEEP, reason=f"masqd's {where} masquerades no IPv{family.family} traffic "
                                        f"(masqueradeSourceCIDRs lists no IPv{family.family} source)", **steps)
        return Verdict(UNMANAGED, reason=f"masqd's {where} has no final masquerade rule", **steps)
    return Verdict(MASQUERADE, **steps)


def _live_match(address: Address, net: Network, origins, desired: FamilyRules | None = None) -> Match:
    if net in origins:
        return Match(net, origins[net])
    if desired is not None and desired.keep is not None and not _uncovered([net], desired.nonmasq):
        # a CIDR of the flattened longest-prefix result: it keeps the address for the entry deciding it
        decided = desired.deciding(address)
        if decided is not None and decided[1]:
            return Match(net, origins.get(decided[0], ()), part_of=decided[0])
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
    (empty: the kernel holds exactly the desired rules). ``origins``: a
    :class:`~masqd.provenance.Provenance` (or the non-masquerade entries' origins alone)."""
    provenance = _provenance(origins)
    desired = ruleset.family(live.family)
    masquerades_any = desired is None or desired.masquerades_any
    lines: list[str] = []
    if not live.present:
        lines.append(f"{where} is not in the kernel: nothing masqd writes is there, so masqd masquerades nothing")
    else:
        if not live.hooked:
            lines.append(f"{where} is there, but traffic does not reach it (not hooked into nat POSTROUTING)")
        elif not live.local_exempt and live.masquerade:
            lines.append("destinations local to the node are not exempted (the LOCAL exemption is missing), "
                         "so traffic to the node's own addresses is masqueraded too")
        if not live.masquerade and masquerades_any:
            lines.append("the final masquerade rule is missing: traffic no CIDR keeps is not masqueraded")
        elif live.masquerade and not masquerades_any:
            lines.append(f"the kernel masquerades IPv{live.family} traffic, the desired state none "
                         f"(masqueradeSourceCIDRs lists no IPv{live.family} source)")
        wanted = desired.nonmasq if desired is not None else ()
        missing = _uncovered(wanted, live.nonmasq)
        if missing:
            lines.append("missing from the kernel: " + _listing(missing, provenance.keep, desired))
        extra = _uncovered(live.nonmasq, wanted)
        if extra:
            lines.append("in the kernel, not in the desired state: " + _listing(extra, {}))
        if desired is not None:
            lines += _rule_differences(ruleset, desired, live, provenance)
        lines += [f"unexpected: {item}" for item in live.unexpected]
    if live.drift is not None:
        lines.append(f"a sync would rewrite it ({live.drift})")
    return tuple(lines)


def _rule_differences(ruleset: RuleSet, desired: FamilyRules, live: LiveFamily, provenance: Provenance) -> list[str]:
    """The decision model's rules that differ: source lists, interfaces, the address rewritten to."""
    lines = []
    kept_from = provenance.sources.get(NON_MASQUERADE_SOURCES, {})
    missing = _uncovered(desired.keep_sources, live.keep_sources)
    if missing:
        lines.append("nonMasqueradeSourceCIDRs missing from the kernel (traffic from them is masqueraded): "
                     + _listing(missing, kept_from))
    extra = _uncovered(live.keep_sources, desired.keep_sources)
    if extra:
        lines.append("sources the kernel never masquerades, not in the desired state's nonMasqueradeSourceCIDRs: "
                     + _listing(extra, {}))
    if not live.masquerade or not desired.masquerades_any:
        return lines  # no final rule, or none wanted: said above
    if live.masq_sources is None and desired.masq_sources is not None:
        lines.append("the kernel masquerades traffic from any source, the desired state only from "
                     "masqueradeSourceCIDRs "
                     + _listing(list(desired.masq_sources), provenance.sources.get(MASQUERADE_SOURCES, {})))
    elif live.masq_sources is not None and desired.masq_sources is None:
        lines.append("the kernel masquerades only traffic from " + _listing(list(live.masq_sources), {})
                     + ", the desired state from any source (no masqueradeSourceCIDRs)")
    elif live.masq_sources is not None and desired.masq_sources is not None:
        missing = _uncovered(desired.masq_sources, live.masq_sources)
        if missing:
            lines.append("masqueradeSourceCIDRs missing from the kernel (traffic from them is not masqueraded): "
                         + _listing(missing, provenance.sources.get(MASQUERADE_SOURCES, {})))
        extra = _uncovered(live.masq_sources, desired.masq_sources)
        if extra:
            lines.append("sources the kernel masquerades, not in the desired state's masqueradeSourceCIDRs: "
                         + _listing(extra, {}))
    if set(live.interfaces) != set(ruleset.interfaces):
        lines.append(f"the kernel masquerades traffic leaving through {_interfaces_text(live.interfaces)}, the desired "
                     f"state through {_interfaces_text(ruleset.interfaces)} (outputInterfaces)")
    kernel_snat = _snat(live.snat_to, provenance).get("snat_to")
    wanted_snat = None if desired.snat_to is None else str(desired.snat_to)
    if kernel_snat != wanted_snat:
        lines.append(f"the kernel rewrites the source to {rewrite_text(kernel_snat)}, the desired state to "
                     f"{rewrite_text(wanted_snat, SNAT_KEYS[desired.family])}")
    return lines


def _interfaces_text(interfaces) -> str:
    return ", ".join(interfaces) if interfaces else "any interface"


def rewrite_text(snat_to: str | None, key: str | None = None) -> str:
    if snat_to is None:
        return "the node's address (MASQUERADE)"
    return f"{snat_to} (SNAT{', ' + key if key else ''})"


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


def _listing(networks: list[Network], origins, desired: FamilyRules | None = None) -> str:
    shown = [_listed(net, origins, desired) for net in networks[:LISTED]]
    more = f", and {len(networks) - LISTED} more" if len(networks) > LISTED else ""
    return ", ".join(shown) + more


def _listed(net: Network, origins, desired: FamilyRules | None) -> str:
    if origins.get(net):
        return f"{net} (from {', '.join(map(str, origins[net]))})"
    if desired is not None and desired.keep is not None:  # a CIDR of the flattened longest-prefix result
        holding = [entry for entry in desired.listed if entry.version == net.version and net.subnet_of(entry)]
        if holding:
            entry = max(holding, key=lambda entry: entry.prefixlen)
            found = origins.get(entry)
            return f"{net} (part of {entry}{' from ' + ', '.join(map(str, found)) if found else ''})"
    return str(net)
