"""The config file (YAML or JSON), Go durations, and the flag values masqd validates itself.

Expected values are spelled out here from the compatibility contract, not taken from masqd's own
constants, so a changed default shows up as a failure.
"""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from masqd.config import (
    AgentOptions,
    MasqConfig,
    PortRange,
    parse_config,
    parse_to_ports,
    validate_chain_name,
)
from masqd.cidrs import CIDRError, parse_cidr
from masqd.duration import format_go_duration, parse_go_duration
from masqd.errors import ConfigError, FlagError
from masqd.inputs import ConfigLoader, FileInput

S = 1_000_000_000  # nanoseconds per second
V4 = AgentOptions()
V6 = AgentOptions(enable_ipv6=True)
RESERVED = AgentOptions(nomasq_all_reserved_ranges=True)


def nets(*cidrs: str):
    return tuple(ip_network(c) for c in cidrs)


RFC1918 = nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
ALL_RESERVED = RFC1918 + nets(
    "100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4",
)
DEFAULTS = MasqConfig(
    non_masquerade_cidrs=RFC1918,
    masq_link_local=False,
    masq_link_local_ipv6=False,
    resync_interval_ns=60 * S,
    cidr_limit=64,
)


def config(**changes) -> MasqConfig:
    """DEFAULTS with ``changes``; a config whose file sets cidrLimit records that it did."""
    return replace(DEFAULTS, **changes, cidr_limit_set="cidr_limit" in changes)


def problems_of(text: str, options: AgentOptions = V4):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, options, source="/etc/config/ip-masq-agent")
    assert caught.value.source == "/etc/config/ip-masq-agent"
    return caught.value.problems


# --- valid files ----------------------------------------------------------------------------------

FULL_YAML = """\
nonMasqueradeCIDRs:
  - 10.0.0.0/8
  - 198.51.100.0/24
masqLinkLocal: true
masqLinkLocalIPv6: true
resyncInterval: 1m30s
cidrLimit: 10
"""
FULL = config(
    non_masquerade_cidrs=nets("10.0.0.0/8", "198.51.100.0/24"),
    masq_link_local=True,
    masq_link_local_ipv6=True,
    resync_interval_ns=90 * S,
    cidr_limit=10,
)


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        pytest.param(FULL_YAML, V4, FULL, id="yaml-every-key"),
        pytest.param(json.dumps({
            "nonMasqueradeCIDRs": ["10.0.0.0/8", "198.51.100.0/24"], "masqLinkLocal": True,
            "masqLinkLocalIPv6": True, "resyncInterval": "1m30s", "cidrLimit": 10,
        }, indent=2), V4, FULL, id="json-every-key"),
        pytest.param("masqLinkLocal: true\n", V4, config(masq_link_local=True), id="yaml-partial-keeps-defaults"),
        pytest.param('{"resyncInterval": "5m"}', V4, config(resync_interval_ns=300 * S), id="json-partial-keeps-defaults"),
        pytest.param("cidrLimit: 11\n", RESERVED, config(non_masquerade_cidrs=ALL_RESERVED, cidr_limit=11),
                     id="partial-keeps-reserved-defaults"),
        pytest.param("nonMasqueradeCIDRs: [203.0.113.0/24]\n", RESERVED, config(non_masquerade_cidrs=nets("203.0.113.0/24")),
                     id="listed-cidrs-replace-reserved-defaults"),
        pytest.param("", V4, DEFAULTS, id="empty-file"),
        pytest.param("  \n\n", V4, DEFAULTS, id="whitespace-only"),
        pytest.param("# nothing configured yet\n", V4, DEFAULTS, id="comment-only"),
        pytest.param("---\n", V4, DEFAULTS, id="empty-yaml-document"),
        pytest.param("{}", V4, DEFAULTS, id="empty-json-object"),
        pytest.param("", RESERVED, config(non_masquerade_cidrs=ALL_RESERVED), id="empty-file-reserved"),
        pytest.param('{"nonMasqueradeCIDRs": ["\\u0031\\u0030.0.0.0/8"]}', V4, config(non_masquerade_cidrs=nets("10.0.0.0/8")),
                     id="json-unicode-escapes-in-value"),
        pytest.param('{"masqLink\\u004cocal": true, "\\u0063idrLimit": 5}', V4, config(masq_link_local=True, cidr_limit=5),
                     id="json-unicode-escapes-in-keys"),
        pytest.param('nonMasqueradeCIDRs: ["\\u0031\\u0030.0.0.0/8"]\n', V4, config(non_masquerade_cidrs=nets("10.0.0.0/8")),
                     id="yaml-double-quoted-unicode-escapes"),
        pytest.param("nonMasqueradeCIDRs: null\n", V4, config(non_masquerade_cidrs=()), id="yaml-null-cidrs-is-empty"),
        pytest.param("nonMasqueradeCIDRs:\n", V4, config(non_masquerade_cidrs=()), id="yaml-bare-cidrs-key-is-empty"),
        pytest.param('{"nonMasqueradeCIDRs": null}', V4, config(non_masquerade_cidrs=()), id="json-null-cidrs-is-empty"),
        pytest.param("nonMasqueradeCIDRs: []\n", V4, config(non_masquerade_cidrs=()), id="empty-list"),
        pytest.param('nonMasqueradeCIDRs: [10.0.0.0/8, "fd00::/8", "2001:db8::/32"]\n', V6,
                     config(non_masquerade_cidrs=nets("10.0.0.0/8", "fd00::/8", "2001:db8::/32")),
                     id="ipv6-accepted-with-enable-ipv6"),
        pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12]\ncidrLimit: 2\n", V4,
                     config(non_masquerade_cidrs=nets("10.0.0.0/8", "172.16.0.0/12"), cidr_limit=2),
                     id="exactly-cidrLimit-cidrs"),
        pytest.param("nonMasqueradeCIDRs: []\ncidrLimit: 0\n", V4, config(non_masquerade_cidrs=(), cidr_limit=0),
                     id="cidrLimit-zero-with-no-cidrs"),
        pytest.param("nonMasqueradeCIDRs:\n" + "".join(f"  - 10.{i}.0.0/16\n" for i in range(64)), V4,
                     config(non_masquerade_cidrs=nets(*(f"10.{i}.0.0/16" for i in range(64)))),
                     id="exactly-64-cidrs-by-default"),
        pytest.param("resyncInterval: 500ms\n", V4, config(resync_interval_ns=S // 2), id="duration-ms"),
        pytest.param("resyncInterval: 1.5h\n", V4, config(resync_interval_ns=5400 * S), id="duration-fraction"),
        pytest.param("masqLinkLocal: false\nmasqLinkLocalIPv6: false\n", V4, DEFAULTS, id="explicit-false"),
        pytest.param("\ufeffmasqLinkLocal: true\n", V4, config(masq_link_local=True), id="byte-order-mark"),
    ],
)
def test_valid_config(text, options, expected):
    parsed = parse_config(text, options)
    assert parsed.config == expected
    assert parsed.warnings == ()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(V4, DEFAULTS, id="defaults"),
        pytest.param(RESERVED, config(non_masquerade_cidrs=ALL_RESERVED), id="nomasq-all-reserved-ranges"),
    ],
)
def test_no_file_means_defaults(options, expected, tmp_path):
    assert parse_config(None, options).config == expected
    assert ConfigLoader([FileInput(tmp_path / "absent")], options).load().config == expected


