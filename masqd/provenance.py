"""Where each non-masquerade CIDR of a rule set came from. Pure: no I/O.

A CIDR reaches the rules from one or more *origins*: a config source (a file or an API
ConfigMap, with the line that lists it when the text is at hand), the default list (RFC 1918),
the reserved ranges ``--nomasq-all-reserved-ranges`` adds to it, the link-local default
(``masqLinkLocal: false``), a plugin, or an ``EgressNATPolicy``. ``masqd explain`` shows them;
metrics label CIDRs by their :attr:`Origin.kind`.

Line numbers are found only when asked for (``texts``): composing a big config costs about as
much as parsing it, which the reconciler's hot path must not pay.
"""

from __future__ import annotations

import json
import re
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import yaml

from masqd.cidrs import LINK_LOCAL_V4, LINK_LOCAL_V6, CIDRError, Network, parse_cidr
from masqd.config import DEFAULTS_ORIGIN, RESERVED_CIDRS, AgentOptions, MergedConfig
from masqd.ruleset import RuleSet

#: Every kind of origin, in the order :func:`cidr_origins` lists them for one CIDR.
ORIGIN_KINDS: tuple[str, ...] = ("config", "defaults", "reserved-ranges", "link-local", "plugin", "policy")
#: The kinds a plugin may declare its contributed CIDRs to be (``masqd_origin_kind``, see
#: :func:`masqd.hookspecs.nonmasq_cidrs`).
CONTRIBUTION_KINDS: tuple[str, ...] = ("plugin", "policy")

RESERVED_RANGES_FLAG = "--nomasq-all-reserved-ranges"
_CIDR_KEY = "nonMasqueradeCIDRs"


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


def cidr_origins(
    ruleset: RuleSet,
    merged: MergedConfig,
    contributions: Iterable,
    options: AgentOptions,
    texts: Mapping[str, str] | None = None,
    *,
    descriptions: Mapping[str, Mapping[Network, tuple[Origin, ...]]] | None = None,
) -> dict[Network, tuple[Origin, ...]]:
    """Every network of every family of ``ruleset`` -> its origins (at least one each, none twice).

    ruleset: the desired rules computed from ``merged`` and ``contributions``.
    merged: the merged config (its ``origins`` name the config sources listing each CIDR).
    contributions: the plugins' validated CIDRs (:class:`masqd.plugins.Contribution`).
    options: the agent flags (``--nomasq-all-reserved-ranges`` decides what the defaults hold).
    texts: config source name -> its text, to find the line listing each CIDR; without it (or for
        a text whose lines cannot be mapped) lines are ``None``.
    descriptions: plugin name -> CIDR -> what the plugin said about it
        (:meth:`masqd.plugins.Plugins.describe_cidrs`); those replace the plain "plugin NAME"
        origin of the CIDRs they cover.
    """
    found: dict[Network, list[Origin]] = {}

    def add(net: Network, origin: Origin) -> None:
        listed = found.setdefault(net, [])
        if origin not in listed:
            listed.append(origin)

    config = merged.config
    for net in _link_local_exempt(ruleset, config):
        add(net, Origin("link-local", "masqLinkLocal" if net.version == 4 else "masqLinkLocalIPv6"))
    lines = {name: _cidr_lines(text) for name, text in (texts or {}).items()}
    reserved = {parse_cidr(c) for c in RESERVED_CIDRS} if options.nomasq_all_reserved_ranges else set()
    for net, names in merged.origins.items():
        for name in names:
            if name == DEFAULTS_ORIGIN and name not in merged.sources:
                add(net, Origin("reserved-ranges", RESERVED_RANGES_FLAG) if net in reserved else Origin("defaults", "RFC 1918"))
            else:
                add(net, Origin("config", name, _first(lines.get(name, {}).get(net))))
    for contribution in contributions:
        described = (descriptions or {}).get(contribution.plugin, {})
        for net in contribution.cidrs:
            for origin in described.get(net) or (Origin("plugin", contribution.plugin),):
                add(net, origin)
    in_rule_order = dict.fromkeys(net for family in ruleset.families for net in family.nonmasq)
    return {net: tuple(found.get(net, ())) for net in in_rule_order}


