"""``masqd explain`` and the decision model beyond upstream (issue 16): the deciding prefix among
the non-masquerade and masquerade entries and where it came from, the source rules (``--from``),
the interface rule (``--out-interface``), the address traffic is rewritten to, the JSON facts,
``--live`` verdicts from what the kernel holds, the metrics per list, and ``validate`` /
``render`` naming the new keys.

The pure cases build their inputs the way masqd does (each config parsed with ``parse_config``,
merged, the rule set computed with the plugins' entries, the origins found in the texts); each
verdict is checked against :meth:`masqd.ruleset.RuleSet.decide`, the one decision every backend
renders. The command-line cases run ``masqd.cli.main`` in process with the dry-run backend:
nothing here touches the kernel.
"""

from __future__ import annotations

import io
import ipaddress
import json
import pytest
from prometheus_client.parser import text_string_to_metric_families

from masqd.backends.base import LiveFamily, LiveRules
from masqd.cli import main
from masqd.config import AgentOptions, merge_configs, parse_config
from masqd.explain import (KEEP, MASQUERADE, UNMANAGED, as_json, explain, explain_kernel, format_text, parse_interface,
                           parse_source, source_family_problem)
from masqd.metrics import Metrics
from masqd.plugins import Contribution
from masqd.provenance import cidr_origins, decision_origins, list_counts, origin_counts
from masqd.ruleset import compute_ruleset
from masqd.status import AgentStatus

V6 = AgentOptions(enable_ipv6=True)
KEPT = "keeps the pod source address (not masqueraded)"
MASQ = "masqueraded to the node's address"
LOCAL = "  note: unless it is an address of this node: traffic to the node's own addresses is never masqueraded"
LINK_LOCAL = "link-local default (masqLinkLocal: false)"


def ip(text: str):
    return ipaddress.ip_address(text)


def net(text: str):
    return ipaddress.ip_network(text)


def plan(text: str, options: AgentOptions = AgentOptions(), plugins=()):
    """``(ruleset, provenance, merged, contributions)`` for one config ``cfg.yaml`` and plugin
    entries ``plugins`` ``[(plugin, [cidr...], masquerade, kind)]``."""
    merged = merge_configs([("cfg.yaml", parse_config(text, options, "cfg.yaml").config)], options)
    contributions = tuple(Contribution(name, tuple(map(net, cidrs)), kind, masquerade)
                          for name, cidrs, masquerade, kind in plugins)
    extra = tuple(n for c in contributions if not c.masquerade for n in c.cidrs)
    masq_extra = tuple(n for c in contributions if c.masquerade for n in c.cidrs)
    ruleset = compute_ruleset(merged.config, options, extra, masq_extra=masq_extra)
    provenance = decision_origins(ruleset, merged, contributions, options, {"cfg.yaml": text})
    return ruleset, provenance, merged, contributions


def lines_of(text: str, address: str, options: AgentOptions = AgentOptions(), *, source: str | None = None,
             interface: str | None = None, plugins=()) -> list[str]:
    """The text report's lines for one address; its verdict checked against ``RuleSet.decide``."""
    ruleset, provenance, merged, _ = plan(text, options, plugins)
    report = explain([ip(address)], ruleset, provenance, masq_link_local=merged.config.masq_link_local,
                     source=None if source is None else ip(source), interface=interface)
    [explanation] = report.explanations
    if explanation.desired.action != UNMANAGED:
        assert explanation.desired.masquerades == ruleset.decide(ip(address), None if source is None else ip(source),
                                                                 interface)
    return format_text(report).splitlines()


# --- the deciding prefix and where it came from ---------------------------------------------------------

NESTED = """\
nonMasqueradeCIDRs:
  - 10.0.0.0/8
  - 10.99.0.0/24
masqueradeCIDRs:
  - 10.99.0.0/16
"""
INVERTED = """\
masqueradeCIDRs:
  - 10.1.0.0/16
nonMasqueradeCIDRs:
  - 10.1.2.0/24
"""
METADATA = """\
nonMasqueradeCIDRs: [10.0.0.0/8]
masqLinkLocal: false
masqueradeCIDRs:
  - 169.254.169.254/32
"""


