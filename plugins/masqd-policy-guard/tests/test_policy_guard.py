"""masqd-policy-guard against masqd, through masqd's own test fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import masqd
import pytest

from masqd.config import AgentOptions
from masqd_policy_guard import PolicyGuard

POLICY = """\
minPrefixLength: {ipv4: 8, ipv6: 32}
alwaysMasquerade: [203.0.113.0/24, "2001:db8:ffff::/48"]
"""


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_default_policy_refuses_the_default_route_and_keeps_the_last_good_rules(masqd_dry_run):
    agent = masqd_dry_run(PolicyGuard())
    assert agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n").error is None
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8, 0.0.0.0/0]\n")
    assert [str(p) for p in result.error.problems] == [
        "policy-guard.validate_config: 0.0.0.0/0 exempts every destination from masquerading; "
        "set allowDefaultRoute: true in the default policy to allow it"]
    assert result.nonmasq[4] == ["169.254.0.0/16", "10.0.0.0/8"]


@pytest.mark.parametrize(("cidrs", "fragment"), [
    pytest.param("[10.0.0.0/7]", "10.0.0.0/7 is shorter than /8, the shortest IPv4 prefix", id="short-v4"),
    pytest.param('["2001:db8::/31"]', "2001:db8::/31 is shorter than /32", id="short-v6"),
    pytest.param("[203.0.113.128/25]", "203.0.113.128/25 overlaps 203.0.113.0/24", id="inside-always-masquerade"),
    pytest.param("[203.0.0.0/8]", "203.0.0.0/8 overlaps 203.0.113.0/24", id="around-always-masquerade"),
    pytest.param('["2001:db8::/32"]', "2001:db8::/32 overlaps 2001:db8:ffff::/48", id="v6-always-masquerade"),
])
def test_policy_file_rules(masqd_dry_run, policy_file, cidrs, fragment):
    agent = masqd_dry_run(PolicyGuard(policy_file), options=AgentOptions(enable_ipv6=True))
    result = agent.apply(f"nonMasqueradeCIDRs: {cidrs}\n")
    assert result.error is not None and fragment in str(result.error) and str(policy_file) in str(result.error)


def test_allowed_lists_pass(masqd_dry_run, policy_file):
    result = masqd_dry_run(PolicyGuard(policy_file)).apply("nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n")
    assert result.error is None


def test_contributions_of_other_plugins_are_checked_too(masqd_dry_run, policy_file):
    class Adds:
        name = "adds"

        @masqd.hookimpl
        def nonmasq_cidrs(self):
            return ["203.0.113.0/24"]

    result = masqd_dry_run(Adds(), PolicyGuard(policy_file)).apply("nonMasqueradeCIDRs: []\n")
    assert "203.0.113.0/24 overlaps 203.0.113.0/24" in str(result.error)


def test_policy_changes_are_read_again(masqd_dry_run, policy_file):
    agent = masqd_dry_run(PolicyGuard(policy_file))
    assert agent.apply("nonMasqueradeCIDRs: [0.0.0.0/0]\n").error is not None
    policy_file.write_text("allowDefaultRoute: true\n")
    assert agent.apply("nonMasqueradeCIDRs: [0.0.0.0/0]\n").error is None


@pytest.mark.parametrize(("text", "fragment"), [
    pytest.param("allowDefaultRoute: yes please\n", "allowDefaultRoute: 'yes please': expected true or false", id="bool"),
    pytest.param("minPrefixLength: {ipv4: 40}\n", "minPrefixLength.ipv4: 40: expected a whole number 0-32", id="too-long"),
    pytest.param("minPrefixLenght: {ipv4: 8}\n", "unknown key(s) minPrefixLenght", id="typo"),
    pytest.param("alwaysMasquerade: [203.0.113.1/24]\n", "alwaysMasquerade[0]: '203.0.113.1/24': not aligned",
                 id="misaligned"),
    pytest.param("[1, 2]\n", "expected a mapping", id="not-a-mapping"),
])
def test_a_bad_policy_file_keeps_the_last_good_rules_and_names_file_and_key(masqd_dry_run, policy_file, text, fragment):
    agent = masqd_dry_run(PolicyGuard(policy_file))
    assert agent.apply(None).error is None
    policy_file.write_text(text)
    result = agent.apply("nonMasqueradeCIDRs: [192.0.2.0/24]\n")
    assert result.error is not None and fragment in str(result.error) and str(policy_file) in str(result.error)
    assert result.nonmasq[4][-1] == "192.168.0.0/16"  # the defaults applied first are still there


def test_masqd_validate_with_the_installed_plugin(tmp_path, policy_file):
    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n")
    env = {**os.environ, "MASQD_PLUGINS": "policy-guard", "MASQD_POLICY_GUARD": str(policy_file)}
    masqd_cli = Path(sys.executable).with_name("masqd")
    result = subprocess.run([str(masqd_cli), "validate", "--config", str(config)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert (f"error: plugins: policy-guard.validate_config: 203.0.113.0/24 overlaps 203.0.113.0/24, which "
            f"{policy_file} says must always be masqueraded (alwaysMasquerade)") in result.stderr
