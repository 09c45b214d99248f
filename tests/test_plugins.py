"""Plugins: every hook with a real plugin object registered (nothing patched), isolation of plugins
that raise, hang or return garbage, call order, blocking, loading errors.

Each test of a hook is marked ``@covers("hook_name")``; the meta-test at the end fails when a
hookspec in ``masqd.hookspecs`` has no test.
"""

from __future__ import annotations

import ipaddress
import threading
import time

import anyio
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

import masqd
from masqd import hookspecs
from masqd.agent import build_agent
from masqd.backends.dryrun import DryRunBackend
from masqd.cli import main
from masqd.config import AgentOptions, parse_config
from masqd.errors import FlagError, PluginError, PluginLoadError
from masqd.plugins import Plugins, SourceContext
from masqd.provenance import Origin
from masqd.audit import family_changes
from masqd.reconcile import Reconciler
from masqd.ruleset import compute_ruleset
from masqd.testing import make_plugins, running, wait_until

COVERED: set[str] = set()
CONTEXT = SourceContext(config_path="/nonexistent/config", options=AgentOptions(), resync_interval=lambda: 60.0,
                        on_resync_interval_change=lambda callback: None)
WAIT = 10  # seconds before a test gives up waiting (a failure, not a timing claim)


def covers(*hooks: str):
    COVERED.update(hooks)
    return lambda test: test


class Adds:
    """nonmasq_cidrs returns a fixed list."""

    def __init__(self, name: str, *cidrs):
        self.name = name
        self.cidrs = list(cidrs)

    @masqd.hookimpl
    def nonmasq_cidrs(self, config):
        return self.cidrs


class Overrides:
    """masquerade_cidrs returns a fixed list."""

    def __init__(self, name: str, *cidrs):
        self.name = name
        self.cidrs = list(cidrs)

    @masqd.hookimpl
    def masquerade_cidrs(self, config, options):
        return self.cidrs


class Vetoes:
    name = "veto"

    def __init__(self, forbidden: str):
        self.forbidden = ipaddress.ip_network(forbidden)
        self.seen = []

    @masqd.hookimpl
    def validate_config(self, config, cidrs):
        self.seen.append(cidrs)
        return [f"{net} is forbidden here" for net in cidrs if net == self.forbidden]


class Records:
    name = "recorder"

    def __init__(self):
        self.events = []

    @masqd.hookimpl
    def audit(self, event):
        self.events.append(event)


# --- nonmasq_cidrs -----------------------------------------------------------------------------------


@covers("nonmasq_cidrs")
def test_contributed_cidrs_are_written_after_the_config_ones(masqd_dry_run):
    agent = masqd_dry_run(Adds("ranges", "203.0.113.0/24", ipaddress.ip_network("198.51.100.0/24")))
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert result.error is None
    assert result.nonmasq[4] == ["169.254.0.0/16", "10.0.0.0/8", "203.0.113.0/24", "198.51.100.0/24"]
    assert result.contributions == {"ranges": ["203.0.113.0/24", "198.51.100.0/24"]}
    assert "-A IP-MASQ-AGENT -d 203.0.113.0/24 -m comment" in result.rules


@covers("nonmasq_cidrs")
def test_a_cidr_already_listed_is_written_once(masqd_dry_run):
    agent = masqd_dry_run(Adds("a", "10.0.0.0/8", "192.0.2.0/24", "192.0.2.0/24"), Adds("b", "192.0.2.0/24"))
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert result.nonmasq[4] == ["169.254.0.0/16", "10.0.0.0/8", "192.0.2.0/24"]


@covers("nonmasq_cidrs")
@pytest.mark.parametrize(("returned", "key", "reason"), [
    pytest.param(["10.0.0.1/8"], "bad.nonmasq_cidrs[0]", "did you mean '10.0.0.0/8'", id="misaligned"),
    pytest.param(["192.0.2.0/24", "not-a-cidr"], "bad.nonmasq_cidrs[1]", "not a CIDR", id="second-item-garbage"),
    pytest.param([42], "bad.nonmasq_cidrs[0]", "expected a CIDR string", id="number"),
    pytest.param([ipaddress.ip_address("192.0.2.1")], "bad.nonmasq_cidrs[0]", "expected a CIDR string", id="address-object"),
    pytest.param(["2001:db8::/32"], "bad.nonmasq_cidrs[0]", "--enable-ipv6", id="ipv6-without-flag"),
    pytest.param("10.0.0.0/8", "bad.nonmasq_cidrs", "expected an iterable", id="a-string-not-a-list"),
    pytest.param(42, "bad.nonmasq_cidrs", "expected an iterable", id="not-iterable"),
    pytest.param({"cidrs": []}, "bad.nonmasq_cidrs", "expected an iterable", id="a-mapping"),
])
def test_an_unusable_contribution_rejects_the_state_and_names_the_plugin(masqd_dry_run, returned, key, reason):
    bad = Adds("bad", "192.0.2.0/24")
    agent = masqd_dry_run(bad)
    assert agent.apply(None).error is None
    before = agent.backend.applied
    bad.cidrs = returned
    result = agent.apply(None)
    assert isinstance(result.error, PluginError)
    (problem,) = result.error.problems
    assert problem.key == key and reason in problem.reason
    assert agent.backend.applied == before and agent.backend.writes == 1  # the last good rules stay
    assert [e.result for e in result.audits] == ["rejected"]