def test_empty_file_on_disk_means_defaults(tmp_path):
    path = tmp_path / "ip-masq-agent"
    path.write_text("")
    assert ConfigLoader([FileInput(path)], V4).load().config == DEFAULTS


def test_resync_interval_in_seconds():
    assert parse_config("resyncInterval: 1m30s\n", V4).config.resync_interval == 90.0


@pytest.mark.parametrize("key", ["masqLinkLocal", "masqLinkLocalIPv6", "resyncInterval", "cidrLimit"])
@pytest.mark.parametrize("null", [pytest.param("null", id="null"), pytest.param("~", id="tilde"), pytest.param("", id="bare")])
def test_null_scalar_keeps_default_with_warning(key, null):
    parsed = parse_config(f"{key}: {null}\n", V4)
    assert parsed.config == DEFAULTS
    (warning,) = parsed.warnings
    assert warning.key == key
    assert "default" in warning.reason


# --- invalid files: one problem each --------------------------------------------------------------

CIDR0 = "nonMasqueradeCIDRs[0]"
CIDR_EXAMPLE = "'10.0.0.0/8'"


@pytest.mark.parametrize(
    ("text", "options", "key", "value", "hint"),
    [
        # alignment: the reason names the aligned block
        pytest.param("nonMasqueradeCIDRs: [10.0.0.1/8]", V4, CIDR0, "10.0.0.1/8", "'10.0.0.0/8'", id="misaligned-v4"),
        pytest.param("nonMasqueradeCIDRs: [192.168.1.1/16]", V4, CIDR0, "192.168.1.1/16", "'192.168.0.0/16'",
                     id="misaligned-v4-192"),
        pytest.param('nonMasqueradeCIDRs: ["fd00::1/8"]', V6, CIDR0, "fd00::1/8", "'fd00::/8'", id="misaligned-v6"),
        # not a CIDR at all
        pytest.param("nonMasqueradeCIDRs: [10.0.0.256/8]", V4, CIDR0, "10.0.0.256/8", CIDR_EXAMPLE, id="octet-too-big"),
        pytest.param("nonMasqueradeCIDRs: [10.0.0.0/33]", V4, CIDR0, "10.0.0.0/33", CIDR_EXAMPLE, id="prefix-too-long"),
        pytest.param('nonMasqueradeCIDRs: ["fd00::/129"]', V6, CIDR0, "fd00::/129", CIDR_EXAMPLE, id="v6-prefix-too-long"),
        pytest.param("nonMasqueradeCIDRs: [10.0.0/8]", V4, CIDR0, "10.0.0/8", CIDR_EXAMPLE, id="three-octets"),
        pytest.param("nonMasqueradeCIDRs: [010.0.0.0/8]", V4, CIDR0, "010.0.0.0/8", CIDR_EXAMPLE, id="leading-zero-octet"),
        pytest.param("nonMasqueradeCIDRs: [not-a-cidr]", V4, CIDR0, "not-a-cidr", CIDR_EXAMPLE, id="word"),
        pytest.param('nonMasqueradeCIDRs: [""]', V4, CIDR0, "", CIDR_EXAMPLE, id="empty-string"),
        pytest.param('nonMasqueradeCIDRs: ["10.0.0.0/8 -j ACCEPT"]', V4, CIDR0, "10.0.0.0/8 -j ACCEPT", CIDR_EXAMPLE,
                     id="injected-iptables-args"),
        pytest.param('nonMasqueradeCIDRs: ["10.0.0.0/8\\n-A POSTROUTING -j ACCEPT"]', V4, CIDR0,
                     "10.0.0.0/8\n-A POSTROUTING -j ACCEPT", CIDR_EXAMPLE, id="injected-newline-and-rule"),
        pytest.param('nonMasqueradeCIDRs: ["10.0.0.0/8\\n"]', V4, CIDR0, "10.0.0.0/8\n", CIDR_EXAMPLE, id="trailing-newline"),
        pytest.param('nonMasqueradeCIDRs: [" 10.0.0.0/8"]', V4, CIDR0, " 10.0.0.0/8", CIDR_EXAMPLE, id="leading-space"),
        pytest.param("nonMasqueradeCIDRs: [10.0.0.0/255.0.0.0]", V4, CIDR0, "10.0.0.0/255.0.0.0", CIDR_EXAMPLE,
                     id="netmask-form"),
        pytest.param("nonMasqueradeCIDRs: [10.0.0.0]", V4, CIDR0, "10.0.0.0", CIDR_EXAMPLE, id="no-prefix"),
        pytest.param('nonMasqueradeCIDRs: ["fe80::%eth0/64"]', V6, CIDR0, "fe80::%eth0/64", CIDR_EXAMPLE, id="v6-zone"),
        pytest.param("nonMasqueradeCIDRs: [10]", V4, CIDR0, 10, CIDR_EXAMPLE, id="number-item"),
        pytest.param("nonMasqueradeCIDRs: [true]", V4, CIDR0, True, CIDR_EXAMPLE, id="bool-item"),
        pytest.param("nonMasqueradeCIDRs: [null]", V4, CIDR0, None, CIDR_EXAMPLE, id="null-item"),
        pytest.param("nonMasqueradeCIDRs: [[10.0.0.0/8]]", V4, CIDR0, ["10.0.0.0/8"], CIDR_EXAMPLE, id="nested-list"),
        pytest.param("nonMasqueradeCIDRs: 10.0.0.0/8", V4, "nonMasqueradeCIDRs", "10.0.0.0/8", "list", id="string-not-list"),
        pytest.param("nonMasqueradeCIDRs: {a: 1}", V4, "nonMasqueradeCIDRs", {"a": 1}, "list", id="mapping-not-list"),
        # IPv6 needs --enable-ipv6
        pytest.param('nonMasqueradeCIDRs: ["fd00::/8"]', V4, CIDR0, "fd00::/8", "--enable-ipv6", id="ipv6-without-flag"),
        pytest.param('nonMasqueradeCIDRs: [10.0.0.0/8, "2001:db8::/32"]', V4, "nonMasqueradeCIDRs[1]", "2001:db8::/32",
                     "--enable-ipv6", id="ipv6-second-item-without-flag"),
        # cidrLimit
        pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\ncidrLimit: 2\n", V4,
                     "nonMasqueradeCIDRs", "3 CIDRs", "cidrLimit=2", id="more-than-cidrLimit"),
        pytest.param("nonMasqueradeCIDRs:\n" + "".join(f"  - 10.{i}.0.0/16\n" for i in range(65)), V4,
                     "nonMasqueradeCIDRs", "65 CIDRs", "cidrLimit=64", id="more-than-default-64"),
        pytest.param("cidrLimit: 2\n", V4, "nonMasqueradeCIDRs", "3 CIDRs", "raise cidrLimit", id="defaults-over-cidrLimit"),
        pytest.param("cidrLimit: '64'\n", V4, "cidrLimit", "64", "whole number", id="cidrLimit-string"),
        pytest.param("cidrLimit: true\n", V4, "cidrLimit", True, "whole number", id="cidrLimit-bool"),
        pytest.param("cidrLimit: 64.5\n", V4, "cidrLimit", 64.5, "whole number", id="cidrLimit-float"),
        pytest.param('{"cidrLimit": 64.0}', V4, "cidrLimit", 64.0, "whole number", id="cidrLimit-json-float"),
        pytest.param("cidrLimit: -1\n", V4, "cidrLimit", -1, "from 0 to 9223372036854775807", id="cidrLimit-negative"),
        pytest.param("cidrLimit: [64]\n", V4, "cidrLimit", [64], "whole number", id="cidrLimit-list"),
        # resyncInterval
        pytest.param("resyncInterval: '60'\n", V4, "resyncInterval", "60", "'60s'", id="duration-no-unit"),
        pytest.param("resyncInterval: 1h30\n", V4, "resyncInterval", "1h30", "'60s'", id="duration-last-part-no-unit"),
        pytest.param("resyncInterval: 60x\n", V4, "resyncInterval", "60x", "valid units", id="duration-unknown-unit"),
        pytest.param("resyncInterval: 1d\n", V4, "resyncInterval", "1d", "valid units", id="duration-days-unknown"),
        pytest.param("resyncInterval: 0s\n", V4, "resyncInterval", "0s", "positive", id="duration-zero"),
        pytest.param("resyncInterval: '0'\n", V4, "resyncInterval", "0", "positive", id="duration-bare-zero"),
        pytest.param("resyncInterval: -5s\n", V4, "resyncInterval", "-5s", "positive", id="duration-negative"),
        pytest.param("resyncInterval: 60\n", V4, "resyncInterval", 60, "Go duration string", id="duration-number"),
        pytest.param('{"resyncInterval": 60000000000}', V4, "resyncInterval", 60000000000, "Go duration string",
                     id="duration-json-nanoseconds"),
        pytest.param("resyncInterval: ''\n", V4, "resyncInterval", "", "'60s'", id="duration-empty"),
        pytest.param("resyncInterval: 60 s\n", V4, "resyncInterval", "60 s", "'60s'", id="duration-space"),
        # booleans
        pytest.param("masqLinkLocal: 'true'\n", V4, "masqLinkLocal", "true", "true or false", id="bool-quoted-string"),
        pytest.param("masqLinkLocal: 1\n", V4, "masqLinkLocal", 1, "true or false", id="bool-number"),
        pytest.param('{"masqLinkLocalIPv6": "false"}', V4, "masqLinkLocalIPv6", "false", "true or false",
                     id="bool-v6-json-string"),
        pytest.param("masqLinkLocalIPv6: [true]\n", V4, "masqLinkLocalIPv6", [True], "true or false", id="bool-list"),
        # the whole document
        pytest.param("- 10.0.0.0/8\n- 172.16.0.0/12\n", V4, "<top level>", ["10.0.0.0/8", "172.16.0.0/12"], "mapping",
                     id="top-level-yaml-list"),
        pytest.param('["10.0.0.0/8"]', V4, "<top level>", ["10.0.0.0/8"], "mapping", id="top-level-json-list"),
        pytest.param('"nonMasqueradeCIDRs"', V4, "<top level>", "nonMasqueradeCIDRs", "mapping", id="top-level-string"),
        pytest.param("42\n", V4, "<top level>", 42, "mapping", id="top-level-number"),
    ],
)
def test_invalid_config_names_key_value_and_what_is_valid(text, options, key, value, hint):
    (problem,) = problems_of(text, options)
    assert problem.key == key
    assert problem.value == value
    assert hint in problem.reason


