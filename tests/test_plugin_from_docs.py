"""A third-party plugin written only from masqd's plugin documentation, and its tests.

"masqd-ipam-ranges" keeps the pod source address for the CIDRs an IPAM service lists. It
follows the IPAM through an event source (the daemon runs ``run``, which calls ``notify`` when the
list changes; one-shot commands await ``read_once``), contributes the CIDRs with
``nonmasq_cidrs``, vetoes any CIDR shorter than /8 with ``validate_config``, records audit events,
and says which IPAM pool each CIDR came from with ``describe_cidrs``. It declares no
``masqd_origin_kind`` (so its CIDRs are plain plugin CIDRs).

Documented sources used: docs/plugins.md, docs/architecture.md, masqd/hookspecs.py,
masqd/testing (docstrings), masqd/plugins/values.py (SourceContext), masqd/events.py.
"""

from __future__ import annotations

import ipaddress
import threading

import anyio
import pytest

import masqd
from masqd.agent import build_agent
from masqd.backends.base import BackendSettings
from masqd.config import AgentOptions
from masqd.plugins.values import Contribution
from masqd.testing import event_source, running, wait_until

PLUGIN_NAME = "masqd-ipam-ranges"
SOURCE_NAME = "ipam-ranges"
WAIT = 10.0  # wait_until's hang guard: far above what any of these should take

# Only documentation (RFC 5737) and private ranges; 0.0.0.0/0 is the "everything" mistake the veto
# exists for (no /1../7 block is private or documentation space).
POOL_A = ("192.0.2.0/24", "pool-a")
POOL_B = ("198.51.100.0/24", "pool-b")
POOL_C = ("203.0.113.0/24", "pool-c")
POOL_LAB = ("172.31.0.0/16", "pool-lab")
TOO_WIDE = ("0.0.0.0/0", "pool-oops")


# --------------------------------------------------------------------------------------------
# The simulated IPAM service
# --------------------------------------------------------------------------------------------


class FakeIpam:
    """An in-memory IPAM: a list of (CIDR, pool) with a revision that changes on every edit.
    ``fetch()`` is what a real client's blocking HTTP call would be."""

    def __init__(self, entries=()):
        self._lock = threading.Lock()
        self._entries = tuple(entries)
        self._revision = 1
        self.fetches = 0
        self.fail = False

    def publish(self, entries) -> None:
        with self._lock:
            self._entries = tuple(entries)
            self._revision += 1

    def fetch(self) -> tuple[int, tuple[tuple[str, str], ...]]:
        with self._lock:
            self.fetches += 1
            if self.fail:
                raise ConnectionError("ipam.example.internal: connection refused")
            return self._revision, self._entries


# --------------------------------------------------------------------------------------------
# The plugin, as a user would write it
# --------------------------------------------------------------------------------------------


class IpamSource:
    """The plugin's event source. The daemon runs ``run``; one-shot commands await ``read_once``."""

    name = SOURCE_NAME

    def __init__(self, plugin: IpamRangesPlugin, poll_interval: float):
        self._plugin = plugin
        self._poll_interval = poll_interval
        self.run_calls = 0
        self.read_once_calls = 0
        self.notifies: list[str] = []

    async def _refresh(self) -> bool:
        """Read the IPAM (blocking client: off the event loop); True when the list changed."""
        revision, entries = await anyio.to_thread.run_sync(self._plugin.ipam.fetch)
        return self._plugin.remember(revision, entries)

    async def read_once(self) -> None:
        self.read_once_calls += 1
        await self._refresh()

    async def run(self, notify) -> None:
        self.run_calls += 1
        while True:
            if await self._refresh():
                reason = f"IPAM revision {self._plugin.revision}"
                self.notifies.append(reason)
                notify(reason)  # from the event loop, as register_sources asks
            await anyio.sleep(self._poll_interval)