@pytest.mark.parametrize(("text", "address", "expected"), [
    pytest.param(NESTED, "10.99.1.1", [
        f"10.99.1.1: {MASQ}",
        "  decided by 10.99.0.0/16, a masquerade entry (the longest matching prefix), from cfg.yaml line 5",
        "  also matches (shorter, overridden): 10.0.0.0/8 (non-masquerade entry) from cfg.yaml line 2",
        LOCAL,
    ], id="masquerade-entry-inside-a-kept-range"),
    pytest.param(NESTED, "10.99.0.7", [
        f"10.99.0.7: {KEPT}",
        "  decided by 10.99.0.0/24, a non-masquerade entry (the longest matching prefix), from cfg.yaml line 3",
        "  also matches (shorter, overridden): 10.99.0.0/16 (masquerade entry) from cfg.yaml line 5",
        "  also matches (shorter, overridden): 10.0.0.0/8 (non-masquerade entry) from cfg.yaml line 2",
    ], id="kept-entry-inside-the-masquerade-entry-inside-a-kept-range"),
    pytest.param(NESTED, "10.5.5.5", [f"10.5.5.5: {KEPT}", "  matched 10.0.0.0/8 from cfg.yaml line 2"],
                 id="only-kept-entries-hold-it-upstream-lines"),
    pytest.param(INVERTED, "10.1.2.3", [
        f"10.1.2.3: {KEPT}",
        "  decided by 10.1.2.0/24, a non-masquerade entry (the longest matching prefix), from cfg.yaml line 4",
        "  also matches (shorter, overridden): 10.1.0.0/16 (masquerade entry) from cfg.yaml line 2",
    ], id="kept-entry-inside-a-masquerade-entry"),
    pytest.param(INVERTED, "10.1.3.3", [
        f"10.1.3.3: {MASQ}",
        "  decided by 10.1.0.0/16, a masquerade entry (the longest matching prefix), from cfg.yaml line 2",
        LOCAL,
    ], id="masquerade-entry-no-kept-range-holds"),
    pytest.param(METADATA, "169.254.169.254", [
        f"169.254.169.254: {MASQ}",
        "  decided by 169.254.169.254/32, a masquerade entry (the longest matching prefix), from cfg.yaml line 4",
        f"  also matches (shorter, overridden): 169.254.0.0/16 (non-masquerade entry) from {LINK_LOCAL}",
        LOCAL,
    ], id="metadata-server-masqueraded"),
    pytest.param(METADATA, "169.254.1.1", [f"169.254.1.1: {KEPT}", f"  matched 169.254.0.0/16 from {LINK_LOCAL}"],
                 id="rest-of-link-local-kept"),
])
def test_the_deciding_prefix_is_named_with_its_origin(text, address, expected):
    assert lines_of(text, address) == expected


def test_a_plugins_masquerade_entry_is_named_by_its_plugin():
    lines = lines_of("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "10.42.0.1",
                     plugins=[("overrides", ["10.42.0.0/16"], True, "plugin"), ("gw", ["10.43.0.0/16"], True, "policy")])
    assert lines[1] == "  decided by 10.42.0.0/16, a masquerade entry (the longest matching prefix), from plugin overrides"
    assert lines_of("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "10.43.0.1",
                    plugins=[("gw", ["10.43.0.0/16"], True, "policy")])[1].endswith("from EgressNATPolicy gw")


# --- source and interface rules ---------------------------------------------------------------------------

SOURCES = """\
nonMasqueradeCIDRs: [10.0.0.0/8]
masqueradeSourceCIDRs:
  - 10.244.0.0/16
nonMasqueradeSourceCIDRs:
  - 10.244.9.0/24
"""
ONLY_EXEMPT = "nonMasqueradeSourceCIDRs: [10.244.9.0/24]\n"


@pytest.mark.parametrize(("text", "source", "expected"), [
    pytest.param(SOURCES, "10.244.1.5", [
        f"203.0.113.9: {MASQ}",
        "  from 10.244.1.5: in masqueradeSourceCIDRs 10.244.0.0/16 (cfg.yaml line 3): may be masqueraded",
        "  no non-masquerade CIDR matches it", LOCAL,
    ], id="inside-masqueradeSourceCIDRs"),
    pytest.param(SOURCES, "192.168.7.7", [
        f"203.0.113.9: {KEPT}",
        "  from 192.168.7.7: source not in masqueradeSourceCIDRs (10.244.0.0/16 from cfg.yaml line 3): not masqueraded",
        "  the destination alone would be masqueraded (no entry holds it)",
    ], id="outside-masqueradeSourceCIDRs"),
    pytest.param(SOURCES, "10.244.9.5", [
        f"203.0.113.9: {KEPT}",
        "  from 10.244.9.5: in nonMasqueradeSourceCIDRs 10.244.9.0/24 (cfg.yaml line 5): never masqueraded",
        "  the destination alone would be masqueraded (no entry holds it)",
    ], id="in-nonMasqueradeSourceCIDRs-wins-inside-masqueradeSourceCIDRs"),
    pytest.param(SOURCES, None, [
        f"203.0.113.9: {MASQ}",
        "  no non-masquerade CIDR matches it",
        "  holds only for traffic from 10.244.0.0/16 (masqueradeSourceCIDRs, cfg.yaml line 3) but not from 10.244.9.0/24 "
        "(nonMasqueradeSourceCIDRs, cfg.yaml line 5); from other sources it keeps the pod address (--from SOURCE "
        "explains one)",
        LOCAL,
    ], id="no-from-lists-the-conditions"),
    pytest.param(ONLY_EXEMPT, None, [
        f"203.0.113.9: {MASQ}", "  no non-masquerade CIDR matches it",
        "  holds for traffic from any source but 10.244.9.0/24 (nonMasqueradeSourceCIDRs, cfg.yaml line 1), which keeps "
        "the pod address (--from SOURCE explains one)",
        LOCAL,
    ], id="no-from-only-exempt-sources"),
    pytest.param(ONLY_EXEMPT, "10.1.1.1", [
        f"203.0.113.9: {MASQ}", "  from 10.1.1.1: no source rule applies (not in nonMasqueradeSourceCIDRs): may be "
        "masqueraded", "  no non-masquerade CIDR matches it", LOCAL,
    ], id="from-outside-the-exempt-sources"),
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "10.1.1.1", [
        f"203.0.113.9: {MASQ}", "  from 10.1.1.1: no source rule applies (no source lists are set): may be masqueraded",
        "  no non-masquerade CIDR matches it", LOCAL,
    ], id="from-without-source-lists"),
])
def test_source_rules(text, source, expected):
    assert lines_of(text, "203.0.113.9", source=source) == expected


