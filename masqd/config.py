"""The config file and the command-line options, as frozen, validated values. Pure: no I/O.

The config file is the upstream ``ip-masq-agent`` file (a ConfigMap key mounted at
``/etc/config/ip-masq-agent``), YAML or JSON, every key optional. :func:`parse_config` turns its
text into a :class:`MasqConfig` or raises :class:`~masqd.errors.ConfigError` listing *every*
problem (key, offending value, what would be valid). Keys are matched like Go's ``encoding/json``
matches them (exactly, else case-insensitively) so a file behaves as it does upstream, but anything
that is not the canonical spelling, and any unknown key, is reported as a warning.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
import yaml.composer
import yaml.events

from masqd.cidrs import CIDRError, Network, duplicates, parse_cidr
from masqd.duration import format_go_duration, parse_go_duration
from masqd.errors import ConfigError, FlagError, Problem, shorten

DEFAULT_CONFIG_PATH = "/etc/config/ip-masq-agent"
DEFAULT_MASQ_CHAIN = "IP-MASQ-AGENT"

#: RFC 1918 private ranges: the upstream default non-masquerade list.
RFC1918_CIDRS: tuple[str, ...] = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
#: Added to the defaults by ``--nomasq-all-reserved-ranges`` (the upstream list, same order).
RESERVED_CIDRS: tuple[str, ...] = (
    "100.64.0.0/10",  # RFC 6598 carrier-grade NAT
    "192.0.0.0/24",  # RFC 6890 IETF protocol assignments
    "192.0.2.0/24",  # RFC 5737 TEST-NET-1
    "192.88.99.0/24",  # RFC 7526 6to4 relay anycast
    "198.18.0.0/15",  # RFC 6815 benchmarking
    "198.51.100.0/24",  # RFC 5737 TEST-NET-2
    "203.0.113.0/24",  # RFC 5737 TEST-NET-3
    "240.0.0.0/4",  # RFC 5735 former class E
)

_SECOND_NS = 1_000_000_000
#: Largest config accepted, in bytes (a file) or characters (a ConfigMap's text). A file listing
#: 100k CIDRs is about 2 MB, so this leaves room for any real config while a runaway file (a log
#: written to the wrong path, a 50 MB upload) is refused at once, before it is read into memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
#: At most this many problems (and, separately, warnings) are reported for one config; the rest
#: are counted in a last entry, so a list of a million bad CIDRs gives a readable error.
MAX_REPORTED_FINDINGS = 100
#: Longest key, reason or duration text shown in a problem; longer ones are cut with "...".
_MAX_SHOWN_CHARS = 200

#: Shortest resync honoured. Each resync runs iptables-save; at 1 ms that is a busy loop (over
#: 100% CPU measured), so shorter values are raised to this, with a warning.
MIN_RESYNC_INTERVAL_NS = 100_000_000


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive source-port interval for ``--to-ports`` (``first`` .. ``last``, 1..65535)."""

    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """The command-line flags shared with the upstream agent, validated.

    masq_chain: nat chain masqd owns (``--masq-chain``, default ``IP-MASQ-AGENT``).
    nomasq_all_reserved_ranges: default list also holds every RFC-reserved IPv4 range.
    enable_ipv6: program ip6tables too, and accept IPv6 CIDRs in the config.
    random_fully: add ``--random-fully`` to MASQUERADE (when the iptables binary supports it).
    to_ports: source-port intervals MASQUERADE maps to; empty means the kernel's choice.
    """

    masq_chain: str = DEFAULT_MASQ_CHAIN
    nomasq_all_reserved_ranges: bool = False
    enable_ipv6: bool = False
    random_fully: bool = True
    to_ports: tuple[PortRange, ...] = ()

    def __post_init__(self) -> None:
        validate_chain_name(self.masq_chain)


