"""The decision model's config keys (issue 16): parsing, every problem named, merging several
sources, and the RuleSet they give (flattening by longest prefix, per-family source lists).

The rules each backend renders from them are checked against a reference decision function in
``test_decision_properties.py``, and with real packets in ``test_netns_decisions.py``.
"""

from __future__ import annotations

import ipaddress

import anyio
import pytest

from masqd.config import AgentOptions, merge_configs, parse_config
from masqd.errors import ConfigError
from masqd.plan import plan_rules
from masqd.ruleset import compute_ruleset

V6 = AgentOptions(enable_ipv6=True)
net = ipaddress.ip_network
addr = ipaddress.ip_address


def config(text: str, options: AgentOptions = V6):
    return parse_config(text, options).config


def problems(text: str, options: AgentOptions = V6) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, options)
    return [str(problem) for problem in caught.value.problems]


def test_every_new_key_parses_into_typed_values():
    parsed = config(
        "masqueradeCIDRs: [10.99.0.0/16]\n"
        "masqueradeSourceCIDRs: [10.244.0.0/16, 'fd00:244::/64']\n"
        "nonMasqueradeSourceCIDRs: [10.244.9.0/24]\n"
        "snatToAddress: 192.0.2.10\n"
        "snatToAddressIPv6: '2001:db8::10'\n"
        "outputInterfaces: [eth0, ens+]\n"
    )
    assert parsed.masquerade_cidrs == (net("10.99.0.0/16"),)
    assert parsed.masquerade_source_cidrs == (net("10.244.0.0/16"), net("fd00:244::/64"))
    assert parsed.non_masquerade_source_cidrs == (net("10.244.9.0/24"),)
    assert parsed.snat_to_address == addr("192.0.2.10") and parsed.snat_to_address_ipv6 == addr("2001:db8::10")
    assert parsed.output_interfaces == ("eth0", "ens+")


def test_json_and_case_insensitive_keys_work_as_for_the_upstream_keys():
    parsed = parse_config('{"masqueradecidrs": ["10.99.0.0/16"], "snatToAddress": "192.0.2.10"}', V6)
    assert parsed.config.masquerade_cidrs == (net("10.99.0.0/16"),)
    assert [w.reason for w in parsed.warnings] == [
        "key matched 'masqueradeCIDRs' ignoring case (as the upstream agent does); spell it 'masqueradeCIDRs'"]


def test_a_typo_of_a_new_key_is_a_warning_with_a_suggestion():
    parsed = parse_config("masqueradeCidr: [10.99.0.0/16]\n", V6)
    assert parsed.config.masquerade_cidrs == ()
    assert "did you mean 'masqueradeCIDRs'?" in parsed.warnings[0].reason


@pytest.mark.parametrize("key", ["masqueradeCIDRs", "masqueradeSourceCIDRs", "nonMasqueradeSourceCIDRs"])
def test_null_cidr_list_is_an_empty_list(key):
    assert parse_config(f"{key}: null\n", V6).warnings == ()