@pytest.mark.parametrize(
    ("text", "line", "value"),
    [
        pytest.param("masqLinkLocal: true\nnonMasqueradeCIDRs:\n  - 10.0.0.0/8\n - 172.16.0.0/12\n", 4, " - 172.16.0.0/12",
                     id="yaml-bad-indent"),
        pytest.param("nonMasqueradeCIDRs:\n\t- 10.0.0.0/8\n", 2, "\t- 10.0.0.0/8", id="yaml-tab"),
        pytest.param("masqLinkLocal: true: false\n", 1, "masqLinkLocal: true: false", id="yaml-mapping-in-value"),
        pytest.param('{\n  "masqLinkLocal": true\n  "cidrLimit": 5\n}\n', 3, '  "cidrLimit": 5', id="json-missing-comma"),
        pytest.param('{\n  "masqLinkLocal": true,\n  "nonMasqueradeCIDRs": ["10.0.0.0/8"\n}\n', 4, "}",
                     id="json-unclosed-list"),
    ],
)
def test_parse_error_reports_the_line(text, line, value):
    (problem,) = problems_of(text)
    assert problem.key.startswith(f"<line {line}, column ")
    assert problem.value == value
    # a document opening with "{" is JSON only (as upstream); anything else is YAML, a JSON superset
    expected = "not valid JSON" if text.startswith("{") else "not valid YAML or JSON"
    assert expected in problem.reason