@dataclass(frozen=True, slots=True)
class MasqConfig:
    """The validated contents of the config file.

    non_masquerade_cidrs: destinations that keep the pod source address, in file order
        (default: RFC 1918, plus the reserved ranges with ``--nomasq-all-reserved-ranges``).
    masq_link_local: masquerade 169.254.0.0/16 too (default false: link-local keeps the pod IP).
    masq_link_local_ipv6: masquerade fe80::/10 too (default false).
    resync_interval_ns: how often the kernel is re-checked for drift, in nanoseconds (default 60 s).
    cidr_limit: maximum number of ``nonMasqueradeCIDRs`` (link-local not counted; default 64),
        a guard against a runaway list.
    cidr_limit_set: the file sets ``cidrLimit``; only then do plugin contributions count toward
        it (the default 64 is for compatibility, not a limit plugin authors signed up for).
    keys: the canonical keys the file sets (a null value counts only for ``nonMasqueradeCIDRs``,
        where it means an empty list); when several config sources merge, a key no source sets
        keeps its default (see :func:`merge_configs`).
    """

    non_masquerade_cidrs: tuple[Network, ...] = tuple(parse_cidr(c) for c in RFC1918_CIDRS)
    masq_link_local: bool = False
    masq_link_local_ipv6: bool = False
    resync_interval_ns: int = 60 * _SECOND_NS
    cidr_limit: int = 64
    cidr_limit_set: bool = False
    keys: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def resync_interval(self) -> float:
        """``resync_interval_ns`` in seconds."""
        return self.resync_interval_ns / _SECOND_NS


@dataclass(frozen=True, slots=True)
class ParsedConfig:
    """A valid config and the warnings found on the way (unknown keys, duplicates, ...)."""

    config: MasqConfig
    warnings: tuple[Problem, ...] = field(default=())


def default_config(options: AgentOptions) -> MasqConfig:
    """The config used when the file is missing (or a key is absent from it)."""
    cidrs = RFC1918_CIDRS + (RESERVED_CIDRS if options.nomasq_all_reserved_ranges else ())
    return MasqConfig(non_masquerade_cidrs=tuple(parse_cidr(c) for c in cidrs))


_KEYS = ("nonMasqueradeCIDRs", "masqLinkLocal", "masqLinkLocalIPv6", "resyncInterval", "cidrLimit")


def parse_config(text: str | None, options: AgentOptions, source: str = "<config>") -> ParsedConfig:
    """Parse and validate config file text (YAML or JSON). ``None`` (no file) means defaults.

    Raises :class:`ConfigError` with every problem found; returns the config and its warnings.
    """
    defaults = default_config(options)
    if text is None:
        return ParsedConfig(defaults)
    if len(text) > MAX_CONFIG_BYTES:
        raise _config_error(source, [too_large_problem("<document>", f"{len(text)} characters")])
    document = _load_document(text, source)
    if document is None:  # an empty file, like upstream, means defaults
        return ParsedConfig(defaults)
    if not isinstance(document, dict):
        raise ConfigError(
            source,
            [Problem("<top level>", shorten(document), "expected a mapping of keys such as 'nonMasqueradeCIDRs:'")],
        )

    problems: list[Problem] = []
    warnings: list[Problem] = []
    values: dict[str, Any] = {}
    for raw_key, value in document.items():
        key = _canonical_key(raw_key, warnings)
        if key is not None:
            values[key] = (_key_text(raw_key), value)

    ctx = _Context(options, {}, problems, warnings)
    keys = set()
    for key, (raw_key, value) in values.items():
        if value is None and key != "nonMasqueradeCIDRs":
            warnings.append(Problem(raw_key, None, "null value ignored: the default is kept"))
            continue
        keys.add(key)
        _PARSERS[key](raw_key, value, ctx)

    config = MasqConfig(**{**_defaults_as_fields(defaults), **ctx.fields, "keys": frozenset(keys)})
    cidr_key, cidr_value = values.get("nonMasqueradeCIDRs", ("nonMasqueradeCIDRs", None))
    # Count what the file lists, valid or not, so a limit problem is reported next to the others.
    count = len(cidr_value) if isinstance(cidr_value, list) else len(config.non_masquerade_cidrs)
    _validate(config, count, str(cidr_key), problems, warnings)
    if problems:
        raise _config_error(source, problems, warnings)
    return ParsedConfig(config, _bounded(warnings, "warnings"))


def _config_error(source: str, problems: list[Problem], warnings: list[Problem] | tuple[Problem, ...] = ()) -> ConfigError:
    return ConfigError(source, _bounded(problems, "problems"), _bounded(list(warnings), "warnings"))


