"""Where each entry the decisions of a rule set rest on came from. Pure: no I/O.

A non-masquerade CIDR reaches the rules from one or more *origins*: a config source (a file or an
API ConfigMap, with the line that lists it when the text is at hand), the default list (RFC 1918),
the reserved ranges ``--nomasq-all-reserved-ranges`` adds to it, the link-local default
(``masqLinkLocal: false``), a plugin, or an ``EgressNATPolicy``. The decision model's other
entries (:mod:`masqd.ruleset`) have origins too: a masquerade entry comes from a config source's
``masqueradeCIDRs`` or a plugin's ``masquerade_cidrs``; the source lists
(``nonMasqueradeSourceCIDRs``, ``masqueradeSourceCIDRs``), ``outputInterfaces`` and
``snatToAddress[IPv6]`` from config sources. ``masqd explain`` shows them
(:func:`decision_origins`; :func:`cidr_origins` is its non-masquerade part); metrics label
CIDRs by their :attr:`Origin.kind` (:func:`origin_counts`, :func:`list_counts`).

Line numbers are found only when asked for (``texts``): composing a big config costs about as
much as parsing it, which the reconciler's hot path must not pay.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import yaml

from masqd.cidrs import LINK_LOCAL_V4, LINK_LOCAL_V6, CIDRError, Network, parse_cidr
from masqd.config import DEFAULTS_ORIGIN, RESERVED_CIDRS, AgentOptions, MergedConfig
from masqd.config.model import OTHER_CIDR_LISTS
from masqd.ruleset import RuleSet

#: Every kind of origin, in the order :func:`cidr_origins` lists them for one CIDR.
ORIGIN_KINDS: tuple[str, ...] = ("config", "defaults", "reserved-ranges", "link-local", "plugin", "policy")
#: The kinds a plugin may declare its contributed CIDRs to be (``masqd_origin_kind``, see
#: :func:`masqd.hookspecs.nonmasq_cidrs`).
CONTRIBUTION_KINDS: tuple[str, ...] = ("plugin", "policy")

RESERVED_RANGES_FLAG = "--nomasq-all-reserved-ranges"
_CIDR_KEY = "nonMasqueradeCIDRs"
#: The decision model's lists beyond upstream (config keys), as :attr:`Provenance` and the
#: metrics (:func:`list_counts`) name them.
MASQUERADE_CIDRS = "masqueradeCIDRs"
MASQUERADE_SOURCES = "masqueradeSourceCIDRs"
NON_MASQUERADE_SOURCES = "nonMasqueradeSourceCIDRs"
SOURCE_LISTS: tuple[str, ...] = (NON_MASQUERADE_SOURCES, MASQUERADE_SOURCES)
#: The decision model's settings whose config lines :attr:`Provenance.settings` holds.
SNAT_KEYS = {4: "snatToAddress", 6: "snatToAddressIPv6"}
INTERFACES_KEY = "outputInterfaces"
#: Every key whose items (a list's) or value (a scalar's) the line finder maps to lines.
_LINE_KEYS: tuple[str, ...] = (_CIDR_KEY, MASQUERADE_CIDRS, MASQUERADE_SOURCES, NON_MASQUERADE_SOURCES,
                               INTERFACES_KEY, *SNAT_KEYS.values())
_CIDR_KEYS = frozenset({_CIDR_KEY, MASQUERADE_CIDRS, MASQUERADE_SOURCES, NON_MASQUERADE_SOURCES})


@dataclass(frozen=True, slots=True)
class Origin:
    """One place a non-masquerade CIDR came from.

    kind: one of :data:`ORIGIN_KINDS`.
    name: what of that kind: the config source (a path, ``configmap NAMESPACE/NAME``), ``RFC 1918``
        for the defaults, the flag for the reserved ranges, ``masqLinkLocal`` /
        ``masqLinkLocalIPv6`` for link-local, the plugin's name, the policy's name.
    line: the 1-based line listing the CIDR in the config source, when known.
    detail: what the plugin said about it (``file /etc/cidrs/corp line 3``), when it said anything.
    """

    kind: str
    name: str
    line: int | None = None
    detail: str | None = None

    def __str__(self) -> str:
        if self.kind == "config":
            return self.name if self.line is None else f"{self.name} line {self.line}"
        if self.kind == "defaults":
            return f"default list ({self.name}; no config source sets {_CIDR_KEY})"
        if self.kind == "reserved-ranges":
            return self.name
        if self.kind == "link-local":
            return f"link-local default ({self.name}: false)"
        if self.kind == "policy":
            return f"EgressNATPolicy {self.name}"
        text = f"{self.kind} {self.name}"
        return text if self.detail is None else f"{text} ({self.detail})"


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where every entry the decisions of a rule set rest on came from (:func:`decision_origins`).

    keep: every non-masquerade entry as listed (:attr:`~masqd.ruleset.FamilyRules.listed`, not the
        flattened longest-prefix result), in rule order -> its origins: what :func:`cidr_origins`
        returns.
    masquerade: every masquerade entry (``masqueradeCIDRs``, plugins' ``masquerade_cidrs``) -> its
        origins.
    sources: :data:`NON_MASQUERADE_SOURCES` / :data:`MASQUERADE_SOURCES` -> each CIDR of that
        list -> the config sources listing it (with lines).
    settings: ``snatToAddress`` / ``snatToAddressIPv6`` -> the address (``str``) -> the config
        sources setting it; ``outputInterfaces`` -> each name -> the config sources listing it.
        A value whose source cannot be told (several sources and no texts) has no origins.
    """

    keep: Mapping[Network, tuple[Origin, ...]]
    masquerade: Mapping[Network, tuple[Origin, ...]] = field(default_factory=dict)
    sources: Mapping[str, Mapping[Network, tuple[Origin, ...]]] = field(default_factory=dict)
    settings: Mapping[str, Mapping[str, tuple[Origin, ...]]] = field(default_factory=dict)


