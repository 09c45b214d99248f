"""Every pass that changes what the agent is doing says so once (issue 18, items 5 and 9): a fixed
config after a rejection is "accepted again" even when the rules do not change, a first pass
that finds its rules already in the kernel says "rules already in place", and ``run --once``
with an invalid config prints each problem once (no log line about keeping rules it never had).
"""

from __future__ import annotations

import subprocess

import pytest
import structlog

from masqd_proc import MASQD, log_events

from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.errors import ConfigError
from masqd.reconcile import Reconciler
from masqd.testing import netns

BAD = "nonMasqueradeCIDRs: [10.0.0.1/8]\n"
GOOD = "nonMasqueradeCIDRs: [10.0.0.0/8]\n"


async def test_a_fixed_config_is_said_to_be_accepted_again_even_when_the_rules_stay(tmp_path):
    config = tmp_path / "config"
    config.write_text(GOOD)
    reconciler = Reconciler(DryRunBackend(), AgentOptions(), config)
    with structlog.testing.capture_logs() as logs:
        await reconciler.reconcile()
        config.write_text(BAD)
        with pytest.raises(ConfigError):
            await reconciler.reconcile()
        with pytest.raises(ConfigError):
            await reconciler.reconcile()  # the same rejection: not logged again
        config.write_text(GOOD)  # back to the rules already applied: nothing is written
        await reconciler.reconcile()
        await reconciler.reconcile()
    events = [entry["event"] for entry in logs if entry["log_level"] != "debug" and not entry["event"].startswith("dry-run")]
    assert events == ["rules applied", "config rejected; keeping the rules last applied", "config accepted again"]
    accepted = next(entry for entry in logs if entry["event"] == "config accepted again")
    assert accepted["path"] == [str(config)]


def test_run_once_with_an_invalid_config_prints_each_problem_once(tmp_path):
    config = tmp_path / "config"
    config.write_text(BAD)
    result = subprocess.run([str(MASQD), "run", "--once", "--backend", "dry-run", "--config", str(config),
                             "--log-format", "json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if "not aligned" in line] == [
        f"error: {config}: nonMasqueradeCIDRs[0]: '10.0.0.1/8': not aligned to a CIDR block: host bits are set; "
        "did you mean '10.0.0.0/8'?"]
    assert log_events(result.stderr) == []


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_run_once_on_a_kernel_that_already_holds_the_rules_says_so(node_ns, tmp_path, backend):
    config = tmp_path / "config"
    config.write_text(GOOD)
    command = [str(MASQD), "run", "--once", "--backend", backend, "--config", str(config), "--log-format", "json"]
    try:
        first = netns.run(node_ns, *command)
        second = netns.run(node_ns, *command)
    finally:
        netns.run(node_ns, str(MASQD), "cleanup", "--backend", backend, check=False)
    assert [e["event"] for e in log_events(first.stderr) if e["event"].startswith("rules")] == ["rules applied"]
    [in_place] = [e for e in log_events(second.stderr) if e["event"].startswith("rules")]
    assert (in_place["event"], in_place["cidrs"]) == ("rules already in place", 2)


@pytest.mark.netns
def test_explain_live_names_masqds_rules_of_another_backend(node_ns, tmp_path):
    """``explain --live`` reads the iptables backend by default: after ``--backend nftables`` it
    finds none of its rules, and says where masqd's rules are and how to explain them (issue 18,
    item 12), still exiting 5 (the chosen backend's rules differ from the desired state)."""
    config = tmp_path / "config"
    config.write_text(GOOD)
    try:
        netns.run(node_ns, str(MASQD), "run", "--once", "--backend", "nftables", "--config", str(config))
        result = netns.run(node_ns, str(MASQD), "explain", "--live", "10.1.2.3", "--config", str(config),
                           check=False)
    finally:
        netns.run(node_ns, str(MASQD), "cleanup", "--backend", "nftables", check=False)
    assert result.returncode == 5
    assert ("note: the kernel holds none of the iptables backend's rules, but masqd's rules of the nftables "
            "backend, table masqd: explain them with --backend nftables") in result.stderr.splitlines()


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_first_write_logs_the_cidrs_it_changed_against_what_the_kernel_held(node_ns, tmp_path, backend):
    """After a restart (or a migration) the kernel holds a previous config's rules: the first
    write's log line and audit event name what it added and removed against those (issue 18,
    item 4), not every CIDR as new."""
    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24, 198.51.100.0/24]\n")
    command = [str(MASQD), "run", "--once", "--backend", backend, "--config", str(config), "--log-format", "json"]
    try:
        netns.run(node_ns, *command)
        config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n")
        second = netns.run(node_ns, *command)
    finally:
        netns.run(node_ns, str(MASQD), "cleanup", "--backend", backend, check=False)
    [written] = [e for e in log_events(second.stderr) if e["event"] == "rules applied"]
    assert (written["cidrs_added"], written["cidrs_removed"]) == (["203.0.113.0/24"],
                                                                  ["192.0.2.0/24", "198.51.100.0/24"])