def too_large_problem(key: str, size: str) -> Problem:
    """A config source bigger than :data:`MAX_CONFIG_BYTES` (``size``: e.g. "52428800 bytes")."""
    return Problem(key, size, f"too large: a config may hold at most {MAX_CONFIG_BYTES} bytes "
                              f"({MAX_CONFIG_BYTES // (1024 * 1024)} MiB); a file listing 100k CIDRs is about 2 MB")


def _bounded(findings: list[Problem], what: str) -> tuple[Problem, ...]:
    """``findings`` made safe to log: at most :data:`MAX_REPORTED_FINDINGS` of them, each key and
    reason one printable line of bounded length (YAML's messages can quote the input)."""
    shown = tuple(Problem(_cut(p.key), p.value, _one_line(p.reason)) for p in findings[:MAX_REPORTED_FINDINGS])
    hidden = len(findings) - len(shown)
    if hidden > 0:
        shown += (Problem("<document>", None, f"{hidden} more {what} not shown; fix the ones above first"),)
    return shown


def _one_line(text: str) -> str:
    text = " ".join(text.split()) if not text.isprintable() else text
    if not text.isprintable():  # what split() left: NUL, lone surrogates, other control characters
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return _cut(text)


def _cut(text: str) -> str:
    # (a key is shown quoted by Problem when unprintable, so only its length is bounded here)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."


def _key_text(raw_key: Any) -> str:
    """A key of the file as text for problems (a YAML key may be a number too big to print)."""
    if isinstance(raw_key, str):
        return raw_key
    try:
        return str(raw_key)
    except Exception:  # e.g. an int of more than 4300 digits (a 5000-digit hex key)
        return f"<a {type(raw_key).__name__} key>"


def _defaults_as_fields(config: MasqConfig) -> dict[str, Any]:
    return {
        "non_masquerade_cidrs": config.non_masquerade_cidrs,
        "masq_link_local": config.masq_link_local,
        "masq_link_local_ipv6": config.masq_link_local_ipv6,
        "resync_interval_ns": config.resync_interval_ns,
        "cidr_limit": config.cidr_limit,
        "cidr_limit_set": config.cidr_limit_set,
        "keys": config.keys,
    }


class _ConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: ~20x faster on big lists
    """YAML's safe loader without timestamp resolution: as upstream, ``2024-01-01`` stays a string
    (and then fails as a duration with a clear message instead of becoming a date)."""


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


def _load_document(text: str, source: str) -> Any:
    # Like upstream's YAML-to-JSON step: a document starting with "{" is JSON and only JSON
    # (exact about \u escapes, strict about syntax); anything else is YAML, which covers JSON too.
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            line = text.splitlines()[exc.lineno - 1] if exc.lineno <= len(text.splitlines()) else ""
            where = f"<line {exc.lineno}, column {exc.colno}>"
            raise _config_error(source, [Problem(where, _excerpt(line, exc.colno - 1), f"not valid JSON: {exc.msg}")]) from None
        except RecursionError:
            raise _config_error(source, [Problem("<document>", None, "not valid JSON: nested too deeply")]) from None
        except ValueError as exc:  # a number of more than 4300 digits
            raise _config_error(source, [Problem("<document>", None, f"not valid JSON: {exc}")]) from None
    # Anchors and aliases need '&' or '*': without either, libyaml's own (faster) composer is safe.
    loader = _AnchorRefusingLoader if "&" in text or "*" in text else _ConfigLoader
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except _AnchorFound as exc:
        where, line = _where(text, exc.problem_mark)
        raise _config_error(source, [Problem(where, line, _ANCHOR_MESSAGE)]) from None
    except yaml.YAMLError as exc:
        where, line = _where(text, getattr(exc, "problem_mark", None))
        problem = getattr(exc, "problem", None) or str(exc)
        raise _config_error(source, [Problem(where, line, f"not valid YAML or JSON: {problem}")]) from None
    except RecursionError:  # absurd nesting (libyaml stops at depth 1000 before this)
        raise _config_error(source, [Problem("<document>", None, "not valid YAML or JSON: nested too deeply")]) from None
    except ValueError as exc:  # a value YAML cannot construct (an int of more than 4300 digits)
        raise _config_error(source, [Problem("<document>", None, f"not valid YAML or JSON: {exc}")]) from None
    except Exception as exc:  # PyYAML's constructors on odd input: "!!int ''" (IndexError), "!!bool ''" (KeyError)
        reason = f"a tagged value cannot be read ({type(exc).__name__}: {exc})"
        raise _config_error(source, [Problem("<document>", None, f"not valid YAML or JSON: {reason}")]) from None


