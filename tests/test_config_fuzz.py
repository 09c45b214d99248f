"""Hostile config input: arbitrary bytes, YAML and JSON documents, oversized files, alias bombs,
deep nesting, and garbage plugin contributions.

Whatever the input, the outcome is a valid config (every CIDR a real ``ipaddress`` network, and
a rule text made only of fixed rule skeletons and those networks) or a :class:`ConfigError` with
printable problems; never another exception, a hang, or an outside string in a rule.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import tracemalloc

import anyio
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import masqd
from masqd.backends.iptables import destination_match, render_ruleset
from masqd.config import (
    MAX_CONFIG_BYTES,
    AgentOptions,
    MasqConfig,
    ParsedConfig,
    parse_config,
)
from masqd.config.parse import _AnchorRefusingLoader, _ConfigLoader
from masqd.errors import ConfigError, PluginError
from masqd.inputs import ConfigLoader, FileInput
from masqd.ruleset import compute_ruleset
from masqd.sources.files import content_digest

from config_strategies import (DEST_MATCH, HANG_SECONDS, SAFE_RULE_CHARS, V4, V6, assert_clear_error, documents,
                               dump_document, is_cidr, json_values, networks, rule_skeleton, scalars, strings_in, texts)

FUZZ = settings(max_examples=150, deadline=HANG_SECONDS * 1000, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- what every outcome must satisfy (see also config_strategies) ----------------------------------


def assert_usable(parsed: ParsedConfig, options: AgentOptions, inputs: list[str] = ()) -> None:
    config = parsed.config
    for net in config.non_masquerade_cidrs:
        assert isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network))
        assert net.version == 4 or options.enable_ipv6
    for warning in parsed.warnings:
        assert str(warning).isprintable()
    rules = render_ruleset(compute_ruleset(config, options))
    assert SAFE_RULE_CHARS.fullmatch(rules), rules
    # Every line is a fixed skeleton (what an empty list renders) with, at most, one of the
    # config's networks (or link-local) as its destination: nothing else can reach a rule.
    empty = MasqConfig(non_masquerade_cidrs=(), masq_link_local=True, masq_link_local_ipv6=True)
    ret = '-A IP-MASQ-AGENT{} -m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN'
    skeletons = set(rule_skeleton(render_ruleset(compute_ruleset(empty, options)))) | {ret.format(" -d <net>"), ret.format("")}
    allowed = {destination_match(n).strip().removeprefix("-d ") for n in config.non_masquerade_cidrs}
    allowed |= {"169.254.0.0/16", "fe80::/10"}
    for line, skeleton in zip(rules.splitlines(), rule_skeleton(rules)):
        assert skeleton in skeletons, line
        assert all(dest in allowed for dest in DEST_MATCH.findall(line)), line
    for text in inputs:
        if len(text) >= 12 and not is_cidr(text) and re.search(r"[^0-9A-Fa-f:./]", text):
            assert text not in rules


def check_text(text: str, options: AgentOptions = V4) -> ParsedConfig | ConfigError:
    """Parse ``text``; any exception but ConfigError fails the test."""
    try:
        parsed = parse_config(text, options, source="fuzz")
    except ConfigError as exc:
        assert_clear_error(exc)
        return exc
    try:
        inputs = strings_in(yaml.load(text, Loader=_AnchorRefusingLoader))  # noqa: S506
    except Exception:
        inputs = []
    assert_usable(parsed, options, inputs)
    return parsed


def check_file(path, data: bytes, options: AgentOptions = V4) -> None:
    """The real file path: bytes on disk, read by FileInput, parsed and merged by ConfigLoader."""
    path.write_bytes(data)
    try:
        loaded = ConfigLoader([FileInput(path)], options).load()
    except ConfigError as exc:
        assert_clear_error(exc)
        return
    assert_usable(ParsedConfig(loaded.config), options)


# --- strategies ------------------------------------------------------------------------------------

KEYS = ("nonMasqueradeCIDRs", "masqLinkLocal", "masqLinkLocalIPv6", "resyncInterval", "cidrLimit")
any_document = documents | json_values

#: Pieces of YAML syntax, tags, anchors and aliases, assembled into (mostly broken) documents.
YAML_PIECES = (
    "nonMasqueradeCIDRs", "cidrLimit", "resyncInterval", "masqLinkLocal", ": ", "- ", "\n", "  ", "[", "]", "{", "}", ",",
    "10.0.0.0/8", "fd00::/8", "10.0.0.1/8", "&a ", "*a", "&b ", "*b", "<<: *a", "!!str ", "!!int ", "!!binary ",
    "!!python/object/apply:os.system ", "!<tag:yaml.org,2002:seq> ", "!e!%0A ", "%YAML 1.1\n", "%TAG !e! tag:x,2000:\n",
    "---\n", "...\n", "? ", "#", "|\n", ">\n", "'", '"', "\\x00", "\\ud800", "\0", "\ud800", "\ufeff", "\x85", "\u2028",
    "~", "null", "true", "1e400", ".nan", "0x" + "f" * 40, "0b1", "190:20:30", "2024-01-01", "=", "@", "`",
)
yaml_texts = st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join)


# --- properties --------------------------------------------------------------------------------------


@FUZZ
@given(document=any_document, style=st.sampled_from(("json", "json-ascii", "yaml", "yaml-unicode", "yaml-flow")),
       options=st.sampled_from((V4, V6)))
def test_any_document_is_a_valid_config_or_a_clear_error(document, style, options):
    try:
        text = dump_document(document, style)
    except (yaml.YAMLError, UnicodeError, ValueError):
        return  # not representable in that syntax
    check_text(text, options)


@FUZZ
@given(document=documents)
def test_refusing_anchors_changes_nothing_else(document):
    # The anchor-refusing composer (PyYAML's, on libyaml's events) builds what libyaml's own does.
    text = "# R&D *\n" + yaml.safe_dump(document, allow_unicode=True)
    assert _outcome(text, _AnchorRefusingLoader) == _outcome(text, _ConfigLoader)


def _outcome(text: str, loader: type) -> object:
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506
    except yaml.YAMLError as exc:
        return type(exc), getattr(exc, "problem", None)


@FUZZ
@given(text=yaml_texts, options=st.sampled_from((V4, V6)))
def test_yaml_syntax_tags_anchors_and_control_characters(text, options):
    result = check_text(text, options)
    if isinstance(result, ParsedConfig):
        assert not _uses_anchors(text), "an anchor or alias was accepted"


def _uses_anchors(text: str) -> bool:
    try:
        return any(isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None
                   for event in yaml.parse(text, Loader=yaml.SafeLoader))
    except Exception:
        return False  # not even YAML events: parse_config must have refused it anyway


@FUZZ
@given(text=st.text(max_size=200) | st.text(st.characters(codec="utf-8", categories=["Cc", "Cs"]), max_size=50))
def test_arbitrary_text(text):
    check_text(text)
    check_text("nonMasqueradeCIDRs: [" + text + "]")
    check_text('{"nonMasqueradeCIDRs": [' + json.dumps(text) + "]}")


@FUZZ
@given(data=st.binary(max_size=500) | yaml_texts.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes_through_the_file_reader(tmp_path, data):
    check_file(tmp_path / "ip-masq-agent", data)
    for text in (data.decode("latin-1"), data.decode("utf-8", "surrogateescape"), data.decode("utf-8", "replace")):
        check_text(text)


@FUZZ
@given(document=documents, encoding=st.sampled_from(("utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1")))
def test_encodings_through_the_file_reader(tmp_path, document, encoding):
    try:
        data = json.dumps(document, ensure_ascii=False).encode(encoding)
    except UnicodeError:
        return
    check_file(tmp_path / "ip-masq-agent", data, V6)


# --- size, bombs, nesting, encodings ------------------------------------------------------------------


def _load_in_thread(path):
    """ConfigLoader.load() on ``path`` in a thread: the test fails (instead of hanging) if it
    does not return within a generous bound. Returns what load() returned or raised."""
    outcome = {}

    def work():
        try:
            outcome["value"] = ConfigLoader([FileInput(path)], V4).load()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "loading the config did not return (hung)"
    return outcome.get("error", outcome.get("value"))


def test_a_50_mb_file_is_refused_without_being_read(tmp_path):
    path = tmp_path / "ip-masq-agent"
    block = b"nonMasqueradeCIDRs:\n" + b"  - 10.0.0.0/8\n" * 4096
    with path.open("wb") as file:
        while file.tell() < 50 * 1024 * 1024:
            file.write(block)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        error = _load_in_thread(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(error, ConfigError)
    assert error.source == str(path)
    [problem] = error.problems
    assert problem.key == "<file>" and problem.value == f"{size} bytes"
    assert f"at most {MAX_CONFIG_BYTES} bytes (16 MiB)" in problem.reason
    assert peak < 4 * 1024 * 1024, "the file was read into memory"
    assert content_digest(path).startswith(f"too-large:{size}:")


def test_a_sparse_file_just_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "ip-masq-agent"
    with path.open("wb") as file:
        file.truncate(MAX_CONFIG_BYTES + 1)
    error = _load_in_thread(path)
    assert isinstance(error, ConfigError) and error.problems[0].value == f"{MAX_CONFIG_BYTES + 1} bytes"


def test_configmap_text_over_the_limit_is_refused():
    # A ConfigMap's text reaches parse_config without a file: the same limit, in characters.
    text = "# " + "x" * MAX_CONFIG_BYTES
    with pytest.raises(ConfigError) as caught:
        parse_config(text, V4, source="configmap kube-system/ip-masq-agent")
    [problem] = caught.value.problems
    assert problem.key == "<document>" and problem.value == f"{len(text)} characters"
    assert "too large" in problem.reason


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
nonMasqueradeCIDRs: *i
"""