def cidr_origins(
    ruleset: RuleSet,
    merged: MergedConfig,
    contributions: Iterable,
    options: AgentOptions,
    texts: Mapping[str, str] | None = None,
    *,
    descriptions: Mapping[str, Mapping[Network, tuple[Origin, ...]]] | None = None,
) -> dict[Network, tuple[Origin, ...]]:
    """Every non-masquerade entry of every family of ``ruleset`` as listed -> its origins (at
    least one each, none twice); with no masquerade entry cutting into a kept range those are the
    networks of the rules, in rule order.

    ruleset: the desired rules computed from ``merged`` and ``contributions``.
    merged: the merged config (its ``origins`` name the config sources listing each CIDR).
    contributions: the plugins' validated CIDRs (:class:`masqd.plugins.Contribution`); masquerade
        contributions (``masquerade_cidrs``) are not non-masquerade entries and are left out.
    options: the agent flags (``--nomasq-all-reserved-ranges`` decides what the defaults hold).
    texts: config source name -> its text, to find the line listing each CIDR; without it (or for
        a text whose lines cannot be mapped) lines are ``None``.
    descriptions: plugin name -> CIDR -> what the plugin said about it
        (:meth:`masqd.plugins.Plugins.describe_cidrs`); those replace the plain "plugin NAME"
        origin of the CIDRs they cover.
    """
    lines = {name: _value_lines(text) for name, text in (texts or {}).items()}
    return _keep_origins(ruleset, merged, contributions, options, lines, descriptions)