def _where(text: str, mark: Any) -> tuple[str, str]:
    """``(<line L, column C>, the text around it)`` for a YAML error's mark (``<document>`` without)."""
    lines = text.splitlines()
    if mark is None:
        return "<document>", _excerpt(lines[0] if lines else "", 0)
    line = lines[mark.line] if 0 <= mark.line < len(lines) else ""
    return f"<line {mark.line + 1}, column {mark.column + 1}>", _excerpt(line, mark.column)


def _excerpt(line: str, column: int) -> str:
    """``line`` when short, else the 80 characters around ``column`` (a minified JSON document is
    one line of megabytes: the error shows where, not all of it)."""
    if len(line) <= 80:
        return line
    start = max(0, min(column - 40, len(line) - 80))
    return ("..." if start > 0 else "") + line[start : start + 80] + ("..." if start + 80 < len(line) else "")


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


def _parse_cidrs(key: str, value: Any, ctx: _Context) -> None:
    if value is None:  # like Go: null sets the list to empty
        ctx.fields["non_masquerade_cidrs"] = ()
        return
    if not isinstance(value, list):
        ctx.problems.append(Problem(key, shorten(value), "expected a list of CIDR strings, e.g. ['10.0.0.0/8']"))
        return
    cidrs: list[Network] = []
    for index, item in enumerate(value):
        try:
            net = parse_cidr(item)
        except CIDRError as exc:
            ctx.problems.append(Problem(f"{key}[{index}]", shorten(item), exc.reason))
            continue
        if net.version == 6 and not ctx.options.enable_ipv6:
            ctx.problems.append(
                Problem(f"{key}[{index}]", item, "IPv6 CIDR given but IPv6 is not enabled; start masqd with --enable-ipv6")
            )
        cidrs.append(net)
    ctx.fields["non_masquerade_cidrs"] = tuple(cidrs)


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
        ctx.problems.append(Problem(key, shorten(value), "must be 0 or more (and fit in 64 bits)"))
    else:
        ctx.fields["cidr_limit"] = value
        ctx.fields["cidr_limit_set"] = True


_PARSERS = {
    "nonMasqueradeCIDRs": _parse_cidrs,
    "masqLinkLocal": _parse_bool("masq_link_local"),
    "masqLinkLocalIPv6": _parse_bool("masq_link_local_ipv6"),
    "resyncInterval": _parse_resync,
    "cidrLimit": _parse_limit,
}


def limit_problem(key: str, limit: int, counted: str, remedy: str) -> Problem:
    """More non-masquerade CIDRs than ``cidrLimit`` allows (``counted``: e.g. "65 CIDRs")."""
    return Problem(key, counted, f"at most cidrLimit={limit} CIDRs are accepted (link-local not counted); {remedy}")


def _validate(config: MasqConfig, count: int, cidr_key: str, problems: list[Problem], warnings: list[Problem]) -> None:
    cidrs = config.non_masquerade_cidrs
    if count > config.cidr_limit:
        problems.append(limit_problem(cidr_key, config.cidr_limit, f"{count} CIDRs", "remove CIDRs or raise cidrLimit"))
    for net in duplicates(cidrs):
        warnings.append(Problem(cidr_key, str(net), "listed more than once; one entry is enough"))


# --- several config sources ------------------------------------------------------------------------

#: The origin shown for CIDRs that come from the defaults (no present source lists any).
DEFAULTS_ORIGIN = "defaults"


@dataclass(frozen=True, slots=True)
class MergedConfig:
    """The config masqd applies, merged from every config source present, and where each
    non-masquerade CIDR came from.

    config: the merged values (see :func:`merge_configs`).
    origins: each CIDR of ``config.non_masquerade_cidrs`` -> the sources listing it, in source
        order (``("defaults",)`` for default CIDRs).
    sources: the names of the sources present (a missing file or ConfigMap is not present).
    """

    config: MasqConfig
    origins: dict[Network, tuple[str, ...]]
    sources: tuple[str, ...]