@covers("nonmasq_cidrs")
def test_ipv6_contributions_with_ipv6_enabled(masqd_dry_run):
    agent = masqd_dry_run(Adds("v6", "2001:db8::/32", "192.0.2.0/24"), options=AgentOptions(enable_ipv6=True))
    result = agent.apply(None)
    assert result.nonmasq[6][-1] == "2001:db8::/32" and result.nonmasq[4][-1] == "192.0.2.0/24"


@covers("nonmasq_cidrs")
def test_contributions_count_toward_cidr_limit_only_when_the_file_sets_it(masqd_dry_run):
    many = [f"10.{i}.0.0/16" for i in range(70)]
    agent = masqd_dry_run(Adds("many", *many))
    assert agent.apply("nonMasqueradeCIDRs: []\n").error is None  # default 64 does not apply to plugins
    result = agent.apply("nonMasqueradeCIDRs: [192.0.2.0/24]\ncidrLimit: 50\n")
    assert isinstance(result.error, PluginError)
    (problem,) = result.error.problems
    assert problem.value == "71 CIDRs (1 from the file, 70 from plugins)" and "cidrLimit=50" in problem.reason


@covers("nonmasq_cidrs")
def test_contributions_are_named_in_the_write_log(tmp_path):
    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    plugins = make_plugins(Adds("ranges", "203.0.113.0/24"))
    with structlog.testing.capture_logs() as logs:
        anyio.run(Reconciler(DryRunBackend(), AgentOptions(), config, plugins=plugins).reconcile)
    (applied,) = [e for e in logs if e["event"] == "rules applied"]
    assert applied["cidrs_from_plugins"] == {"ranges": 1}


@covers("masquerade_cidrs")
def test_a_plugin_contributing_both_kinds_is_named_with_each_count_in_the_write_log(tmp_path):
    class Both(Adds):
        @masqd.hookimpl
        def masquerade_cidrs(self):
            return ["10.99.0.0/16", "10.98.0.0/16"]

    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    plugins = make_plugins(Both("both", "203.0.113.0/24"))
    with structlog.testing.capture_logs() as logs:
        anyio.run(Reconciler(DryRunBackend(), AgentOptions(), config, plugins=plugins).reconcile)
    (applied,) = [e for e in logs if e["event"] == "rules applied"]
    assert applied["cidrs_from_plugins"] == {"both": 1}
    assert applied["masquerade_cidrs_from_plugins"] == {"both": 2}


# --- validate_config --------------------------------------------------------------------------------


@covers("validate_config")
def test_a_veto_keeps_the_last_good_rules_and_names_the_plugin(masqd_dry_run):
    veto = Vetoes("192.0.2.0/24")
    agent = masqd_dry_run(veto)
    assert agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n").error is None
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n")
    assert isinstance(result.error, PluginError)
    assert [str(p) for p in result.error.problems] == ["veto.validate_config: 192.0.2.0/24 is forbidden here"]
    assert result.nonmasq[4] == ["169.254.0.0/16", "10.0.0.0/8"]
    assert [e.result for e in result.audits] == ["rejected"]
    assert "192.0.2.0/24 is forbidden here" in result.audits[0].error


@covers("validate_config", "nonmasq_cidrs")
def test_validate_config_sees_the_config_and_every_contribution(masqd_dry_run):
    veto = Vetoes("198.51.100.0/24")
    agent = masqd_dry_run(Adds("adds", "198.51.100.0/24"), veto)
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert "198.51.100.0/24 is forbidden here" in str(result.error)
    assert [str(n) for n in veto.seen[-1]] == ["10.0.0.0/8", "198.51.100.0/24"]  # link-local not included


@covers("validate_config")
@pytest.mark.parametrize("returned", [
    pytest.param("a single string", id="string"),
    pytest.param([1, 2], id="not-strings"),
    pytest.param(True, id="bool"),
])
def test_validate_config_returning_garbage_rejects(masqd_dry_run, returned):
    class Garbage:
        name = "garbage"

        @masqd.hookimpl
        def validate_config(self):
            return returned

    result = masqd_dry_run(Garbage()).apply(None)
    (problem,) = result.error.problems
    assert problem.key == "garbage.validate_config" and "expected a list of problem strings" in problem.reason


# --- audit -------------------------------------------------------------------------------------------