def decision_origins(
    ruleset: RuleSet,
    merged: MergedConfig,
    contributions: Iterable,
    options: AgentOptions,
    texts: Mapping[str, str] | None = None,
    *,
    descriptions: Mapping[str, Mapping[Network, tuple[Origin, ...]]] | None = None,
) -> Provenance:
    """Where every entry of ``ruleset``'s decisions came from: :func:`cidr_origins` (same
    arguments) for the non-masquerade entries, and the masquerade entries, source lists and
    settings of the decision model beside them (:class:`Provenance`). Each text is composed once."""
    contributions = tuple(contributions)
    lines = {name: _value_lines(text) for name, text in (texts or {}).items()}
    keep = _keep_origins(ruleset, merged, contributions, options, lines, descriptions)
    lists = merged.list_origins or {}

    def config_origins(key: str, net: Network, names: Iterable[str]) -> list[Origin]:
        return [Origin("config", name, _first(lines.get(name, {}).get(key, {}).get(net))) for name in names]

    masquerade: dict[Network, list[Origin]] = {}
    for net, names in lists.get(MASQUERADE_CIDRS, {}).items():
        _add(masquerade, net, *config_origins(MASQUERADE_CIDRS, net, names))
    for contribution in contributions:
        if getattr(contribution, "masquerade", False):
            described = (descriptions or {}).get(contribution.plugin, {})
            for net in contribution.cidrs:
                _add(masquerade, net, *(described.get(net) or (Origin(contribution.kind, contribution.plugin),)))
    in_order = dict.fromkeys(net for family in ruleset.families for net in family.masq)
    sources = {key: {net: tuple(config_origins(key, net, names)) for net, names in lists.get(key, {}).items()}
               for key in SOURCE_LISTS}
    config = merged.config
    settings: dict[str, dict[str, tuple[Origin, ...]]] = {}
    for version, key in SNAT_KEYS.items():
        address = config.snat_to_address if version == 4 else config.snat_to_address_ipv6
        if address is not None:
            settings[key] = {str(address): _setting_origins(merged, lines, key, address)}
    if config.output_interfaces:
        settings[INTERFACES_KEY] = {name: _setting_origins(merged, lines, INTERFACES_KEY, name)
                                    for name in config.output_interfaces}
    return Provenance(keep, {net: tuple(masquerade.get(net, ())) for net in {**in_order, **masquerade}},
                      sources, settings)


def _keep_origins(ruleset: RuleSet, merged: MergedConfig, contributions: Iterable, options: AgentOptions,
                  lines: Mapping[str, Mapping[str, Mapping]], descriptions) -> dict[Network, tuple[Origin, ...]]:
    found: dict[Network, list[Origin]] = {}
    config = merged.config
    for net in _link_local_exempt(ruleset, config):
        _add(found, net, Origin("link-local", "masqLinkLocal" if net.version == 4 else "masqLinkLocalIPv6"))
    reserved = {parse_cidr(c) for c in RESERVED_CIDRS} if options.nomasq_all_reserved_ranges else set()
    for net, names in merged.origins.items():
        for name in names:
            if name == DEFAULTS_ORIGIN and name not in merged.sources:
                _add(found, net, Origin("reserved-ranges", RESERVED_RANGES_FLAG) if net in reserved
                     else Origin("defaults", "RFC 1918"))
            else:
                _add(found, net, Origin("config", name, _first(lines.get(name, {}).get(_CIDR_KEY, {}).get(net))))
    for contribution in contributions:
        if getattr(contribution, "masquerade", False):
            continue
        described = (descriptions or {}).get(contribution.plugin, {})
        for net in contribution.cidrs:
            _add(found, net, *(described.get(net) or (Origin("plugin", contribution.plugin),)))
    in_rule_order = dict.fromkeys(net for family in ruleset.families for net in family.listed)
    return {net: tuple(found.get(net, ())) for net in in_rule_order}


def _add(found: dict, net, *origins: Origin) -> None:
    listed = found.setdefault(net, [])
    for origin in origins:
        if origin not in listed:
            listed.append(origin)


def _setting_origins(merged: MergedConfig, lines, key: str, value) -> tuple[Origin, ...]:
    """The config sources whose text sets ``key`` to (or lists) ``value``, with the line; without
    texts, the one config source when there is one."""
    found = tuple(Origin("config", name, _first(lines[name][key][value]))
                  for name in merged.sources if value in lines.get(name, {}).get(key, {}))
    if found:
        return found
    return (Origin("config", merged.sources[0]),) if len(merged.sources) == 1 else ()


