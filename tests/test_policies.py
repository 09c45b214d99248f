"""``EgressNATPolicy`` objects: validation (pure) and the built-in plugin that turns ``NoSNAT``
destinations into non-masquerade CIDRs. The API side (watching them) is in test_kube.py."""

from __future__ import annotations

import pytest

from masqd.cidrs import parse_cidr
from masqd.config import AgentOptions
from masqd.default_plugins.egress import EgressNATPolicies
from masqd.errors import ConfigError
from masqd.plugins import Plugins, SourceContext
from masqd.policies import parse_policies, parse_policy
from masqd.kube import KubeSettings


def policy(name: str, action="NoSNAT", *cidrs, generation=1, **spec_extra) -> dict:
    spec = {"action": action, "destinations": [{"cidr": c} for c in cidrs], **spec_extra}
    return {"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy",
            "metadata": {"name": name, "generation": generation}, "spec": spec}


def test_a_valid_policy():
    parsed = parse_policy(policy("on-prem", "NoSNAT", "192.0.2.0/24", "198.51.100.0/24", "192.0.2.0/24", generation=3),
                          allow_ipv6=False)
    assert parsed.name == "on-prem" and parsed.generation == 3 and parsed.keeps_pod_address
    assert parsed.cidrs == (parse_cidr("192.0.2.0/24"), parse_cidr("198.51.100.0/24"))  # duplicates once


@pytest.mark.parametrize(
    ("obj", "key", "says"),
    [
        pytest.param({"metadata": {"name": "x"}}, "spec", "expected a mapping", id="no-spec"),
        pytest.param(policy("x", "NoNAT", "10.0.0.0/8"), "spec.action", "NoSNAT, SNAT", id="bad-action"),
        pytest.param(policy("x", "NoSNAT"), "spec.destinations", "non-empty list", id="no-destinations"),
        pytest.param({"metadata": {"name": "x"}, "spec": {"action": "NoSNAT", "destinations": [{"cidr": "10.0.0.1/8"}]}},
                     "spec.destinations[0].cidr", "10.0.0.0/8", id="unaligned-names-the-network"),
        pytest.param({"metadata": {"name": "x"}, "spec": {"action": "NoSNAT", "destinations": [{"ip": "10.0.0.0/8"}]}},
                     "spec.destinations[0].cidr", "", id="missing-cidr"),
        pytest.param(policy("x", "NoSNAT", *[f"10.{i // 256}.{i % 256}.0/24" for i in range(1001)]),
                     "spec.destinations", "at most 1000", id="too-many"),
    ],
)
def test_invalid_policies_name_key_and_reason(obj, key, says):
    with pytest.raises(ConfigError) as caught:
        parse_policy(obj, allow_ipv6=False)
    assert caught.value.source == "EgressNATPolicy x"
    assert key in [p.key for p in caught.value.problems]
    assert says in str(caught.value)


def test_ipv6_with_the_flag():
    assert parse_policy(policy("v6", "NoSNAT", "2001:db8::/32"), allow_ipv6=True).cidrs == (parse_cidr("2001:db8::/32"),)


def test_ipv6_destinations_are_left_out_without_the_flag_and_the_ipv4_ones_kept():
    parsed = parse_policy(policy("dual", "NoSNAT", "192.0.2.0/24", "2001:db8::/32"), allow_ipv6=False)
    assert parsed.cidrs == (parse_cidr("192.0.2.0/24"),)
    assert parsed.ignored == (parse_cidr("2001:db8::/32"),)
    with pytest.raises(ConfigError, match="10.0.0.0/8"):  # an invalid IPv6 entry is still invalid
        parse_policy(policy("x", "NoSNAT", "10.0.0.1/8", "2001:db8::1/32"), allow_ipv6=False)


def test_policy_set_skips_the_invalid_and_keeps_the_others():
    found = parse_policies([policy("b", "NoSNAT", "10.0.0.0/8", "192.0.2.0/24"), policy("bad", "Nope", "10.0.0.0/8"),
                            policy("a", "NoSNAT", "10.0.0.0/8"), policy("snat", "SNAT", "203.0.113.0/24")],
                           allow_ipv6=False)
    assert [p.name for p in found.valid] == ["a", "b", "snat"]
    assert [e.source for e in found.invalid] == ["EgressNATPolicy bad"]
    assert found.nonmasq_origins() == {parse_cidr("10.0.0.0/8"): ("a", "b"), parse_cidr("192.0.2.0/24"): ("b",)}


def source_context(kube: KubeSettings | None = None) -> SourceContext:
    return SourceContext(config_path="/nonexistent", options=AgentOptions(), resync_interval=lambda: 60.0,
                         on_resync_interval_change=lambda cb: None, kube=kube)


def _enabled_plugin() -> EgressNATPolicies:
    plugin = EgressNATPolicies()
    registered = []
    plugin.register_sources(registered.append, source_context(KubeSettings(egress_nat_policies=True)))
    assert [s.name for s in registered] == ["egress-nat-policies"]
    return plugin


def test_plugin_is_silent_without_the_flag():
    plugin = EgressNATPolicies()
    registered = []
    plugin.register_sources(registered.append, source_context())
    assert registered == [] and plugin.nonmasq_cidrs(None, AgentOptions()) is None


def test_plugin_contributes_nosnat_destinations_and_reports_invalid_once(capsys):
    plugin = _enabled_plugin()
    assert plugin.update({"a": policy("a", "NoSNAT", "192.0.2.0/24"), "bad": policy("bad", "NoSNAT", "192.0.2.1/24")})
    assert plugin.nonmasq_cidrs(None, AgentOptions()) == ["192.0.2.0/24"]
    assert plugin.nonmasq_cidrs(None, AgentOptions()) == ["192.0.2.0/24"]
    err = capsys.readouterr()
    logged = (err.out + err.err).count("EgressNATPolicy skipped")
    assert logged == 1  # not once per reconcile


def test_plugin_asks_for_a_reconcile_only_when_a_spec_changes():
    plugin = _enabled_plugin()
    a = policy("a", "NoSNAT", "192.0.2.0/24")
    assert plugin.update({"a": a}) is not None
    with_status = {**a, "status": {"conditions": [{"type": "Accepted", "status": "True"}]}}
    assert plugin.update({"a": with_status}) is None  # the controller's status write
    assert plugin.update({"a": policy("a", "NoSNAT", "198.51.100.0/24")}) is not None
    assert plugin.update({}) is not None


async def test_plugin_contributions_flow_through_the_plugin_manager():
    plugins = Plugins.load(entry_points=False)
    plugin = next(p for p in plugins.pm.get_plugins() if isinstance(p, EgressNATPolicies))
    context = source_context(KubeSettings(egress_nat_policies=True))
    assert "egress-nat-policies" in [s.name for s in plugins.sources(context)]
    plugin.update({"a": policy("a", "NoSNAT", "203.0.113.0/24"), "v6": policy("v6", "NoSNAT", "2001:db8::/32")})
    contributions = await plugins.contributions(None, AgentOptions())
    assert [(c.plugin, c.cidrs, c.kind) for c in contributions] == [  # the v6 CIDR left out, not fatal
        ("masqd.default_plugins.egress", (parse_cidr("203.0.113.0/24"),), "policy")]
    assert [p.name for p in plugin.policies.valid if p.ignored] == ["v6"]