class IpamRangesPlugin:
    """masqd-ipam-ranges: CIDRs from an IPAM service keep the pod source address."""

    # make_plugins registers an instance under its ``name`` attribute when it has one
    # (masqd.testing.make_plugins docstring); an entry point would give this name in production.
    name = PLUGIN_NAME
    min_prefix = 8

    def __init__(self, ipam: FakeIpam, poll_interval: float = 0.01):
        self.ipam = ipam
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self.revision: int | None = None
        self._entries: tuple[tuple[str, str], ...] | None = None  # None: never read yet
        self.sources: list[IpamSource] = []
        self.contexts_once: list[bool] = []
        self.audits: list = []  # the AuditEvents masqd handed to us

    # not a hook: called by the source
    def remember(self, revision: int, entries) -> bool:
        with self._lock:
            if revision == self.revision:
                return False
            self.revision, self._entries = revision, tuple(entries)
            return True

    def _snapshot(self):
        with self._lock:
            return self._entries

    # ---- hooks ------------------------------------------------------------------------------

    @masqd.hookimpl
    def register_sources(self, register, context):
        self.contexts_once.append(context.once)
        source = IpamSource(self, self.poll_interval)
        self.sources.append(source)
        register(source)

    @masqd.hookimpl
    def nonmasq_cidrs(self, config, options):
        entries = self._snapshot()
        if entries is None:
            return None
        return [cidr for cidr, _pool in entries]

    @masqd.hookimpl
    def validate_config(self, config, cidrs, options):
        return [
            f"{net}: prefix /{net.prefixlen} is shorter than /{self.min_prefix}; "
            f"refusing to keep the pod address for so wide a range"
            for net in cidrs
            if net.prefixlen < self.min_prefix
        ]

    @masqd.hookimpl
    def audit(self, event):
        self.audits.append(event)

    @masqd.hookimpl
    def describe_cidrs(self, cidrs):
        entries = self._snapshot() or ()
        pools = {ipaddress.ip_network(cidr): pool for cidr, pool in entries}
        return {net: f"IPAM pool {pools[net]}" for net in cidrs if net in pools}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend():
    return "asyncio"


def results(plugin: IpamRangesPlugin) -> list[str]:
    return [event.result for event in plugin.audits]


def dry_run_backend(plugins, options: AgentOptions = AgentOptions()):
    """The dry-run backend, made the way the daemon makes one for ``--backend dry-run``."""
    return plugins.make_backend("dry-run", BackendSettings(options=options))


def applied_rules(agent) -> str:
    """The iptables-restore text of the rules the agent applied last ('' before any)."""
    applied = agent.status.applied
    return "" if applied is None else agent.backend.render(applied)


def rule_for(cidr: str) -> str:
    return f"-A IP-MASQ-AGENT -d {cidr} "


# --------------------------------------------------------------------------------------------
# One pass on the dry-run backend: masqd_dry_run / masqd_plugins
# --------------------------------------------------------------------------------------------


def test_plugin_loads_with_its_name_and_hooks(masqd_plugins):
    plugins = masqd_plugins(IpamRangesPlugin(FakeIpam()))
    mine = [info for info in plugins.describe() if info.name == PLUGIN_NAME]
    assert len(mine) == 1, [info.name for info in plugins.describe()]
    assert not mine[0].builtin
    assert set(mine[0].hooks) == {
        "register_sources", "nonmasq_cidrs", "validate_config", "audit", "describe_cidrs",
    }


def test_its_cidrs_reach_the_rules(masqd_dry_run):
    plugin = IpamRangesPlugin(FakeIpam([POOL_A, POOL_B, POOL_LAB]))
    agent = masqd_dry_run(plugin)

    result = agent.apply("nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n")

    assert result.error is None
    for cidr in ("10.0.0.0/8", POOL_A[0], POOL_B[0], POOL_LAB[0]):
        assert rule_for(cidr) in result.rules, result.rules
    assert rule_for(POOL_C[0]) not in result.rules
    assert sorted(result.contributions[PLUGIN_NAME]) == sorted([POOL_A[0], POOL_B[0], POOL_LAB[0]])
    assert set(result.nonmasq[4]) >= {"10.0.0.0/8", POOL_A[0], POOL_B[0], POOL_LAB[0]}
    # a one-pass agent reads the source once and never runs it
    (source,) = plugin.sources
    assert (source.read_once_calls, source.run_calls) == (1, 0)
    assert plugin.contexts_once == [True]