# Upstream (k8s.io/apimachinery util/yaml.ToJSON) parses a document starting with '{' as JSON only.
@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"nonMasqueradeCIDRs": ["10.0.0.0/8",]}', id="trailing-comma"),
        pytest.param("{'masqLinkLocal': true}", id="single-quotes"),
        pytest.param('{"masqLinkLocal": yes}', id="yaml-bool-word"),
    ],
)
def test_json_document_with_json_syntax_error_is_rejected(text):
    problems_of(text)


def test_every_problem_in_a_file_is_reported_at_once():
    text = """\
nonMasqueradeCIDRs:
  - 10.0.0.0/8
  - 10.0.0.1/8
  - fd00::/8
  - 10.0.0.0/8 -j ACCEPT
masqLinkLocal: "yes"
masqLinkLocalIPv6: 0
resyncInterval: 60
cidrLimit: -3
"""
    problems = problems_of(text)
    assert [(p.key, p.value) for p in problems] == [
        ("nonMasqueradeCIDRs[1]", "10.0.0.1/8"),
        ("nonMasqueradeCIDRs[2]", "fd00::/8"),
        ("nonMasqueradeCIDRs[3]", "10.0.0.0/8 -j ACCEPT"),
        ("masqLinkLocal", "yes"),
        ("masqLinkLocalIPv6", 0),
        ("resyncInterval", 60),
        ("cidrLimit", -3),
    ]