@pytest.mark.parametrize("text, expected", [
    pytest.param("masqueradeCIDRs: [10.0.0.1/8]\n", "masqueradeCIDRs[0]: '10.0.0.1/8': ", id="misaligned"),
    pytest.param("masqueradeCIDRs: 10.0.0.0/8\n", "masqueradeCIDRs: '10.0.0.0/8': expected a list of CIDR strings",
                 id="not-a-list"),
    pytest.param("masqueradeSourceCIDRs: [junk]\n", "masqueradeSourceCIDRs[0]: 'junk': ", id="source-garbage"),
    pytest.param("nonMasqueradeSourceCIDRs: [42]\n", "nonMasqueradeSourceCIDRs[0]: 42: ", id="source-number"),
    pytest.param("snatToAddress: 192.0.2.10/32\n", "snatToAddress: '192.0.2.10/32': expected an IPv4 address such as "
                 "192.0.2.10 (no prefix length, no zone)", id="snat-cidr"),
    pytest.param("snatToAddress: '2001:db8::1'\n", "snatToAddress: '2001:db8::1': is an IPv6 address; this key takes "
                 "IPv4 (use snatToAddressIPv6 for IPv6)", id="snat-wrong-family"),
    pytest.param("snatToAddressIPv6: 192.0.2.1\n", "snatToAddressIPv6: '192.0.2.1': is an IPv4 address", id="snat6-v4"),
    pytest.param("snatToAddress: 127.0.0.1\n", "snatToAddress: '127.0.0.1': is a loopback address", id="loopback"),
    pytest.param("snatToAddress: 0.0.0.0\n", "snatToAddress: '0.0.0.0': is unspecified", id="unspecified"),
    pytest.param("snatToAddress: 224.0.0.1\n", "snatToAddress: '224.0.0.1': is a multicast address", id="multicast"),
    pytest.param("snatToAddress: 255.255.255.255\n", "is the broadcast address", id="broadcast"),
    pytest.param("snatToAddressIPv6: 'fe80::1'\n", "snatToAddressIPv6: 'fe80::1': is link-local", id="v6-link-local"),
    pytest.param("snatToAddressIPv6: 'fe80::1%eth0'\n", "expected an IPv6 address", id="v6-zone"),
    pytest.param("snatToAddress: 10\n", "snatToAddress: 10: expected an IPv4 address", id="snat-number"),
    pytest.param("outputInterfaces: eth0\n", "outputInterfaces: 'eth0': expected a list of interface names", id="ifaces-str"),
    pytest.param("outputInterfaces: [eth0123456789012]\n", "outputInterfaces[0]: 'eth0123456789012': expected an "
                 "interface name of 1-15", id="name-too-long"),
    pytest.param("outputInterfaces: ['eth 0']\n", "outputInterfaces[0]: 'eth 0'", id="name-space"),
    pytest.param("outputInterfaces: ['eth0/1']\n", "outputInterfaces[0]: 'eth0/1'", id="name-slash"),
    pytest.param("outputInterfaces: ['et\"h']\n", "outputInterfaces[0]: 'et\"h'", id="name-quote"),
    pytest.param("outputInterfaces: ['..']\n", "outputInterfaces[0]: '..'", id="name-dotdot"),
    pytest.param("outputInterfaces: ['eth+0']\n", "outputInterfaces[0]: 'eth+0'", id="plus-inside"),
    pytest.param("outputInterfaces: ['']\n", "outputInterfaces[0]: ''", id="empty-name"),
    pytest.param("outputInterfaces: [3]\n", "outputInterfaces[0]: 3", id="name-number"),
    pytest.param("outputInterfaces: ['-j']\n", "outputInterfaces[0]: '-j'", id="leading-dash"),
    pytest.param("outputInterfaces: ['-+']\n", "outputInterfaces[0]: '-+'", id="leading-dash-wildcard"),
])
def test_a_bad_value_of_a_new_key_is_named_with_what_is_valid(text, expected):
    assert any(problem.startswith(expected) or expected in problem for problem in problems(text)), problems(text)


def test_ipv6_values_need_enable_ipv6():
    found = problems("masqueradeCIDRs: ['fd00::/8']\nsnatToAddressIPv6: '2001:db8::10'\n", AgentOptions())
    assert found == [
        "masqueradeCIDRs[0]: 'fd00::/8': IPv6 CIDR given but IPv6 is not enabled; start masqd with --enable-ipv6",
        "snatToAddressIPv6: '2001:db8::10': IPv6 address given but IPv6 is not enabled; start masqd with --enable-ipv6",
    ]


def test_fifteen_characters_and_a_wildcard_of_fifteen_are_interface_names():
    assert config("outputInterfaces: [eth012345678901, eth01234567890+, 'bond0.100', 'veth@x']\n").output_interfaces == (
        "eth012345678901", "eth01234567890+", "bond0.100", "veth@x")


def test_the_same_prefix_kept_and_masqueraded_names_both_places():
    assert problems("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\nmasqueradeCIDRs: [192.0.2.0/24]\n") == [
        "masqueradeCIDRs[0]: '192.0.2.0/24': also listed in nonMasqueradeCIDRs[1]: a destination is either kept or "
        "masqueraded; remove it from one of the two lists"]


def plan_problems(*texts: str) -> str:
    """The error of planning the merged config of ``texts`` (sources a.yaml, b.yaml, ...)."""
    parts = [(f"{name}.yaml", config(text)) for name, text in zip("abc", texts)]
    with pytest.raises(ConfigError) as caught:
        anyio.run(plan_rules, merge_configs(parts, V6).config, V6, None, merge_configs(parts, V6))
    return str(caught.value)


def test_a_default_keep_entry_masqueraded_too_is_named_as_the_default():
    assert plan_problems("masqueradeCIDRs: [172.16.0.0/12]\n") == (
        "invalid config a.yaml: masqueradeCIDRs: '172.16.0.0/12': masqueraded by a.yaml (masqueradeCIDRs) and kept by "
        "the default nonMasqueradeCIDRs: a destination is either kept or masqueraded")


def test_masquerading_the_whole_link_local_range_asks_for_masqlinklocal():
    assert plan_problems("masqueradeCIDRs: [169.254.0.0/16]\n") == (
        "invalid config a.yaml: masqueradeCIDRs: '169.254.0.0/16': masqueraded by a.yaml (masqueradeCIDRs) and kept by "
        "the link-local default (masqLinkLocal: false; set masqLinkLocal: true to masquerade it): a destination is "
        "either kept or masqueraded")
    assert config("masqLinkLocal: true\nmasqueradeCIDRs: [169.254.0.0/16]\n").masquerade_cidrs == (net("169.254.0.0/16"),)