def test_a_source_list_of_the_other_family_only_masquerades_none_of_this_one():
    text = "masqueradeSourceCIDRs: [10.244.0.0/16]\n"
    assert lines_of(text, "2001:db8::1", V6) == [
        f"2001:db8::1: {KEPT}", "  masqueradeSourceCIDRs lists no IPv6 source: no IPv6 traffic is masqueraded",
        "  the destination alone would be masqueraded (no entry holds it)"]
    assert lines_of(text, "2001:db8::1", V6, source="2001:db8:5::5")[1] == (
        "  from 2001:db8:5::5: masqueradeSourceCIDRs lists no IPv6 source: not masqueraded")


INTERFACES = "outputInterfaces:\n  - eth0\n  - ens+\n"


@pytest.mark.parametrize(("interface", "expected"), [
    pytest.param("eth0", [f"203.0.113.9: {MASQ}",
                          "  leaves through eth0: matches eth0 in outputInterfaces (cfg.yaml line 2): may be masqueraded",
                          "  no non-masquerade CIDR matches it", LOCAL], id="eth0"),
    pytest.param("ens3", [f"203.0.113.9: {MASQ}",
                          "  leaves through ens3: matches ens+ in outputInterfaces (cfg.yaml line 3): may be masqueraded",
                          "  no non-masquerade CIDR matches it", LOCAL], id="ens-wildcard"),
    pytest.param("eth1", [f"203.0.113.9: {KEPT}",
                          "  leaves through eth1, not in outputInterfaces [eth0, ens+] (cfg.yaml line 2, cfg.yaml line 3):"
                          " not masqueraded",
                          "  the destination alone would be masqueraded (no entry holds it)"], id="not-listed"),
    pytest.param("ens", [f"203.0.113.9: {MASQ}",
                         "  leaves through ens: matches ens+ in outputInterfaces (cfg.yaml line 3): may be masqueraded",
                         "  no non-masquerade CIDR matches it", LOCAL], id="wildcard-matches-its-bare-prefix"),
    pytest.param(None, [f"203.0.113.9: {MASQ}", "  no non-masquerade CIDR matches it",
                        "  holds only for traffic leaving through eth0, ens+ (outputInterfaces, cfg.yaml line 2, cfg.yaml "
                        "line 3); through other interfaces it keeps the pod address (--out-interface NAME explains one)",
                        LOCAL], id="no-flag-lists-the-condition"),
])
def test_interface_rule(interface, expected):
    assert lines_of(INTERFACES, "203.0.113.9", interface=interface) == expected


def test_an_interface_without_outputInterfaces_says_every_interface_may_masquerade():
    assert lines_of("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "203.0.113.9", interface="eth1")[1] == (
        "  leaves through eth1: no outputInterfaces are set, so any interface may masquerade")


def test_the_interface_rule_comes_before_the_source_rule():
    text = INTERFACES + SOURCES
    lines = lines_of(text, "203.0.113.9", source="10.244.1.5", interface="eth1")
    assert lines[0] == f"203.0.113.9: {KEPT}"
    assert lines[1].startswith("  leaves through eth1, not in outputInterfaces")
    assert lines[2].startswith("  from 10.244.1.5: in masqueradeSourceCIDRs")


# --- the address traffic is rewritten to ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "options", "address", "headline"), [
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\nsnatToAddress: 192.0.2.10\n", AgentOptions(), "203.0.113.9",
                 "203.0.113.9: masqueraded: SNAT to 192.0.2.10 (snatToAddress, cfg.yaml line 2)", id="snat-ipv4"),
    pytest.param("snatToAddressIPv6: 2001:db8::10\n", V6, "2001:db9::1",
                 "2001:db9::1: masqueraded: SNAT to 2001:db8::10 (snatToAddressIPv6, cfg.yaml line 1)", id="snat-ipv6"),
    pytest.param("snatToAddressIPv6: 2001:db8::10\n", V6, "203.0.113.9", f"203.0.113.9: {MASQ}",
                 id="snat-ipv6-only-leaves-ipv4-masqueraded"),
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\nsnatToAddress: 192.0.2.10\n", AgentOptions(), "10.1.1.1",
                 f"10.1.1.1: {KEPT}", id="kept-is-not-rewritten"),
])
def test_the_rewrite_address_is_named(text, options, address, headline):
    assert lines_of(text, address, options)[0] == headline