def test_limit_problem_is_reported_next_to_cidr_problems():
    problems = problems_of("nonMasqueradeCIDRs: [10.0.0.1/8, 172.16.0.0/12, x]\ncidrLimit: 2\n")
    assert {p.key for p in problems} == {"nonMasqueradeCIDRs[0]", "nonMasqueradeCIDRs[2]", "nonMasqueradeCIDRs"}


def test_config_error_message_names_source_key_value_and_reason():
    with pytest.raises(ConfigError) as caught:
        parse_config("nonMasqueradeCIDRs: [10.0.0.1/8]\n", V4, source="/etc/config/ip-masq-agent")
    message = str(caught.value)
    assert "/etc/config/ip-masq-agent" in message
    assert "nonMasqueradeCIDRs[0]" in message
    assert "'10.0.0.1/8'" in message
    assert "'10.0.0.0/8'" in message


# --- warnings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        pytest.param("nonMasqueradeCIRDs: [100.64.0.0/10]\n", "nonMasqueradeCIRDs", "did you mean 'nonMasqueradeCIDRs'?",
                     id="typo-suggests-key"),
        pytest.param("masqLinkLocl: true\n", "masqLinkLocl", "did you mean 'masqLinkLocal'?", id="typo-bool-key"),
        pytest.param("resync: 5m\n", "resync", "did you mean 'resyncInterval'?", id="short-key"),
        pytest.param("egress: true\n", "egress", "valid keys: nonMasqueradeCIDRs", id="unrelated-key-lists-valid-keys"),
    ],
)
def test_unknown_key_is_a_warning_and_ignored(text, key, hint):
    parsed = parse_config(text, V4)
    assert parsed.config == DEFAULTS
    (warning,) = parsed.warnings
    assert warning.key == key
    assert hint in warning.reason


@pytest.mark.parametrize(
    ("text", "key", "canonical", "expected"),
    [
        pytest.param("nonMasqueradeCidrs: [100.64.0.0/10]\n", "nonMasqueradeCidrs", "nonMasqueradeCIDRs",
                     config(non_masquerade_cidrs=nets("100.64.0.0/10")), id="nonMasqueradeCidrs"),
        pytest.param('{"NONMASQUERADECIDRS": ["100.64.0.0/10"]}', "NONMASQUERADECIDRS", "nonMasqueradeCIDRs",
                     config(non_masquerade_cidrs=nets("100.64.0.0/10")), id="upper-case-json"),
        pytest.param("masqlinklocal: true\n", "masqlinklocal", "masqLinkLocal", config(masq_link_local=True),
                     id="masqlinklocal"),
        pytest.param("ResyncInterval: 5m\n", "ResyncInterval", "resyncInterval", config(resync_interval_ns=300 * S),
                     id="ResyncInterval"),
    ],
)
def test_key_in_other_case_is_honoured_like_go_and_warned(text, key, canonical, expected):
    parsed = parse_config(text, V4)
    assert parsed.config == expected
    (warning,) = parsed.warnings
    assert warning.key == key
    assert f"'{canonical}'" in warning.reason


def test_duplicate_cidrs_are_kept_and_warned():
    parsed = parse_config("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16, 10.0.0.0/8, 10.0.0.0/8]\n", V4)
    assert parsed.config.non_masquerade_cidrs == nets("10.0.0.0/8", "192.168.0.0/16", "10.0.0.0/8", "10.0.0.0/8")
    (warning,) = parsed.warnings
    assert warning.key == "nonMasqueradeCIDRs"
    assert warning.value == "10.0.0.0/8"


def test_warnings_do_not_hide_problems():
    problems = problems_of("nonMasqueradeCIRDs: []\nmasqLinkLocal: maybe\n")
    assert [(p.key, p.value) for p in problems] == [("masqLinkLocal", "maybe")]


# --- Go durations ---------------------------------------------------------------------------------

