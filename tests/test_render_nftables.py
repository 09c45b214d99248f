"""The nftables backend, pure: golden nft scripts, the read-back model, CIDR collapse, the
``--to-ports`` split, and ``sync`` against :class:`~masqd.testing.fake_nft.FakeNft`, an in-memory
nft that tracks what the tables hold and lists them as the real kernel does (checked here against
the kernel's own listings).

The golden scripts in ``tests/golden/nftables/`` cover the same configs and flags as the iptables
golden tests (there is no "random-fully unsupported by the binary" case: every nft has
``fully-random``; and ``--masq-chain`` names an iptables chain, so it does not change the nft
script). Each was read against the issue's rule description and loaded with ``nft -f`` into a
throw-away namespace (nft 1.0.6): all are accepted, and ``nft list`` prints them back unchanged
but for whitespace. The ``listing_*.json`` files are what that kernel printed for
``nft --json list table`` after loading them (``capture_listings.py`` says how, and regenerates
them); ``drift_*`` ones were captured after changing the table by hand.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from masqd.backends.nftables import (
    NftablesBackend,
    desired_state,
    intervals_of,
    parse_listing,
    render_replace,
    render_table,
)
from masqd.config import AgentOptions, parse_config, parse_to_ports
from masqd.errors import ApplyError, BackendError
from masqd.ruleset import compute_ruleset
from masqd.testing.fake_nft import FakeNft

GOLDEN = Path(__file__).parent / "golden" / "nftables"
ONLY_10 = "nonMasqueradeCIDRs: [10.0.0.0/8]\n"
IPV6_CONFIG = 'nonMasqueradeCIDRs: [10.0.0.0/8, "fd00::/8", 192.168.0.0/16, "2001:db8::/32"]\n'
TWO_RANGES = "1024-29999,32768-65535"


def golden(name: str) -> str:
    return (GOLDEN / f"{name}.txt").read_text()


def listing(name: str) -> str:
    return (GOLDEN / f"listing_{name}.json").read_text()


def ruleset_for(config_text: str | None, options: AgentOptions):
    return compute_ruleset(parse_config(config_text, options).config, options)


def desired(config_text: str | None, options: AgentOptions, family: int = 4):
    ruleset = ruleset_for(config_text, options)
    (rules,) = [f for f in ruleset.families if f.family == family]
    return desired_state(rules, ruleset.masquerade)


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def v6(text: str) -> int:
    return int(ipaddress.IPv6Address(text))


# --- golden scripts --------------------------------------------------------------------------------

GOLDEN_CASES = [
    pytest.param("defaults", None, AgentOptions(), id="defaults"),
    pytest.param("nomasq_all_reserved_ranges", None, AgentOptions(nomasq_all_reserved_ranges=True),
                 id="nomasq-all-reserved-ranges"),
    pytest.param("ipv6", IPV6_CONFIG, AgentOptions(enable_ipv6=True), id="ipv6-enabled-with-v6-cidrs"),
    pytest.param("masq_link_local", "masqLinkLocal: true\n", AgentOptions(), id="masqLinkLocal"),
    pytest.param("masq_link_local_ipv6", 'masqLinkLocalIPv6: true\nnonMasqueradeCIDRs: [10.0.0.0/8, "fd00::/8"]\n',
                 AgentOptions(enable_ipv6=True), id="masqLinkLocalIPv6"),
    pytest.param("defaults", None, AgentOptions(masq_chain="MASQD-EGRESS"), id="custom-chain-changes-nothing"),
    pytest.param("random_fully_false", None, AgentOptions(random_fully=False), id="random-fully-false"),
    pytest.param("to_ports_one_range", ONLY_10, AgentOptions(to_ports=parse_to_ports("32768-65535")),
                 id="to-ports-one-range"),
    pytest.param("to_ports_two_ranges", ONLY_10, AgentOptions(to_ports=parse_to_ports(TWO_RANGES)),
                 id="to-ports-two-unequal-ranges"),
    pytest.param("to_ports_two_ranges_no_random_fully", ONLY_10,
                 AgentOptions(to_ports=parse_to_ports(TWO_RANGES), random_fully=False),
                 id="to-ports-two-ranges-random-fully-false"),
    pytest.param("to_ports_three_ranges", ONLY_10,
                 AgentOptions(to_ports=parse_to_ports("1000-1999,3000-3499,5000-5249")), id="to-ports-three-ranges"),
    pytest.param("to_ports_single_port", ONLY_10, AgentOptions(to_ports=parse_to_ports("8000")),
                 id="to-ports-single-port"),
]


@pytest.mark.parametrize(("name", "config_text", "options"), GOLDEN_CASES)
def test_render_matches_golden(name, config_text, options):
    assert NftablesBackend().render(ruleset_for(config_text, options)) == golden(name)


def test_masqd_render_prints_the_golden_script(tmp_path, capsys):
    from masqd.cli import main

    config = tmp_path / "config"
    config.write_text(IPV6_CONFIG)
    assert main(["render", "--backend", "nftables", "--enable-ipv6", "--config", str(config)]) == 0
    assert capsys.readouterr().out == golden("ipv6")


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.txt")))
def test_every_golden_replaces_each_table_whole_in_one_script(name):
    """The atomic idiom per family: ``add table`` (so the ``delete`` cannot fail on a kernel
    without the table), ``delete table``, then the whole definition; IPv4 first."""
    text = golden(name)
    headers = [line for line in text.splitlines() if not line.startswith(("\t", "}"))]
    families = ["ip", "ip6"] if "ip6" in text else ["ip"]
    assert headers == [line for f in families
                       for line in (f"add table {f} masqd", f"delete table {f} masqd", f"table {f} masqd {{")]
    assert text.count("type nat hook postrouting priority srcnat + 10; policy accept;") == len(families)


def test_ipv6_table_uses_ip6_matches_and_its_own_set():
    text = golden("ipv6")
    ip6 = text[text.index("table ip6 masqd {"):]
    assert "ip6 daddr @nonmasq6 return" in ip6 and "type ipv6_addr" in ip6
    assert "nonmasq4" not in ip6 and "ip daddr" not in ip6


def test_empty_set_has_no_elements_line():
    text = NftablesBackend().render(ruleset_for("nonMasqueradeCIDRs: []\nmasqLinkLocal: true\n", AgentOptions()))
    assert "elements" not in text
    assert "\t\tflags interval\n" in text


# --- read-back: JSON from a real kernel parses into the model the renderer uses ----------------------

ROUND_TRIPS = [
    pytest.param("defaults_ip", None, AgentOptions(), 4, id="defaults"),
    pytest.param("ipv6_ip", IPV6_CONFIG, AgentOptions(enable_ipv6=True), 4, id="ipv6-config-ip-table"),
    pytest.param("ipv6_ip6", IPV6_CONFIG, AgentOptions(enable_ipv6=True), 6, id="ipv6-config-ip6-table"),
    pytest.param("masq_link_local_ip", "masqLinkLocal: true\n", AgentOptions(), 4, id="masqLinkLocal"),
    pytest.param("to_ports_two_ranges_ip", ONLY_10, AgentOptions(to_ports=parse_to_ports(TWO_RANGES)), 4,
                 id="to-ports-numgen-port-range-fully-random"),
    pytest.param("to_ports_two_ranges_no_random_fully_ip", ONLY_10,
                 AgentOptions(to_ports=parse_to_ports(TWO_RANGES), random_fully=False), 4, id="to-ports-no-flags"),
    pytest.param("to_ports_single_port_ip", ONLY_10, AgentOptions(to_ports=parse_to_ports("8000")), 4,
                 id="to-ports-single-port"),
    pytest.param("everything_ip", 'nonMasqueradeCIDRs: [0.0.0.0/0, "::/0"]\n', AgentOptions(enable_ipv6=True), 4,
                 id="v4-everything"),
    pytest.param("everything_ip6", 'nonMasqueradeCIDRs: [0.0.0.0/0, "::/0"]\n', AgentOptions(enable_ipv6=True), 6,
                 id="v6-everything"),
    pytest.param("merged_ip", "nonMasqueradeCIDRs: [11.0.0.0/8, 12.0.0.0/8, 192.0.2.1/32, 192.0.2.2/32, "
                 "192.0.2.3/32, 10.1.0.0/16, 10.0.0.0/8]\nmasqLinkLocal: true\n", AgentOptions(), 4,
                 id="merged-adjacent-and-single-address-elements"),
    pytest.param("mapped_ip6", 'nonMasqueradeCIDRs: ["::ffff:192.0.2.0/120", "::ffff:192.0.3.0/120", '
                 '"::192.0.2.0/120", "2001:db8::1/128"]\nmasqLinkLocalIPv6: true\n', AgentOptions(enable_ipv6=True), 6,
                 id="v6-ipv4-mapped-and-compatible"),
]


@pytest.mark.parametrize(("fixture", "config_text", "options", "family"), ROUND_TRIPS)
def test_kernel_listing_parses_to_the_desired_state(fixture, config_text, options, family):
    assert parse_listing(listing(fixture), family) == desired(config_text, options, family)


def test_listing_model_holds_what_the_kernel_showed():
    state = parse_listing(listing("to_ports_two_ranges_ip"), 4)
    assert state.chain == ("nat", "postrouting", 110, "accept")
    assert state.set_type == "ipv4_addr"
    assert state.intervals == ((v4("10.0.0.0"), v4("10.255.255.255")), (v4("169.254.0.0"), v4("169.254.255.255")))
    assert len(state.rules) == 2 + 3 * 2 + 1


def test_listing_without_a_table_is_none():
    empty = {"nftables": [json.loads(listing("defaults_ip"))["nftables"][0]]}  # metainfo only
    assert parse_listing(json.dumps(empty), 4) is None


def _objects(text: str) -> dict:
    return json.loads(text)


def _elements(doc: dict) -> list:
    (body,) = [o["set"] for o in doc["nftables"] if "set" in o]
    return body["elem"]


def _rules(doc: dict) -> list[dict]:
    return [o["rule"] for o in doc["nftables"] if "rule" in o]


def _chain(doc: dict) -> dict:
    (body,) = [o["chain"] for o in doc["nftables"] if "chain" in o]
    return body


def _prefix(addr: str, length: int) -> dict:
    return {"prefix": {"addr": addr, "len": length}}


# Changes that mean the same table: the model compares address intervals, not how nft spells them.
def _shuffled(doc):
    _elements(doc).reverse()


def _handles_renumbered(doc):
    for obj in doc["nftables"]:
        body = next(iter(obj.values()))
        if "handle" in body:
            body["handle"] += 100


def _prefix_as_range(doc):
    elements = _elements(doc)
    elements[elements.index(_prefix("10.0.0.0", 8))] = {"range": ["10.0.0.0", "10.255.255.255"]}


def _prefix_split_in_adjacent_halves(doc):
    elements = _elements(doc)
    elements.remove(_prefix("10.0.0.0", 8))
    elements += [_prefix("10.0.0.0", 9), _prefix("10.128.0.0", 9)]


def _element_with_comment(doc):
    elements = _elements(doc)
    at = elements.index(_prefix("10.0.0.0", 8))
    elements[at] = {"elem": {"val": elements[at], "comment": "noted"}}


@pytest.mark.parametrize("change", [
    pytest.param(_shuffled, id="elements-in-another-order"),
    pytest.param(_handles_renumbered, id="handles-renumbered"),
    pytest.param(_prefix_as_range, id="prefix-listed-as-range"),
    pytest.param(_prefix_split_in_adjacent_halves, id="prefix-listed-as-two-adjacent-halves"),
    pytest.param(_element_with_comment, id="element-with-options"),
])
def test_equivalent_listings_compare_equal(change):
    doc = _objects(listing("defaults_ip"))
    change(doc)
    assert doc != _objects(listing("defaults_ip"))
    assert parse_listing(json.dumps(doc), 4) == desired(None, AgentOptions())


# --- drift: anything masqd did not write makes the read-back differ ---------------------------------


@pytest.mark.parametrize(("fixture", "reason"), [
    pytest.param("drift_element_deleted_ip", "set elements", id="element-deleted"),
    pytest.param("drift_range_element_added_ip", "set elements", id="range-element-added"),
    pytest.param("drift_set_flushed_ip", "set elements", id="set-flushed"),
    pytest.param("drift_foreign_rule_inserted_ip", "rules", id="foreign-rule-inserted"),
    pytest.param("drift_counter_rule_added_ip", "rules", id="counter-rule-appended"),
    pytest.param("drift_chain_flushed_ip", "rules", id="chain-flushed"),
    pytest.param("drift_policy_drop_ip", "chain", id="chain-policy-drop"),
    pytest.param("drift_chain_priority_ip", "chain", id="chain-priority-srcnat-minus-1"),
])
def test_kernel_drift_is_seen(fixture, reason):
    from masqd.backends.nftables.live import why_rewritten

    want = desired(None, AgentOptions())
    got = parse_listing(listing(fixture), 4)
    assert got != want
    assert reason in why_rewritten(got, want)


def test_extra_chain_in_masqds_table_is_seen():
    assert parse_listing(listing("drift_extra_chain_ip"), 4) != desired(None, AgentOptions())


def test_dormant_table_is_seen():
    # nft 1.0.6 prints the dormant flag of a table as "flags": "ip" in JSON (its own quirk)
    assert json.loads(listing("drift_table_dormant_ip"))["nftables"][1]["table"]["flags"] == "ip"
    assert parse_listing(listing("drift_table_dormant_ip"), 4) != desired(None, AgentOptions())


def _drop_element(doc):
    _elements(doc).pop(0)


def _add_element(doc):
    _elements(doc).append(_prefix("192.0.2.0", 24))


def _widen_element(doc):
    _elements(doc)[0]["prefix"]["len"] = 7


def _extra_rule(doc):
    rule = copy.deepcopy(_rules(doc)[0])
    rule["handle"] = 99
    doc["nftables"].append({"rule": rule})


def _drop_rule(doc):
    doc["nftables"].remove({"rule": _rules(doc)[0]})


def _swap_returns(doc):
    first, second = _rules(doc)[:2]
    first["expr"], second["expr"] = second["expr"], first["expr"]


def _chain_field(field, value):
    def change(doc):
        _chain(doc)[field] = value
    return change


def _drop_chain(doc):
    doc["nftables"] = [o for o in doc["nftables"] if "chain" not in o]


def _drop_set(doc):
    doc["nftables"] = [o for o in doc["nftables"] if "set" not in o]


def _set_without_interval_flag(doc):
    (body,) = [o["set"] for o in doc["nftables"] if "set" in o]
    del body["flags"]


def _set_type(doc):
    (body,) = [o["set"] for o in doc["nftables"] if "set" in o]
    body["type"] = "ipv6_addr"


def _counter_before_return(doc):
    _rules(doc)[1]["expr"].insert(1, {"counter": {"packets": 0, "bytes": 0}})


def _unknown_expression(doc):
    _rules(doc)[0]["expr"][0] = {"frobnicate": {"left": 1}}


def _masquerade_flags(flags):
    def change(doc):
        masquerade = _rules(doc)[-1]["expr"][-1]
        if flags is None:
            masquerade["masquerade"] = None
        else:
            masquerade["masquerade"] = {"flags": flags}
    return change


def _return_becomes_accept(doc):
    _rules(doc)[1]["expr"][-1] = {"accept": None}


def _other_set_referenced(doc):
    _rules(doc)[1]["expr"][0]["match"]["right"] = "@other"


def _negated_set_match(doc):
    _rules(doc)[1]["expr"][0]["match"]["op"] = "!="


def _saddr_not_daddr(doc):
    _rules(doc)[1]["expr"][0]["match"]["left"]["payload"]["field"] = "saddr"


def _fib_flags(doc):
    _rules(doc)[0]["expr"][0]["match"]["left"]["fib"]["flags"] = ["daddr", "iif"]


def _fib_result(doc):
    _rules(doc)[0]["expr"][0]["match"]["right"] = "unicast"


def _rule_moved_to_other_chain(doc):
    _rules(doc)[0]["chain"] = "other"


MUTATIONS = [
    pytest.param(_drop_element, id="element-removed"),
    pytest.param(_add_element, id="element-added"),
    pytest.param(_widen_element, id="element-widened"),
    pytest.param(_extra_rule, id="extra-rule"),
    pytest.param(_drop_rule, id="rule-removed"),
    pytest.param(_swap_returns, id="rules-reordered"),
    pytest.param(_chain_field("prio", 0), id="chain-priority-changed"),
    pytest.param(_chain_field("hook", "output"), id="chain-hook-changed"),
    pytest.param(_chain_field("type", "filter"), id="chain-type-changed"),
    pytest.param(_chain_field("policy", "drop"), id="chain-policy-drop"),
    pytest.param(_drop_chain, id="chain-missing"),
    pytest.param(_drop_set, id="set-missing"),
    pytest.param(_set_without_interval_flag, id="set-without-interval-flag"),
    pytest.param(_set_type, id="set-type-changed"),
    pytest.param(_counter_before_return, id="counter-added-to-rule"),
    pytest.param(_unknown_expression, id="unknown-expression"),
    pytest.param(_masquerade_flags(None), id="masquerade-without-fully-random"),
    pytest.param(_masquerade_flags("random"), id="masquerade-random-not-fully-random"),
    pytest.param(_masquerade_flags(["fully-random", "persistent"]), id="masquerade-extra-flag"),
    pytest.param(_return_becomes_accept, id="return-becomes-accept"),
    pytest.param(_other_set_referenced, id="other-set-referenced"),
    pytest.param(_negated_set_match, id="negated-set-match"),
    pytest.param(_saddr_not_daddr, id="saddr-instead-of-daddr"),
    pytest.param(_fib_flags, id="fib-extra-flag"),
    pytest.param(_fib_result, id="fib-result-changed"),
    pytest.param(_rule_moved_to_other_chain, id="rule-in-other-chain"),
]


@pytest.mark.parametrize("change", MUTATIONS)
def test_changed_listing_differs_from_desired(change):
    doc = _objects(listing("defaults_ip"))
    change(doc)
    assert doc != _objects(listing("defaults_ip")), "the mutation changed nothing"
    assert parse_listing(json.dumps(doc), 4) != desired(None, AgentOptions())


def _port_rule_numgen(modulus, below):
    def change(doc):
        for rule in _rules(doc):
            for item in rule["expr"]:
                numgen = item.get("match", {}).get("left", {}).get("numgen")
                if numgen is not None:
                    numgen.update(modulus)
                    if below is not None:
                        item["match"]["right"] = below
    return change


def _port_range(doc):
    _rules(doc)[2]["expr"][-1]["masquerade"]["port"]["range"][1] = 29998


def _protocol(doc):
    _rules(doc)[2]["expr"][0]["match"]["right"] = "udp"


@pytest.mark.parametrize("change", [
    pytest.param(_port_rule_numgen({"mod": 61743}, None), id="numgen-modulus"),
    pytest.param(_port_rule_numgen({}, 28975), id="numgen-threshold"),
    pytest.param(_port_rule_numgen({"offset": 1}, None), id="numgen-offset"),
    pytest.param(_port_rule_numgen({"mode": "inc"}, None), id="numgen-inc-not-random"),
    pytest.param(_port_range, id="port-range"),
    pytest.param(_protocol, id="protocol"),
])
def test_changed_port_rules_differ_from_desired(change):
    doc = _objects(listing("to_ports_two_ranges_ip"))
    change(doc)
    assert doc != _objects(listing("to_ports_two_ranges_ip"))
    assert parse_listing(json.dumps(doc), 4) != desired(ONLY_10, AgentOptions(to_ports=parse_to_ports(TWO_RANGES)))


# --- CIDR collapse --------------------------------------------------------------------------------

def _nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(("cidrs", "intervals"), [
    pytest.param(("10.0.0.0/8", "10.1.0.0/16"), [("10.0.0.0", "10.255.255.255")], id="contained"),
    pytest.param(("10.1.0.0/16", "10.0.0.0/8"), [("10.0.0.0", "10.255.255.255")], id="contained-listed-first"),
    pytest.param(("10.0.0.0/8", "11.0.0.0/8"), [("10.0.0.0", "11.255.255.255")], id="adjacent"),
    pytest.param(("11.0.0.0/8", "12.0.0.0/8"), [("11.0.0.0", "12.255.255.255")], id="adjacent-not-one-cidr"),
    pytest.param(("192.0.2.0/24", "192.0.2.0/24"), [("192.0.2.0", "192.0.2.255")], id="duplicate"),
    pytest.param(("192.0.2.0/25", "192.0.2.128/26", "192.0.2.192/26"), [("192.0.2.0", "192.0.2.255")],
                 id="three-pieces-make-a-block"),
    pytest.param(("192.0.2.0/25", "192.0.2.192/26"), [("192.0.2.0", "192.0.2.127"), ("192.0.2.192", "192.0.2.255")],
                 id="gap-kept"),
    pytest.param(("198.51.100.0/24", "10.0.0.0/8", "0.0.0.0/0"), [("0.0.0.0", "255.255.255.255")],
                 id="everything-swallows-the-rest"),
    pytest.param(("255.255.255.255/32", "0.0.0.0/32"), [("0.0.0.0", "0.0.0.0"), ("255.255.255.255", "255.255.255.255")],
                 id="extremes"),
    pytest.param((), [], id="empty"),
])
def test_ipv4_intervals_are_merged(cidrs, intervals):
    assert intervals_of(_nets(*cidrs)) == tuple((v4(a), v4(b)) for a, b in intervals)


@pytest.mark.parametrize(("cidrs", "intervals"), [
    pytest.param(("2001:db8::/33", "2001:db8:8000::/33"), [("2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")],
                 id="adjacent-halves"),
    pytest.param(("::/0", "fe80::/10"), [("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")], id="everything"),
    pytest.param(("::ffff:192.0.2.0/120", "::ffff:192.0.3.0/120"), [("::ffff:192.0.2.0", "::ffff:192.0.3.255")],
                 id="ipv4-mapped-adjacent"),
    pytest.param(("::ffff:192.0.2.0/120", "::192.0.2.0/120"),
                 [("::192.0.2.0", "::192.0.2.255"), ("::ffff:192.0.2.0", "::ffff:192.0.2.255")],
                 id="mapped-and-compatible-are-different-addresses"),
])
def test_ipv6_intervals_are_merged(cidrs, intervals):
    assert intervals_of(_nets(*cidrs)) == tuple((v6(a), v6(b)) for a, b in intervals)


def _elements_line(text: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith("\t\telements = { ")]
    return line.removeprefix("\t\telements = { ").removesuffix(" }").split(", ")


@pytest.mark.parametrize(("config", "family", "elements"), [
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8, 11.0.0.0/8, 10.9.0.0/16]\nmasqLinkLocal: true\n", 4,
                 ["10.0.0.0/7"], id="adjacent-blocks-become-one-cidr"),
    pytest.param("nonMasqueradeCIDRs: [11.0.0.0/8, 12.0.0.0/8]\nmasqLinkLocal: true\n", 4,
                 ["11.0.0.0/8", "12.0.0.0/8"], id="merged-range-that-is-no-cidr-as-fewest-cidrs"),
    pytest.param("nonMasqueradeCIDRs: [192.0.2.1/32, 192.0.2.2/32, 192.0.2.3/32]\nmasqLinkLocal: true\n", 4,
                 ["192.0.2.1/32", "192.0.2.2/31"], id="unaligned-range"),
    pytest.param("nonMasqueradeCIDRs: [0.0.0.0/0, 10.0.0.0/8]\n", 4, ["0.0.0.0/0"], id="v4-everything"),
    pytest.param('nonMasqueradeCIDRs: ["::/0", "2001:db8::/32"]\n', 6, ["::/0"], id="v6-everything"),
    pytest.param('nonMasqueradeCIDRs: ["::ffff:192.0.2.0/120", "::ffff:192.0.3.0/120", 192.0.2.0/24]\n'
                 'masqLinkLocalIPv6: true\n', 6, ["::ffff:192.0.2.0/119"], id="ipv4-mapped-stays-ipv6"),
])
def test_set_elements_are_the_fewest_cidrs(config, family, elements):
    text = render_table(desired(config, AgentOptions(enable_ipv6=True), family))
    # the address may be spelt either way (``::ffff:c000:200`` or ``::ffff:192.0.2.0``): nft reads both
    assert [ipaddress.ip_network(e) for e in _elements_line(text)] == [ipaddress.ip_network(e) for e in elements]


def test_ipv4_mapped_cidr_never_reaches_the_ipv4_set():
    ruleset = ruleset_for('nonMasqueradeCIDRs: ["::ffff:192.0.2.0/120"]\nmasqLinkLocal: true\n',
                          AgentOptions(enable_ipv6=True))
    assert desired_state(ruleset.ipv4, ruleset.masquerade).intervals == ()
    assert desired_state(ruleset.ipv6, ruleset.masquerade).intervals[0] == (v6("::ffff:192.0.2.0"), v6("::ffff:192.0.2.255"))


# --- --to-ports: the numgen split ------------------------------------------------------------------

_PORT_LINE = re.compile(
    r"meta l4proto (?P<proto>\w+)(?: numgen random mod (?P<mod>\d+) < (?P<below>\d+))? masquerade "
    r"to :(?P<first>\d+)(?:-(?P<last>\d+))?(?P<fr> fully-random)?"
)


@pytest.mark.parametrize(("to_ports", "intervals"), [
    pytest.param("8000", [(8000, 8000)], id="single-port"),
    pytest.param("32768-65535", [(32768, 65535)], id="one-range"),
    pytest.param("1024-29999,32768-65535", [(1024, 29999), (32768, 65535)], id="two-unequal-ranges"),
    pytest.param("32768-65535,1024-29999", [(32768, 65535), (1024, 29999)], id="two-ranges-high-first"),
    pytest.param("1000-1999,3000-3499,5000-5249", [(1000, 1999), (3000, 3499), (5000, 5249)], id="three-ranges"),
    pytest.param("5000,6000,7000", [(5000, 5000), (6000, 6000), (7000, 7000)], id="three-single-ports"),
    pytest.param("2000-2009,3000", [(2000, 2009), (3000, 3000)], id="range-then-single-port"),
])
@pytest.mark.parametrize("random_fully", [True, False], ids=["fully-random", "no-fully-random"])
def test_to_ports_split_is_exact(to_ports, intervals, random_fully):
    options = AgentOptions(to_ports=parse_to_ports(to_ports), random_fully=random_fully)
    text = render_table(desired(ONLY_10, options))
    chain = text[text.index("\tchain nat {"):]
    rules = [line.strip() for line in chain.splitlines()[3:-2]]  # after comment, type; before the closing braces
    assert rules[:2] == ["fib daddr type local return", "ip daddr @nonmasq4 return"]
    rules = rules[2:]
    assert rules[-1] == ("masquerade fully-random" if random_fully else "masquerade")  # catch-all last
    port_rules = [_PORT_LINE.fullmatch(line) for line in rules[:-1]]
    assert all(port_rules), rules
    sizes = [last - first + 1 for first, last in intervals]
    expected = []
    for protocol in ("tcp", "udp", "sctp"):
        for index, (first, last) in enumerate(intervals):
            final = index == len(intervals) - 1
            # taken when numgen random mod M < K: M = ports in this and every later interval, K = this size
            expected.append((protocol, None if final else sum(sizes[index:]), None if final else sizes[index],
                             first, last, random_fully))
    got = [(m["proto"], m["mod"] and int(m["mod"]), m["below"] and int(m["below"]), int(m["first"]),
            int(m["last"] or m["first"]), bool(m["fr"])) for m in port_rules]
    assert got == expected
    # every interval is chosen with probability size / total: ports are spread evenly
    total = sum(sizes)
    left = Fraction(1)
    for _, modulus, below, first, last, _ in got[:len(intervals)]:
        take = Fraction(1) if modulus is None else Fraction(below, modulus)
        assert left * take == Fraction(last - first + 1, total)
        left *= 1 - take
    assert left == 0


def test_to_ports_split_matches_the_iptables_probabilities():
    options = AgentOptions(to_ports=parse_to_ports("1000-1999,3000-3499,5000-5249"))
    masquerade = ruleset_for(ONLY_10, options).masquerade
    rules = desired(ONLY_10, options).rules[2:-1]
    for protocol_rules in (rules[0:3], rules[3:6], rules[6:9]):
        for rule, share in zip(protocol_rules, masquerade.port_shares(), strict=True):
            assert (rule.ports == (share.ports.first, share.ports.last))
            assert (None if rule.modulus is None else Fraction(rule.below, rule.modulus)) == share.probability


# --- the fake nft: it lists what the kernel lists, and tracks what it holds --------------------------

#: The captures of ``capture_listings.py`` that load a script and edit nothing, in the order it ran
#: them (table handles are numbered across the whole run): name -> (config, options, families listed).
KERNEL_CAPTURES = [
    ("defaults", None, AgentOptions(), ("ip",)),
    ("ipv6", IPV6_CONFIG, AgentOptions(enable_ipv6=True), ("ip", "ip6")),
    ("masq_link_local", "masqLinkLocal: true\n", AgentOptions(), ("ip",)),
    ("to_ports_two_ranges", ONLY_10, AgentOptions(to_ports=parse_to_ports(TWO_RANGES)), ("ip",)),
    ("to_ports_two_ranges_no_random_fully", ONLY_10,
     AgentOptions(to_ports=parse_to_ports(TWO_RANGES), random_fully=False), ("ip",)),
    ("to_ports_single_port", ONLY_10, AgentOptions(to_ports=parse_to_ports("8000")), ("ip",)),
    ("everything", 'nonMasqueradeCIDRs: [0.0.0.0/0, "::/0"]\n', AgentOptions(enable_ipv6=True), ("ip", "ip6")),
    ("merged", "nonMasqueradeCIDRs: [11.0.0.0/8, 12.0.0.0/8, 192.0.2.1/32, 192.0.2.2/32, 192.0.2.3/32, "
     "10.1.0.0/16, 10.0.0.0/8]\nmasqLinkLocal: true\n", AgentOptions(), ("ip",)),
    ("mapped", 'nonMasqueradeCIDRs: ["::ffff:192.0.2.0/120", "::ffff:192.0.3.0/120", "::192.0.2.0/120", '
     '"2001:db8::1/128"]\nmasqLinkLocalIPv6: true\n', AgentOptions(enable_ipv6=True), ("ip6",)),
]


def test_the_fake_lists_masqds_scripts_byte_for_byte_as_the_kernel_did():
    """Each script loaded into the fake, as capture_listings.py loaded it into a namespace (the
    tables of the previous one flushed first), lists exactly as nft 1.0.6 printed it."""
    nft = FakeNft()
    for name, config_text, options, families in KERNEL_CAPTURES:
        nft.run("".join(f"delete table {family} {table}\n" for family, table in nft.tables))  # flush ruleset
        nft.run(NftablesBackend().render(ruleset_for(config_text, options)))
        for family in families:
            assert nft.listing(family) == listing(f"{name}_{family}"), (name, family)


@pytest.mark.parametrize("fixture", sorted(p.stem.removeprefix("listing_") for p in GOLDEN.glob("listing_*.json")))
def test_the_fake_holds_any_kernel_listing_as_it_was_printed(fixture):
    """A kernel's state, loaded into the fake (drift as someone left it), lists unchanged."""
    nft = FakeNft()
    nft.load_listing(listing(fixture))
    assert nft.listing("ip6" if fixture.endswith("_ip6") else "ip") == listing(fixture)


