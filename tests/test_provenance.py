"""Where each non-masquerade CIDR came from (``masqd.provenance``): pure, no I/O.

The inputs are built the way masqd builds them (each source parsed with ``parse_config``, merged
with ``merge_configs``, the rule set computed with the plugins' CIDRs), so a case here is a config
a user could write.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqd.config import RESERVED_CIDRS, AgentOptions, merge_configs, parse_config
from masqd.plugins import Contribution
from masqd.provenance import ORIGIN_KINDS, Origin, cidr_origins
from masqd.ruleset import compute_ruleset

V6 = AgentOptions(enable_ipv6=True)
RESERVED = AgentOptions(nomasq_all_reserved_ranges=True)
RFC1918 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
DEFAULTS = "default list (RFC 1918; no config source sets nonMasqueradeCIDRs)"
LINK_LOCAL = "link-local default (masqLinkLocal: false)"


def origins(sources, options=AgentOptions(), plugins=(), descriptions=None, texts=True):
    """``{cidr: [str(origin), ...]}`` for config ``sources`` ``[(name, text)]`` and plugin CIDRs
    ``plugins`` ``[(plugin, [cidr, ...])]``, every network of the rule set in rule order."""
    merged = merge_configs([(name, parse_config(text, options, name).config) for name, text in sources], options)
    contributions = tuple(Contribution(name, tuple(map(ipaddress.ip_network, cidrs))) for name, cidrs in plugins)
    extra = tuple(net for c in contributions for net in c.cidrs)
    ruleset = compute_ruleset(merged.config, options, extra)
    found = cidr_origins(ruleset, merged, contributions, options, dict(sources) if texts else None,
                         descriptions=descriptions)
    return {str(net): [str(origin) for origin in listed] for net, listed in found.items()}


YAML = """\
# a comment, then the key
nonMasqueradeCIDRs:
  - 10.0.0.0/8        # pods
  - "198.51.100.0/24"
  - 10.0.0.0/8        # listed twice: the first line is named