def test_another_source_replacing_the_defaults_is_no_conflict():
    a = config("nonMasqueradeCIDRs: [192.168.0.0/16]\n")
    b = config("masqueradeCIDRs: [10.0.0.0/8]\n")  # alone it would conflict with the default 10.0.0.0/8
    merged = merge_configs([("a.yaml", a), ("b.yaml", b)], V6)
    ruleset, _ = anyio.run(plan_rules, merged.config, V6, None, merged)
    assert ruleset.decide(addr("10.1.1.1")) is True and ruleset.decide(addr("192.168.1.1")) is False


def test_two_sources_keeping_and_masquerading_one_prefix_are_named():
    assert plan_problems("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "masqueradeCIDRs: [10.0.0.0/8]\n") == (
        "invalid config a.yaml, b.yaml: masqueradeCIDRs: '10.0.0.0/8': masqueraded by b.yaml (masqueradeCIDRs) and "
        "kept by a.yaml (nonMasqueradeCIDRs): a destination is either kept or masqueraded")


def test_the_same_source_in_both_source_lists_is_a_warning():
    warnings = parse_config("masqueradeSourceCIDRs: [10.0.0.0/8]\nnonMasqueradeSourceCIDRs: [10.0.0.0/8]\n", V6).warnings
    assert [(w.key, w.value, w.reason) for w in warnings if w.key == "nonMasqueradeSourceCIDRs"] == [
        ("nonMasqueradeSourceCIDRs", "10.0.0.0/8", "also listed in masqueradeSourceCIDRs: traffic from it is never "
                                                   "masqueraded")]


def test_every_source_in_masqueradesourcecidrs_is_the_same_as_no_list():
    rules = compute_ruleset(config("masqueradeSourceCIDRs: [0.0.0.0/0, 10.244.0.0/16]\n"), V6)
    assert rules.ipv4.masq_sources is None and rules.ipv6.masq_sources == ()


def test_null_output_interfaces_is_any_interface():
    assert parse_config("outputInterfaces: null\n", V6).warnings == ()
    assert config("outputInterfaces: ~\n").output_interfaces == ()


@pytest.mark.parametrize("key", ["nonMasqueradeCIDRs", "masqueradeCIDRs", "masqueradeSourceCIDRs",
                                 "nonMasqueradeSourceCIDRs"])
def test_cidr_limit_holds_for_each_list_on_its_own(key):
    three = "[192.0.2.0/26, 192.0.2.64/26, 192.0.2.128/26]"
    keep = "" if key == "nonMasqueradeCIDRs" else "nonMasqueradeCIDRs: [10.0.0.0/8]\n"  # the defaults are 3
    assert problems(f"cidrLimit: 2\n{keep}{key}: {three}\n") == [
        f"{key}: '3 CIDRs': at most cidrLimit=2 CIDRs are accepted (link-local not counted); remove CIDRs or raise "
        "cidrLimit"]
    text = ("cidrLimit: 3\nnonMasqueradeCIDRs: [192.0.2.0/26, 192.0.2.64/26, 192.0.2.128/26]\n"
            "masqueradeSourceCIDRs: [10.1.0.0/16, 10.2.0.0/16, 10.3.0.0/16]\n")
    assert config(text).cidr_limit == 3  # three in each list: each within the limit


def test_a_source_list_without_one_family_warns_that_family_is_never_masqueraded():
    warnings = parse_config("masqueradeSourceCIDRs: [10.244.0.0/16]\n", V6).warnings
    assert [w.reason for w in warnings] == [
        "lists no IPv6 source, so no IPv6 traffic is masqueraded; list the IPv6 pod ranges too"]
    assert parse_config("masqueradeSourceCIDRs: [10.244.0.0/16]\n", AgentOptions()).warnings == ()


def test_duplicates_in_a_new_list_are_a_warning():
    warnings = parse_config("masqueradeCIDRs: [10.99.0.0/16, 10.99.0.0/16]\noutputInterfaces: [eth0, eth0]\n", V6).warnings
    assert [(w.key, w.reason) for w in warnings] == [
        ("outputInterfaces[1]", "listed more than once; one entry is enough"),
        ("masqueradeCIDRs", "listed more than once; one entry is enough")]


# --- several config sources ---------------------------------------------------------------------------