@covers("audit")
def test_audit_sees_every_attempt_with_its_result(masqd_dry_run):
    recorder = Records()
    agent = masqd_dry_run(recorder, options=AgentOptions(enable_ipv6=True))
    agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    agent.apply("nonMasqueradeCIDRs: [192.0.2.0/24, '2001:db8::/32']\n")
    agent.apply("nonMasqueradeCIDRs: [10.0.0.1/8]\n")
    assert [e.result for e in recorder.events] == ["applied", "unchanged", "applied", "rejected"]
    first, _, change, rejected = recorder.events
    assert first.added == {"ipv4": ("10.0.0.0/8", "169.254.0.0/16"), "ipv6": ("fe80::/10",)}
    assert change.added == {"ipv4": ("192.0.2.0/24",), "ipv6": ("2001:db8::/32",)}
    assert change.removed == {"ipv4": ("10.0.0.0/8",)}
    assert change.written == ("ipv4", "ipv6") and change.backend == "dry-run" and change.trigger == "manual"
    assert rejected.error and "10.0.0.1/8" in rejected.error and rejected.added == {}
    with pytest.raises(TypeError):
        change.added["ipv4"] = ()  # frozen: one hook cannot change what the next one sees


IPV6 = AgentOptions(enable_ipv6=True)
#: Aligned networks that sort differently as text and as addresses (10.0.0.0/8 vs 9.0.0.0/8),
#: nest (10.0.0.0/8, 10.0.0.0/16), and mix families.
NETWORK_POOL = [ipaddress.ip_network(text) for text in (
    "9.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16", "10.0.0.0/24", "10.1.0.0/16", "100.64.0.0/10", "192.0.2.0/24",
    "192.0.2.128/25", "198.51.100.7/32", "203.0.113.0/24", "2001:db8::/32", "2001:db8::/48", "2001:db8:1::/48",
    "fd00::/8", "fec0::/10", "::ffff:192.0.2.0/120")]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(NETWORK_POOL), unique=True), st.lists(st.sampled_from(NETWORK_POOL), unique=True))
def test_audit_changes_are_the_sorted_set_differences_per_family(old, new):
    """What an audit event (and a write's log line) lists as added and removed: exactly the set
    differences, in ipaddress order, per family, whatever the rule order."""
    def ruleset(networks):
        text = "nonMasqueradeCIDRs: [" + ", ".join(f'"{n}"' for n in networks) + "]\ncidrLimit: 1000\n"
        return compute_ruleset(parse_config(text, IPV6).config, IPV6)

    added, removed = family_changes(ruleset(old), ruleset(new))
    for label, version in (("ipv4", 4), ("ipv6", 6)):
        was = {n for n in old if n.version == version}
        now = {n for n in new if n.version == version}
        assert added.get(label, ()) == tuple(map(str, sorted(now - was)))
        assert removed.get(label, ()) == tuple(map(str, sorted(was - now)))


@covers("audit")
def test_audit_reports_a_failed_apply(masqd_dry_run):
    from masqd.errors import ApplyError

    recorder = Records()
    agent = masqd_dry_run(recorder)

    async def refuse(ruleset):
        raise ApplyError(["iptables-restore"], 4, "Another app is currently holding the xtables lock")

    agent.backend.sync = refuse
    result = agent.apply(None)
    assert [e.result for e in result.audits] == ["failed"]
    assert "xtables lock" in recorder.events[0].error


@covers("audit")
def test_a_raising_audit_hook_is_logged_and_the_others_still_run(masqd_dry_run):
    class Broken:
        name = "broken-audit"

        @masqd.hookimpl
        def audit(self, event):
            raise OSError("disk full")

    recorder = Records()
    with structlog.testing.capture_logs() as logs:
        result = masqd_dry_run(recorder, Broken()).apply(None)
    assert result.error is None and len(recorder.events) == 1
    (failed,) = [e for e in logs if e["event"] == "audit hook failed"]
    assert failed["plugin"] == "broken-audit" and "disk full" in failed["error"]


# --- register_backends -------------------------------------------------------------------------------


class MemoryBackend(DryRunBackend):
    name = "memory"

    def __init__(self, settings):
        super().__init__()
        self.settings = settings


class OffersMemoryBackend:
    name = "memory-backend"

    @masqd.hookimpl
    def register_backends(self, register):
        register("memory", MemoryBackend)


@covers("register_backends")
def test_a_plugin_backend_is_selectable_by_name():
    from masqd.backends.base import BackendSettings

    plugins = make_plugins(OffersMemoryBackend())
    assert plugins.backend_names() == ("dry-run", "iptables", "memory", "nftables")
    backend = plugins.make_backend("memory", BackendSettings(AgentOptions(masq_chain="X"), "legacy"))
    assert isinstance(backend, MemoryBackend) and backend.settings.options.masq_chain == "X"
    with pytest.raises(FlagError, match="unknown backend; available: dry-run, iptables, memory, nftables"):
        plugins.make_backend("memroy", BackendSettings())


@covers("register_backends")
@pytest.mark.parametrize("order", [pytest.param({}, id="called-first"), pytest.param({"trylast": True}, id="trylast")])
def test_a_plugin_cannot_take_over_a_built_in_backend_name(order):
    from masqd.backends.base import BackendSettings
    from masqd.backends.iptables import IptablesBackend

    class AlsoIptables:
        name = "impostor"

        @masqd.hookimpl(**order)
        def register_backends(self, register):
            register("iptables", MemoryBackend)

    with structlog.testing.capture_logs() as logs:
        plugins = make_plugins(AlsoIptables())
        assert isinstance(plugins.make_backend("iptables", BackendSettings()), IptablesBackend)
    (taken,) = [e for e in logs if e["event"] == "backend name already taken; ignored"]
    assert taken["plugin"] == "impostor" and taken["registered_by"] == "masqd.default_plugins.backends"