US, MS, M, H = 1_000, 1_000_000, 60 * S, 3600 * S


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        pytest.param("60s", 60 * S, id="60s"),
        pytest.param("5m", 5 * M, id="5m"),
        pytest.param("1m30s", 90 * S, id="1m30s"),
        pytest.param("500ms", 500 * MS, id="500ms"),
        pytest.param("1h0m0s", H, id="1h0m0s"),
        pytest.param("1.5h", 5400 * S, id="1.5h"),
        pytest.param(".5s", 500 * MS, id="leading-dot"),
        pytest.param("5.s", 5 * S, id="trailing-dot"),
        pytest.param("2us", 2 * US, id="us"),
        pytest.param("2\u00b5s", 2 * US, id="micro-sign"),
        pytest.param("2\u03bcs", 2 * US, id="greek-mu"),
        pytest.param("100ns", 100, id="ns"),
        pytest.param("1h1m1s1ms1us1ns", H + M + S + MS + US + 1, id="every-unit"),
        pytest.param("1h1h", 2 * H, id="repeated-unit-adds"),
        pytest.param("1.000000001s", S + 1, id="nanosecond-fraction"),
        pytest.param("0.1h", 360 * S, id="tenth-hour"),
        pytest.param("+5s", 5 * S, id="plus-sign"),
        pytest.param("-1m30s", -90 * S, id="negative"),
        pytest.param("0", 0, id="bare-zero"),
        pytest.param("-0", 0, id="minus-zero"),
        pytest.param("0s", 0, id="zero-seconds"),
        pytest.param("2562047h47m16.854775807s", 2**63 - 1, id="int64-max"),
    ],
)
def test_parse_go_duration(text, ns):
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        pytest.param(0, "0s", id="zero"),
        pytest.param(1, "1ns", id="1ns"),
        pytest.param(1_500, "1.5\u00b5s", id="1.5us"),
        pytest.param(2 * US, "2\u00b5s", id="2us"),
        pytest.param(1_500_000, "1.5ms", id="1.5ms"),
        pytest.param(500 * MS, "500ms", id="500ms"),
        pytest.param(S, "1s", id="1s"),
        pytest.param(60 * S, "1m0s", id="1m0s"),
        pytest.param(90 * S, "1m30s", id="1m30s"),
        pytest.param(H, "1h0m0s", id="1h0m0s"),
        pytest.param(5400 * S, "1h30m0s", id="1h30m0s"),
        pytest.param(S + 1, "1.000000001s", id="1s-and-1ns"),
        pytest.param(61 * S + 500 * MS, "1m1.5s", id="1m1.5s"),
        pytest.param(-90 * S, "-1m30s", id="negative"),
        pytest.param(2**63 - 1, "2562047h47m16.854775807s", id="int64-max"),
        pytest.param(-(2**63), "-2562047h47m16.854775808s", id="int64-min"),
    ],
)
def test_format_go_duration(ns, text):
    assert format_go_duration(ns) == text


@pytest.mark.parametrize(
    "ns",
    [0, 1, 999, 1_000, 1_001, 999_999, MS, S - 1, S, S + 1, 59 * S, 60 * S, 90 * S, H - 1, H, 5400 * S,
     24 * H, 2**63 - 1, -1, -S, -(2**63 - 1)],
)
def test_duration_round_trip_table(ns):
    assert parse_go_duration(format_go_duration(ns)) == ns


@given(st.integers(min_value=-(2**63 - 1), max_value=2**63 - 1))
def test_duration_round_trip_property(ns):
    assert parse_go_duration(format_go_duration(ns)) == ns


# Go parses the int64 minimum that Duration.String prints.
def test_duration_round_trip_int64_min():
    assert parse_go_duration("-2562047h47m16.854775808s") == -(2**63)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("60", id="no-unit"),
        pytest.param("1h30", id="last-part-no-unit"),
        pytest.param("5x", id="unknown-unit"),
        pytest.param("5S", id="upper-case-unit"),
        pytest.param("1d", id="days"),
        pytest.param("5 s", id="space"),
        pytest.param(" 5s", id="leading-space"),
        pytest.param("5s ", id="trailing-space"),
        pytest.param("s", id="unit-only"),
        pytest.param(".s", id="dot-only"),
        pytest.param("+", id="sign-only"),
        pytest.param("--5s", id="double-sign"),
        pytest.param("1h-5m", id="inner-sign"),
        pytest.param("1e3s", id="exponent"),
        pytest.param("2562047h47m16.854775808s", id="overflow-by-one"),
        pytest.param("9223372036854775808ns", id="overflow-ns"),
        pytest.param("99999999999h", id="overflow-hours"),
    ],
)
def test_invalid_go_duration(text):
    with pytest.raises(ValueError) as caught:
        parse_go_duration(text)
    assert repr(text) in str(caught.value)


# Go's ParseDuration accepts only the ASCII digits 0-9.
@pytest.mark.parametrize("text", [pytest.param("\u0663\u0660s", id="arabic-indic"),
                                  pytest.param("\uff16\uff10s", id="fullwidth")])
def test_non_ascii_digits_are_not_a_duration(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


# --- --to-ports -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", (), id="empty-means-kernel-choice"),
        pytest.param("8000", (PortRange(8000, 8000),), id="single-port"),
        pytest.param("32768-65535", (PortRange(32768, 65535),), id="one-range"),
        pytest.param("1024-29999,32768-65535", (PortRange(1024, 29999), PortRange(32768, 65535)), id="two-ranges"),
        pytest.param("32768-65535,1024-29999", (PortRange(32768, 65535), PortRange(1024, 29999)), id="order-kept"),
        pytest.param("1000-1999,2000-2999", (PortRange(1000, 1999), PortRange(2000, 2999)), id="adjacent"),
        pytest.param("1-65535", (PortRange(1, 65535),), id="full-range"),
        pytest.param("80,443,8000-8100", (PortRange(80, 80), PortRange(443, 443), PortRange(8000, 8100)), id="mixed"),
        pytest.param("5000-5000", (PortRange(5000, 5000),), id="range-of-one"),
    ],
)
def test_parse_to_ports(text, expected):
    assert parse_to_ports(text) == expected


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        pytest.param("0", "1-65535", id="port-zero"),
        pytest.param("65536", "1-65535", id="port-too-big"),
        pytest.param("70000-80000", "1-65535", id="range-too-big"),
        pytest.param("2000-1000", "first not above the last", id="reversed"),
        pytest.param("1000-2000,1500-2500", "overlap", id="overlap"),
        pytest.param("1500-2500,1000-2000", "overlap", id="overlap-given-later"),
        pytest.param("80,80", "overlap", id="same-port-twice"),
        pytest.param("1024-", "e.g. '1024-29999,32768-65535'", id="open-end"),
        pytest.param("-1024", "e.g. '1024-29999,32768-65535'", id="negative"),
        pytest.param("1024:2000", "e.g. '1024-29999,32768-65535'", id="colon"),
        pytest.param("1024,", "e.g. '1024-29999,32768-65535'", id="trailing-comma"),
        pytest.param(" 1024", "e.g. '1024-29999,32768-65535'", id="leading-space"),
        pytest.param("1024-2000-3000", "e.g. '1024-29999,32768-65535'", id="three-parts"),
        pytest.param("http", "e.g. '1024-29999,32768-65535'", id="service-name"),
        pytest.param("1024 --random", "e.g. '1024-29999,32768-65535'", id="injected-option"),
        pytest.param("1024\n", "e.g. '1024-29999,32768-65535'", id="newline"),
        pytest.param(
            "\u0661\u0660\u0662\u0664",
            "e.g. '1024-29999,32768-65535'",
            id="non-ascii-digits",
        ),
    ],
)
def test_invalid_to_ports(text, hint):
    with pytest.raises(FlagError) as caught:
        parse_to_ports(text)
    assert caught.value.flag == "to-ports"
    assert caught.value.value == text
    assert hint in caught.value.reason


