"""``masqd controller``: the pure translation (table-driven), and the controller against the
in-process API server (``tests/kubeapi.py``) over a real socket, lightkube unpatched."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from masqd.cidrs import parse_cidr
from masqd.hookspecs import hookimpl
from masqd.plugins import Plugins
from masqd.cli import main
from masqd.config import AgentOptions, parse_config
from masqd.controller import (
    CONFLICT_RETRIES,
    DEFAULT_POLICY,
    MANAGED_BY_LABEL,
    MANAGED_POLICY,
    Controller,
    ControllerOptions,
    PolicyStatus,
    merge_condition,
    network_key,
    render_config,
    translate,
)
from masqd.kube import KubeSettings, ObjectRef, make_client
from masqd.testing import wait_until

from deploy_files import agent_grants, controller_grants, rbac_allows
from kubeapi import FakeKubeAPI

CONFIGMAP = ObjectRef("kube-system", "ip-masq-agent")
RFC1918 = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]


def policy(name: str, *cidrs: str, action: str = "NoSNAT", generation: int = 1, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy",
            "metadata": {"name": name, "generation": generation, **extra},
            "spec": {"action": action, "destinations": [{"cidr": c} for c in cidrs]}}


def node(name: str, *pod_cidrs: str, single: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if pod_cidrs:
        spec["podCIDRs"] = list(pod_cidrs)
    if single:
        spec["podCIDR"] = single
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": spec}


def options(*, services: tuple[str, ...] = (), node_cidrs: tuple[str, ...] = (), ipv6: bool = False) -> ControllerOptions:
    return ControllerOptions(CONFIGMAP, service_cidrs=tuple(map(parse_cidr, services)),
                             node_cidrs=tuple(map(parse_cidr, node_cidrs)), enable_ipv6=ipv6)


def written(text: str) -> list[str]:
    """The CIDRs a config text lists, in order (and checks the agent accepts it)."""
    parsed = parse_config(text, AgentOptions(enable_ipv6=True))
    return [str(net) for net in parsed.config.non_masquerade_cidrs]


# --- the pure translation ----------------------------------------------------------------------------

DEFAULT = policy(DEFAULT_POLICY, *RFC1918)


@pytest.mark.parametrize(
    ("policies", "nodes", "opts", "expected_cidrs"),
    [
        pytest.param([], [], options(), RFC1918, id="no-policies-default-counts-as-present"),
        pytest.param([DEFAULT, policy("extra", "100.64.0.0/10", "203.0.113.0/24")], [], options(),
                     ["10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16", "203.0.113.0/24"],
                     id="union-sorted"),
        pytest.param([DEFAULT, policy("a", "10.0.0.0/8", "198.51.100.0/24"), policy("b", "198.51.100.0/24")], [],
                     options(), ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "198.51.100.0/24"],
                     id="dedupe-across-policies"),
        pytest.param([DEFAULT, policy("order", "192.0.2.128/25", "192.0.2.0/24", "192.0.2.0/25")], [], options(),
                     ["10.0.0.0/8", "172.16.0.0/12", "192.0.2.0/24", "192.0.2.0/25", "192.0.2.128/25",
                      "192.168.0.0/16"], id="ordering-address-then-prefix"),
        pytest.param([DEFAULT, policy("v6", "fd00::/8", "198.51.100.0/24")], [], options(),
                     ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "198.51.100.0/24"], id="ipv6-left-out"),
        pytest.param([DEFAULT, policy("v6", "fd00::/8", "198.51.100.0/24")], [], options(ipv6=True),
                     ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "198.51.100.0/24", "fd00::/8"],
                     id="ipv6-written-with-flag-after-ipv4"),
        pytest.param([DEFAULT, policy("bad", "198.51.100.0/24", "10.0.0.1/8")], [], options(), RFC1918,
                     id="invalid-policy-excluded-whole"),
        pytest.param([DEFAULT, policy("out", "198.51.100.0/24", action="SNAT")], [], options(), RFC1918,
                     id="snat-policy-excluded"),
        pytest.param([policy(DEFAULT_POLICY, "10.0.0.0/8")], [], options(), ["10.0.0.0/8"],
                     id="edited-default-is-used-as-edited"),
        pytest.param([DEFAULT], [node("n1", "10.244.1.0/24", "fd00:1::/64"), node("n2", single="10.244.0.0/24"),
                                 node("n3")],
                     options(services=("10.96.0.0/12",), node_cidrs=("192.0.2.0/24",)),
                     ["10.0.0.0/8", "10.96.0.0/12", "10.244.0.0/24", "10.244.1.0/24", "172.16.0.0/12",
                      "192.0.2.0/24", "192.168.0.0/16"], id="cluster-ranges-via-managed-policy"),
        pytest.param([DEFAULT, policy(MANAGED_POLICY, "203.0.113.0/24")], [node("n1", "10.244.1.0/24")], options(),
                     ["10.0.0.0/8", "10.244.1.0/24", "172.16.0.0/12", "192.168.0.0/16"],
                     id="edited-managed-policy-counts-as-desired"),
        pytest.param([DEFAULT, policy(MANAGED_POLICY, "203.0.113.0/24")], [], options(), RFC1918,
                     id="managed-policy-without-ranges-contributes-nothing"),
    ],
)
def test_translation_writes_the_union(policies, nodes, opts, expected_cidrs) -> None:
    translation = translate({p["metadata"]["name"]: p for p in policies}, nodes, opts)
    assert [str(net) for net in translation.cidrs] == expected_cidrs
    assert written(translation.config_text) == expected_cidrs


def test_config_text_is_the_documented_yaml() -> None:
    translation = translate([DEFAULT], [], options())
    assert translation.config_text == "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 172.16.0.0/12\n- 192.168.0.0/16\n"
    assert not translation.default_missing


def test_translation_is_deterministic_whatever_the_input_order() -> None:
    policies = [DEFAULT, policy("a", "198.51.100.0/24", "100.64.0.0/10"), policy("b", "203.0.113.0/24")]
    nodes = [node("n1", "10.244.1.0/24"), node("n2", "10.244.0.0/24")]
    first = translate(policies, nodes, options())
    second = translate(list(reversed(policies)), list(reversed(nodes)), options())
    assert first == second


@pytest.mark.parametrize(
    ("count", "limit_line"),
    [
        pytest.param(64, None, id="64-no-cidrLimit"),
        pytest.param(65, "cidrLimit: 1065", id="65-cidrLimit-with-room-for-a-policy"),
        pytest.param(300, "cidrLimit: 1300", id="300-cidrLimit-with-room-for-a-policy"),
    ],
)
def test_more_than_64_cidrs_carry_a_cidr_limit(count: int, limit_line: str | None) -> None:
    cidrs = [f"100.{64 + i // 256}.{i % 256}.0/24" for i in range(count)]
    translation = translate([policy(DEFAULT_POLICY, *cidrs)], [], options())
    assert len(translation.cidrs) == count
    lines = translation.config_text.splitlines()
    assert (lines[-1] == limit_line) if limit_line else not any(line.startswith("cidrLimit") for line in lines)
    assert len(written(translation.config_text)) == count
    parsed = parse_config(translation.config_text, AgentOptions())  # a v4-only agent accepts it too
    assert len(parsed.config.non_masquerade_cidrs) == count


async def test_an_agent_watching_policies_too_accepts_a_new_policy_before_the_controller_rewrites() -> None:
    """The ConfigMap the controller wrote (70 CIDRs) is the agent's only source; a policy added
    since is contributed by the agent's own watch and must not trip the ConfigMap's cidrLimit."""
    from masqd.reconcile import plan_rules

    cidrs = [f"100.{64 + i // 256}.{i % 256}.0/24" for i in range(70)]
    config = parse_config(translate([policy(DEFAULT_POLICY, *cidrs)], [], options()).config_text, AgentOptions()).config

    class NewPolicy:
        @hookimpl
        def nonmasq_cidrs(self):
            return [f"198.18.{i}.0/24" for i in range(200)]

    plugins = Plugins.load(entry_points=False, extra=[("new-policy", NewPolicy())])
    ruleset, _ = await plan_rules(config, AgentOptions(), plugins)
    assert len(ruleset.ipv4.nonmasq) >= 270


def test_empty_union_is_an_explicit_empty_list() -> None:
    text = render_config(())
    assert text == "nonMasqueradeCIDRs: []\n"
    assert written(text) == []


@pytest.mark.parametrize(
    ("obj", "ipv6", "accepted", "message_has"),
    [
        pytest.param(policy("p", "198.51.100.0/24", generation=3), False, True, "1 destination keeps", id="valid"),
        pytest.param(policy("p", "10.0.0.1/8", "nonsense", generation=3), False, False,
                     "spec.destinations[0].cidr: '10.0.0.1/8'", id="invalid-names-every-problem"),
        pytest.param(policy("p", "fd00::/8", "198.51.100.0/24", generation=3), False, True,
                     "IPv6 destinations left out (the controller runs without --enable-ipv6): fd00::/8",
                     id="ipv6-left-out-says-so"),
        pytest.param(policy("p", "fd00::/8", generation=3), True, True, "1 destination keeps", id="ipv6-with-flag"),
        pytest.param(policy("p", "198.51.100.0/24", action="SNAT", generation=3), False, True, "SNAT",
                     id="snat"),
        pytest.param(policy("p", "198.51.100.0/24", action="Drop", generation=3), False, False, "spec.action",
                     id="unknown-action"),
        pytest.param({"metadata": {"name": "p", "generation": 3}, "spec": "x"}, False, False, "spec",
                     id="spec-not-a-mapping"),
    ],
)
def test_policy_status(obj, ipv6: bool, accepted: bool, message_has: str) -> None:
    status = translate([DEFAULT, obj], [], options(ipv6=ipv6)).statuses["p"]
    assert status.accepted is accepted
    assert status.reason == ("Valid" if accepted else "Invalid")
    assert status.observed_generation == 3
    assert message_has in status.message
    if not accepted:
        invalid = translate([DEFAULT, obj], [], options(ipv6=ipv6))
        assert written(invalid.config_text) == RFC1918


def test_invalid_problems_are_all_in_the_message() -> None:
    status = translate([policy("p", "10.0.0.1/8", "bogus")], [], options()).statuses["p"]
    assert "10.0.0.0/8" in status.message  # the aligned form is suggested
    assert "spec.destinations[1].cidr: 'bogus'" in status.message


def test_managed_policy_spec_sorted_deduplicated_from_nodes_and_flags() -> None:
    nodes = [node("b", "10.244.1.0/24", "fd00:1::/64"), node("a", single="10.244.0.0/24"),
             node("c", "10.244.1.0/24"), node("d"), node("e", "not-a-cidr")]
    translation = translate([DEFAULT], nodes, options(services=("10.96.0.0/12", "fd00:96::/108"),
                                                      node_cidrs=("192.0.2.0/24", "10.96.0.0/12")))
    assert translation.managed_spec == {"action": "NoSNAT", "destinations": [
        {"cidr": c} for c in ["10.96.0.0/12", "10.244.0.0/24", "10.244.1.0/24", "192.0.2.0/24",
                              "fd00:1::/64", "fd00:96::/108"]]}
    assert len(translation.warnings) == 1 and "Node e" in translation.warnings[0]


def test_no_cluster_ranges_means_no_managed_policy() -> None:
    assert translate([DEFAULT], [node("n")], options()).managed_spec is None


def test_managed_policy_status_is_judged_on_its_desired_spec() -> None:
    edited = policy(MANAGED_POLICY, "bogus", generation=7)
    status = translate([DEFAULT, edited], [node("n", "10.244.0.0/24")], options()).statuses[MANAGED_POLICY]
    assert status.accepted and status.observed_generation == 7


def test_missing_default_is_reported_and_counted() -> None:
    translation = translate([policy("x", "198.51.100.0/24")], [], options())
    assert translation.default_missing
    assert DEFAULT_POLICY not in translation.statuses  # no object yet: nothing to record on
    assert written(translation.config_text) == RFC1918[:2] + ["192.168.0.0/16", "198.51.100.0/24"]


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("previous", "status", "expected_time"),
    [
        pytest.param(None, PolicyStatus(True, "ok", 2), "2024-05-01T12:00:00Z", id="first"),
        pytest.param([{"type": "Accepted", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}],
                     PolicyStatus(True, "ok", 2), "2020-01-01T00:00:00Z", id="same-status-keeps-time"),
        pytest.param([{"type": "Accepted", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}],
                     PolicyStatus(False, "bad", 2), "2024-05-01T12:00:00Z", id="flip-new-time"),
    ],
)
def test_condition_transition_time(previous, status: PolicyStatus, expected_time: str) -> None:
    condition = status.condition(previous, NOW)
    assert condition == {"type": "Accepted", "status": "True" if status.accepted else "False",
                         "reason": status.reason, "message": status.message, "observedGeneration": 2,
                         "lastTransitionTime": expected_time}


def test_merge_condition_keeps_other_conditions_in_place() -> None:
    other = {"type": "Other", "status": "True"}
    old = {"type": "Accepted", "status": "False"}
    new = {"type": "Accepted", "status": "True"}
    assert merge_condition([old, other], new) == [new, other]
    assert merge_condition([other], new) == [other, new]
    assert merge_condition(None, new) == [new]


# --- against the fake API server ---------------------------------------------------------------------

#: Short leader-election durations (client-go's are 15 s / 10 s / 2 s).
TIMING = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.15, "coalesce": 0.01}
#: Generous limit for every wait-for-a-condition; nothing asserts how long anything took.
WAIT = 10.0
LEASE = ("leases", "masqd-controller", "kube-system")
CONFIGMAP_PATH = "/api/v1/namespaces/kube-system/configmaps"
POLICY_PATH = "/apis/networking.gke.io/v1/egressnatpolicies"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
OLD_TIME = "2020-01-01T00:00:00Z"


@pytest.fixture
def api():
    """The fake API server; stopped (every thread joined) after the test."""
    before = set(threading.enumerate())
    server = FakeKubeAPI(bookmark_interval=None).start()
    try:
        yield server
    finally:
        server.stop()
    leaked = [t.name for t in threading.enumerate() if t not in before and t.name.startswith("fake-kubeapi")]
    assert not leaked, f"server threads still running: {leaked}"


@pytest.fixture
def kubeconfig(api, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig")


class Cluster:
    """Controller replicas against the fake API, in the test's own task group. Every replica is
    cancelled (a leader releases its Lease) and its client closed on exit; no task outlives it."""

    def __init__(self, kubeconfig: Path, **options: Any):
        self.settings = KubeSettings(kubeconfig=str(kubeconfig), backoff_initial=0.05, backoff_max=0.3,
                                     request_timeout=2.0)
        self.options = ControllerOptions(CONFIGMAP, **options)
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._done: dict[str, anyio.Event] = {}

    async def __aenter__(self) -> Cluster:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        for scope in self._scopes.values():
            scope.cancel()
        result = await self._tg.__aexit__(*exc)
        if exc[0] is None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert not others, f"tasks left behind: {others}"
        return result

    def start(self, **timing: float) -> Controller:
        identity = f"replica-{len(self._scopes) + 1}"
        client = make_client(self.settings)
        controller = Controller(client, self.options, settings=self.settings, identity=identity,
                                **{**TIMING, **timing})
        scope = self._scopes[identity] = anyio.CancelScope()
        done = self._done[identity] = anyio.Event()

        async def run() -> None:
            try:
                with scope:
                    await controller.run()
            finally:
                with anyio.CancelScope(shield=True):
                    await client.close()
                done.set()

        self._tg.start_soon(run)
        return controller

    async def stop(self, controller: Controller) -> None:
        self._scopes[controller.identity].cancel()
        with anyio.fail_after(WAIT):
            await self._done[controller.identity].wait()


def config_cidrs(api: FakeKubeAPI) -> list[str] | None:
    obj = api.get("configmaps", CONFIGMAP.name, CONFIGMAP.namespace)
    text = ((obj or {}).get("data") or {}).get("config")
    return None if text is None else written(text)


def accepted(api: FakeKubeAPI, name: str) -> dict[str, Any] | None:
    obj = api.get("egressnatpolicies", name) or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Accepted"), None)


def managed_cidrs(api: FakeKubeAPI) -> list[str] | None:
    obj = api.get("egressnatpolicies", MANAGED_POLICY)
    return None if obj is None else [d["cidr"] for d in obj["spec"]["destinations"]]


def writes_to(api: FakeKubeAPI, prefix: str, since: int = 0) -> list:
    return [r for r in api.requests[since:] if r.method in WRITE_METHODS and r.path.startswith(prefix)]


async def next_sync(api: FakeKubeAPI, controller: Controller) -> None:
    """Make the controller run one more pass (an unrelated Node appears) and wait for it."""
    syncs = controller.syncs
    api.put(node(f"noise-{syncs}"))
    await wait_until(lambda: controller.syncs > syncs, "another sync pass")


def keep_status(api: FakeKubeAPI, name: str, *cidrs: str, transition: str | None = None) -> None:
    """Change a policy's destinations (or only its condition's lastTransitionTime), keeping its status."""
    obj = api.get("egressnatpolicies", name)
    if cidrs:
        obj["spec"]["destinations"] = [{"cidr": c} for c in cidrs]
    if transition:
        for condition in obj["status"]["conditions"]:
            condition["lastTransitionTime"] = transition
    api.put(obj)


async def test_default_policy_created_when_absent_and_edits_kept(api, kubeconfig) -> None:
    async with Cluster(kubeconfig) as cluster:
        controller = cluster.start()
        created = await wait_until(lambda: api.get("egressnatpolicies", DEFAULT_POLICY), "the default policy")
        assert created["spec"] == {"action": "NoSNAT", "destinations": [{"cidr": c} for c in RFC1918]}
        await wait_until(lambda: config_cidrs(api) == RFC1918, "the ConfigMap")
        assert [r.method for r in writes_to(api, CONFIGMAP_PATH)] == ["POST"]  # absent: created

        api.put(policy(DEFAULT_POLICY, "10.0.0.0/8", "100.64.0.0/10"))
        await wait_until(lambda: config_cidrs(api) == ["10.0.0.0/8", "100.64.0.0/10"], "the edit in the ConfigMap")
        await next_sync(api, controller)
        assert api.get("egressnatpolicies", DEFAULT_POLICY)["spec"]["destinations"] == [
            {"cidr": "10.0.0.0/8"}, {"cidr": "100.64.0.0/10"}]  # an edit is kept, not reverted
        assert [r.method for r in writes_to(api, POLICY_PATH) if not r.path.endswith("/status")] == ["POST"]
        assert api.get("egressnatpolicies", MANAGED_POLICY) is None  # no cluster ranges known

        api.delete("egressnatpolicies", DEFAULT_POLICY)
        await wait_until(lambda: (api.get("egressnatpolicies", DEFAULT_POLICY) or {}).get("spec") == created["spec"],
                         "the default policy re-created")
        await wait_until(lambda: config_cidrs(api) == RFC1918, "the ConfigMap back to the default")


async def test_managed_policy_follows_nodes_and_flags_and_reverts_edits(api, kubeconfig) -> None:
    api.put(node("n1", "10.244.1.0/24"))
    api.put(node("n2", single="10.244.0.0/24"))
    flags = {"service_cidrs": (parse_cidr("10.96.0.0/12"),), "node_cidrs": (parse_cidr("192.0.2.0/24"),)}
    async with Cluster(kubeconfig, **flags) as cluster:
        cluster.start()
        expected = ["10.96.0.0/12", "10.244.0.0/24", "10.244.1.0/24", "192.0.2.0/24"]
        await wait_until(lambda: managed_cidrs(api) == expected, "the managed policy")
        managed = api.get("egressnatpolicies", MANAGED_POLICY)
        assert managed["metadata"]["labels"] == {MANAGED_BY_LABEL: "masqd"}
        assert managed["spec"]["action"] == "NoSNAT"
        union = sorted(set(expected) | set(RFC1918), key=lambda c: network_sort(c))
        await wait_until(lambda: config_cidrs(api) == union, "the cluster ranges in the ConfigMap")

        api.put(node("n3", "10.244.2.0/24", "fd00:2::/64"))
        expected = ["10.96.0.0/12", "10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24", "192.0.2.0/24", "fd00:2::/64"]
        await wait_until(lambda: managed_cidrs(api) == expected, "a new node's ranges")
        api.delete("nodes", "n1")
        expected.remove("10.244.1.0/24")
        await wait_until(lambda: managed_cidrs(api) == expected, "a removed node's range gone")
        await wait_until(lambda: "10.244.1.0/24" not in config_cidrs(api) and "10.244.2.0/24" in config_cidrs(api),
                         "the ConfigMap following the nodes")
        assert "fd00:2::/64" not in config_cidrs(api)  # no --enable-ipv6

        configmap_writes = len(writes_to(api, CONFIGMAP_PATH))
        tampered = api.get("egressnatpolicies", MANAGED_POLICY)
        tampered["metadata"]["labels"] = {}
        tampered["spec"] = {"action": "NoSNAT", "destinations": [{"cidr": "0.0.0.0/0"}]}
        api.put(tampered)
        await wait_until(lambda: managed_cidrs(api) == expected
                         and api.get("egressnatpolicies", MANAGED_POLICY)["metadata"]["labels"]
                         == {MANAGED_BY_LABEL: "masqd"}, "the edit reverted")
        assert len(writes_to(api, CONFIGMAP_PATH)) == configmap_writes  # the ConfigMap never saw the edit

        api.delete("egressnatpolicies", MANAGED_POLICY)
        await wait_until(lambda: managed_cidrs(api) == expected, "the managed policy re-created")


def network_sort(cidr: str):
    return network_key(parse_cidr(cidr))


async def test_configmap_has_the_union_and_is_not_rewritten(api, kubeconfig) -> None:
    api.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIGMAP.name,
                                                                   "namespace": CONFIGMAP.namespace},
             "data": {"config": "nonMasqueradeCIDRs: []", "note": "kept"}})
    api.put(policy(DEFAULT_POLICY, *RFC1918))
    api.put(policy("extra", "198.51.100.0/24", "fd00::/8", "10.0.0.0/8"))
    api.put(policy("out", "203.0.113.0/24", action="SNAT"))
    async with Cluster(kubeconfig) as cluster:
        controller = cluster.start()
        expected = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "198.51.100.0/24"]
        await wait_until(lambda: config_cidrs(api) == expected, "the union in the ConfigMap")
        stored = api.get("configmaps", CONFIGMAP.name, CONFIGMAP.namespace)
        assert stored["data"]["note"] == "kept"
        assert stored["data"]["config"] == "nonMasqueradeCIDRs:\n" + "".join(f"- {c}\n" for c in expected)
        parse_config(stored["data"]["config"], AgentOptions())  # a v4-only agent takes it
        await wait_until(lambda: all(accepted(api, n) for n in (DEFAULT_POLICY, "extra", "out")), "every status")

        assert [r.method for r in writes_to(api, CONFIGMAP_PATH)] == ["PUT"]
        status_writes = len(writes_to(api, POLICY_PATH))
        await next_sync(api, controller)
        extra = api.get("egressnatpolicies", "extra")
        extra["metadata"]["labels"] = {"team": "net"}  # not the spec: nothing to write
        api.put(extra)
        await next_sync(api, controller)
        assert [r.method for r in writes_to(api, CONFIGMAP_PATH)] == ["PUT"]
        assert len(writes_to(api, POLICY_PATH)) == status_writes


async def test_policy_status_accepted_rejected_with_generation(api, kubeconfig) -> None:
    api.put(policy("good", "198.51.100.0/24"))
    api.put(policy("bad", "10.0.0.1/8", "nonsense"))
    api.put(policy("v6", "fd00::/8", "203.0.113.0/24"))
    async with Cluster(kubeconfig) as cluster:
        controller = cluster.start()
        good = await wait_until(lambda: accepted(api, "good"), "good's status")
        assert {k: good[k] for k in ("status", "reason", "observedGeneration")} == {
            "status": "True", "reason": "Valid", "observedGeneration": 1}
        assert TIME.fullmatch(good["lastTransitionTime"])
        bad = await wait_until(lambda: accepted(api, "bad"), "bad's status")
        assert (bad["status"], bad["reason"], bad["observedGeneration"]) == ("False", "Invalid", 1)
        assert "spec.destinations[0].cidr: '10.0.0.1/8'" in bad["message"] and "'10.0.0.0/8'" in bad["message"]
        assert "spec.destinations[1].cidr: 'nonsense'" in bad["message"]
        v6 = await wait_until(lambda: accepted(api, "v6"), "v6's status")
        assert v6["status"] == "True" and "IPv6 destinations left out" in v6["message"]
        await wait_until(lambda: config_cidrs(api) == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                         "198.51.100.0/24", "203.0.113.0/24"], "the ConfigMap")

        # an unchanged condition is not rewritten; its transition time is the one recorded
        keep_status(api, "good", transition=OLD_TIME)
        keep_status(api, "bad", transition=OLD_TIME)
        status_writes = len(writes_to(api, POLICY_PATH))
        await next_sync(api, controller)
        assert len(writes_to(api, POLICY_PATH)) == status_writes

        keep_status(api, "good", "198.51.100.0/25")  # still valid: generation 2, no transition
        good = await wait_until(lambda: (c := accepted(api, "good")) and c["observedGeneration"] == 2 and c,
                                "good's new generation observed")
        assert good["status"] == "True" and good["lastTransitionTime"] == OLD_TIME

        keep_status(api, "bad", "192.0.2.0/24")  # fixed: flips to accepted
        bad = await wait_until(lambda: (c := accepted(api, "bad")) and c["status"] == "True" and c,
                               "bad accepted once fixed")
        assert bad["observedGeneration"] == 2 and bad["reason"] == "Valid"
        assert bad["lastTransitionTime"] != OLD_TIME and TIME.fullmatch(bad["lastTransitionTime"])
        await wait_until(lambda: "192.0.2.0/24" in config_cidrs(api), "the fixed policy in the ConfigMap")


async def test_conflict_is_reread_and_retried(api, kubeconfig) -> None:
    async with Cluster(kubeconfig) as cluster:
        cluster.start()
        await wait_until(lambda: config_cidrs(api) == RFC1918, "the ConfigMap")
        mark = len(api.requests)
        api.fail_next(2, status=409, path_contains=f"{CONFIGMAP.name}?")  # the next two PUTs, not GETs
        api.put(policy("extra", "198.51.100.0/24"))
        await wait_until(lambda: "198.51.100.0/24" in config_cidrs(api), "the ConfigMap updated")
        seen = [(r.method, r.status) for r in api.requests[mark:] if r.path == f"{CONFIGMAP_PATH}/{CONFIGMAP.name}"]
        assert seen == [("GET", 200), ("PUT", 409), ("GET", 200), ("PUT", 409), ("GET", 200), ("PUT", 200)]


async def test_a_write_conflicting_past_the_retries_is_refused_then_retried_after_a_backoff(api, kubeconfig) -> None:
    async with Cluster(kubeconfig) as cluster:
        cluster.start()
        await wait_until(lambda: config_cidrs(api) == RFC1918, "the ConfigMap")
        mark = len(api.requests)
        api.fail_next(CONFLICT_RETRIES, status=409, path_contains=f"{CONFIGMAP.name}?")  # every PUT of one pass
        with capture_logs() as logs:
            api.put(policy("extra", "198.51.100.0/24"))
            await wait_until(lambda: "198.51.100.0/24" in config_cidrs(api), "the ConfigMap updated")
            await wait_until(lambda: accepted(api, "extra"), "the policy's status written all the same")
        seen = [(r.method, r.status) for r in api.requests[mark:] if r.path == f"{CONFIGMAP_PATH}/{CONFIGMAP.name}"]
        seen = seen[: seen.index(("PUT", 200)) + 1]  # (a later pass may still GET before its watch catches up)
        assert seen == [("GET", 200), ("PUT", 409)] * CONFLICT_RETRIES + [("GET", 200), ("PUT", 200)]
        refused = [e for e in logs if e["event"] == "controller write failed; the other objects are still converged"]
        assert [e["error"] for e in refused] == [
            f"ApiWriteError: configmap {CONFIGMAP}: still conflicting after {CONFLICT_RETRIES} attempts"]
        assert [e["log_level"] for e in logs if e["event"] == "controller sync failed; retrying"] == ["warning"]


async def test_api_outage_then_recovery_converges(api, kubeconfig) -> None:
    async with Cluster(kubeconfig) as cluster:
        controller = cluster.start()
        await wait_until(lambda: config_cidrs(api) == RFC1918 and accepted(api, DEFAULT_POLICY), "convergence")
        await anyio.to_thread.run_sync(api.stop)
        api.put(policy("late", "198.51.100.0/24"))  # written while the controller cannot see it
        api.put(node("n1", "10.244.0.0/24"))
        await anyio.sleep(TIMING["lease_duration"])  # longer than the renew deadline: leadership lost
        api.start()
        await wait_until(lambda: config_cidrs(api) == ["10.0.0.0/8", "10.244.0.0/24", "172.16.0.0/12",
                                                         "192.168.0.0/16", "198.51.100.0/24"], "convergence after")
        await wait_until(lambda: accepted(api, "late") and managed_cidrs(api) == ["10.244.0.0/24"], "statuses after")
        assert controller.is_leader
        assert api.get(*LEASE)["spec"]["holderIdentity"] == controller.identity


async def test_two_replicas_one_leader_and_only_it_writes(api, kubeconfig) -> None:
    async with Cluster(kubeconfig) as cluster:
        replicas = [cluster.start(), cluster.start()]
        leaders = await wait_until(lambda: [c for c in replicas if c.is_leader], "a leader")
        assert len(leaders) == 1
        leader, follower = leaders[0], next(c for c in replicas if c is not leaders[0])
        await wait_until(lambda: config_cidrs(api) == RFC1918 and accepted(api, DEFAULT_POLICY), "convergence")
        for _ in range(40):  # several renew periods: never two leaders
            assert [c.is_leader for c in replicas].count(True) == 1
            await anyio.sleep(0.02)
        lease = api.get(*LEASE)["spec"]
        assert lease["holderIdentity"] == leader.identity
        assert lease["leaseDurationSeconds"] == 1
        assert MICRO_TIME.fullmatch(lease["renewTime"]) and MICRO_TIME.fullmatch(lease["acquireTime"])
        assert follower.writes == 0 and follower.syncs == 0
        others = [r for r in api.requests if r.method in WRITE_METHODS and "/leases" not in r.path]
        assert len(others) == leader.writes > 0


async def test_cancelled_leader_releases_and_the_other_takes_over(api, kubeconfig) -> None:
    async with Cluster(kubeconfig) as cluster:
        first = cluster.start()
        await wait_until(lambda: first.is_leader, "the first replica leading")
        second = cluster.start()
        await wait_until(lambda: config_cidrs(api) == RFC1918, "convergence")
        transitions = api.get(*LEASE)["spec"]["leaseTransitions"]
        await cluster.stop(first)
        assert api.get(*LEASE)["spec"]["holderIdentity"] in ("", second.identity)  # released on the way out
        await wait_until(lambda: second.is_leader, "the second replica leading")
        lease = api.get(*LEASE)["spec"]
        assert lease["holderIdentity"] == second.identity
        assert lease["leaseTransitions"] == transitions + 1
        api.put(policy("extra", "198.51.100.0/24"))
        await wait_until(lambda: "198.51.100.0/24" in config_cidrs(api), "the new leader writing")
        # the server holds the write before the controller has read the answer and counted it
        await wait_until(lambda: second.writes > 0, "the write counted by the new leader")


async def test_held_lease_is_taken_only_once_expired(api, kubeconfig) -> None:
    def ghost_renews() -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        api.put({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": LEASE[1], "namespace": LEASE[2]},
                 "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 1, "acquireTime": stamp,
                          "renewTime": stamp, "leaseTransitions": 3}})

    ghost_renews()
    async with Cluster(kubeconfig) as cluster:
        controller = cluster.start()
        for _ in range(8):  # the holder keeps renewing: never taken
            await anyio.sleep(0.2)
            ghost_renews()
            assert not controller.is_leader
        assert api.get("configmaps", CONFIGMAP.name, CONFIGMAP.namespace) is None
        assert not [r for r in api.requests if r.method in WRITE_METHODS and "/leases" not in r.path]
        # the holder dies without releasing: taken once expired
        await wait_until(lambda: controller.is_leader, "the expired lease taken")
        lease = api.get(*LEASE)["spec"]
        assert lease["holderIdentity"] == controller.identity and lease["leaseTransitions"] == 4
        await wait_until(lambda: config_cidrs(api) == RFC1918, "the new leader writing")


async def test_leader_that_cannot_renew_stops_writing(api, kubeconfig) -> None:
    async with Cluster(kubeconfig) as cluster:
        controller = cluster.start()
        await wait_until(lambda: config_cidrs(api) == RFC1918 and accepted(api, DEFAULT_POLICY), "convergence")
        api.fail_next(10**6, status=500, path_contains="/leases/")  # renewals fail from now on
        await wait_until(lambda: not controller.is_leader, "the leader stepping down")
        mark = len(api.requests)
        api.put(policy("extra", "198.51.100.0/24"))
        await anyio.sleep(0.5)
        assert [r for r in api.requests[mark:] if "/leases" not in r.path] == []  # no writes, not even watches
        assert "198.51.100.0/24" not in config_cidrs(api)
        api.clear_faults()
        await wait_until(lambda: controller.is_leader and "198.51.100.0/24" in config_cidrs(api), "leading again")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(["--service-cidr", "10.0.0.1/8"], "--service-cidr", id="misaligned-service-cidr"),
        pytest.param(["--node-cidr", "nodes"], "--node-cidr", id="bad-node-cidr"),
        pytest.param(["--lease", "no-slash"], "--lease", id="bad-lease"),
        pytest.param(["--configmap", "Kube_System/x"], "--configmap", id="bad-configmap"),
    ],
)
def test_cli_bad_flags_exit_2_naming_the_flag(flags: list[str], message: str, capsys) -> None:
    argv = ["controller", "--configmap", "kube-system/ip-masq-agent", *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_configmap_is_required(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["controller"])
    assert exit_info.value.code == 2 and "--configmap" in capsys.readouterr().err


def test_cli_without_credentials_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["controller", "--configmap", "kube-system/ip-masq-agent", "--kubeconfig", str(tmp_path / "none")])
    assert code == 2
    assert "no usable Kubernetes credentials" in capsys.readouterr().err


async def test_cli_controller_runs_and_releases_the_lease_on_sigterm(api, kubeconfig, tmp_path: Path) -> None:
    log_path = tmp_path / "controller.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "masqd", "controller", "--configmap", "kube-system/ip-masq-agent",
             "--kubeconfig", str(kubeconfig), "--service-cidr", "10.96.0.0/12", "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            await wait_until(lambda: config_cidrs(api) == ["10.0.0.0/8", "10.96.0.0/12", "172.16.0.0/12",
                                                             "192.168.0.0/16"], "the ConfigMap", timeout=30)
            holder = api.get(*LEASE)["spec"]["holderIdentity"]
            assert holder and "_" in holder
            proc.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=WAIT))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 0, log_path.read_text()
    assert api.get(*LEASE)["spec"]["holderIdentity"] == "", log_path.read_text()


# --- the shipped RBAC against the requests actually made ------------------------------------------

_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def rbac_attributes(record) -> tuple[str, str, str, str | None, str | None]:
    """(group, resource[/subresource], verb, namespace, name) of one request, as the API server's
    RBAC authorizer sees it (a list/watch with ``fieldSelector=metadata.name=X`` is authorized
    for the name X)."""
    parts = record.path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    namespace = None
    if rest and rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], (rest[1] if len(rest) > 1 else None)
    if len(rest) > 2:
        resource += "/" + rest[2]
    if record.method == "GET":
        verb = "get" if name else ("watch" if record.query.get("watch") in ("true", "1") else "list")
        selector = record.query.get("fieldSelector", "")
        if name is None and selector.startswith("metadata.name="):
            name = selector.split("=", 1)[1]
    else:
        verb = _VERBS[record.method]
    return group, resource, verb, namespace, name


async def test_every_request_the_controller_makes_is_allowed_by_the_shipped_rbac(api, kubeconfig) -> None:
    """Create the default and managed policies, write the ConfigMap and statuses, take the Lease,
    then (restarted without cluster ranges) delete the managed policy: all under the RBAC of
    examples/kubernetes/controller-rbac.yaml."""
    api.put(node("n1", "10.244.1.0/24"))
    api.put(policy("typo", "10.0.0.1/8"))
    async with Cluster(kubeconfig, service_cidrs=(parse_cidr("10.96.0.0/12"),)) as cluster:
        cluster.start()
        await wait_until(lambda: managed_cidrs(api), "the managed policy")
        await wait_until(lambda: accepted(api, "typo"), "a status written")
        await wait_until(lambda: config_cidrs(api), "the ConfigMap")
    api.delete("nodes", "n1")
    async with Cluster(kubeconfig) as cluster:  # no ranges left: the managed policy goes
        cluster.start()
        await wait_until(lambda: api.get("egressnatpolicies", MANAGED_POLICY) is None, "the managed policy deleted")
    grants = controller_grants()
    denied = sorted({rbac_attributes(r) for r in api.requests if not rbac_allows(grants, *rbac_attributes(r))})
    assert denied == [], f"the shipped RBAC refuses: {denied}"
    verbs = {rbac_attributes(r)[1:3] for r in api.requests}
    assert {("configmaps", "watch"), ("egressnatpolicies", "delete"), ("leases", "update")} <= verbs  # exercised


async def test_every_request_the_agent_makes_is_allowed_by_the_shipped_rbac(api, kubeconfig, tmp_path) -> None:
    from masqd.cli import main

    api.put(policy("on-prem", "192.0.2.0/24"))
    api.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ip-masq-agent", "namespace": "kube-system"},
             "data": {"config": "nonMasqueradeCIDRs: [10.0.0.0/8]\n"}})
    flags = ["--kube-configmap", "kube-system/ip-masq-agent", "--egress-nat-policies", "--kubeconfig", str(kubeconfig),
             "--config", str(tmp_path / "absent")]
    assert await anyio.to_thread.run_sync(main, ["validate", *flags]) == 0
    from masqd.agent import build_agent
    from masqd.backends.dryrun import DryRunBackend
    from masqd.config import AgentOptions
    from masqd.inputs import config_inputs
    from masqd.kube import ObjectRef
    from masqd.testing import running

    settings = KubeSettings(configmap=ObjectRef("kube-system", "ip-masq-agent"), egress_nat_policies=True,
                            kubeconfig=str(kubeconfig))
    agent = build_agent(AgentOptions(), backend=DryRunBackend(), config=config_inputs([], (), settings), kube=settings)
    async with running(agent):
        await wait_until(lambda: api.watch_count == 2, "both watches open")
    grants = agent_grants()
    denied = sorted({rbac_attributes(r) for r in api.requests if not rbac_allows(grants, *rbac_attributes(r))})
    assert denied == [], f"the shipped RBAC refuses: {denied}"


async def test_a_refused_policy_write_does_not_keep_the_configmap_from_being_written(api, kubeconfig) -> None:
    api.put(node("n1", "10.244.1.0/24"))
    api.put(policy(MANAGED_POLICY, "203.0.113.0/24"))  # edited: the controller wants to put it right...
    api.fail_next(1000, status=403, path_contains="/egressnatpolicies/masqd-managed")  # ...and is refused
    api.put(policy("on-prem", "192.0.2.0/24"))
    async with Cluster(kubeconfig) as cluster:
        cluster.start()
        await wait_until(lambda: "192.0.2.0/24" in (config_cidrs(api) or []), "the ConfigMap written anyway")
        await wait_until(lambda: accepted(api, "on-prem"), "the other policies' status written anyway")
    assert managed_cidrs(api) == ["203.0.113.0/24"]  # still refused