@covers("register_backends")
def test_a_registration_hook_that_hangs_is_abandoned_at_start_up():
    release = threading.Event()

    class HangsAtStartUp:
        name = "slow-start"

        @masqd.hookimpl
        def register_backends(self, register):
            register("slow", MemoryBackend)
            release.wait()

    try:
        with structlog.testing.capture_logs() as logs:
            plugins = Plugins.load(entry_points=False, hook_timeout=0.2, extra=[("slow-start", HangsAtStartUp())])
            assert plugins.backend_names() == ("dry-run", "iptables", "nftables")  # what it registered is ignored
        (failed,) = [e for e in logs if e["event"].startswith("plugin failed to register")]
        assert failed["plugin"] == "slow-start" and "did not return within 0.2 s" in failed["error"]
    finally:
        release.set()


@covers("register_backends")
def test_a_plugin_that_fails_to_register_contributes_nothing_and_the_rest_work():
    class HalfBroken:
        name = "half-broken"

        @masqd.hookimpl
        def register_backends(self, register):
            register("half", MemoryBackend)
            raise RuntimeError("config service down")

    with structlog.testing.capture_logs() as logs:
        plugins = make_plugins(HalfBroken())
        assert plugins.backend_names() == ("dry-run", "iptables", "nftables")
    assert any(e["event"].startswith("plugin failed to register") and e["plugin"] == "half-broken" for e in logs)


# --- register_sources --------------------------------------------------------------------------------


class Poker:
    """A source that asks for a reconcile whenever the test sets ``poke``."""

    name = "poker"

    def __init__(self):
        self.poke = anyio.Event()
        self.started = 0

    async def run(self, notify):
        self.started += 1
        while True:
            await self.poke.wait()
            self.poke = anyio.Event()
            notify("poked")


class Hangs:
    """A source that never returns and never notifies."""

    name = "hangs"
    started = False

    async def run(self, notify):
        Hangs.started = True
        await anyio.sleep_forever()


class OffersSources:
    name = "sources"

    def __init__(self, *sources):
        self.sources = sources

    @masqd.hookimpl
    def register_sources(self, register, context):
        self.context = context
        for source in self.sources:
            register(source)


@covers("register_sources", "audit")
async def test_a_plugin_source_triggers_reconciles_in_the_daemon(tmp_path):
    config = tmp_path / "config"
    config.write_text("resyncInterval: 1h\n")
    poker, recorder = Poker(), Records()
    offers = OffersSources(poker, Hangs())
    plugins = make_plugins(offers, recorder)
    agent = build_agent(AgentOptions(), backend=DryRunBackend(), config=config, plugins=plugins)
    async with running(agent):
        await wait_until(lambda: agent.status.generation == 1 and poker.started and Hangs.started, "startup")
        poker.poke.set()
        await wait_until(lambda: agent.status.generation == 2, "the reconcile the source asked for")
        await wait_until(lambda: len(recorder.events) == 2, "audit delivery")
    assert [e.trigger for e in recorder.events] == ["startup", "poker"]
    assert offers.context.config_path == str(config) and offers.context.resync_interval() == 3600


class BlockingRun:
    def run(self, notify):  # not a coroutine function: it would block the event loop
        pass


@covers("register_sources")
@pytest.mark.parametrize("registered", [pytest.param(object(), id="no-run"), pytest.param(BlockingRun(), id="sync-run")])
def test_a_registered_object_without_async_run_is_refused_with_the_plugin_name(registered):
    with structlog.testing.capture_logs() as logs:
        found = make_plugins(OffersSources(registered)).sources(CONTEXT)
    assert [s.name for s in found if s.plugin == "sources"] == []
    assert any(e["event"].startswith("plugin registered something that is not an event source")
               and e["plugin"] == "sources" for e in logs)


# --- isolation ---------------------------------------------------------------------------------------


def test_a_raising_hook_rejects_the_state_and_names_the_plugin(masqd_dry_run):
    class Raises:
        name = "flaky"
        fail = False

        @masqd.hookimpl
        def nonmasq_cidrs(self):
            if self.fail:
                raise ConnectionError("IPAM unreachable")
            return ["192.0.2.0/24"]

    flaky = Raises()
    agent = masqd_dry_run(flaky)
    agent.apply(None)
    flaky.fail = True
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert str(result.error.problems[0]) == "flaky.nonmasq_cidrs: raised ConnectionError('IPAM unreachable')"
    assert result.nonmasq[4][-1] == "192.0.2.0/24"  # the last good state, contribution included
    flaky.fail = False
    assert agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n").error is None


def test_a_returned_object_whose_repr_raises_is_reported_not_fatal(masqd_dry_run):
    class Hostile:
        def __repr__(self):
            raise RuntimeError("no repr for you")

    result = masqd_dry_run(Adds("hostile", Hostile())).apply(None)
    (problem,) = result.error.problems
    assert problem.key == "hostile.nonmasq_cidrs[0]" and "Hostile object whose repr() failed" in str(problem)