# --- JSON ----------------------------------------------------------------------------------------------------

UPSTREAM_KEYS = {"address", "family", "verdict", "matches", "reason"}
NEW_KEYS = {"deciding_prefix", "overridden", "source", "interface", "rewrite", "conditions"}
CFG5 = {"kind": "config", "name": "cfg.yaml", "line": 5, "detail": None, "text": "cfg.yaml line 5"}


def _json(text: str, address: str, **flags) -> dict:
    ruleset, provenance, _, _ = plan(text)
    [item] = as_json(explain([ip(address)], ruleset, provenance, **flags))
    return item


@pytest.mark.parametrize(("text", "flags", "keys"), [
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\n", {}, UPSTREAM_KEYS, id="upstream-config-upstream-keys"),
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\n", {"source": ip("10.1.1.1")}, UPSTREAM_KEYS | NEW_KEYS,
                 id="from-flag"),
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\n", {"interface": "eth0"}, UPSTREAM_KEYS | NEW_KEYS,
                 id="out-interface-flag"),
    pytest.param(NESTED, {}, UPSTREAM_KEYS | NEW_KEYS, id="masqueradeCIDRs"),
    pytest.param("snatToAddress: 192.0.2.10\n", {}, UPSTREAM_KEYS | NEW_KEYS, id="snatToAddress"),
])
def test_json_gains_the_new_keys_only_when_in_play(text, flags, keys):
    assert set(_json(text, "10.99.1.1", **flags)) == keys


def test_json_facts():
    text = NESTED + "masqueradeSourceCIDRs: [10.244.0.0/16]\nsnatToAddress: 192.0.2.10\noutputInterfaces: [eth0]\n"
    item = _json(text, "10.99.1.1", source=ip("10.244.1.5"), interface="eth0")
    assert item["verdict"] == "masquerade" and item["matches"] == []
    assert item["deciding_prefix"] == {"cidr": "10.99.0.0/16", "entry": "masquerade", "kept": False, "origins": [CFG5]}
    assert [(o["cidr"], o["entry"]) for o in item["overridden"]] == [("10.0.0.0/8", "non-masquerade")]
    assert item["source"]["address"] == "10.244.1.5" and item["source"]["keeps"] is False
    assert item["source"]["held_by"] == "10.244.0.0/16" and item["source"]["keeps_by"] is None
    assert item["interface"] == {"name": "eth0", "matched": "eth0", "keeps": False, "output_interfaces": [
        {"name": "eth0", "origins": [{"kind": "config", "name": "cfg.yaml", "line": 8, "detail": None,
                                      "text": "cfg.yaml line 8"}]}]}
    assert item["rewrite"] == {"target": "SNAT", "address": "192.0.2.10", "key": "snatToAddress", "origins": [
        {"kind": "config", "name": "cfg.yaml", "line": 7, "detail": None, "text": "cfg.yaml line 7"}]}
    assert item["conditions"] == []
    kept = _json(text, "10.99.1.1", source=ip("10.9.9.9"))
    assert (kept["verdict"], kept["source"]["keeps_by"], kept["rewrite"]) == ("keep", "masqueradeSourceCIDRs", None)
    unflagged = _json(text, "10.99.1.1")
    assert [line.split(" (")[0] for line in unflagged["conditions"]] == [
        "holds only for traffic leaving through eth0", "holds only for traffic from 10.244.0.0/16"]
    assert _json("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "203.0.113.9", interface="eth0")["rewrite"] == {
        "target": "MASQUERADE", "address": None, "key": None, "origins": []}


# --- --live: the kernel's verdict from what it holds ----------------------------------------------------------

FULL = NESTED + """\
masqueradeSourceCIDRs: [10.244.0.0/16]
nonMasqueradeSourceCIDRs: [10.244.9.0/24]
snatToAddress: 192.0.2.10
outputInterfaces: [eth0, ens+]
"""


def held(ruleset, **overrides) -> LiveRules:
    """The IPv4 rules the kernel holds when it holds ``ruleset``'s, as a read-back says it, with
    ``overrides`` (what someone changed)."""
    family = ruleset.ipv4
    values = dict(present=True, hooked=True, local_exempt=True, nonmasq=family.nonmasq, masquerade=family.masquerades_any,
                  keep_sources=family.keep_sources, masq_sources=family.masq_sources, interfaces=ruleset.interfaces,
                  snat_to=None if family.snat_to is None else str(family.snat_to))
    return LiveRules("test", "chain X", (LiveFamily(4, **{**values, **overrides}),))