def test_port_range_size_and_text():
    assert (PortRange(1024, 29999).size, str(PortRange(1024, 29999))) == (28976, "1024-29999")
    assert (PortRange(8000, 8000).size, str(PortRange(8000, 8000))) == (1, "8000")


# --- --masq-chain ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("IP-MASQ-AGENT", id="default"),
        pytest.param("MASQD-EGRESS", id="custom"),
        pytest.param("masq_chain.v2", id="lower-dot-underscore"),
        pytest.param("_private", id="leading-underscore"),
        pytest.param("0", id="digit"),
        pytest.param("A" * 28, id="28-chars"),
        pytest.param("postrouting", id="builtin-name-other-case"),  # chain names are case-sensitive
    ],
)
def test_valid_chain_name(name):
    assert validate_chain_name(name) == name
    assert AgentOptions(masq_chain=name).masq_chain == name


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        pytest.param("", "1-28 characters", id="empty"),
        pytest.param("A" * 29, "1-28 characters", id="29-chars"),
        pytest.param("-IP-MASQ", "not starting with '-'", id="leading-dash"),
        pytest.param(".hidden", "not starting with '-' or '.'", id="leading-dot"),
        pytest.param("IP MASQ", "1-28 characters", id="space"),
        pytest.param("IP-MASQ-AGENT -j ACCEPT", "1-28 characters", id="injected-args"),
        pytest.param("IP-MASQ\n", "1-28 characters", id="newline"),
        pytest.param("IP/MASQ", "1-28 characters", id="slash"),
        pytest.param("POSTROUTING", "IP-MASQ-AGENT", id="builtin-chain"),
        pytest.param("MASQUERADE", "IP-MASQ-AGENT", id="target-name"),
        pytest.param("RETURN", "IP-MASQ-AGENT", id="return"),
        pytest.param("ACCEPT", "IP-MASQ-AGENT", id="accept"),
    ],
)
def test_invalid_chain_name(name, hint):
    with pytest.raises(FlagError) as caught:
        validate_chain_name(name)
    assert caught.value.flag == "masq-chain"
    assert caught.value.value == name
    assert hint in caught.value.reason
    with pytest.raises(FlagError):
        AgentOptions(masq_chain=name)


@pytest.mark.parametrize(
    ("value", "expected_ns", "warned"),
    [
        pytest.param("1ms", 100_000_000, True, id="1ms-raised-to-floor"),
        pytest.param("1ns", 100_000_000, True, id="1ns-raised-to-floor"),
        pytest.param("100ms", 100_000_000, False, id="at-floor"),
        pytest.param("500ms", 500_000_000, False, id="above-floor"),
    ],
)
def test_resync_interval_has_a_floor_against_busy_loops(value, expected_ns, warned):
    parsed = parse_config(f"resyncInterval: {value}\n", AgentOptions())
    assert parsed.config.resync_interval_ns == expected_ns
    floor_warnings = [w for w in parsed.warnings if w.key == "resyncInterval"]
    assert bool(floor_warnings) is warned
    if warned:
        assert floor_warnings[0].value == value and "minimum 100ms" in floor_warnings[0].reason


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("0.0.0.0/0", "0.0.0.0/0", id="everything"),
    pytest.param("10.0.0.0/08", "10.0.0.0/8", id="prefix-leading-zero-as-go"),
    pytest.param("255.255.255.255/32", "255.255.255.255/32", id="all-ones"),
    pytest.param("10.0.0.00/32", None, id="last-octet-leading-zero"),
    pytest.param("10.0.0.0.0/8", None, id="five-octets"),
    pytest.param("10..0.0/8", None, id="empty-octet"),
    pytest.param("10.0.0.0./8", None, id="trailing-dot"),
    pytest.param("10.0.0.1/32", "10.0.0.1/32", id="host"),
    pytest.param("10.0.0.1/31", None, id="host-bits-set"),
    pytest.param("::ffff:10.0.0.0/104", "::ffff:a00:0/104", id="ipv4-mapped-ipv6"),
])
def test_ipv4_cidrs_are_parsed_exactly_as_ipaddress_reads_them(value, expected):
    """The IPv4 fast path accepts exactly what the general parser accepts."""
    if expected is None:
        with pytest.raises(CIDRError):
            parse_cidr(value)
    else:
        assert str(parse_cidr(value)) == expected