async def test_the_fakes_terse_listing_has_every_table_without_set_elements():
    nft = FakeNft()
    await NftablesBackend(nft).sync(ruleset_for(IPV6_CONFIG, AgentOptions(enable_ipv6=True)))
    terse = json.loads(nft.ruleset_listing(terse=True))["nftables"]
    full = [item for family in ("ip", "ip6") for item in json.loads(nft.listing(family))["nftables"][1:]]
    for item in full:
        item.get("set", {}).pop("elem", None)
    assert terse == [json.loads(nft.listing("ip"))["nftables"][0], *full]
    assert parse_listing(nft.ruleset_listing(terse=True), 6).intervals == ()


#: Put before each refused part: a change the refusal must undo (the whole script or nothing).
_UNDONE = "delete table ip masqd\nadd table ip other\n"


@pytest.mark.parametrize(("script", "line", "error"), [
    pytest.param("delete table ip6 masqd\n", "delete table ip6 masqd",
                 "/dev/stdin:3:18-22: Error: Could not process rule: No such file or directory", id="delete-missing"),
    pytest.param("flush ruleset\n", "flush ruleset",
                 "/dev/stdin:3:1-5: Error: syntax error, unexpected flush", id="statement-masqd-does-not-write"),
    pytest.param("table ip masqd {\n\tset s {\n\t\ttype ipv4_addr\n\t\tflags interval\n"
                 "\t\telements = { 10.0.0.0/8, 10.1.0.0/16 }\n\t}\n}\n", "\t\telements = { 10.0.0.0/8, 10.1.0.0/16 }",
                 "/dev/stdin:7:28-38: Error: conflicting intervals specified", id="overlapping-elements"),
    pytest.param("table ip masqd {\n\tchain nat {\n\t\tip daddr @nosuchset return\n\t}\n}\n",
                 "\t\tip daddr @nosuchset return", "/dev/stdin:5:12-21: Error: No such file or directory",
                 id="missing-set"),
    pytest.param("table ip6 masqd {\n\tset s {\n\t\ttype ipv6_addr\n\t\telements = { 10.0.0.0/8 }\n\t}\n}\n",
                 "\t\telements = { 10.0.0.0/8 }", "/dev/stdin:6:16-25: Error: fake nft: ", id="element-of-another-family"),
    pytest.param("table ip other {\n}\n", "table ip other {", "/dev/stdin:3:10-14: Error: fake nft: table ip other "
                 "exists", id="block-for-a-table-that-exists"),
])
async def test_the_fake_refuses_a_script_as_nft_does_and_changes_nothing(script, line, error):
    nft = FakeNft()
    await NftablesBackend(nft).sync(ruleset_for(None, AgentOptions()))
    before = nft.listing("ip")
    with pytest.raises(ApplyError) as caught:
        await nft.apply(_UNDONE + script)
    assert caught.value.stderr.startswith(error) and caught.value.line == line
    assert caught.value.command == ["nft", "-f", "-"]
    assert nft.listing("ip") == before and set(nft.tables) == {("ip", "masqd")}