async def test_a_failing_plugin_is_retried_without_waiting_for_a_file_change(tmp_path):
    class FlakyAtStart:
        name = "flaky-start"
        calls = 0

        @masqd.hookimpl
        def nonmasq_cidrs(self):
            FlakyAtStart.calls += 1
            if FlakyAtStart.calls == 1:
                raise ConnectionError("IPAM not up yet")
            return ["192.0.2.0/24"]

    config = tmp_path / "config"
    config.write_text("resyncInterval: 1h\n")
    plugins = make_plugins(FlakyAtStart())
    backend = DryRunBackend()
    agent = build_agent(AgentOptions(), backend=backend, config=config, plugins=plugins, retry_initial_seconds=0.01)
    async with running(agent):
        await wait_until(lambda: backend.writes == 1, "the retry after the plugin failed")
    assert [str(n) for n in backend.applied.ipv4.nonmasq][-1] == "192.0.2.0/24" and FlakyAtStart.calls == 2


def test_even_system_exit_from_a_plugin_is_only_its_failure(masqd_dry_run):
    class Exits:
        name = "exits"

        @masqd.hookimpl
        def validate_config(self):
            raise SystemExit(3)

    result = masqd_dry_run(Exits()).apply(None)
    assert str(result.error.problems[0]) == "exits.validate_config: raised SystemExit(3)"


def test_a_hanging_hook_is_abandoned_reported_and_not_called_again_until_it_returns(masqd_dry_run):
    release = threading.Event()

    class Hangs:
        name = "hangs"
        calls = 0

        @masqd.hookimpl
        def nonmasq_cidrs(self):
            Hangs.calls += 1
            if Hangs.calls == 2:
                release.wait()  # stuck until the test lets go
            return ["192.0.2.0/24"]

    agent = masqd_dry_run(Hangs(), hook_timeout=0.2)
    assert agent.apply(None).error is None
    hung = agent.apply(None)
    assert "did not return within 0.2 s (hung)" in str(hung.error)
    still = agent.apply(None)
    assert "still hung in the call started at" in str(still.error) and Hangs.calls == 2
    assert still.nonmasq[4][-1] == "192.0.2.0/24"  # last good state
    release.set()  # the stuck call returns; from then on the hook is called again
    for _ in range(WAIT * 100):
        result = agent.apply(None)
        if result.error is None:
            break
        time.sleep(0.01)
    assert result.error is None and Hangs.calls == 3


# --- order, blocking, loading --------------------------------------------------------------------------


def test_hooks_run_in_pluggy_order_tryfirst_and_trylast_respected(masqd_dry_run):
    class First(Adds):
        @masqd.hookimpl(tryfirst=True)
        def nonmasq_cidrs(self, config):
            return self.cidrs

    class Last(Adds):
        @masqd.hookimpl(trylast=True)
        def nonmasq_cidrs(self, config):
            return self.cidrs

    # registered first, called last (pluggy is LIFO) unless tryfirst/trylast says otherwise
    agent = masqd_dry_run(Last("last", "198.51.100.0/24"), Adds("early", "192.0.2.0/24"),
                          Adds("late", "203.0.113.0/24"), First("first", "100.64.0.0/10"))
    result = agent.apply("nonMasqueradeCIDRs: []\n")
    assert list(result.contributions) == ["first", "late", "early", "last"]
    assert result.nonmasq[4][1:] == ["100.64.0.0/10", "203.0.113.0/24", "192.0.2.0/24", "198.51.100.0/24"]


def test_a_blocked_plugin_is_not_loaded():
    plugins = Plugins.load(entry_points=False, disabled=["adds"], extra=[("adds", Adds("adds", "192.0.2.0/24"))])
    assert "adds" not in [info.name for info in plugins.describe()]
    implementers = {impl.plugin_name for impl in plugins.pm.hook.nonmasq_cidrs.get_hookimpls()}
    assert implementers == {"masqd.default_plugins.egress"}  # the built-in one only


def test_blocking_the_default_sources_leaves_no_sources():
    plugins = Plugins.load(entry_points=False, disabled=["masqd.default_plugins.sources"])
    assert plugins.sources(CONTEXT) == []


def test_a_misspelled_hook_fails_at_start_up_naming_the_plugin():
    class Typo:
        @masqd.hookimpl
        def nonmasq_cidr(self, config):
            return []

    with pytest.raises(PluginLoadError, match=r"plugin typo: unknown hook 'nonmasq_cidr'.*masqd's hooks are: audit"):
        Plugins.load(entry_points=False, extra=[("typo", Typo())])


def test_an_argument_the_hook_does_not_offer_fails_at_start_up():
    class WrongArgs:
        @masqd.hookimpl
        def nonmasq_cidrs(self, config, cluster):
            return []

    with pytest.raises(PluginLoadError, match=r"plugin wrong-args: nonmasq_cidrs: argument\(s\) \{'cluster'\} are "
                       r"not offered by the hook; it offers: config, options$"):
        Plugins.load(entry_points=False, extra=[("wrong-args", WrongArgs())])