_OCTET = st.sampled_from(["0", "1", "9", "10", "99", "100", "255", "256", "300", "00", "01", "010", ""])


@given(st.lists(_OCTET, min_size=3, max_size=5), st.sampled_from(["0", "8", "24", "31", "32", "33", "08"]))
def test_ipv4_fast_path_agrees_with_ipaddress(octets, prefix):
    value = ".".join(octets) + "/" + prefix
    try:
        expected = ip_network(f"{'.'.join(octets)}/{int(prefix)}")
    except ValueError:
        expected = None
    try:
        got = parse_cidr(value)
    except CIDRError:
        got = None
    assert got == expected


# --- a key given twice (issue 18): upstream keeps the last one; masqd says so, with both lines -------


def _repeat_warnings(parsed):
    return [str(w) for w in parsed.warnings]


BIG_BLOCK = "".join(f"  - 10.{i // 256}.{i % 256}.0/24\n" for i in range(300))  # the fast path's shape


@pytest.mark.parametrize(("text", "cidrs", "warnings"), [
    pytest.param("nonMasqueradeCIDRs:\n  - 10.0.0.0/8\nnonMasqueradeCIDRs:\n  - 192.168.0.0/16\n",
                 ("192.168.0.0/16",),
                 ["nonMasqueradeCIDRs: given twice, at lines 1 and 3: only the last (line 3) is used, as the upstream "
                  "agent does; remove the others"], id="yaml-block-lists"),
    pytest.param("cidrLimit: 5\nnonMasqueradeCIDRs: [192.168.0.0/16]\nnonMasqueradeCIDRs:\n" + BIG_BLOCK
                 + "cidrLimit: 400\ncidrLimit: 500\n",
                 None,
                 ["cidrLimit: given 3 times, at lines 1, 304 and 305: only the last (line 305) is used, as the upstream "
                  "agent does; remove the others",
                  "nonMasqueradeCIDRs: given twice, at lines 2 and 3: only the last (line 3) is used, as the upstream "
                  "agent does; remove the others"], id="yaml-big-block-list-after-a-flow-one"),
    pytest.param("nonMasqueradeCIDRs:\n" + BIG_BLOCK + "cidrLimit: 400\ncidrLimit: 500\n", None,
                 ["cidrLimit: given twice, at lines 302 and 303: only the last (line 303) is used, as the upstream "
                  "agent does; remove the others"], id="yaml-big-block-list-other-key-repeated"),
    pytest.param('{"nonMasqueradeCIDRs": ["10.0.0.0/8"],\n  "masqLinkLocal": {"a": 1, "a": 2},\n'
                 '  "nonMasqueradeCIDRs": ["192.168.0.0/16"]}', None, None, id="json-nested-repeat-is-not-top-level"),
    pytest.param('{"nonMasqueradeCIDRs": ["10.0.0.0/8"],\n "cidrLimit": 3,\n\n "nonMasqueradeCIDRs": ["192.168.0.0/16"]}',
                 ("192.168.0.0/16",),
                 ["nonMasqueradeCIDRs: given twice, at lines 1 and 4: only the last (line 4) is used, as the upstream "
                  "agent does; remove the others"], id="json"),
])
def test_a_repeated_key_keeps_the_last_and_is_warned_with_its_lines(text, cidrs, warnings):
    if warnings is None:  # the nested repeat makes masqLinkLocal invalid; the top-level repeat is still named
        error = problems_error(text)
        assert [str(w) for w in error.warnings] == [
            "nonMasqueradeCIDRs: given twice, at lines 1 and 3: only the last (line 3) is used, as the upstream "
            "agent does; remove the others"]
        return
    parsed = parse_config(text, V4)
    assert _repeat_warnings(parsed) == warnings
    if cidrs is not None:
        assert parsed.config.non_masquerade_cidrs == nets(*cidrs)
    else:
        assert len(parsed.config.non_masquerade_cidrs) == 300 and parsed.config.cidr_limit in (400, 500)


def problems_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, V4)
    return caught.value


def test_missing_config_files_are_named_once_and_their_appearance_logged(tmp_path):
    from structlog.testing import capture_logs

    path = tmp_path / "config"
    loader = ConfigLoader([FileInput(path)], V4)
    note = "no such file; the defaults apply (a missing config file is allowed, as for an optional ConfigMap)"
    assert loader.missing_at_start() == [(str(path), note)]
    with capture_logs() as logs:
        loader.load()
        assert loader.missing_files() == [(str(path), note)]
        loader.load()  # a resync: nothing logged again
        path.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
        loader.load()
        assert loader.missing_files() == []
    assert [(e["event"], e["path"]) for e in logs] == [("config file present now; its config applies", str(path))]