def _random_cidrs(rng: random.Random, count: int, family: int) -> set[str]:
    bits = 32 if family == 4 else 128
    return {str(ipaddress.ip_network((rng.getrandbits(bits), rng.randint(bits // 4, bits)), strict=False))
            for _ in range(count)}


def _addresses(networks) -> list:
    """The fewest aligned CIDRs covering ``networks``: equal lists mean equal address sets."""
    return list(ipaddress.collapse_addresses(ipaddress.ip_network(n) for n in networks))


def _held(nft: FakeNft, family: str, name: str) -> list:
    address = ipaddress.IPv4Address if family == "ip" else ipaddress.IPv6Address
    return [net for first, last in nft.tables[(family, "masqd")].sets[name].elements
            for net in ipaddress.summarize_address_range(address(first), address(last))]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_fake_tracks_arbitrary_element_changes(seed):
    """Many random CIDRs synced, then others: the fake's sets hold exactly the new ones (masqd's
    link-local ranges included), nothing left of the old ones, and read back in sync."""
    rng = random.Random(seed)
    options = AgentOptions(enable_ipv6=True)
    nft = FakeNft()
    backend = NftablesBackend(nft)
    for _ in range(2):
        cidrs = {4: _random_cidrs(rng, 400, 4), 6: _random_cidrs(rng, 100, 6)}
        config = f"cidrLimit: 1000\nnonMasqueradeCIDRs: [{', '.join(map(json.dumps, sorted(cidrs[4] | cidrs[6])))}]\n"
        ruleset = ruleset_for(config, options)
        assert (await backend.sync(ruleset)).changed
        assert _held(nft, "ip", "nonmasq4") and _addresses(_held(nft, "ip", "nonmasq4")) == \
            _addresses([*cidrs[4], "169.254.0.0/16"])
        assert _addresses(_held(nft, "ip6", "nonmasq6")) == _addresses([*cidrs[6], "fe80::/10"])
        for family in ruleset.families:
            held = parse_listing(await nft.list_table(family.family), family.family)
            assert held == desired_state(family, ruleset.masquerade)
        assert not (await backend.sync(ruleset)).changed


# --- sync against the fake nft -------------------------------------------------------------------------


@pytest.fixture
def nft() -> FakeNft:
    return FakeNft()


@pytest.mark.parametrize(("name", "config_text", "options"), GOLDEN_CASES)
async def test_sync_of_every_config_leaves_the_desired_tables_and_then_writes_nothing(nft, name, config_text, options):
    backend = NftablesBackend(nft)
    ruleset = ruleset_for(config_text, options)
    result = await backend.sync(ruleset)
    assert nft.writes == [golden(name)]
    assert result.written == tuple(f.label for f in ruleset.families)
    for family in ruleset.families:
        assert parse_listing(nft.listing("ip" if family.family == 4 else "ip6"), family.family) == \
            desired_state(family, ruleset.masquerade)
    assert len(nft.tables) == len(ruleset.families)  # the write marker's table is gone again
    assert not (await backend.sync(ruleset)).changed
    assert len(nft.writes) == 1


async def test_first_sync_applies_one_transaction_for_both_families(nft):
    result = await NftablesBackend(nft).sync(ruleset_for(IPV6_CONFIG, AgentOptions(enable_ipv6=True)))
    assert result.written == ("ipv4", "ipv6")
    assert result.reasons == ("table ip masqd missing", "table ip6 masqd missing")
    script = golden("ipv6")
    # read back, apply (no separate nft --check: nft -f is all or nothing and names the failing
    # line), then one cheap structural read-back (no elements) of both tables
    assert nft.calls == [("list", 4), ("list", 6), ("apply", script), ("list-structure", None)]
    assert set(nft.tables) == {("ip", "masqd"), ("ip6", "masqd")}


async def test_second_sync_with_unchanged_state_writes_nothing(nft):
    backend = NftablesBackend(nft)
    ruleset = ruleset_for(IPV6_CONFIG, AgentOptions(enable_ipv6=True))
    await backend.sync(ruleset)
    nft.calls.clear()
    for _ in range(3):
        result = await backend.sync(ruleset_for(IPV6_CONFIG, AgentOptions(enable_ipv6=True)))  # equal, not the same
        assert not result.changed
    assert nft.calls == [("list", 4), ("list", 6)] * 3  # read back only: no write


async def test_only_the_family_that_drifted_is_rewritten(nft):
    backend = NftablesBackend(nft)
    ruleset = ruleset_for(IPV6_CONFIG, AgentOptions(enable_ipv6=True))
    await backend.sync(ruleset)
    nft.run("delete table ip6 masqd\n")  # someone deleted the IPv6 table
    result = await backend.sync(ruleset)
    assert result.written == ("ipv6",)
    assert result.reasons == ("table ip6 masqd missing",)
    ipv6_part = golden("ipv6")[golden("ipv6").index("add table ip6 masqd"):]
    assert nft.writes[-1] == ipv6_part


@pytest.mark.parametrize(("drift", "reason", "rewritten"), [
    pytest.param("drift_element_deleted_ip", "table ip masqd: set elements differ (0 intervals removed, 1 added)",
                 False, id="element-deleted"),
    pytest.param("drift_foreign_rule_inserted_ip", "table ip masqd: rules differ", True, id="foreign-rule"),
    pytest.param("drift_chain_priority_ip", "table ip masqd: chain priority (99, masqd writes 110) differ", True,
                 id="chain-priority"),
])
async def test_drift_is_healed(nft, drift, reason, rewritten):
    """A table that differs in more than its elements is replaced whole; a missing element is
    put back in place."""
    backend = NftablesBackend(nft)
    ruleset = ruleset_for(None, AgentOptions())
    await backend.sync(ruleset)
    nft.load_listing(listing(drift))  # what the kernel held after someone changed the table
    result = await backend.sync(ruleset)
    assert result.written == ("ipv4",) and result.reasons == (reason,)
    assert nft.writes == [golden("defaults")] * (2 if rewritten else 1)
    assert parse_listing(nft.listing("ip"), 4) == desired(None, AgentOptions())
    assert not (await backend.sync(ruleset)).changed


async def test_a_config_change_of_set_elements_only_changes_those_elements(nft):
    """Without a monitor vouching for the kernel, the table is read back first; only the
    element that differs is removed, in place (no nft -f of the whole table)."""
    backend = NftablesBackend(nft)
    await backend.sync(ruleset_for(None, AgentOptions()))
    nft.calls.clear()
    result = await backend.sync(ruleset_for("masqLinkLocal: true\n", AgentOptions()))
    assert result.reasons == ("table ip masqd: set elements differ (1 intervals removed, 0 added)",)
    link_local = (int(ipaddress.IPv4Address("169.254.0.0")), int(ipaddress.IPv4Address("169.254.255.255")))
    assert nft.calls == [("list", 4), ("list", 6), ("elements", ((4, (link_local,), ()),))]
    assert nft.writes == []
    assert parse_listing(nft.listing("ip"), 4) == desired("masqLinkLocal: true\n", AgentOptions())


async def test_a_table_that_vanished_is_replaced_whole_when_the_set_changed_too(nft):
    backend = NftablesBackend(nft)
    await backend.sync(ruleset_for(None, AgentOptions()))
    nft.run("delete table ip masqd\n")
    nft.calls.clear()
    result = await backend.sync(ruleset_for("masqLinkLocal: true\n", AgentOptions()))
    assert result.reasons == ("table ip masqd missing",)
    assert [kind for kind, _ in nft.calls] == ["list", "list", "apply", "list-structure"]
    assert nft.writes == [golden("masq_link_local")]
    assert parse_listing(nft.listing("ip"), 4) == desired("masqLinkLocal: true\n", AgentOptions())


class RejectingNft(FakeNft):
    """``nft -f`` refuses every transaction while ``refusing``, with the message nft 1.0.6
    prints for a rule that references a set that does not exist."""

    refusing = True

    async def apply(self, script: str) -> None:
        if not self.refusing:
            return await super().apply(script)
        self.calls.append(("refused", script))
        raise ApplyError(["nft", "-f", "-"], 1, "/dev/stdin:6:12-21: Error: No such file or directory",
                         "\t\tip daddr @nosuchset return")


async def test_a_refused_apply_names_the_failing_line_and_changes_nothing():
    nft = RejectingNft()
    with pytest.raises(ApplyError, match="No such file or directory") as caught:
        await NftablesBackend(nft).sync(ruleset_for(None, AgentOptions()))
    assert caught.value.line == "\t\tip daddr @nosuchset return"
    # ip masqd read back, ip6 masqd looked for (IPv6 is off: a leftover table would be removed)
    assert [kind for kind, _ in nft.calls] == ["list", "list", "refused"]
    assert nft.tables == {}


async def test_a_refused_apply_keeps_the_tables_already_there():
    nft = RejectingNft()
    nft.refusing = False
    backend = NftablesBackend(nft)
    await backend.sync(ruleset_for(None, AgentOptions()))
    before = nft.listing("ip")
    nft.refusing = True
    with pytest.raises(ApplyError, match="No such file or directory"):  # a rule changes: the table is replaced
        await backend.sync(ruleset_for(None, AgentOptions(random_fully=False)))
    assert nft.listing("ip") == before
    assert nft.calls[-1][0] == "refused" and len(nft.writes) == 1


class StoresTablesDifferently(FakeNft):
    """A kernel that accepts masqd's table but keeps its chain with another policy."""

    async def apply(self, script: str) -> None:
        await super().apply(script)
        for table in self.tables.values():
            for chain in table.chains.values():
                chain.hook = (*chain.hook[:3], "drop")


async def test_a_table_read_back_differently_after_apply_is_an_error_not_a_loop():
    nft = StoresTablesDifferently()
    with pytest.raises(BackendError, match="reads it back differently"):
        await NftablesBackend(nft).sync(ruleset_for(None, AgentOptions()))
    assert len(nft.writes) == 1


async def test_cleanup_deletes_only_the_tables_that_exist(nft):
    backend = NftablesBackend(nft)
    await backend.sync(ruleset_for(IPV6_CONFIG, AgentOptions(enable_ipv6=True)))
    assert await backend.cleanup("IP-MASQ-AGENT") == ("ip masqd", "ip6 masqd")
    assert nft.writes[-1] == "add table ip masqd\ndelete table ip masqd\nadd table ip6 masqd\ndelete table ip6 masqd\n"
    assert nft.tables == {}
    writes = len(nft.writes)
    assert await backend.cleanup("IP-MASQ-AGENT") == ()
    assert len(nft.writes) == writes  # nothing there: nothing written


async def test_cleanup_of_one_family(nft):
    backend = NftablesBackend(nft)
    await backend.sync(ruleset_for(None, AgentOptions()))
    assert await backend.cleanup("") == ("ip masqd",)
    assert nft.writes[-1] == "add table ip masqd\ndelete table ip masqd\n"
    assert nft.tables == {}


def test_render_replace_of_several_tables_is_one_script():
    ruleset = ruleset_for(IPV6_CONFIG, AgentOptions(enable_ipv6=True))
    states = [desired_state(f, ruleset.masquerade) for f in ruleset.families]
    assert render_replace(states) == golden("ipv6")


def test_single_flags_printed_as_strings_are_understood():
    """Newer nft versions print a one-element flag set as a plain string ("flags": "daddr"),
    1.0.6 as a list; both must read back as in sync, or every resync would rewrite the table."""
    doc = json.loads(listing("defaults_ip"))
    for item in doc["nftables"]:
        if "set" in item:
            item["set"]["flags"] = "interval"
        if "rule" in item:
            for expr in item["rule"]["expr"]:
                fib = expr.get("match", {}).get("left", {}).get("fib")
                if fib:
                    fib["flags"] = "daddr"
    assert parse_listing(json.dumps(doc), 4) == desired(None, AgentOptions())