def test_several_sources_union_the_lists_and_agree_on_one_snat_address():
    a = config("masqueradeCIDRs: [10.99.0.0/16]\noutputInterfaces: [eth0]\nsnatToAddress: 192.0.2.10\n")
    b = config("masqueradeCIDRs: [10.98.0.0/16, 10.99.0.0/16]\noutputInterfaces: [eth1, eth0]\n"
               "nonMasqueradeSourceCIDRs: [10.244.9.0/24]\nsnatToAddress: 192.0.2.10\n")
    merged = merge_configs([("a", a), ("b", b)], V6)
    assert merged.config.masquerade_cidrs == (net("10.99.0.0/16"), net("10.98.0.0/16"))
    assert merged.config.output_interfaces == ("eth0", "eth1")
    assert merged.config.non_masquerade_source_cidrs == (net("10.244.9.0/24"),)
    assert merged.config.snat_to_address == addr("192.0.2.10")
    assert merged.list_origins["masqueradeCIDRs"][net("10.99.0.0/16")] == ("a", "b")


def test_two_sources_with_different_snat_addresses_are_an_error_naming_both():
    a, b = config("snatToAddress: 192.0.2.10\n"), config("snatToAddress: 192.0.2.11\n")
    with pytest.raises(ConfigError) as caught:
        merge_configs([("/etc/a", a), ("configmap kube-system/b", b)], V6)
    assert str(caught.value) == (
        "invalid config /etc/a, configmap kube-system/b: snatToAddress: '192.0.2.10, 192.0.2.11': /etc/a sets "
        "192.0.2.10 and configmap kube-system/b sets 192.0.2.11: traffic can be rewritten to one address only; set it "
        "in one config source")


# --- the rule set ---------------------------------------------------------------------------------------


def test_an_override_inside_a_kept_range_flattens_only_that_range():
    rules = compute_ruleset(config("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nmasqueradeCIDRs: [10.0.0.0/9]\n"),
                            V6)
    # 192.168.0.0/16 and link-local are untouched and keep their place; 10.0.0.0/8 becomes its kept half
    assert rules.ipv4.nonmasq == (net("169.254.0.0/16"), net("192.168.0.0/16"), net("10.128.0.0/9"))
    assert rules.ipv4.listed == (net("169.254.0.0/16"), net("10.0.0.0/8"), net("192.168.0.0/16"))
    assert rules.ipv4.masq == (net("10.0.0.0/9"),)


def test_an_override_no_kept_range_holds_changes_no_rule():
    plain = compute_ruleset(config("nonMasqueradeCIDRs: [10.0.0.0/8]\n"), V6)
    rules = compute_ruleset(config("nonMasqueradeCIDRs: [10.0.0.0/8]\nmasqueradeCIDRs: [8.8.8.0/24, 0.0.0.0/0]\n"), V6)
    assert rules.ipv4.nonmasq == plain.ipv4.nonmasq and rules.ipv4.keep is None


@pytest.mark.parametrize("destination, masqueraded", [
    pytest.param("10.1.2.3", False, id="in-8-only"),
    pytest.param("10.99.1.1", True, id="in-16-override"),
    pytest.param("10.99.0.9", False, id="in-24-inside-the-override"),
    pytest.param("169.254.169.254", True, id="metadata"),
    pytest.param("169.254.1.1", False, id="other-link-local"),
    pytest.param("198.51.100.1", True, id="no-match"),
])
def test_the_longest_prefix_decides(destination, masqueraded):
    rules = compute_ruleset(config("nonMasqueradeCIDRs: [10.0.0.0/8, 10.99.0.0/24]\n"
                                   "masqueradeCIDRs: [10.99.0.0/16, 169.254.169.254/32]\n"), V6)
    assert rules.decide(addr(destination)) is masqueraded
    kept = any(addr(destination) in n for n in rules.ipv4.nonmasq)
    assert kept is not masqueraded  # the rules' destinations say the same


def test_source_lists_and_interfaces_decide_before_the_destination():
    rules = compute_ruleset(config("masqueradeSourceCIDRs: [10.244.0.0/16]\nnonMasqueradeSourceCIDRs: [10.244.9.0/24]\n"
                                   "outputInterfaces: [eth0, ens+]\n"), V6)
    out = addr("198.51.100.1")
    assert rules.decide(out, addr("10.244.1.2"), "eth0") is True
    assert rules.decide(out, addr("10.244.1.2"), "ens5") is True
    assert rules.decide(out, addr("10.244.1.2"), "eth1") is False
    assert rules.decide(out, addr("10.244.9.2"), "eth0") is False  # nonMasqueradeSourceCIDRs
    assert rules.decide(out, addr("10.1.1.1"), "eth0") is False  # not in masqueradeSourceCIDRs
    assert rules.ipv6.masq_sources == () and not rules.ipv6.masquerades_any  # lists no IPv6 source
    assert rules.decide(addr("2001:db8::1"), addr("fd00::1"), "eth0") is False