def test_hook_wrappers_are_refused():
    class Wraps:
        @masqd.hookimpl(wrapper=True)
        def nonmasq_cidrs(self, config):
            return (yield)

    with pytest.raises(PluginLoadError, match="plugin wraps: nonmasq_cidrs is a hook wrapper"):
        Plugins.load(entry_points=False, extra=[("wraps", Wraps())])


def test_masqd_plugins_naming_an_uninstalled_plugin_fails_at_start_up():
    with pytest.raises(PluginLoadError, match="plugin no-such-plugin: named in MASQD_PLUGINS"):
        Plugins.load(environ={"MASQD_PLUGINS": "no-such-plugin"})


def test_empty_masqd_plugins_loads_no_entry_point_plugins():
    plugins = Plugins.load(environ={"MASQD_PLUGINS": ""})
    assert all(info.builtin for info in plugins.describe())


def test_plugins_command_lists_plugins_and_backends(capsys):
    assert main(["plugins", "--disable-plugin", "masqd.default_plugins.sources"]) == 0
    out = capsys.readouterr().out
    assert "masqd.default_plugins.backends  (built-in)  hooks: register_backends" in out
    assert "masqd.default_plugins.sources" not in out
    assert "backends: dry-run, iptables, nftables" in out


def test_unknown_backend_is_a_usage_error_listing_plugin_backends(capsys):
    assert main(["render", "--backend", "nft", "--config", "/nonexistent"]) == 2
    assert "--backend=nft: unknown backend; available: dry-run, iptables, nftables" in capsys.readouterr().err


# --- describe_cidrs ------------------------------------------------------------------------------------


class Describes:
    """Contributes CIDRs and says where each came from (``described``: what describe_cidrs returns)."""

    def __init__(self, name: str, cidrs, described):
        self.name = name
        self.cidrs = list(cidrs)
        self.described = described
        self.asked: list = []

    @masqd.hookimpl
    def nonmasq_cidrs(self):
        return self.cidrs

    @masqd.hookimpl
    def describe_cidrs(self, cidrs):
        self.asked.append(cidrs)
        if isinstance(self.described, BaseException):
            raise self.described
        return self.described() if callable(self.described) else self.described


def describe(plugins: Plugins, options: AgentOptions = AgentOptions()):
    async def both():
        return await plugins.describe_cidrs(await plugins.contributions(None, options))
    return anyio.run(both)


def _texts(described: dict) -> dict:
    return {plugin: {str(net): [str(origin) for origin in origins] for net, origins in by_net.items()}
            for plugin, by_net in described.items()}