def merge_configs(parts: list[tuple[str, MasqConfig]] | tuple[tuple[str, MasqConfig], ...], options: AgentOptions) -> MergedConfig:
    """Merge the valid configs of the present sources, ``(name, config)`` in source order.

    No source present: the defaults. One source: that source's config, exactly. Several:
    ``nonMasqueradeCIDRs`` are unioned (first listing wins the order), ``masqLinkLocal`` and
    ``masqLinkLocalIPv6`` are OR'ed, the smallest ``resyncInterval`` wins, and a key no source
    sets keeps its default. ``cidrLimit`` was already checked per source by :func:`parse_config`;
    with several sources plugin contributions are not counted against any one source's limit.
    """
    defaults = default_config(options)
    listing = [(name, c) for name, c in parts if "nonMasqueradeCIDRs" in c.keys]
    origins: dict[Network, list[str]] = {}
    for name, config in listing:
        for net in config.non_masquerade_cidrs:
            names = origins.setdefault(net, [])
            if name not in names:
                names.append(name)
    if not listing:
        origins = {net: [DEFAULTS_ORIGIN] for net in defaults.non_masquerade_cidrs}
    merged_origins = {net: tuple(names) for net, names in origins.items()}
    names = tuple(name for name, _ in parts)
    if len(parts) == 1:
        return MergedConfig(parts[0][1], merged_origins, names)
    if not parts:
        return MergedConfig(defaults, merged_origins, names)
    resyncs = [c.resync_interval_ns for _, c in parts if "resyncInterval" in c.keys]
    config = MasqConfig(
        non_masquerade_cidrs=tuple(origins),
        masq_link_local=any(c.masq_link_local for _, c in parts),
        masq_link_local_ipv6=any(c.masq_link_local_ipv6 for _, c in parts),
        resync_interval_ns=min(resyncs) if resyncs else defaults.resync_interval_ns,
        cidr_limit=max(c.cidr_limit for _, c in parts),
        cidr_limit_set=False,
        keys=frozenset().union(*(c.keys for _, c in parts)),
    )
    return MergedConfig(config, merged_origins, names)


# --- flags ----------------------------------------------------------------------------------------

_CHAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,27}")
_BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
_TARGET_NAMES = {"ACCEPT", "DROP", "RETURN", "QUEUE", "MASQUERADE", "SNAT", "DNAT", "REDIRECT", "MARK", "LOG"}


def validate_chain_name(name: str) -> str:
    """Return ``name`` if it can be an iptables chain masqd owns, else raise :class:`FlagError`."""
    if not isinstance(name, str) or not _CHAIN_NAME.fullmatch(name):
        raise FlagError(
            "masq-chain", name, "expected 1-28 characters of letters, digits, '_', '.', '-', not starting with '-' or '.'"
        )
    if name in _BUILTIN_CHAINS | _TARGET_NAMES:
        raise FlagError("masq-chain", name, "is a built-in chain or target name; choose a name of your own such as IP-MASQ-AGENT")
    return name


def parse_to_ports(text: str) -> tuple[PortRange, ...]:
    """Parse ``--to-ports`` (``1024-29999,32768-65535`` or ``8000``); empty text means no port mapping."""
    if text.strip() == "":
        return ()
    ranges: list[PortRange] = []
    for piece in text.split(","):
        match = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", piece)
        if not match:
            raise FlagError("to-ports", text, f"{piece!r} is not a port or a range; expected e.g. '1024-29999,32768-65535'")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if not 1 <= first <= last <= 65535:
            raise FlagError("to-ports", text, f"{piece!r}: ports must be 1-65535 with the first not above the last")
        ranges.append(PortRange(first, last))
    ordered = sorted(ranges, key=lambda r: r.first)
    for before, after in zip(ordered, ordered[1:]):
        if after.first <= before.last:
            raise FlagError("to-ports", text, f"ranges {before} and {after} overlap; give each port once")
    return tuple(ranges)