def test_veto_keeps_the_last_good_rules_and_names_the_plugin(masqd_dry_run):
    ipam = FakeIpam([POOL_A])
    plugin = IpamRangesPlugin(ipam)
    agent = masqd_dry_run(plugin)
    good = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert good.error is None and rule_for(POOL_A[0]) in good.rules

    # the IPAM starts listing a range that would keep the pod address for everything
    ipam.publish([POOL_A, POOL_B, TOO_WIDE])
    vetoed = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")

    assert vetoed.error is not None
    message = str(vetoed.error)
    assert PLUGIN_NAME in message and "0.0.0.0/0" in message, message
    assert vetoed.rules == good.rules  # the last good rules stay, the new POOL_B too is held back
    assert rule_for(POOL_B[0]) not in vetoed.rules

    # the veto covers the whole list, not only this plugin's share
    ipam.publish([POOL_A])
    from_config = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8, 0.0.0.0/0]\n")
    assert from_config.error is not None and PLUGIN_NAME in str(from_config.error)
    assert from_config.rules == good.rules

    # fixed: applies again
    fixed = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n")
    assert fixed.error is None and rule_for(POOL_C[0]) in fixed.rules


def test_a_prefix_of_exactly_8_is_not_vetoed(masqd_dry_run):
    plugin = IpamRangesPlugin(FakeIpam([("10.0.0.0/8", "pool-ten")]))
    result = masqd_dry_run(plugin).apply("nonMasqueradeCIDRs: []\n")
    assert result.error is None
    assert rule_for("10.0.0.0/8") in result.rules


def test_audit_hook_sees_applied_and_rejected(masqd_dry_run):
    ipam = FakeIpam([POOL_A])
    plugin = IpamRangesPlugin(ipam)
    agent = masqd_dry_run(plugin)

    first = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    ipam.publish([POOL_A, TOO_WIDE])
    second = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")

    assert first.error is None and second.error is not None
    assert [e.result for e in first.audits] == ["applied"]
    assert [e.result for e in second.audits] == ["rejected"]
    # the plugin's own hook saw the same two attempts (in one pass: delivered before apply returns)
    assert results(plugin) == ["applied", "rejected"]
    applied, rejected = plugin.audits
    assert applied.backend == "dry-run"
    assert POOL_A[0] in applied.added["ipv4"]
    assert applied.error is None
    assert rejected.error and PLUGIN_NAME in rejected.error
    assert not rejected.added.get("ipv4")


def test_describe_cidrs_says_which_pool(masqd_plugins):
    """``describe_cidrs`` is called only by ``masqd explain``; the testing support has no
    explain helper, so this calls the plugin manager the fixture returns, with the contribution
    (``masqd.plugins.values.Contribution``) ``nonmasq_cidrs`` would have produced."""
    plugin = IpamRangesPlugin(FakeIpam([POOL_A, POOL_LAB]))
    plugin.remember(7, [POOL_A, POOL_LAB])
    plugins = masqd_plugins(plugin)
    nets = tuple(ipaddress.ip_network(c) for c in (POOL_A[0], POOL_LAB[0], POOL_C[0]))
    contribution = Contribution(PLUGIN_NAME, nets)  # kind: the default, "plugin"

    described, problems = anyio.run(plugins.describe_cidrs, [contribution])

    assert problems == []
    mine = described[PLUGIN_NAME]
    (origin_a,) = mine[nets[0]]
    assert (origin_a.kind, origin_a.name, origin_a.detail) == ("plugin", PLUGIN_NAME, "IPAM pool pool-a")
    (origin_lab,) = mine[nets[1]]
    assert origin_lab.detail == "IPAM pool pool-lab"
    assert nets[2] not in mine  # not described: shown as coming from the plugin


# --------------------------------------------------------------------------------------------
# One-shot agents (once=True) read the source once
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_one_shot_agent_uses_read_once_not_run(masqd_plugins, tmp_path):
    ipam = FakeIpam([POOL_B])
    plugin = IpamRangesPlugin(ipam)
    plugins = masqd_plugins(plugin)
    config = tmp_path / "ip-masq-agent"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")

    agent = build_agent(AgentOptions(), backend=dry_run_backend(plugins), config=config,
                        plugins=plugins, once=True)
    with anyio.fail_after(WAIT):
        await agent.run_once()

    (source,) = plugin.sources
    assert plugin.contexts_once == [True]
    assert source.read_once_calls == 1
    assert source.run_calls == 0
    assert ipam.fetches == 1
    assert rule_for(POOL_B[0]) in applied_rules(agent)
    assert results(plugin) == ["applied"]