def origin_counts(ruleset: RuleSet, merged: MergedConfig, contributions: Iterable,
                  options: AgentOptions) -> dict[tuple[str, str], int]:
    """Non-masquerade CIDRs per (family label, origin kind), for the metrics: as :func:`cidr_origins`
    classifies them, a contribution's CIDRs by the kind its plugin declared (``plugin``, or
    ``policy``; the two agree when a ``policy`` plugin describes each CIDR with the policies
    listing it, as the hook asks), without building an origin per CIDR: ``ipaddress`` networks
    hash slowly, and a scrape runs on the event loop. Here only the few default CIDRs and, when
    two plugins of a kind contribute, their CIDRs are hashed (to count a CIDR both list once).
    Masquerade contributions are :func:`list_counts`'."""
    counts: Tally[tuple[str, str]] = Tally()
    config = merged.config
    for family in ruleset.families:
        masq_link_local = config.masq_link_local if family.family == 4 else config.masq_link_local_ipv6
        link_local = LINK_LOCAL_V4 if family.family == 4 else LINK_LOCAL_V6
        if not masq_link_local and family.listed[:1] == (link_local,):
            counts[family.label, "link-local"] += 1
    # merge_configs names the defaults only when no config source lists any CIDR: either every
    # CIDR comes from the defaults (a dozen at most) or every one from config sources
    if DEFAULTS_ORIGIN in merged.sources or (DEFAULTS_ORIGIN,) not in merged.origins.values():
        for version, count in Tally(net.version for net in merged.origins).items():
            counts[f"ipv{version}", "config"] += count
    else:
        reserved = {parse_cidr(c) for c in RESERVED_CIDRS} if options.nomasq_all_reserved_ranges else set()
        for net in merged.origins:
            counts[f"ipv{net.version}", "reserved-ranges" if net in reserved else "defaults"] += 1
    for (version, kind), count in _contribution_counts(c for c in contributions
                                                       if not getattr(c, "masquerade", False)).items():
        counts[f"ipv{version}", kind] += count
    return dict(counts)


def list_counts(merged: MergedConfig, contributions: Iterable) -> dict[tuple[str, str, str], int]:
    """The entries of the decision model's other lists per (family label, list, origin kind), for
    the metrics: ``list`` is the config key (:data:`MASQUERADE_CIDRS`, :data:`MASQUERADE_SOURCES`,
    :data:`NON_MASQUERADE_SOURCES`), ``kind`` ``config`` for the config sources' entries, or the
    kind a plugin declared for its ``masquerade_cidrs`` (a CIDR two plugins of a kind list counts
    once, a CIDR from a config source and a plugin for each, as :func:`decision_origins` names
    them). Empty when no list is set."""
    counts: Tally[tuple[str, str, str]] = Tally()
    for key in OTHER_CIDR_LISTS:
        for version, count in Tally(net.version for net in (merged.list_origins or {}).get(key, {})).items():
            counts[f"ipv{version}", key, "config"] += count
    for (version, kind), count in _contribution_counts(c for c in contributions
                                                       if getattr(c, "masquerade", False)).items():
        counts[f"ipv{version}", MASQUERADE_CIDRS, kind] += count
    return dict(counts)


def _contribution_counts(contributions: Iterable) -> Tally[tuple[int, str]]:
    """CIDRs per (IP version, declared kind), a CIDR two plugins of a kind list counted once."""
    counts: Tally[tuple[int, str]] = Tally()
    by_kind: dict[str, list] = {}
    for contribution in contributions:
        by_kind.setdefault(contribution.kind, []).append(contribution)
    for kind, group in by_kind.items():
        nets = group[0].cidrs if len(group) == 1 else tuple(dict.fromkeys(n for c in group for n in c.cidrs))
        for net in nets:
            counts[net.version, kind] += 1
    return counts


def _link_local_exempt(ruleset: RuleSet, config) -> list[Network]:
    exempt = []
    if not config.masq_link_local and LINK_LOCAL_V4 in ruleset.ipv4.listed:
        exempt.append(LINK_LOCAL_V4)
    if ruleset.ipv6 is not None and not config.masq_link_local_ipv6 and LINK_LOCAL_V6 in ruleset.ipv6.listed:
        exempt.append(LINK_LOCAL_V6)
    return exempt


def _first(numbers: list[int] | None) -> int | None:
    return numbers[0] if numbers else None


# --- line numbers -----------------------------------------------------------------------------------

#: A config text's lines: key (:data:`_LINE_KEYS`) -> each item of its list, or its value -> the
#: 1-based lines writing it, in order. Items are networks for the CIDR lists, addresses for
#: ``snatToAddress[IPv6]``, strings for ``outputInterfaces``; a key the text lacks is absent.
ValueLines = dict[str, dict[object, list[int]]]


def _value_lines(text: str) -> ValueLines:
    """The lines of a config text (:data:`ValueLines`). Empty when the text cannot be mapped
    (never raises)."""
    try:
        if text.lstrip().startswith("{"):
            return _json_lines(text)
        return _yaml_lines(text) or {}
    except Exception:  # noqa: BLE001 - a line number is a nicety; an unmappable text just has none
        return {}


