"""Parsing the config file (YAML or JSON) into a :class:`~masqd.config.model.MasqConfig`, with
every problem named. Pure: no I/O.

:func:`parse_config` turns a file's text into a :class:`~masqd.config.model.ParsedConfig` or raises
:class:`~masqd.errors.ConfigError` listing *every* problem (key, offending value, what would be
valid), at most :data:`MAX_REPORTED_FINDINGS` of them. Keys are matched like Go's ``encoding/json``
matches them (exactly, else case-insensitively) so a file behaves as it does upstream, but anything
that is not the canonical spelling, and any unknown key, is reported as a warning. YAML is read by a
safe loader that keeps dates as strings and refuses anchors and aliases (a big block list of CIDRs
is read by :mod:`masqd.config.fastparse` instead, to the same document); a document starting with
``{`` is JSON only. :func:`too_large_problem` and :func:`limit_problem` are the problems other
config readers (files, the reconciler counting plugin CIDRs) report in the same words.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import re
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import yaml
import yaml.composer
import yaml.events

from masqd.cidrs import CIDRError, Network, duplicates, network_key, parse_cidrs
from masqd.config.fastparse import fast_document
from masqd.config.syntax import (duplicate_warnings, error_location, excerpt, has_repeat, json_duplicates,
                                  yaml_duplicates, yaml_error_reason)
from masqd.config.model import (
    CIDR_LIST_KEYS,
    INTERFACE_NAME,
    MAX_CONFIG_BYTES,
    MIN_RESYNC_INTERVAL_NS,
    AgentOptions,
    MasqConfig,
    ParsedConfig,
    default_config,
)
from masqd.duration import format_go_duration, parse_go_duration
from masqd.errors import ConfigError, Problem, shorten, truncate

#: At most this many problems (and, separately, warnings) are reported for one config; the rest
#: are counted in a last entry, so a list of a million bad CIDRs gives a readable error.
MAX_REPORTED_FINDINGS = 100
#: Longest key, reason or duration text shown in a problem; longer ones are cut with "...".
_MAX_SHOWN_CHARS = 200

_KEYS = ("nonMasqueradeCIDRs", "masqLinkLocal", "masqLinkLocalIPv6", "resyncInterval", "cidrLimit",
         # the decision model beyond upstream (docs/configuration.md, "Decision model")
         "masqueradeCIDRs", "masqueradeSourceCIDRs", "nonMasqueradeSourceCIDRs", "snatToAddress",
         "snatToAddressIPv6", "outputInterfaces")


def parse_config(text: str | None, options: AgentOptions, source: str = "<config>", *,
                 known: Mapping[str, Network] | None = None) -> ParsedConfig:
    """Parse and validate config file text (YAML or JSON). ``None`` (no file) means defaults.

    Raises :class:`ConfigError` with every problem found; returns the config and its warnings.
    ``known``: CIDR texts -> their networks, from the parse of an earlier version of the text
    (:meth:`ParsedConfig.known_networks`); a CIDR listed as one of those texts is that network
    (after a one-line edit of a 100k list, one network is built instead of 100k, and the rules
    of the two versions share their networks).
    """
    defaults = default_config(options)
    if text is None:
        return ParsedConfig(defaults)
    if len(text) > MAX_CONFIG_BYTES:
        raise _config_error(source, [too_large_problem("<document>", f"{len(text)} characters")])
    document, repeated = _load_document(text, source)
    if document is None:  # an empty file, like upstream, means defaults
        return ParsedConfig(defaults)
    if not isinstance(document, dict):
        raise ConfigError(
            source,
            [Problem("<top level>", shorten(document), "expected a mapping of keys such as 'nonMasqueradeCIDRs:'")],
        )

    problems: list[Problem] = []
    warnings: list[Problem] = duplicate_warnings(repeated)  # upstream keeps the last one too
    values: dict[str, Any] = {}
    for raw_key, value in document.items():
        key = _canonical_key(raw_key, warnings)
        if key is not None:
            values[key] = (_key_text(raw_key), value)

    ctx = _Context(options, {}, problems, warnings, known)
    keys = set()
    for key, (raw_key, value) in values.items():
        if value is None and key not in CIDR_LIST_KEYS and key != "outputInterfaces":
            warnings.append(Problem(raw_key, None, "null value ignored: the default is kept"))
            continue
        keys.add(key)
        _PARSERS[key](raw_key, value, ctx)

    config = dataclasses.replace(defaults, **ctx.fields, keys=frozenset(keys))
    # Count what the file lists, valid or not, so a limit problem is reported next to the others.
    for key, attribute in CIDR_LIST_KEYS.items():
        raw_key, value = values.get(key, (key, None))
        count = len(value) if isinstance(value, list) else len(getattr(config, attribute))
        distinct = ctx.distinct if key == "nonMasqueradeCIDRs" else False
        _validate_list(config, getattr(config, attribute), count, str(raw_key), problems, warnings, distinct)
    _validate_decisions(config, {key: str(raw) for key, (raw, _) in values.items()}, options, problems, warnings)
    if problems:
        raise _config_error(source, problems, warnings)
    return ParsedConfig(config, _bounded(warnings, "warnings"), ctx.cidr_texts)


def _config_error(source: str, problems: list[Problem], warnings: list[Problem] | tuple[Problem, ...] = ()) -> ConfigError:
    return ConfigError(source, _bounded(problems, "problems"), _bounded(list(warnings), "warnings"))


def too_large_problem(key: str, size: str) -> Problem:
    """A config source bigger than :data:`MAX_CONFIG_BYTES` (``size``: e.g. "52428800 bytes")."""
    return Problem(key, size, f"too large: a config may hold at most {MAX_CONFIG_BYTES} bytes "
                              f"({MAX_CONFIG_BYTES // (1024 * 1024)} MiB); a file listing 100k CIDRs is about 2 MB")


def _bounded(findings: list[Problem], what: str) -> tuple[Problem, ...]:
    """``findings`` made safe to log: at most :data:`MAX_REPORTED_FINDINGS` of them, each key and
    reason one printable line of bounded length (YAML's messages can quote the input)."""
    shown = tuple(
        Problem(truncate(p.key, _MAX_SHOWN_CHARS), p.value, _one_line(p.reason)) for p in findings[:MAX_REPORTED_FINDINGS]
    )
    hidden = len(findings) - len(shown)
    if hidden > 0:
        shown += (Problem("<document>", None, f"{hidden} more {what} not shown; fix the ones above first"),)
    return shown


def _one_line(text: str) -> str:
    text = " ".join(text.split()) if not text.isprintable() else text
    if not text.isprintable():  # what split() left: NUL, lone surrogates, other control characters
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return truncate(text, _MAX_SHOWN_CHARS)


def _key_text(raw_key: Any) -> str:
    """A key of the file as text for problems (a YAML key may be a number too big to print)."""
    if isinstance(raw_key, str):
        return raw_key
    try:
        return str(raw_key)
    except Exception:  # e.g. an int of more than 4300 digits (a 5000-digit hex key)
        return f"<a {type(raw_key).__name__} key>"


class _ConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when present: far faster on big lists
    """YAML's safe loader without timestamp resolution: as upstream, ``2024-01-01`` stays a string
    (and then fails as a duration with a clear message instead of becoming a date). It notes the
    top-level keys given more than once (``duplicates``), which YAML loaders silently drop."""

    duplicates: list = []

    def construct_document(self, node: Any) -> Any:
        self.duplicates = yaml_duplicates(node)
        return super().construct_document(node)


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _AnchorFound(yaml.YAMLError):
    """The document defines an anchor (``&name``) or uses an alias (``*name``, ``<<: *name``)."""

    def __init__(self, mark: Any):
        super().__init__("anchor or alias")
        self.problem_mark = mark


# libyaml composes nodes in C, out of reach of Python hooks; with it, PyYAML's own Composer runs on
# libyaml's events instead (listed first so its methods win). The pure-Python loader has it already.
_COMPOSER_BASES = (_ConfigLoader,) if issubclass(_ConfigLoader, yaml.composer.Composer) else (yaml.composer.Composer, _ConfigLoader)


class _AnchorRefusingLoader(*_COMPOSER_BASES):  # type: ignore[misc]
    """:class:`_ConfigLoader` refusing anchors and aliases while composing, before anything is
    constructed: the upstream config never needs them, and aliases nested a few levels deep make
    a 1 kB "billion laughs" document expand to billions of values."""

    def __init__(self, stream: str):
        _ConfigLoader.__init__(self, stream)
        yaml.composer.Composer.__init__(self)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.events.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AnchorFound(event.start_mark)
        return super().compose_node(parent, index)


_ANCHOR_MESSAGE = "YAML anchors and aliases are not accepted in the config; write each value out in full"


def _load_document(text: str, source: str) -> tuple[Any, list]:
    """The document and its repeated top-level keys (see :mod:`masqd.config.syntax`)."""
    # Like upstream's YAML-to-JSON step: a document starting with "{" is JSON and only JSON
    # (exact about \u escapes, strict about syntax); anything else is YAML, which covers JSON too.
    if text.lstrip().startswith("{"):
        repeats: list[bool] = []
        try:
            document = json.loads(text, object_pairs_hook=lambda pairs: repeats.append(has_repeat(pairs)) or dict(pairs))
            return document, json_duplicates(text) if any(repeats) else []
        except json.JSONDecodeError as exc:
            line = text.splitlines()[exc.lineno - 1] if exc.lineno <= len(text.splitlines()) else ""
            where = f"<line {exc.lineno}, column {exc.colno}>"
            raise _config_error(source, [Problem(where, excerpt(line, exc.colno - 1), f"not valid JSON: {exc.msg}")]) from None
        except RecursionError:
            raise _config_error(source, [Problem("<document>", None, "not valid JSON: nested too deeply")]) from None
        except ValueError as exc:  # a number of more than 4300 digits
            raise _config_error(source, [Problem("<document>", None, f"not valid JSON: {exc}")]) from None
    document = fast_document(text, _load_unique)  # the common shape of a big file, or None
    if document is not None:
        return document, []
    try:
        return _load_yaml_keys(text)
    except _AnchorFound as exc:
        where, line = error_location(text, exc.problem_mark)
        raise _config_error(source, [Problem(where, line, _ANCHOR_MESSAGE)]) from None
    except yaml.YAMLError as exc:
        mark, problem = (yaml_error_reason(exc, text)
                         or (getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or str(exc)))
        where, line = error_location(text, mark)
        raise _config_error(source, [Problem(where, line, f"not valid YAML or JSON: {problem}")]) from None
    except RecursionError:  # absurd nesting (libyaml stops at depth 1000 before this)
        raise _config_error(source, [Problem("<document>", None, "not valid YAML or JSON: nested too deeply")]) from None
    except ValueError as exc:  # a value YAML cannot construct (an int of more than 4300 digits)
        raise _config_error(source, [Problem("<document>", None, f"not valid YAML or JSON: {exc}")]) from None
    except Exception as exc:  # PyYAML's constructors on odd input: "!!int ''" (IndexError), "!!bool ''" (KeyError)
        reason = f"a tagged value cannot be read ({type(exc).__name__}: {exc})"
        raise _config_error(source, [Problem("<document>", None, f"not valid YAML or JSON: {reason}")]) from None


def _load_yaml(text: str) -> Any:
    return _load_yaml_keys(text)[0]


def _load_unique(text: str) -> Any:
    """:func:`_load_yaml` for the fast path, which declines (this raises) when a key repeats."""
    document, repeated = _load_yaml_keys(text)
    if repeated:
        raise ValueError("a repeated key")
    return document


def _load_yaml_keys(text: str) -> tuple[Any, list]:
    # Anchors and aliases need '&' or '*': without either, libyaml's own (faster) composer is safe.
    loader = (_AnchorRefusingLoader if "&" in text or "*" in text else _ConfigLoader)(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def _canonical_key(raw_key: Any, warnings: list[Problem]) -> str | None:
    if isinstance(raw_key, str) and raw_key in _KEYS:
        return raw_key
    text = _key_text(raw_key)
    for key in _KEYS:
        if text.lower() == key.lower():
            warnings.append(
                Problem(text, None, f"key matched '{key}' ignoring case (as the upstream agent does); spell it '{key}'")
            )
            return key
    close = difflib.get_close_matches(text, _KEYS, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(_KEYS)}"
    warnings.append(Problem(text, None, f"unknown key ignored{hint}"))
    return None


@dataclass(slots=True)
class _Context:
    """What the per-key parsers read (options) and fill in (fields, problems, warnings)."""

    options: AgentOptions
    fields: dict[str, Any]
    problems: list[Problem]
    warnings: list[Problem]
    known: Mapping[str, Network] | None = None  # see parse_config
    distinct: bool = False  # the CIDRs are known to hold no duplicates
    cidr_texts: tuple[str, ...] = ()  # see ParsedConfig


def _parse_cidrs(key: str, value: Any, ctx: _Context) -> None:
    if isinstance(value, list):
        parsed, canonical = parse_cidrs(value, ctx.known)
        if canonical:  # each an IPv4 network written as str() writes it: distinct texts are distinct networks
            ctx.distinct = len(set(value)) == len(value)
            ctx.fields["non_masquerade_cidrs"] = tuple(parsed)
            ctx.cidr_texts = tuple(value)
            return
        _collect_cidrs(key, value, parsed, "non_masquerade_cidrs", ctx)
    else:
        _parse_cidr_list("non_masquerade_cidrs")(key, value, ctx)


def _parse_cidr_list(attribute: str):
    def parse(key: str, value: Any, ctx: _Context) -> None:
        if value is None:  # like Go: null sets the list to empty
            ctx.fields[attribute] = ()
        elif not isinstance(value, list):
            ctx.problems.append(Problem(key, shorten(value), "expected a list of CIDR strings, e.g. ['10.0.0.0/8']"))
        else:
            _collect_cidrs(key, value, parse_cidrs(value)[0], attribute, ctx)

    return parse


def _collect_cidrs(key: str, value: list, parsed: list, attribute: str, ctx: _Context) -> None:
    """The networks of a list (``parsed``: :func:`parse_cidrs` of it), each bad item a problem."""
    cidrs: list[Network] = []
    for index, (item, net) in enumerate(zip(value, parsed)):
        if isinstance(net, CIDRError):
            ctx.problems.append(Problem(f"{key}[{index}]", shorten(item), net.reason))
            continue
        if net.version == 6 and not ctx.options.enable_ipv6:
            ctx.problems.append(
                Problem(f"{key}[{index}]", item, "IPv6 CIDR given but IPv6 is not enabled; start masqd with --enable-ipv6")
            )
        cidrs.append(net)
    ctx.fields[attribute] = tuple(cidrs)


def _parse_bool(attribute: str):
    def parse(key: str, value: Any, ctx: _Context) -> None:
        if isinstance(value, bool):
            ctx.fields[attribute] = value
        else:
            ctx.problems.append(Problem(key, shorten(value), "expected true or false"))

    return parse


def _parse_resync(key: str, value: Any, ctx: _Context) -> None:
    if not isinstance(value, str):
        ctx.problems.append(Problem(key, shorten(value), "expected a Go duration string such as '60s', '5m' or '1m30s'"))
        return
    try:
        ns = parse_go_duration(value)
    except ValueError as exc:
        ctx.problems.append(Problem(key, shorten(value), str(exc)))
        return
    if ns <= 0:
        ctx.problems.append(Problem(key, value, "must be a positive duration, e.g. '60s'"))
        return
    if ns < MIN_RESYNC_INTERVAL_NS:
        floor = format_go_duration(MIN_RESYNC_INTERVAL_NS)
        ctx.warnings.append(Problem(key, value, f"shorter than the minimum {floor}; using {floor}"))
        ns = MIN_RESYNC_INTERVAL_NS
    ctx.fields["resync_interval_ns"] = ns


def _parse_limit(key: str, value: Any, ctx: _Context) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.problems.append(Problem(key, shorten(value), "expected a whole number such as 64"))
    elif not 0 <= value < 2**63:
        ctx.problems.append(Problem(key, shorten(value), "must be from 0 to 9223372036854775807 (2^63-1, the largest 64-bit signed integer)"))
    else:
        ctx.fields["cidr_limit"] = value
        ctx.fields["cidr_limit_set"] = True


#: ``outputInterfaces`` names: :data:`~masqd.config.model.INTERFACE_NAME`, or up to 14 of its
#: characters and a ``+`` (any name starting with them, as iptables' ``-o eth+``). ``+`` alone
#: (every interface) is refused: nft refuses its ``oifname "*"`` and iptables-save drops ``-o +``.
_INTERFACE = re.compile(rf"{INTERFACE_NAME.pattern}|[A-Za-z0-9_.@][A-Za-z0-9_.@-]{{0,13}}\+")


def _parse_interfaces(key: str, value: Any, ctx: _Context) -> None:
    if value is None:  # as for the CIDR lists: null is an empty list (any interface)
        ctx.fields["output_interfaces"] = ()
        return
    if not isinstance(value, list):
        ctx.problems.append(Problem(key, shorten(value), "expected a list of interface names, e.g. ['eth0', 'ens+']"))
        return
    names: list[str] = []
    for index, item in enumerate(value):
        if item == "+":
            ctx.problems.append(Problem(f"{key}[{index}]", item, "'+' alone is every interface: leave "
                                                                 "outputInterfaces out (or empty) to masquerade on any"))
        elif not isinstance(item, str) or not _INTERFACE.fullmatch(item) or item in (".", ".."):
            ctx.problems.append(Problem(f"{key}[{index}]", shorten(item),
                                        "expected an interface name of 1-15 letters, digits, '_', '.', '-' or '@' "
                                        "(not starting with '-'; not '.' or '..'), or a prefix ending in '+' such as "
                                        "'eth+'"))
        elif item in names:
            ctx.warnings.append(Problem(f"{key}[{index}]", item, "listed more than once; one entry is enough"))
        else:
            names.append(item)
    ctx.fields["output_interfaces"] = tuple(names)


def _parse_address(attribute: str, version: int):
    other = "snatToAddressIPv6" if version == 4 else "snatToAddress"

    def parse(key: str, value: Any, ctx: _Context) -> None:
        example = "192.0.2.10" if version == 4 else "2001:db8::10"
        try:
            if not isinstance(value, str) or "/" in value or "%" in value:
                raise ValueError
            address = ipaddress.ip_address(value)
        except ValueError:
            ctx.problems.append(Problem(key, shorten(value), f"expected an IPv{version} address such as {example} "
                                                             "(no prefix length, no zone)"))
            return
        if address.version != version:
            ctx.problems.append(Problem(key, value, f"is an IPv{address.version} address; this key takes IPv{version} "
                                                    f"(use {other} for IPv{address.version})"))
            return
        if version == 6 and not ctx.options.enable_ipv6:
            ctx.problems.append(Problem(key, value, "IPv6 address given but IPv6 is not enabled; start masqd with --enable-ipv6"))
            return
        unusable = next((what for what, bad in (
            ("unspecified", address.is_unspecified), ("a loopback address", address.is_loopback),
            ("a multicast address", address.is_multicast), ("link-local", version == 6 and address.is_link_local),
            ("the broadcast address", version == 4 and address == ipaddress.IPv4Address("255.255.255.255")),
        ) if bad), None)
        if unusable:
            ctx.problems.append(Problem(key, value, f"is {unusable}: traffic cannot leave the node from it; "
                                                    f"give an address of this node's egress interface, e.g. {example}"))
            return
        ctx.fields[attribute] = address

    return parse


_PARSERS = {
    "nonMasqueradeCIDRs": _parse_cidrs,
    "masqueradeCIDRs": _parse_cidr_list("masquerade_cidrs"),
    "masqueradeSourceCIDRs": _parse_cidr_list("masquerade_source_cidrs"),
    "nonMasqueradeSourceCIDRs": _parse_cidr_list("non_masquerade_source_cidrs"),
    "snatToAddress": _parse_address("snat_to_address", 4),
    "snatToAddressIPv6": _parse_address("snat_to_address_ipv6", 6),
    "outputInterfaces": _parse_interfaces,
    "masqLinkLocal": _parse_bool("masq_link_local"),
    "masqLinkLocalIPv6": _parse_bool("masq_link_local_ipv6"),
    "resyncInterval": _parse_resync,
    "cidrLimit": _parse_limit,
}


def limit_problem(key: str, limit: int, counted: str, remedy: str) -> Problem:
    """More non-masquerade CIDRs than ``cidrLimit`` allows (``counted``: e.g. "65 CIDRs")."""
    return Problem(key, counted, f"at most cidrLimit={limit} CIDRs are accepted (link-local not counted); {remedy}")


def _validate_list(config: MasqConfig, cidrs: tuple[Network, ...], count: int, key: str, problems: list[Problem],
                   warnings: list[Problem], distinct: bool) -> None:
    """``cidrLimit`` holds for each CIDR list on its own; a CIDR listed twice is a warning."""
    if count > config.cidr_limit:
        problems.append(limit_problem(key, config.cidr_limit, f"{count} CIDRs", "remove CIDRs or raise cidrLimit"))
    for net in () if distinct else duplicates(cidrs):
        warnings.append(Problem(key, str(net), "listed more than once; one entry is enough"))


def _validate_decisions(config: MasqConfig, spelled: dict[str, str], options: AgentOptions, problems: list[Problem],
                        warnings: list[Problem]) -> None:
    """What the decision-model keys say together (``spelled``: canonical key -> as the file spells it)."""
    if config.masquerade_cidrs and "nonMasqueradeCIDRs" in config.keys:
        # the file's own list; the defaults, link-local and other sources are checked once merged
        # (masqd.plan), as another source may replace the defaults or set masqLinkLocal
        keep_key = spelled["nonMasqueradeCIDRs"]
        # one pass over a list that may hold 100k CIDRs, keyed by the few masquerade entries
        masq = {network_key(net): None for net in config.masquerade_cidrs}
        keep: dict[int, int] = {}
        for index, key in enumerate(map(network_key, config.non_masquerade_cidrs)):
            if key in masq:
                keep.setdefault(key, index)
        for index, net in enumerate(config.masquerade_cidrs):
            if network_key(net) in keep:
                problems.append(Problem(f"{spelled.get('masqueradeCIDRs', 'masqueradeCIDRs')}[{index}]", str(net),
                                        f"also listed in {keep_key}[{keep[network_key(net)]}]: a destination is either "
                                        "kept or masqueraded; remove it from one of the two lists"))
    both = set(config.masquerade_source_cidrs) & set(config.non_masquerade_source_cidrs)
    for net in sorted(both, key=network_key):
        warnings.append(Problem("nonMasqueradeSourceCIDRs", str(net), "also listed in masqueradeSourceCIDRs: traffic "
                                                                      "from it is never masqueraded"))
    if options.enable_ipv6 and config.masquerade_source_cidrs:
        for version in (4, 6):
            if not any(net.version == version for net in config.masquerade_source_cidrs):
                warnings.append(Problem(spelled.get("masqueradeSourceCIDRs", "masqueradeSourceCIDRs"), None,
                                        f"lists no IPv{version} source, so no IPv{version} traffic is masqueraded; "
                                        f"list the IPv{version} pod ranges too"))
