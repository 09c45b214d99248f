"""Every counter series that can occur is exported at 0 from start-up (issue 17, section 5), so
Prometheus' ``increase()`` sees the first applied or rejected pass, plugin error and watch restart."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import masqd
from masqd import hookspecs
from masqd.agent import Agent, build_agent
from masqd.audit import RESULTS
from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.events import Event
from masqd.hookspecs import hookimpl
from masqd.http import Address
from masqd.inputs import ConfigLoader, ConfigMapInput, FileInput
from masqd.kube import KubeSettings, ObjectRef
from masqd.metrics import AGENT_TRIGGERS, PLUGIN_HOOKS, WATCH_RESTART_REASONS
from masqd.testing import make_plugins


def series(agent: Agent, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric of ``agent``'s /metrics text: sorted labels -> value."""
    text = agent.metrics.render().decode()
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def daemon_agent(config: Path, **kwargs) -> Agent:
    """An agent built as ``masqd run --http-address`` builds it (so it has metrics)."""
    return build_agent(AgentOptions(), backend=DryRunBackend(), config=config, http_address=Address("127.0.0.1", 0),
                       **kwargs)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ip-masq-agent"
    path.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    return path


def reconciles(triggers) -> set[tuple[tuple[str, str], ...]]:
    return {(("result", result), ("trigger", trigger)) for trigger, result in itertools.product(triggers, RESULTS)}


def test_a_default_agent_exports_every_trigger_and_result_at_zero_before_any_pass(config: Path) -> None:
    agent = daemon_agent(config)
    found = series(agent, "masqd_reconciles_total")
    triggers = {"startup", "sighup", "retry", "manual", "file", "timer", "drift-check", "addresses"}
    assert {s.name for s in agent.sources} <= triggers
    assert set(found) == reconciles(triggers)
    assert set(found.values()) == {0}
    assert series(agent, "masqd_plugin_errors_total") == {
        (("hook", "nonmasq_cidrs"), ("plugin", "masqd.default_plugins.egress")): 0}
    assert series(agent, "masqd_kube_watch_restarts_total") == {}  # no watch without --kube-*
    assert series(agent, "masqd_drift_repairs_total") == {(): 0}
    assert series(agent, "masqd_config_errors_total") == {(): 0}


async def test_one_applied_pass_counts_one_and_leaves_the_others_at_zero(config: Path) -> None:
    agent = daemon_agent(config)
    await agent.reconciler.reconcile((Event("file", str(config)),))
    found = series(agent, "masqd_reconciles_total")
    assert found.pop((("result", "applied"), ("trigger", "file"))) == 1
    assert len(found) == 8 * len(RESULTS) - 1 and set(found.values()) == {0}
    await agent.reconciler.reconcile((Event("timer"), Event("file")))  # a batch counts under its first
    found = series(agent, "masqd_reconciles_total")
    assert found[("result", "unchanged"), ("trigger", "timer")] == 1
    assert found[("result", "unchanged"), ("trigger", "file")] == 0
    assert found[("result", "applied"), ("trigger", "file")] == 1
    assert sum(found.values()) == 2


async def test_plugin_hooks_and_sources_are_exported_at_zero_and_counted(config: Path) -> None:
    class Source:
        name = "cni-watch"

        async def run(self, notify):
            pass

    class Unnamed:
        async def run(self, notify):
            pass

    class Guard:
        @hookimpl
        def register_sources(self, register, context):
            register(Source())
            register(Unnamed())

        @hookimpl
        def masquerade_cidrs(self, config, options):
            return []

        @hookimpl
        def validate_config(self, config, cidrs, options):
            raise RuntimeError("policy service down")

        @hookimpl
        def audit(self, event):
            pass

    agent = daemon_agent(config, plugins=make_plugins(Guard()))
    triggers = {s.name for s in agent.sources}
    assert {"cni-watch", "Guard"} <= triggers  # a source without a name is called after its plugin
    assert set(series(agent, "masqd_reconciles_total")) == reconciles(triggers | set(AGENT_TRIGGERS))
    errors = series(agent, "masqd_plugin_errors_total")
    assert errors == {(("hook", hook), ("plugin", plugin)): 0 for plugin, hook in [
        ("Guard", "masquerade_cidrs"), ("Guard", "validate_config"), ("Guard", "audit"),
        ("masqd.default_plugins.egress", "nonmasq_cidrs")]}
    with pytest.raises(Exception, match="policy service down"):
        await agent.reconciler.reconcile((Event("cni-watch"),))
    errors = series(agent, "masqd_plugin_errors_total")
    assert errors.pop((("hook", "validate_config"), ("plugin", "Guard"))) == 1
    assert set(errors.values()) == {0}
    found = series(agent, "masqd_reconciles_total")
    assert found.pop((("result", "rejected"), ("trigger", "cni-watch"))) == 1
    assert set(found.values()) == {0}


def test_each_watch_is_exported_with_each_restart_reason_at_zero(tmp_path: Path) -> None:
    ref = ObjectRef("kube-system", "ip-masq-agent")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                          "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
                          "current-context: x\n")
    settings = KubeSettings(configmap=ref, kubeconfig=str(kubeconfig), egress_nat_policies=True)
    loader = ConfigLoader([FileInput(tmp_path / "absent"), ConfigMapInput(ref, settings)], AgentOptions())
    agent = daemon_agent(loader, kube=settings)
    watches = ("configmap kube-system/ip-masq-agent", "EgressNATPolicy objects")
    assert series(agent, "masqd_kube_watch_restarts_total") == {
        (("reason", reason), ("watch", watch)): 0 for watch in watches for reason, _ in WATCH_RESTART_REASONS}
    assert {"configmap", "egress-nat-policies"} <= {dict(labels)["trigger"]
                                                    for labels in series(agent, "masqd_reconciles_total")}


def test_every_trigger_the_agent_emits_by_itself_is_exported() -> None:
    """Each ``Event("...")`` written in masqd (not an event source's name) is in AGENT_TRIGGERS,
    and the default ``reconcile()`` trigger too."""
    emitted = set()
    for path in Path(masqd.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Event" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                emitted.add(node.args[0].value)
    assert emitted and emitted <= set(AGENT_TRIGGERS)


def test_every_hook_that_can_fail_while_the_agent_runs_is_exported() -> None:
    """A new hook must be added to PLUGIN_HOOKS or to the ones that cannot fail after start-up."""
    specs = {name for name, value in vars(hookspecs).items() if hasattr(value, "masqd_spec")}
    assert specs == set(PLUGIN_HOOKS) | {"register_backends", "register_sources", "describe_cidrs"}