def _cidr_lines(text: str) -> dict[Network, list[int]]:
    """Each CIDR the ``nonMasqueradeCIDRs`` list of a config text holds -> the 1-based lines
    listing it, in order. Empty when the text cannot be mapped (never raises)."""
    return _value_lines(text).get(_CIDR_KEY, {})


def _yaml_lines(text: str) -> ValueLines | None:
    """From the YAML node tree (marks hold each item's position); ``None`` when the text does not
    compose or is no mapping."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError:
        return None
    if not isinstance(root, yaml.MappingNode):
        return None
    lines: ValueLines = {}
    for key in _LINE_KEYS:
        node = _value_node(root, key)
        items = node.value if isinstance(node, yaml.SequenceNode) else [node] if key in SNAT_KEYS.values() else []
        for item in items:
            if isinstance(item, yaml.ScalarNode):
                _record(lines, key, item.value, item.start_mark.line + 1)
    return lines


def _value_node(root, key: str):
    """The value node of ``key`` the config parser uses: of the keys matching ignoring case (as
    Go's decoder matches them), the last one, as the parser keeps the last (``None``: none)."""
    if not isinstance(root, yaml.MappingNode):
        return None
    chosen = [value for name, value in root.value if isinstance(name, yaml.ScalarNode) and _is_key(name.value, key)]
    return chosen[-1] if chosen else None


def _cidr_items(root, key: str = _CIDR_KEY) -> list | None:
    """The item nodes of the list under ``key`` (:func:`_value_node`); ``None``: no list there."""
    node = _value_node(root, key)
    return node.value if isinstance(node, yaml.SequenceNode) else None


def _is_key(name: object, key: str) -> bool:
    return isinstance(name, str) and name.lower() == key.lower()


def _is_cidr_key(key: object) -> bool:
    return _is_key(key, _CIDR_KEY)


def _json_lines(text: str) -> ValueLines:
    """JSON is parsed exactly as the config parser parses it. YAML's node marks give positions for
    most JSON texts; for one YAML cannot read (a raw control character in a string) or reads
    otherwise, the items are matched in order against the string tokens after the (last) key."""
    document = json.loads(text)
    if not isinstance(document, dict):
        return {}
    root = None
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        pass
    strings = None
    lines: ValueLines = {}
    for key in _LINE_KEYS:
        values = [value for name, value in document.items() if _is_key(name, key)]
        if not values:
            continue
        scalar = key in SNAT_KEYS.values()
        if not (isinstance(values[-1], str) if scalar else isinstance(values[-1], list)):
            continue
        items = [values[-1]] if scalar else values[-1]
        node = _value_node(root, key)
        composed = [node] if scalar and node is not None else _cidr_items(root, key) if not scalar else None
        if composed is not None and [getattr(item, "value", None) for item in composed] == items:
            for item in composed:
                _record(lines, key, item.value, item.start_mark.line + 1)
            continue
        if strings is None:
            strings = [(match, _json_string(match.group())) for match in _JSON_STRING.finditer(text)]
        _token_lines(text, strings, key, items, lines)
    return lines


def _token_lines(text: str, strings: list, key: str, items: list, lines: ValueLines) -> None:
    """``items`` matched in order against the string tokens after the (last) ``key``."""
    keys = [match.end() for match, value in strings
            if _is_key(value, key) and text[match.end():].lstrip().startswith(":")]
    start = keys[-1] if keys else 0
    pending = iter(items)
    wanted = next(pending, None)
    line, counted = 1, 0  # the line number at offset ``counted``
    for match, value in strings:
        if match.start() >= start and wanted is not None and value == wanted:
            line += text.count("\n", counted, match.start())
            counted = match.start()
            _record(lines, key, value, line)
            wanted = next(pending, None)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_string(token: str) -> str | None:
    try:
        return json.loads(token)
    except ValueError:
        return None


def _record(lines: ValueLines, key: str, value: object, line: int) -> None:
    """``value`` of ``key`` written on ``line``, as the parser reads it (an unusable one: skipped)."""
    item: object = value
    try:
        if key in _CIDR_KEYS:
            item = parse_cidr(value)
        elif key in SNAT_KEYS.values():
            item = ipaddress.ip_address(value)
        elif not isinstance(value, str):
            return
    except (CIDRError, ValueError, TypeError):
        return
    lines.setdefault(key, {}).setdefault(item, []).append(line)