@pytest.mark.parametrize("text", [
    pytest.param(BILLION_LAUGHS, id="billion-laughs"),
    pytest.param("nonMasqueradeCIDRs: &x [10.0.0.0/8]\n", id="unused-anchor"),
    pytest.param("x: &x 10.0.0.0/8\nnonMasqueradeCIDRs: [*x]\n", id="alias"),
    pytest.param("x: &x {cidrLimit: 3}\n<<: *x\n", id="merge-key"),
    pytest.param("nonMasqueradeCIDRs: &x [*x]\n", id="recursive"),
])
def test_anchors_and_aliases_are_refused(tmp_path, text):
    path = tmp_path / "ip-masq-agent"
    path.write_text(text)
    error = _load_in_thread(path)
    assert isinstance(error, ConfigError)
    [problem] = error.problems
    assert problem.reason.startswith("YAML anchors and aliases are not accepted in the config")
    assert problem.key.startswith("<line ")


def test_ampersands_and_asterisks_that_are_not_anchors_still_parse():
    parsed = parse_config('# R&D *team*\nnonMasqueradeCIDRs: ["10.0.0.0/8"]  # a&b\nx: "*a &b"\n', V4)
    assert parsed.config.non_masquerade_cidrs == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize("text", [
    pytest.param("[" * 100_000, id="yaml-open-flow"),
    pytest.param("[" * 100_000 + "]" * 100_000, id="yaml-closed-flow"),
    pytest.param("# * forces the anchor-checking composer\n" + "[" * 100_000 + "]" * 100_000, id="yaml-closed-flow-checked"),
    pytest.param("a: " + "{a: " * 100_000, id="yaml-mappings"),
    pytest.param("".join("  " * i + "-\n" for i in range(1500)), id="yaml-block"),
    pytest.param('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", id="json-closed"),
    pytest.param('{"a": ' + "[" * 100_000, id="json-open"),
])
def test_deep_nesting_is_refused(tmp_path, text):
    path = tmp_path / "ip-masq-agent"
    path.write_text(text)
    error = _load_in_thread(path)
    assert isinstance(error, ConfigError)
    assert_clear_error(error)
    assert any("nested too deeply" in p.reason or "nesting depth" in p.reason or "not valid" in p.reason
               for p in error.problems)
    assert len(str(error)) < 1000  # the offending line is excerpted, not pasted


@pytest.mark.parametrize(("data", "reason"), [
    pytest.param(b"\0" * 4096, "not valid YAML or JSON: unacceptable character #x0000", id="nul-bytes"),
    pytest.param(b"nonMasqueradeCIDRs: [\xff\xfe10.0.0.0/8]", "not UTF-8 text (invalid start byte at byte 21)", id="invalid-utf8"),
    pytest.param("nonMasqueradeCIDRs: []".encode("utf-16"), "not UTF-8 text (invalid start byte at byte 0)", id="utf-16"),
    pytest.param("nonMasqueradeCIDRs: []".encode("utf-16-le"), "not valid YAML or JSON: unacceptable character #x0000", id="utf-16-no-bom"),
    pytest.param(b"\xed\xa0\x80: 1", "not UTF-8 text (invalid continuation byte at byte 0)", id="encoded-surrogate"),
])
def test_undecodable_files_are_refused(tmp_path, data, reason):
    path = tmp_path / "ip-masq-agent"
    path.write_bytes(data)
    error = _load_in_thread(path)
    assert isinstance(error, ConfigError)
    assert_clear_error(error)
    assert error.problems[0].reason.startswith(reason)


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "ip-masq-agent"
    path.write_bytes(b"\xef\xbb\xbfnonMasqueradeCIDRs: [192.0.2.0/24]\n")
    loaded = _load_in_thread(path)
    assert loaded.config.non_masquerade_cidrs == (ipaddress.ip_network("192.0.2.0/24"),)


def test_a_million_bad_cidrs_give_a_readable_error():
    text = json.dumps({"nonMasqueradeCIDRs": ["x"] * 1_000_000, "cidrLimit": 2_000_000})
    with pytest.raises(ConfigError) as caught:
        parse_config(text, V4)
    problems = caught.value.problems
    assert len(problems) == 101
    assert problems[-1].reason == "999900 more problems not shown; fix the ones above first"


@pytest.mark.parametrize("text", [
    pytest.param("cidrLimit: 0x" + "f" * 5000, id="huge-hex-int"),
    pytest.param("0x" + "f" * 5000 + ": 1", id="huge-hex-key"),
    pytest.param('{"cidrLimit": ' + "1" * 5000 + "}", id="huge-json-int"),
    pytest.param("resyncInterval: " + "1" * 100_000 + "s", id="huge-duration"),
    pytest.param("a: !<%0A%00x> 1", id="tag-with-newline"),
])
def test_huge_numbers_and_odd_tags(text):
    assert isinstance(check_text(text), ConfigError)


# --- plugin contributions ------------------------------------------------------------------------------


class _Unprintable:
    def __str__(self):
        raise RuntimeError("no str")

    def __repr__(self):
        raise RuntimeError("no repr")


class _EvilStr(str):
    def __repr__(self):
        raise RuntimeError("no repr")


class Garbage:
    """A plugin returning whatever the test sets."""

    name = "garbage"

    def __init__(self):
        self.items = []

    @masqd.hookimpl
    def nonmasq_cidrs(self, config, options):
        return self.items


garbage_items = st.lists(
    networks() | texts | st.integers(min_value=-2**80, max_value=2**80) | st.just(10**5000)
    | st.just(_Unprintable()) | texts.map(_EvilStr) | st.just(ipaddress.ip_network("2001:db8::/32"))
    | st.builds(object) | st.none() | st.floats() | st.binary(max_size=8),
    max_size=8,
) | scalars


@settings(max_examples=100, deadline=HANG_SECONDS * 1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=garbage_items, options=st.sampled_from((V4, V6)))
def test_garbage_contributions_are_a_plugin_error_or_networks(masqd_plugins, items, options):
    plugin = Garbage()
    plugins = masqd_plugins(plugin)
    plugin.items = items
    config = parse_config(None, options).config

    try:
        contributions = anyio.run(plugins.contributions, config, options)
    except PluginError as exc:
        assert_clear_error(exc)
        return
    networks_ = [net for c in contributions for net in c.cidrs]
    for net in networks_:
        assert isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network))
        assert net.version == 4 or options.enable_ipv6
    rules = render_ruleset(compute_ruleset(config, options, tuple(networks_)))
    assert SAFE_RULE_CHARS.fullmatch(rules)