@covers("describe_cidrs")
def test_each_plugin_describes_only_its_own_cidrs(masqd_plugins):
    files = Describes("files", ["192.0.2.0/24", "198.51.100.0/24"], {
        "192.0.2.0/24": "file /etc/cidrs/a line 3",
        ipaddress.ip_network("198.51.100.0/24"): ["file /etc/cidrs/a line 4", "file /etc/cidrs/b line 1"],
        "203.0.113.0/24": "not one of mine: ignored",
    })
    policies = Describes("policies", ["203.0.113.0/24"], {"203.0.113.0/24": Origin("policy", "on-prem")})
    quiet = Describes("quiet", ["10.0.0.0/8"], None)
    plugins = masqd_plugins(files, policies, quiet)
    described, problems = describe(plugins)
    assert problems == []
    assert _texts(described) == {
        "files": {"192.0.2.0/24": ["plugin files (file /etc/cidrs/a line 3)"],
                  "198.51.100.0/24": ["plugin files (file /etc/cidrs/a line 4)", "plugin files (file /etc/cidrs/b line 1)"]},
        "policies": {"203.0.113.0/24": ["EgressNATPolicy on-prem"]},
    }
    assert files.asked == [(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.51.100.0/24"))]
    assert quiet.asked == [(ipaddress.ip_network("10.0.0.0/8"),)]


@covers("describe_cidrs")
def test_a_plugin_that_contributed_nothing_is_not_asked(masqd_plugins):
    empty = Describes("empty", [], {"192.0.2.0/24": "never asked"})
    described, problems = describe(masqd_plugins(empty))
    assert (described, problems, empty.asked) == ({}, [], [])


@covers("describe_cidrs")
@pytest.mark.parametrize(("described", "reason"), [
    pytest.param(RuntimeError("boom"), "raised RuntimeError('boom')", id="raises"),
    pytest.param(["192.0.2.0/24"], "expected a mapping", id="a-list"),
    pytest.param({"192.0.2.0/24": 42}, "expected a one-line text or an Origin of kind 'policy'", id="a-number"),
    pytest.param({"192.0.2.0/24": "two\nlines"}, "expected a one-line text", id="a-newline"),
    pytest.param({"192.0.2.0/24": Origin("config", "/etc/x", 1)}, "Origin of kind 'policy'", id="claims-a-config-file"),
    pytest.param({"192.0.2.1/24": "misaligned"}, "did you mean '192.0.2.0/24'", id="bad-cidr-key"),
])
def test_an_unusable_description_loses_only_the_detail_and_names_the_plugin(masqd_plugins, described, reason):
    bad = Describes("bad", ["192.0.2.0/24"], described)
    good = Describes("good", ["198.51.100.0/24"], {"198.51.100.0/24": "file /x line 1"})
    result, problems = describe(masqd_plugins(bad, good))
    assert _texts(result)["good"] == {"198.51.100.0/24": ["plugin good (file /x line 1)"]}
    assert result.get("bad", {}) == {}
    (problem,) = problems
    assert problem.key.startswith("bad.describe_cidrs") and reason in str(problem)


@covers("describe_cidrs")
def test_a_hanging_describe_hook_is_abandoned(masqd_plugins):
    release = threading.Event()

    def hang():
        release.wait(WAIT)
        return {"192.0.2.0/24": "too late"}

    slow = Describes("slow", ["192.0.2.0/24"], hang)
    try:
        described, problems = describe(masqd_plugins(slow, hook_timeout=0.2))
    finally:
        release.set()
    assert described == {}
    (problem,) = problems
    assert problem.key == "slow.describe_cidrs" and "hung" in problem.reason


@covers("describe_cidrs")
def test_the_daemon_never_asks_for_descriptions(masqd_dry_run):
    plugin = Describes("files", ["192.0.2.0/24"], RuntimeError("explain only"))
    result = masqd_dry_run(plugin).apply(None)
    assert result.error is None and "192.0.2.0/24" in result.nonmasq[4]
    assert plugin.asked == []


# --- one-shot commands read registered sources; what contributed CIDRs are ---------------------------------

REMOTE_LIST = '''
import os

import anyio
import masqd


class RemoteList:
    """A source of this plugin's that reads a remote list: the daemon runs it, a one-shot
    command reads it once."""

    name = "remote-list"

    def __init__(self, plugin):
        self.plugin = plugin

    async def run(self, notify):
        await anyio.sleep_forever()

    async def read_once(self):
        if os.environ.get("REMOTE_LIST_DOWN"):
            raise ConnectionRefusedError("IPAM at 192.0.2.53 refused")
        self.plugin.cidrs = ["203.0.113.0/24"]


class Plugin:
    def __init__(self):
        self.cidrs = []
        self.once = None

    @masqd.hookimpl
    def register_sources(self, register, context):
        self.once = context.once
        register(RemoteList(self))

    @masqd.hookimpl
    def nonmasq_cidrs(self):
        return self.cidrs


plugin = Plugin()
'''


@covers("register_sources")
@pytest.mark.parametrize("command", [
    pytest.param(["render"], id="render"), pytest.param(["validate"], id="validate"),
    pytest.param(["run", "--once"], id="run-once"), pytest.param(["explain", "203.0.113.9"], id="explain"),
])
def test_one_shot_commands_read_a_third_party_source_once(install_plugin, capsys, command):
    install_plugin("masqd_test_remote_list", REMOTE_LIST, "remote-list = masqd_test_remote_list:plugin")
    assert main([*command, "--backend", "dry-run", "--config", "/nonexistent/masqd-config"]) == 0
    out, err = capsys.readouterr()
    assert "203.0.113.0/24" in out + err  # read once, then contributed
    import masqd_test_remote_list

    assert masqd_test_remote_list.plugin.once is True


@covers("register_sources")
def test_a_source_that_cannot_be_read_once_fails_the_command_naming_it(install_plugin, capsys, monkeypatch):
    install_plugin("masqd_test_remote_list", REMOTE_LIST, "remote-list = masqd_test_remote_list:plugin")
    monkeypatch.setenv("REMOTE_LIST_DOWN", "1")
    assert main(["render", "--backend", "dry-run", "--config", "/nonexistent/masqd-config"]) == 4
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("error: cannot read event source remote-list (plugin remote-list): raised "
                   "ConnectionRefusedError('IPAM at 192.0.2.53 refused')\n")


async def test_the_daemon_runs_sources_and_never_reads_them_once(tmp_path):
    class Source:
        name = "counted"
        runs = reads = 0

        async def run(self, notify):
            Source.runs += 1
            await anyio.sleep_forever()

        async def read_once(self):
            Source.reads += 1

    config = tmp_path / "config"
    agent = build_agent(AgentOptions(), backend=DryRunBackend(), config=config,
                        plugins=make_plugins(OffersSources(Source())))
    async with running(agent):
        await wait_until(lambda: Source.runs == 1, "the source to run")
    assert Source.reads == 0
    once = build_agent(AgentOptions(), backend=DryRunBackend(), config=config,
                       plugins=make_plugins(OffersSources(Source())), once=True)
    await once.run_once()
    assert (Source.runs, Source.reads) == (1, 1)


class Policies(Adds):
    """A plugin whose CIDRs each stand for a policy object."""

    masqd_origin_kind = "policy"


@covers("nonmasq_cidrs")
async def test_a_plugin_declares_its_cidrs_are_policies_and_the_metrics_count_them_so():
    from masqd.provenance import origin_counts

    options = AgentOptions()
    plugins = make_plugins(Policies("policies", "192.0.2.0/24"), Adds("plain", "198.51.100.0/24"))
    contributions = await plugins.contributions(parse_config(None, options).config, options)
    assert {c.plugin: c.kind for c in contributions} == {"policies": "policy", "plain": "plugin"}
    from masqd.config import merge_configs

    extra = tuple(net for c in contributions for net in c.cidrs)
    ruleset = compute_ruleset(parse_config(None, options).config, options, extra)
    counts = origin_counts(ruleset, merge_configs([], options), contributions, options)
    assert counts[("ipv4", "policy")] == 1 and counts[("ipv4", "plugin")] == 1


def test_an_unknown_origin_kind_is_refused_at_start_up_naming_the_plugin():
    class Odd(Adds):
        masqd_origin_kind = "magic"

    with pytest.raises(PluginLoadError, match="plugin odd: masqd_origin_kind is 'magic'; expected one of plugin, policy"):
        make_plugins(Odd("odd", "192.0.2.0/24"))


# --- masquerade_cidrs ---------------------------------------------------------------------------------


@covers("masquerade_cidrs")
def test_a_masquerade_entry_cuts_a_longer_hole_into_a_kept_range(masqd_dry_run):
    agent = masqd_dry_run(Overrides("metadata", "169.254.169.254/32"))
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert result.error is None, result.error
    assert result.overrides == {"metadata": ["169.254.169.254/32"]}
    kept = [ipaddress.ip_network(net) for net in result.nonmasq[4]]
    assert not any(ipaddress.ip_address("169.254.169.254") in net for net in kept)
    assert any(ipaddress.ip_address("169.254.169.253") in net for net in kept)
    assert ipaddress.ip_network("10.0.0.0/8") in kept
    assert "-d 169.254.169.252/31 -m comment" in result.rules


@covers("masquerade_cidrs")
def test_a_masquerade_entry_outside_every_kept_range_leaves_upstreams_rules(masqd_dry_run):
    agent = masqd_dry_run(Overrides("far", "198.51.100.0/24"))
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert result.error is None
    assert result.nonmasq[4] == ["169.254.0.0/16", "10.0.0.0/8"]


@covers("masquerade_cidrs", "nonmasq_cidrs")
def test_the_same_prefix_kept_by_one_plugin_and_masqueraded_by_another_is_refused_naming_both(masqd_dry_run):
    agent = masqd_dry_run(Adds("keeper", "192.0.2.0/24"), Overrides("masker", "192.0.2.0/24"))
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert isinstance(result.error, PluginError)
    assert ("masqueradeCIDRs: '192.0.2.0/24': masqueraded by plugin masker and kept by plugin keeper: a destination "
            "is either kept or masqueraded") in str(result.error)
    assert result.rules is None  # nothing applied


@covers("masquerade_cidrs")
def test_a_config_keep_entry_and_a_plugin_masquerade_entry_of_one_prefix_are_refused(masqd_dry_run):
    agent = masqd_dry_run(Overrides("masker", "10.0.0.0/8"))
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert "masqueraded by plugin masker and kept by " in str(result.error)
    assert "config (nonMasqueradeCIDRs): a destination is either kept or masqueraded" in str(result.error)


@covers("masquerade_cidrs")
def test_a_plugin_masquerading_the_kept_link_local_range_is_refused_naming_masqlinklocal(masqd_dry_run):
    result = masqd_dry_run(Overrides("ll", "169.254.0.0/16")).apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert isinstance(result.error, PluginError)
    assert ("masqueraded by plugin ll and kept by the link-local default (masqLinkLocal: false; set masqLinkLocal: "
            "true to masquerade it)") in str(result.error)
    assert masqd_dry_run(Overrides("ll2", "169.254.0.0/16")).apply("masqLinkLocal: true\n").error is None


@covers("masquerade_cidrs")
@pytest.mark.parametrize("returned, key, reason", [
    pytest.param(["10.0.0.1/8"], "bad.masquerade_cidrs[0]", "did you mean '10.0.0.0/8'", id="misaligned"),
    pytest.param(["2001:db8::/32"], "bad.masquerade_cidrs[0]", "--enable-ipv6", id="ipv6-without-flag"),
    pytest.param(42, "bad.masquerade_cidrs", "expected an iterable", id="not-iterable"),
])
def test_unusable_masquerade_entries_reject_the_state_naming_the_plugin(masqd_dry_run, returned, key, reason):
    agent = masqd_dry_run(Overrides("bad", "192.0.2.0/24"))
    assert agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n").error is None
    agent.plugins.pm.get_plugin("bad").cidrs = returned
    result = agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert isinstance(result.error, PluginError)
    assert key in str(result.error) and reason in str(result.error)
    assert result.overrides == {"bad": ["192.0.2.0/24"]}  # the last good state stays


# --- the meta-test -------------------------------------------------------------------------------------


def test_every_hookspec_has_a_test():
    specs = {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "masqd_spec")}
    assert specs == {"nonmasq_cidrs", "masquerade_cidrs", "validate_config", "audit", "register_backends",
                     "register_sources", "describe_cidrs"}
    assert specs - COVERED == set(), f"hookspecs without a test: {sorted(specs - COVERED)}"