@pytest.mark.parametrize(("text", "overrides", "address", "flags", "action", "drift", "differences"), [
    pytest.param(FULL, {}, "10.99.1.1", {"source": "10.244.1.5", "interface": "eth0"}, MASQUERADE, False, (),
                 id="in-sync-masqueraded"),
    pytest.param(FULL, {}, "10.99.1.1", {"source": "10.244.9.5"}, KEEP, False, (), id="in-sync-source-kept"),
    pytest.param(FULL, {"keep_sources": ()}, "10.99.1.1", {"source": "10.244.9.5"}, MASQUERADE, True,
                 ("nonMasqueradeSourceCIDRs missing from the kernel (traffic from them is masqueraded): 10.244.9.0/24 "
                  "(from cfg.yaml line 7)",), id="kernel-lacks-the-source-rule"),
    pytest.param(FULL, {"keep_sources": ()}, "10.99.1.1", {}, MASQUERADE, False,
                 ("nonMasqueradeSourceCIDRs missing from the kernel (traffic from them is masqueraded): 10.244.9.0/24 "
                  "(from cfg.yaml line 7)",), id="kernel-lacks-the-source-rule-no-from-still-differs"),
    pytest.param(FULL, {"masq_sources": None}, "10.99.1.1", {"source": "192.168.1.1"}, MASQUERADE, True,
                 ("the kernel masquerades traffic from any source, the desired state only from masqueradeSourceCIDRs "
                  "10.244.0.0/16 (from cfg.yaml line 6)",), id="kernel-lacks-the-masquerade-source-limit"),
    pytest.param(FULL, {"interfaces": ()}, "10.99.1.1", {"interface": "eth1"}, MASQUERADE, True,
                 ("the kernel masquerades traffic leaving through any interface, the desired state through eth0, ens+ "
                  "(outputInterfaces)",), id="kernel-lacks-the-interface-rule"),
    pytest.param(FULL, {"snat_to": None}, "10.99.1.1", {}, MASQUERADE, True,
                 ("the kernel rewrites the source to the node's address (MASQUERADE), the desired state to 192.0.2.10 "
                  "(SNAT, snatToAddress)",), id="kernel-masquerades-instead-of-snat"),
    pytest.param(FULL, {"nonmasq": (net("169.254.0.0/16"), net("10.0.0.0/8"))}, "10.99.1.1", {}, KEEP, True,
                 ("in the kernel, not in the desired state: 10.0.0.0/8",), id="kernel-lacks-the-masquerade-entry"),
    # as the kernel reads back without a final rule: no masquerade rule, so no source limit either
    pytest.param("masqueradeSourceCIDRs: ['2001:db8::/64']\n", {"masq_sources": None}, "203.0.113.9", {}, KEEP, False,
                 (), id="no-source-of-the-family-no-final-rule-expected"),
    pytest.param("masqueradeSourceCIDRs: ['2001:db8::/64']\n", {"masquerade": True, "masq_sources": None}, "203.0.113.9", {}, MASQUERADE,
                 True, ("the kernel masquerades IPv4 traffic, the desired state none (masqueradeSourceCIDRs lists no "
                        "IPv4 source)",), id="a-final-rule-where-none-is-wanted"),
])
def test_live_verdicts_come_from_what_the_kernel_holds(text, overrides, address, flags, action, drift, differences):
    options = V6 if "2001" in text else AgentOptions()
    ruleset, provenance, _, _ = plan(text, options)
    live = held(ruleset, **overrides)
    given = {"source": ip(flags["source"]) if "source" in flags else None, "interface": flags.get("interface")}
    report = explain([ip(address)], ruleset, provenance, live, **given)
    [explanation] = report.explanations
    assert (explanation.live.action, explanation.drift) == (action, drift)
    assert report.differences[4] == differences
    assert report.drift == (drift or bool(differences))
    text_lines = format_text(report).splitlines()
    assert any(line.startswith("  DRIFT: ") for line in text_lines) == drift
    [item] = as_json(report)
    assert item["live"]["drift"] == drift and item["live"]["verdict"] == action


def test_live_drift_text_names_the_desired_source_rule():
    ruleset, provenance, _, _ = plan(FULL)
    report = explain([ip("10.99.1.1")], ruleset, provenance, held(ruleset, keep_sources=()), source=ip("10.244.9.5"))
    assert "  DRIFT: the kernel masquerades it; the desired state keeps the pod address (the source is in " \
           "nonMasqueradeSourceCIDRs 10.244.9.0/24)" in format_text(report).splitlines()