@pytest.mark.anyio
async def test_one_shot_agent_fails_when_the_ipam_cannot_be_read(masqd_plugins, tmp_path):
    ipam = FakeIpam([POOL_B])
    ipam.fail = True
    plugin = IpamRangesPlugin(ipam)
    plugins = masqd_plugins(plugin)
    agent = build_agent(AgentOptions(), backend=dry_run_backend(plugins),
                        config=tmp_path / "absent", plugins=plugins, once=True)

    # hookspecs: "read_once that raises ... makes the command fail with exit code 4, naming the
    # source"; Agent.read_sources_once raises masqd.errors.SourceReadError for it.
    with anyio.fail_after(WAIT), pytest.raises(masqd.errors.SourceReadError) as caught:
        await agent.run_once()
    message = str(caught.value)
    assert SOURCE_NAME in message and PLUGIN_NAME in message and "connection refused" in message, message
    assert applied_rules(agent) == ""  # nothing applied without the IPAM's list
    (source,) = plugin.sources
    assert (source.read_once_calls, source.run_calls) == (1, 0)


# --------------------------------------------------------------------------------------------
# The daemon: running(build_agent(...)) + wait_until, dry-run backend
# --------------------------------------------------------------------------------------------


def daemon(plugins, config):
    return build_agent(AgentOptions(), backend=dry_run_backend(plugins), config=config, plugins=plugins)


@pytest.mark.anyio
async def test_daemon_runs_the_source_and_an_ipam_change_reaches_the_rules(masqd_plugins, tmp_path):
    ipam = FakeIpam([POOL_A])
    plugin = IpamRangesPlugin(ipam)
    plugins = masqd_plugins(plugin)
    config = tmp_path / "ip-masq-agent"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    config_stat = config.stat()

    agent = daemon(plugins, config)
    async with running(agent) as live:
        await wait_until(lambda: rule_for(POOL_A[0]) in applied_rules(live),
                         "the IPAM's first list in the rules", timeout=WAIT)
        (source,) = plugin.sources
        assert plugin.contexts_once == [False]
        assert source.run_calls == 1
        assert source.read_once_calls == 0
        assert event_source(live, SOURCE_NAME) is source

        # the IPAM list changes; nobody touches the config file
        ipam.publish([POOL_B, POOL_C])
        await wait_until(
            lambda: rule_for(POOL_B[0]) in applied_rules(live)
            and rule_for(POOL_C[0]) in applied_rules(live)
            and rule_for(POOL_A[0]) not in applied_rules(live),
            "the IPAM's new list in the rules", timeout=WAIT)
        assert rule_for("10.0.0.0/8") in applied_rules(live)

        # the pass was asked for by the plugin's source, through notify
        await wait_until(
            lambda: any(e.result == "applied" and SOURCE_NAME in e.trigger.split(",")
                        and POOL_B[0] in e.added.get("ipv4", ()) for e in plugin.audits),
            "an audit event for the IPAM-triggered apply", timeout=WAIT)
        assert len(source.notifies) >= 2
    assert config.stat().st_mtime_ns == config_stat.st_mtime_ns


@pytest.mark.anyio
async def test_daemon_veto_keeps_last_good_rules_then_recovers(masqd_plugins, tmp_path):
    ipam = FakeIpam([POOL_A])
    plugin = IpamRangesPlugin(ipam)
    plugins = masqd_plugins(plugin)
    config = tmp_path / "ip-masq-agent"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")

    async with running(daemon(plugins, config)) as live:
        await wait_until(lambda: rule_for(POOL_A[0]) in applied_rules(live),
                         "the IPAM's first list in the rules", timeout=WAIT)
        await wait_until(lambda: "applied" in results(plugin), "an applied audit event", timeout=WAIT)
        good = applied_rules(live)

        ipam.publish([POOL_A, POOL_B, TOO_WIDE])
        rejected = await wait_until(
            lambda: next((e for e in plugin.audits if e.result == "rejected"), None),
            "a rejected audit event", timeout=WAIT)
        assert PLUGIN_NAME in rejected.error and "0.0.0.0/0" in rejected.error, rejected.error
        assert applied_rules(live) == good
        assert rule_for(POOL_B[0]) not in applied_rules(live)
        # readiness is not lost over a rejected state; the rejection is named
        ready, why = live.status.readiness()
        assert ready, why

        ipam.publish([POOL_A, POOL_B])
        await wait_until(lambda: rule_for(POOL_B[0]) in applied_rules(live),
                         "the fixed IPAM list in the rules", timeout=WAIT)
        assert rule_for("0.0.0.0/0") not in applied_rules(live)