def origin_counts(ruleset: RuleSet, merged: MergedConfig, contributions: Iterable,
                  options: AgentOptions) -> dict[tuple[str, str], int]:
    """CIDRs per (family label, origin kind), for the metrics: as :func:`cidr_origins` classifies
    them, a contribution's CIDRs by the kind its plugin declared (``plugin``, or ``policy``; the
    two agree when a ``policy`` plugin describes each CIDR with the policies listing it, as the
    hook asks), without building an origin per CIDR: ``ipaddress`` networks hash slowly, and a
    scrape runs on the event loop. Here only the few default CIDRs and, when two plugins of a kind
    contribute, their CIDRs are hashed (to count a CIDR both list once)."""
    counts: Tally[tuple[str, str]] = Tally()
    config = merged.config
    for family in ruleset.families:
        masq_link_local = config.masq_link_local if family.family == 4 else config.masq_link_local_ipv6
        link_local = LINK_LOCAL_V4 if family.family == 4 else LINK_LOCAL_V6
        if not masq_link_local and family.nonmasq[:1] == (link_local,):
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
    by_kind: dict[str, list] = {}
    for contribution in contributions:
        by_kind.setdefault(contribution.kind, []).append(contribution)
    for kind, group in by_kind.items():
        nets = group[0].cidrs if len(group) == 1 else tuple(dict.fromkeys(n for c in group for n in c.cidrs))
        for net in nets:
            counts[f"ipv{net.version}", kind] += 1
    return dict(counts)


def _link_local_exempt(ruleset: RuleSet, config) -> list[Network]:
    exempt = []
    if not config.masq_link_local and LINK_LOCAL_V4 in ruleset.ipv4.nonmasq:
        exempt.append(LINK_LOCAL_V4)
    if ruleset.ipv6 is not None and not config.masq_link_local_ipv6 and LINK_LOCAL_V6 in ruleset.ipv6.nonmasq:
        exempt.append(LINK_LOCAL_V6)
    return exempt


def _first(numbers: list[int] | None) -> int | None:
    return numbers[0] if numbers else None


# --- line numbers -----------------------------------------------------------------------------------


def _cidr_lines(text: str) -> dict[Network, list[int]]:
    """Each CIDR the ``nonMasqueradeCIDRs`` list of a config text holds -> the 1-based lines
    listing it, in order. Empty when the text cannot be mapped (never raises)."""
    try:
        if text.lstrip().startswith("{"):
            return _json_lines(text)
        return _yaml_lines(text) or {}
    except Exception:  # noqa: BLE001 - a line number is a nicety; an unmappable text just has none
        return {}


def _yaml_lines(text: str) -> dict[Network, list[int]] | None:
    """From the YAML node tree (marks hold each item's position); ``None`` when the text does not
    compose or holds no list under the key."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError:
        return None
    items = _cidr_items(root)
    if items is None:
        return None
    lines: dict[Network, list[int]] = {}
    for node in items:
        if isinstance(node, yaml.ScalarNode):
            _record(lines, node.value, node.start_mark.line + 1)
    return lines


def _cidr_items(root) -> list | None:
    """The item nodes of the list under the key the config parser uses: of the keys matching
    ignoring case (as Go's decoder matches them), the last one, as the parser keeps the last."""
    if not isinstance(root, yaml.MappingNode):
        return None
    chosen = [value for key, value in root.value if isinstance(key, yaml.ScalarNode) and _is_cidr_key(key.value)]
    if not chosen or not isinstance(chosen[-1], yaml.SequenceNode):
        return None
    return chosen[-1].value


def _is_cidr_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() == _CIDR_KEY.lower()


def _json_lines(text: str) -> dict[Network, list[int]]:
    """JSON is parsed exactly as the config parser parses it. YAML's node marks give positions for
    most JSON texts; for one YAML cannot read (a raw control character in a string) or reads
    otherwise, the items are matched in order against the string tokens after the (last) key."""
    document = json.loads(text)
    if not isinstance(document, dict):
        return {}
    values = [value for key, value in document.items() if _is_cidr_key(key)]
    if not values or not isinstance(values[-1], list):
        return {}
    items = values[-1]
    composed = None
    try:
        composed = _cidr_items(yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    except yaml.YAMLError:
        pass
    lines: dict[Network, list[int]] = {}
    if composed is not None and [getattr(node, "value", None) for node in composed] == items:
        for node in composed:
            _record(lines, node.value, node.start_mark.line + 1)
        return lines
    strings = [(match, _json_string(match.group())) for match in _JSON_STRING.finditer(text)]
    keys = [match.end() for match, value in strings
            if _is_cidr_key(value) and text[match.end():].lstrip().startswith(":")]
    start = keys[-1] if keys else 0
    pending = iter(items)
    wanted = next(pending, None)
    line, counted = 1, 0  # the line number at offset ``counted``
    for match, value in strings:
        if match.start() >= start and wanted is not None and value == wanted:
            line += text.count("\n", counted, match.start())
            counted = match.start()
            _record(lines, value, line)
            wanted = next(pending, None)
    return lines


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_string(token: str) -> str | None:
    try:
        return json.loads(token)
    except ValueError:
        return None


def _record(lines: dict[Network, list[int]], value: object, line: int) -> None:
    try:
        net = parse_cidr(value)
    except CIDRError:
        return
    lines.setdefault(net, []).append(line)