def test_live_snat_headline_and_flattened_cidrs_name_the_entry_they_come_from():
    ruleset, provenance, _, _ = plan(FULL)
    assert ruleset.ipv4.keep is not None  # flattened: the kernel holds no 10.0.0.0/8
    report = explain([ip("10.1.2.3"), ip("10.99.1.1")], ruleset, provenance, held(ruleset),
                     source=ip("10.244.1.5"), interface="ens3")
    lines = format_text(report).splitlines()
    assert lines[1:] == [
        f"10.1.2.3: {KEPT}",
        "  leaves through ens3: matches ens+ in outputInterfaces (cfg.yaml line 9): may be masqueraded",
        "  from 10.244.1.5: in masqueradeSourceCIDRs 10.244.0.0/16 (cfg.yaml line 6): may be masqueraded",
        "  matched 10.0.0.0/10 (flattened from 10.0.0.0/8: masquerade entries cut the ranges kept) from cfg.yaml line 2",
        "10.99.1.1: masqueraded: SNAT to 192.0.2.10 (snatToAddress, cfg.yaml line 8)",
        "  leaves through ens3: matches ens+ in outputInterfaces (cfg.yaml line 9): may be masqueraded",
        "  from 10.244.1.5: in masqueradeSourceCIDRs 10.244.0.0/16 (cfg.yaml line 6): may be masqueraded",
        "  no non-masquerade CIDR in the kernel matches it",
        "  in the desired state decided by 10.99.0.0/16 (masquerade entry) from cfg.yaml line 5 (the kernel holds the "
        "longest-prefix result flattened)",
        LOCAL,
        "the kernel holds the desired state (test backend, chain X: ipv4)",
    ]
    assert as_json(report)[0]["live"]["matches"][0]["part_of"] == "10.0.0.0/8"


def test_missing_flattened_cidrs_name_the_entry_they_are_part_of():
    ruleset, provenance, _, _ = plan(NESTED)
    live = held(ruleset, nonmasq=tuple(n for n in ruleset.ipv4.nonmasq if n != net("10.128.0.0/9")))
    report = explain([ip("10.200.0.1")], ruleset, provenance, live)
    assert report.differences[4] == ("missing from the kernel: 10.128.0.0/9 (part of 10.0.0.0/8 from cfg.yaml line 2)",)
    assert report.explanations[0].drift


def test_the_kernel_alone_explains_its_source_rules():
    live = LiveRules("test", "chain X", (LiveFamily(4, present=True, hooked=True, local_exempt=True, nonmasq=(),
                                                    masquerade=True, keep_sources=(net("10.244.9.0/24"),),
                                                    snat_to="192.0.2.10"),))
    report = explain_kernel([ip("203.0.113.9")], live, source=ip("10.244.9.5"))
    assert report.explanations[0].live.action == KEEP
    assert format_text(report).splitlines()[1:3] == [
        f"203.0.113.9: {KEPT}", "  from 10.244.9.5: in nonMasqueradeSourceCIDRs 10.244.9.0/24: never masqueraded"]
    assert as_json(report)[0]["live"]["source"]["keeps_by"] == "nonMasqueradeSourceCIDRs"