masqLinkLocal: false
"""

JSON = """{
  "masqLinkLocal": false,
  "nonMasqueradeCIDRs": [
    "10.0.0.0/8",
    "198.51.100.0/24"
  ]
}
"""

# JSON that is no YAML (a raw DEL character, which JSON allows in a string and YAML refuses), with
# an escaped slash: lines are found by searching for each item's quoted form after the key.
JSON_ESCAPES = '{"note": "\x7f",\n\t"nonMasqueradeCIDRs": [\n\t\t"10.0.0.0\\/8",\n\t\t"198.51.100.0/24"\n\t]\n}\n'


@pytest.mark.parametrize(("sources", "options", "expected"), [
    pytest.param([("a.yaml", YAML)], AgentOptions(), {
        "169.254.0.0/16": [LINK_LOCAL], "10.0.0.0/8": ["a.yaml line 3"], "198.51.100.0/24": ["a.yaml line 4"],
    }, id="yaml-file-and-line"),
    pytest.param([("b.json", JSON)], AgentOptions(), {
        "169.254.0.0/16": [LINK_LOCAL], "10.0.0.0/8": ["b.json line 4"], "198.51.100.0/24": ["b.json line 5"],
    }, id="json-file-and-line"),
    pytest.param([("c.json", JSON_ESCAPES)], AgentOptions(), {
        "169.254.0.0/16": [LINK_LOCAL], "10.0.0.0/8": ["c.json line 3"], "198.51.100.0/24": ["c.json line 4"],
    }, id="json-that-yaml-reads-otherwise"),
    pytest.param([("d.json", '{"NONMASQUERADECIDRS": ["10.0.0.0/8"]}')], AgentOptions(), {
        "169.254.0.0/16": [LINK_LOCAL], "10.0.0.0/8": ["d.json line 1"],
    }, id="json-key-matched-ignoring-case"),
    pytest.param([("e.yaml", "nonmasqueradecidrs: [10.0.0.0/8]\nnonMasqueradeCIDRs:\n- 192.0.2.0/24\n")], AgentOptions(), {
        "169.254.0.0/16": [LINK_LOCAL], "192.0.2.0/24": ["e.yaml line 3"],
    }, id="the-last-matching-key-wins-as-in-the-parser"),
    pytest.param([("e.yaml", "nonMasqueradeCIDRs:\n- 192.0.2.0/24\nNonMasqueradeCidrs: [10.0.0.0/8]\n")], AgentOptions(), {
        "169.254.0.0/16": [LINK_LOCAL], "10.0.0.0/8": ["e.yaml line 3"],
    }, id="even-when-it-is-not-spelled-exactly"),
    pytest.param([("e.json", '{"nonMasqueradeCIDRs": ["192.0.2.0/24"],\n "nonmasqueradecidrs": ["10.0.0.0/8"]}')],
                 AgentOptions(), {"169.254.0.0/16": [LINK_LOCAL], "10.0.0.0/8": ["e.json line 2"]},
                 id="json-last-matching-key"),
    pytest.param([("a.yaml", YAML), ("configmap kube-system/ip-masq-agent", "nonMasqueradeCIDRs: [192.0.2.0/24, 10.0.0.0/8]\n")],
                 AgentOptions(), {
        "169.254.0.0/16": [LINK_LOCAL],
        "10.0.0.0/8": ["a.yaml line 3", "configmap kube-system/ip-masq-agent line 1"],
        "198.51.100.0/24": ["a.yaml line 4"],
        "192.0.2.0/24": ["configmap kube-system/ip-masq-agent line 1"],
    }, id="two-sources-list-the-same-cidr"),
    pytest.param([], AgentOptions(), {"169.254.0.0/16": [LINK_LOCAL], **{c: [DEFAULTS] for c in RFC1918}},
                 id="no-source-defaults"),
    pytest.param([("a.yaml", "resyncInterval: 5s\n")], AgentOptions(),
                 {"169.254.0.0/16": [LINK_LOCAL], **{c: [DEFAULTS] for c in RFC1918}},
                 id="a-source-without-the-key-keeps-the-defaults"),
    pytest.param([], RESERVED, {"169.254.0.0/16": [LINK_LOCAL], **{c: [DEFAULTS] for c in RFC1918},
                                **{c: ["--nomasq-all-reserved-ranges"] for c in RESERVED_CIDRS}},
                 id="reserved-ranges-flag"),
    pytest.param([("a.yaml", "nonMasqueradeCIDRs: [192.0.2.0/24]\n")], RESERVED,
                 {"169.254.0.0/16": [LINK_LOCAL], "192.0.2.0/24": ["a.yaml line 1"]},
                 id="a-listed-reserved-range-is-the-files"),
    pytest.param([("a.yaml", "nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8']\n")], V6, {
        "169.254.0.0/16": [LINK_LOCAL], "10.0.0.0/8": ["a.yaml line 1"],
        "fe80::/10": ["link-local default (masqLinkLocalIPv6: false)"], "fd00::/8": ["a.yaml line 1"],
    }, id="ipv6-link-local"),
    pytest.param([("a.yaml", "nonMasqueradeCIDRs: [10.0.0.0/8]\nmasqLinkLocal: true\n")], AgentOptions(),
                 {"10.0.0.0/8": ["a.yaml line 1"]}, id="masq-link-local-true-has-no-link-local"),
    pytest.param([("a.yaml", "nonMasqueradeCIDRs: [169.254.0.0/16]\n")], AgentOptions(),
                 {"169.254.0.0/16": [LINK_LOCAL, "a.yaml line 1"]}, id="link-local-also-listed"),
    pytest.param([("a.yaml", "nonMasqueradeCIDRs: [169.254.0.0/16]\nmasqLinkLocal: true\n")], AgentOptions(),
                 {"169.254.0.0/16": ["a.yaml line 1"]}, id="link-local-listed-while-masqueraded-by-default"),
])
def test_config_origins(sources, options, expected):
    got = origins(sources, options)
    assert got == expected
    assert list(got) == list(expected)  # rule order


def test_without_texts_lines_are_none():
    assert origins([("a.yaml", YAML)], texts=False)["10.0.0.0/8"] == ["a.yaml"]


@pytest.mark.parametrize("text", [
    pytest.param("nonMasqueradeCIDRs: [10.0.0.0/8]\n", id="valid"),
])
@pytest.mark.parametrize("mapped", [
    pytest.param("{{{{ not json", id="not-json"),
    pytest.param("[1, 2]", id="yaml-list"),
    pytest.param("nonMasqueradeCIDRs: 5", id="not-a-list"),
    pytest.param("nonMasqueradeCIDRs: [*x]", id="undefined-alias"),
    pytest.param('{"nonMasqueradeCIDRs": 5}', id="json-not-a-list"),
    pytest.param("\ufeff\x00", id="control-characters"),
])
def test_a_text_the_line_finder_cannot_map_gives_no_line_and_never_raises(text, mapped):
    options = AgentOptions()
    merged = merge_configs([("a.yaml", parse_config(text, options).config)], options)
    ruleset = compute_ruleset(merged.config, options)
    found = cidr_origins(ruleset, merged, (), options, {"a.yaml": mapped})
    assert [str(o) for o in found[ipaddress.ip_network("10.0.0.0/8")]] == ["a.yaml"]


def test_plugin_origins_with_and_without_descriptions():
    descriptions = {
        "cidr-files": {ipaddress.ip_network("192.0.2.0/24"): (Origin("plugin", "cidr-files", detail="file /x line 2"),)},
        "masqd.default_plugins.egress": {ipaddress.ip_network("203.0.113.0/24"): (Origin("policy", "on-prem"),
                                                                                    Origin("policy", "partners"))},
    }
    got = origins([("a.yaml", "nonMasqueradeCIDRs: [10.0.0.0/8]\n")],
                  plugins=[("cidr-files", ["192.0.2.0/24", "10.0.0.0/8", "198.51.100.0/24"]),
                           ("masqd.default_plugins.egress", ["203.0.113.0/24"])],
                  descriptions=descriptions)
    assert got == {
        "169.254.0.0/16": [LINK_LOCAL],
        "10.0.0.0/8": ["a.yaml line 1", "plugin cidr-files"],  # listed by both: each is named
        "192.0.2.0/24": ["plugin cidr-files (file /x line 2)"],
        "198.51.100.0/24": ["plugin cidr-files"],  # not described: the plugin's name
        "203.0.113.0/24": ["EgressNATPolicy on-prem", "EgressNATPolicy partners"],
    }


@pytest.mark.parametrize(("origin", "text"), [
    pytest.param(Origin("config", "examples/config.yaml", 3), "examples/config.yaml line 3", id="config"),
    pytest.param(Origin("config", "configmap kube-system/ip-masq-agent"), "configmap kube-system/ip-masq-agent",
                 id="config-no-line"),
    pytest.param(Origin("defaults", "RFC 1918"), DEFAULTS, id="defaults"),
    pytest.param(Origin("reserved-ranges", "--nomasq-all-reserved-ranges"), "--nomasq-all-reserved-ranges",
                 id="reserved-ranges"),
    pytest.param(Origin("link-local", "masqLinkLocal"), LINK_LOCAL, id="link-local"),
    pytest.param(Origin("plugin", "cidr-files"), "plugin cidr-files", id="plugin"),
    pytest.param(Origin("plugin", "cidr-files", detail="file /x line 2"), "plugin cidr-files (file /x line 2)",
                 id="plugin-detail"),
    pytest.param(Origin("policy", "default-nosnat"), "EgressNATPolicy default-nosnat", id="policy"),
])
def test_origin_text(origin, text):
    assert origin.kind in ORIGIN_KINDS
    assert str(origin) == text


_cidrs = st.builds(lambda a, p: str(ipaddress.ip_network((a >> (32 - p) << (32 - p), p))),
                   st.integers(0, 2**32 - 1), st.integers(0, 32))


@settings(max_examples=60, deadline=None)
@given(files=st.lists(st.lists(_cidrs, max_size=6), max_size=3),
       plugin=st.lists(_cidrs, max_size=6), masq_link_local=st.booleans(), reserved=st.booleans())
def test_every_network_of_the_rule_set_has_an_origin(files, plugin, masq_link_local, reserved):
    options = AgentOptions(nomasq_all_reserved_ranges=reserved)
    sources = [(f"f{i}.yaml", f"nonMasqueradeCIDRs: [{', '.join(cidrs)}]\nmasqLinkLocal: {str(masq_link_local).lower()}\n")
               for i, cidrs in enumerate(files)]
    got = origins(sources, options, plugins=[("p", list(dict.fromkeys(plugin)))])
    merged = merge_configs([(name, parse_config(text, options, name).config) for name, text in sources], options)
    ruleset = compute_ruleset(merged.config, options, tuple(ipaddress.ip_network(c) for c in plugin))
    assert set(got) == {str(net) for net in ruleset.ipv4.nonmasq}
    assert all(got.values())
    for name, text in sources:  # each file's CIDRs are named with the line that lists them
        for cidr in parse_config(text, options).config.non_masquerade_cidrs:
            assert f"{name} line 1" in got[str(cidr)]