# --- the flags' values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("parse", "text", "message"), [
    pytest.param(parse_source, "pods", "not an IPv4 or IPv6 source address", id="source-word"),
    pytest.param(parse_source, "10.244.0.0/16", "give one address", id="source-cidr"),
    pytest.param(parse_interface, "eth+", "a wildcard matches many interfaces", id="interface-wildcard"),
    pytest.param(parse_interface, "a-very-long-interface", "1-15 letters", id="interface-too-long"),
    pytest.param(parse_interface, "eth 0", "not an interface name", id="interface-space"),
    pytest.param(parse_interface, "..", "not an interface name", id="interface-dotdot"),
    pytest.param(parse_interface, "", "not an interface name", id="interface-empty"),
])
def test_flag_values_are_refused_saying_what_is_valid(parse, text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


@pytest.mark.parametrize(("source", "addresses", "problem"), [
    pytest.param("10.244.1.5", ["10.1.1.1", "203.0.113.9"], None, id="same-family"),
    pytest.param("::ffff:10.244.1.5", ["10.1.1.1"], None, id="ipv4-mapped-is-ipv4"),
    pytest.param("2001:db8::5", ["10.1.1.1"], "--from 2001:db8::5 is an IPv6 address, but 10.1.1.1 is IPv4",
                 id="ipv6-source-ipv4-destination"),
    pytest.param("10.244.1.5", ["10.1.1.1", "2001:db8::1", "2001:db8::2"], "but 2001:db8::1, 2001:db8::2 are IPv6",
                 id="mixed-destinations"),
])
def test_the_source_must_be_of_the_destinations_family(source, addresses, problem):
    found = source_family_problem(ip(source), [ip(a) for a in addresses])
    assert (found is None) == (problem is None)
    if problem is not None:
        assert problem in found


# --- provenance and metrics of the new lists ------------------------------------------------------------------


def test_decision_origins_cover_every_list_and_setting_with_lines():
    ruleset, provenance, merged, contributions = plan(FULL, plugins=[("ovr", ["10.77.0.0/16"], True, "plugin"),
                                                                     ("keep", ["192.0.2.0/24"], False, "plugin")])

    def text(found) -> list[str]:
        return [str(o) for o in found]

    # the non-masquerade entries as listed, not the flattened CIDRs of the rules
    assert list(provenance.keep) == [net("169.254.0.0/16"), net("10.0.0.0/8"), net("10.99.0.0/24"), net("192.0.2.0/24")]
    assert cidr_origins(ruleset, merged, contributions, AgentOptions(), {"cfg.yaml": FULL}) == provenance.keep
    assert {str(n): text(o) for n, o in provenance.masquerade.items()} == {
        "10.99.0.0/16": ["cfg.yaml line 5"], "10.77.0.0/16": ["plugin ovr"]}
    assert text(provenance.sources["masqueradeSourceCIDRs"][net("10.244.0.0/16")]) == ["cfg.yaml line 6"]
    assert text(provenance.sources["nonMasqueradeSourceCIDRs"][net("10.244.9.0/24")]) == ["cfg.yaml line 7"]
    assert text(provenance.settings["snatToAddress"]["192.0.2.10"]) == ["cfg.yaml line 8"]
    assert {name: text(o) for name, o in provenance.settings["outputInterfaces"].items()} == {
        "eth0": ["cfg.yaml line 9"], "ens+": ["cfg.yaml line 9"]}


JSON_LISTS = ('{\n  "masqueradeCIDRs": [\n    "10.99.0.0/16"\n  ],\n  "nonMasqueradeSourceCIDRs": ["10.244.9.0/24"],\n'
              '  "snatToAddress": "192.0.2.10",\n  "outputInterfaces": [\n    "eth0"\n  ]NOTE\n}\n')


@pytest.mark.parametrize("note", [
    pytest.param("", id="json-yaml-reads"),
    # a raw DEL character, which JSON allows in a string and YAML refuses: the string tokens are searched
    pytest.param(', "note": "\x7f"', id="json-yaml-cannot-read"),
])
def test_decision_origins_from_json_lines(note):
    _, provenance, _, _ = plan(JSON_LISTS.replace("NOTE", note))
    assert str(provenance.masquerade[net("10.99.0.0/16")][0]) == "cfg.yaml line 3"
    assert str(provenance.sources["nonMasqueradeSourceCIDRs"][net("10.244.9.0/24")][0]) == "cfg.yaml line 5"
    assert str(provenance.settings["snatToAddress"]["192.0.2.10"][0]) == "cfg.yaml line 6"
    assert str(provenance.settings["outputInterfaces"]["eth0"][0]) == "cfg.yaml line 8"


def test_masquerade_contributions_are_not_counted_as_non_masquerade_cidrs():
    ruleset, _, merged, contributions = plan(FULL, plugins=[
        ("ovr", ["10.77.0.0/16"], True, "plugin"), ("gw", ["10.78.0.0/16", "10.77.0.0/16"], True, "policy"),
        ("keep", ["192.0.2.0/24"], False, "plugin")])
    assert origin_counts(ruleset, merged, contributions, AgentOptions()) == {
        ("ipv4", "link-local"): 1, ("ipv4", "config"): 2, ("ipv4", "plugin"): 1}
    assert list_counts(merged, contributions) == {
        ("ipv4", "masqueradeCIDRs", "config"): 1, ("ipv4", "masqueradeSourceCIDRs", "config"): 1,
        ("ipv4", "nonMasqueradeSourceCIDRs", "config"): 1, ("ipv4", "masqueradeCIDRs", "plugin"): 1,
        ("ipv4", "masqueradeCIDRs", "policy"): 2}
    assert list_counts(plan("nonMasqueradeCIDRs: [10.0.0.0/8]\n")[2], ()) == {}


def _metrics(text: str, plugins=()) -> dict:
    ruleset, _, merged, contributions = plan(text, plugins=plugins)
    status = AgentStatus()
    status.applied, status.applied_from = ruleset, (merged, contributions)
    rendered = Metrics(status, backend="dry-run", options=AgentOptions()).render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(rendered) for s in family.samples
            if s.name in ("masqd_nonmasq_cidrs", "masqd_decision_cidrs")}


def test_the_metrics_count_each_list_by_origin():
    found = _metrics(FULL, plugins=[("ovr", ["10.77.0.0/16"], True, "plugin")])
    assert found == {
        ("masqd_nonmasq_cidrs", (("family", "ipv4"), ("source", "config"))): 2,
        ("masqd_nonmasq_cidrs", (("family", "ipv4"), ("source", "link-local"))): 1,
        ("masqd_decision_cidrs", (("family", "ipv4"), ("list", "masqueradeCIDRs"), ("source", "config"))): 1,
        ("masqd_decision_cidrs", (("family", "ipv4"), ("list", "masqueradeCIDRs"), ("source", "plugin"))): 1,
        ("masqd_decision_cidrs", (("family", "ipv4"), ("list", "masqueradeSourceCIDRs"), ("source", "config"))): 1,
        ("masqd_decision_cidrs", (("family", "ipv4"), ("list", "nonMasqueradeSourceCIDRs"), ("source", "config"))): 1,
    }
    assert {name for name, _ in _metrics("nonMasqueradeCIDRs: [10.0.0.0/8]\n")} == {"masqd_nonmasq_cidrs"}


# --- the command line ---------------------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cfg(tmp_path):
    def write(text: str, name: str = "cfg.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


def test_explain_from_and_out_interface(capsys, cfg):
    path = cfg(FULL)
    code, out, err = run(capsys, "explain", "--backend", "dry-run", "--config", path, "--from", "10.244.9.5",
                         "--out-interface", "ens3", "10.99.1.1")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"10.99.1.1: {KEPT}",
        f"  leaves through ens3: matches ens+ in outputInterfaces ({path} line 9): may be masqueraded",
        f"  from 10.244.9.5: in nonMasqueradeSourceCIDRs 10.244.9.0/24 ({path} line 7): never masqueraded",
        f"  the destination alone would be masqueraded: decided by 10.99.0.0/16, a masquerade entry (the longest "
        f"matching prefix), from {path} line 5",
    ]
    code, out, _ = run(capsys, "explain", "--backend", "dry-run", "--config", path, "--output", "json",
                       "--out-interface", "eth1", "10.99.1.1")
    [item] = json.loads(out)
    assert (code, item["verdict"], item["interface"]["keeps"]) == (0, "keep", True)


@pytest.mark.parametrize(("flags", "message"), [
    pytest.param(["--from", "pods"], "argument --from: 'pods': not an IPv4 or IPv6 source address", id="from-word"),
    pytest.param(["--from", "10.244.0.0/16"], "give one address", id="from-cidr"),
    pytest.param(["--from", "2001:db8::5"], "error: --from 2001:db8::5 is an IPv6 address, but 10.99.1.1 is IPv4",
                 id="from-other-family"),
    pytest.param(["--out-interface", "eth+"], "argument --out-interface: 'eth+': a wildcard matches many interfaces",
                 id="interface-wildcard"),
    pytest.param(["--out-interface", "eth0;reboot"], "'eth0;reboot': not an interface name", id="interface-bad-chars"),
    pytest.param(["--out-interface", "x" * 16], "not an interface name: 1-15 letters", id="interface-too-long"),
])
def test_bad_flag_values_are_usage_errors(capsys, cfg, flags, message):
    code, out, err = run(capsys, "explain", "--backend", "dry-run", "--config", cfg(FULL), *flags, "10.99.1.1")
    assert (code, out) == (2, "")
    assert message in err


def test_validate_names_the_new_keys_and_leaves_an_upstream_summary_alone(capsys, cfg):
    path = cfg(FULL)
    code, out, _ = run(capsys, "validate", "--config", path)
    assert code == 0
    assert out == (f"ok: {path}: 2 non-masquerade CIDRs, resyncInterval 1m0s, cidrLimit 64, 1 masqueradeCIDRs, "
                   "1 masqueradeSourceCIDRs, 1 nonMasqueradeSourceCIDRs, snatToAddress 192.0.2.10, "
                   "outputInterfaces [eth0, ens+]\n")
    upstream = cfg("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "upstream.yaml")
    assert run(capsys, "validate", "--config", upstream)[1] == (
        f"ok: {upstream}: 1 non-masquerade CIDRs, resyncInterval 1m0s, cidrLimit 64\n")


def test_render_names_which_source_set_each_new_entry(capsys, cfg):
    first = cfg(FULL)
    second = cfg("masqueradeCIDRs: [10.99.0.0/16]\nsnatToAddress: 192.0.2.10\n", "second.yaml")
    code, out, err = run(capsys, "render", "--backend", "dry-run", "--config", first, "--config", second)
    assert code == 0 and out
    assert f"10.99.0.0/16 (masqueradeCIDRs): from {first}, {second}" in err.splitlines()
    assert f"10.244.9.0/24 (nonMasqueradeSourceCIDRs): from {first}" in err.splitlines()
    assert "merged: snatToAddress 192.0.2.10, outputInterfaces [eth0, ens+]" in err.splitlines()
    plain = cfg("nonMasqueradeCIDRs: [10.0.0.0/8]\n", "plain.yaml")
    other = cfg("nonMasqueradeCIDRs: [192.0.2.0/24]\n", "other.yaml")
    _, _, err = run(capsys, "render", "--backend", "dry-run", "--config", plain, "--config", other)
    assert err.splitlines() == [f"10.0.0.0/8: from {plain}", f"192.0.2.0/24: from {other}"]


def test_a_plugins_masquerade_entries_are_named_as_such():
    """The plugin lines ``validate`` prints after its summary (``render`` on stderr)."""
    from masqd.cli.agent_commands import _print_contributions

    stream = io.StringIO()
    _print_contributions((Contribution("overrides", (net("10.77.0.0/16"),), "plugin", True),
                          Contribution("extra", (net("192.0.2.0/24"),))), stream)
    assert stream.getvalue().splitlines() == ["plugin extra: 1 non-masquerade CIDRs: 192.0.2.0/24",
                                              "plugin overrides: 1 masquerade CIDRs (masquerade_cidrs): 10.77.0.0/16"]
