"""Drift healed between resyncs: the nftables backend follows ``nft monitor`` and restores its
tables as soon as another process changes them; the iptables backend reads its chain back every
``--drift-check-interval``. The resync interval is an hour in these tests, so a restore can only
come from the drift sources (each restore names its trigger)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import anyio
import pytest
import structlog

from support import NO_RESYNC

from masqd.agent import build_agent
from masqd.backends.dryrun import DryRunBackend
from masqd.backends.nftables import ChangeFilter
from masqd.cli import build_parser
from masqd.config import AgentOptions
from masqd.errors import ApplyError, BackendError, ReadBackError
from masqd.events import Event
from masqd.reconcile import Reconciler
from masqd.sources import drift
from masqd.sources.drift import DriftCheckSource, KernelMonitorSource, RepairBudget
from masqd.testing import netns, running, wait_until
from masqd.testing.netns import CHAIN, chain_lines, jumps, tables
from masqd.testing.processes import children, cmdline, dead

MARKER = "masqd_write_0123456789ab"
HOUR = "resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n"


def transaction(*lines: str, pid: int = 4242) -> list[str]:
    return [*lines, f"# new generation 7 by process {pid} (nft)"]


def changes_reported(lines: list[str]) -> list[str]:
    changes = ChangeFilter(MARKER)
    return [change for line in lines if (change := changes.feed(line)) is not None]


# --- which nft monitor output asks for a restore (pure) ----------------------------------------------


@pytest.mark.parametrize(("lines", "expected"), [
    pytest.param(transaction("delete element ip masqd nonmasq4 { 10.0.0.0/8 }"),
                 ["delete element ip masqd nonmasq4 { 10.0.0.0/8 }; by process 4242 (nft)"], id="element-deleted"),
    pytest.param(transaction("delete rule ip6 masqd nat handle 3", "delete rule ip6 masqd nat handle 4"),
                 ["delete rule ip6 masqd nat handle 3; by process 4242 (nft)"], id="one-report-per-transaction"),
    pytest.param(transaction("add table ip masqd", "delete table ip masqd", "add table ip masqd",
                             "add element ip masqd nonmasq4 { 10.0.0.0/8 }",
                             f"add table ip {MARKER}", f"delete table ip {MARKER}"),
                 [], id="masqd-own-write"),
    pytest.param(transaction("add table ip masqd", f"add table ip {MARKER}", f"delete table ip {MARKER}")
                 + transaction("delete table ip masqd"),
                 ["delete table ip masqd; by process 4242 (nft)"], id="own-write-then-foreign"),
    pytest.param(transaction("add table ip masqd_write_ffffffffffff", "delete table ip masqd"),
                 ["delete table ip masqd; by process 4242 (nft)"], id="another-marker-is-not-ours"),
    pytest.param(transaction("add table ip filter", "add chain ip filter input { type filter hook input priority 0; }",
                             "add table inet masqd", "add rule ip nat POSTROUTING masquerade"),
                 [], id="other-tables"),
    pytest.param(["trace id 9c01f8 ip masqd nat packet: oif \"eth0\""], [], id="trace-lines"),
    pytest.param(["delete element ip masqd nonmasq4 { 10.0.0.0/8 }"], [], id="not-reported-before-its-end"),
    pytest.param(["add table ip masqd", f"add table ip {MARKER}", "# ERROR: We lost some netlink events!"]
                 + transaction("delete table ip masqd"),
                 ["nft monitor: ERROR: We lost some netlink events!", "delete table ip masqd; by process 4242 (nft)"],
                 id="lost-events-ask-for-a-pass-and-forget-the-transaction"),
])
def test_change_filter_reports_foreign_transactions_on_masqd_tables(lines, expected):
    assert changes_reported(lines) == expected


def test_change_filter_shortens_a_long_change():
    line = "add element ip masqd nonmasq4 { " + ", ".join(f"10.0.{i}.0/24" for i in range(200)) + " }"
    (change,) = changes_reported(transaction(line))
    assert change == line[:200] + "...; by process 4242 (nft)"


# --- the drift check, in process ---------------------------------------------------------------------


async def test_drift_check_restores_rules_lost_between_resyncs(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    backend = DryRunBackend()
    agent = build_agent(AgentOptions(), backend=backend, config=config, drift_check_interval=0.02)
    audits = []
    agent.audit.listeners.append(audits.append)
    async with running(agent):
        await wait_until(lambda: backend.writes == 1, "the first apply")
        backend.applied = None  # what the dry-run backend holds is lost, as if flushed by hand
        await wait_until(lambda: backend.writes == 2, "the restore")
    assert [(a.trigger, a.result, a.repair) for a in audits if a.result == "applied"] == [
        ("startup", "applied", False), ("drift-check", "applied", True)]


async def test_drift_check_logs_a_failing_read_once_and_notifies_on_drift() -> None:
    reads, notified = [], []

    async def check():
        reads.append(1)
        if len(reads) <= 3:
            raise ReadBackError(["iptables-save", "-t", "nat"], "Permission denied")
        return "ipv4: chain IP-MASQ-AGENT differs" if len(reads) == 5 else None

    with structlog.testing.capture_logs() as logs:
        with anyio.move_on_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(DriftCheckSource(check, 0.001).run, notified.append)
                await wait_until(lambda: len(reads) >= 6, "six checks")
                tg.cancel_scope.cancel()
    assert notified == ["ipv4: chain IP-MASQ-AGENT differs"]
    failures = [e for e in logs if e["event"].startswith("drift check could not read")]
    assert len(failures) == 1 and "Permission denied" in failures[0]["error"]


def test_repair_budget_allows_a_burst_then_one_repair_per_refill():
    budget = RepairBudget(burst=3, refill=10.0, now=0.0)
    assert [budget.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take(0.0) == 10.0  # the 4th waits for a token
    assert budget.take(0.0) == 20.0
    assert not budget.full(40.0) and budget.full(50.0)  # 2 owed + 3 to refill: 50 s
    assert budget.take(50.0) == 0.0


def restored(logs: list[dict]) -> int:
    """How many outside changes the monitor's log lines say were handed on for restoring."""
    return sum(1 + e.get("more_changes", 0) for e in logs
               if e["event"] == "another process changed masqd's rules; restoring them")


async def test_a_fight_over_the_rules_is_slowed_down_and_logged_once() -> None:
    """Another writer changes masqd's tables again as soon as they are restored: masqd restores
    a burst at once, then only within its budget, taking all changes made meanwhile together."""
    notified: list[str] = []

    async def fighting_writer(changed):
        for n in range(30):
            changed(f"delete table ip masqd; by process 4242 (nft) #{n}")
            await anyio.sleep(0.005)
        await anyio.sleep_forever()

    source = KernelMonitorSource(fighting_writer)
    source.budget = RepairBudget(burst=3, refill=0.05, now=0.0)
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(source.run, notified.append)
            await wait_until(lambda: restored(logs) == 30, "every change restored")
            tg.cancel_scope.cancel()
    assert notified[:3] == [f"delete table ip masqd; by process 4242 (nft) #{n}" for n in range(3)]
    assert len(notified) < 20  # not one pass per change
    fights = [e for e in logs if e["event"].startswith("masqd's rules keep being changed by another process")]
    assert len(fights) == 1 and "another masqd" in fights[0]["event"]


async def _missing() -> str:
    return "ipv4: table ip masqd missing"


@pytest.mark.parametrize(("failure", "check", "expected"), [
    pytest.param(BackendError("nft monitor: exited with status 1: Operation not permitted"), _missing,
                 ["ipv4: table ip masqd missing", "monitor restarted"], id="read-back-at-once-meanwhile"),
    pytest.param(OSError(24, "Too many open files"), None, ["monitor restarted"], id="a-bug-is-only-a-restart"),
])
async def test_a_failing_monitor_falls_back_to_reading_back_until_it_runs_again(monkeypatch, failure, check,
                                                                               expected) -> None:
    """The monitor fails: the rules are read back at once (not an interval later: a back-off is
    shorter than the check interval), and a pass follows once the monitor runs again. A failure
    that is a bug (not a MasqdError) is handled the same way, not a crash of the source."""
    monkeypatch.setattr(drift, "MONITOR_RETRY_SECONDS", 0.2)
    monkeypatch.setattr(drift, "MONITOR_SETTLE_SECONDS", 0.01)
    runs, notified = [], []

    async def monitor(changed):
        runs.append(1)
        if len(runs) == 1:
            raise failure
        await anyio.sleep_forever()

    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(KernelMonitorSource(monitor, check, 3600).run, notified.append)
            await wait_until(lambda: "monitor restarted" in notified, "the pass after the restart")
            tg.cancel_scope.cancel()
    assert notified == expected and len(runs) == 2
    (failed,) = [e for e in logs if e["event"].startswith("cannot follow the kernel's changes")]
    assert str(failure.args[-1]) in failed["error"] and 0.1 <= failed["retry_in_s"] <= 0.2  # the back-off, jittered


def test_check_drift_is_quiet_before_the_first_apply(tmp_path: Path) -> None:
    reconciler = Reconciler(DryRunBackend(), AgentOptions(), tmp_path / "missing")
    assert anyio.run(reconciler.check_drift) is None
    anyio.run(reconciler.reconcile)
    assert anyio.run(reconciler.check_drift) is None
    reconciler.backend.applied = None
    assert anyio.run(reconciler.check_drift) == "ipv4: nothing applied"


def test_check_drift_leaves_a_failed_sync_to_its_retries(tmp_path: Path) -> None:
    """While a failed apply waits for its retry (with back-off), the drift check does not ask for
    passes of its own every interval; once a sync succeeds it checks again."""
    class Refusing(DryRunBackend):
        refuse = False

        async def sync(self, ruleset):
            if self.refuse:
                raise ApplyError(["iptables-restore"], 4, "Another app is currently holding the xtables lock")
            return await super().sync(ruleset)

    backend = Refusing()
    reconciler = Reconciler(backend, AgentOptions(), tmp_path / "missing")
    anyio.run(reconciler._reconcile_guarded, (Event("startup"),))
    backend.applied, backend.refuse = None, True  # lost, and the restore is refused
    anyio.run(reconciler._reconcile_guarded, (Event("timer"),))
    assert reconciler.status.sync_failure is not None and anyio.run(reconciler.check_drift) is None
    backend.refuse = False
    anyio.run(reconciler._reconcile_guarded, (Event("retry"),))
    backend.applied = None
    assert anyio.run(reconciler.check_drift) == "ipv4: nothing applied"


@pytest.mark.parametrize(("value", "seconds"), [
    pytest.param(None, 30.0, id="default"), pytest.param("500ms", 0.5, id="millis"), pytest.param("100ms", 0.1, id="floor"),
    pytest.param("1m30s", 90.0, id="minutes"), pytest.param("0", 0.0, id="off"),
])
def test_drift_check_interval_flag(value, seconds):
    argv = ["run"] + ([] if value is None else [f"--drift-check-interval={value}"])
    assert build_parser().parse_args(argv).drift_check_interval == seconds


@pytest.mark.parametrize("value", ["10", "-1s", "soon", "1ns", "99ms"])
def test_drift_check_interval_flag_rejects(value, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", f"--drift-check-interval={value}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--drift-check-interval" in err and "0 turns the drift check off" in err


# --- against the kernel --------------------------------------------------------------------------------


def started_sources(process) -> list[str]:
    return next(e for e in process.events if e.get("event") == "masqd starting")["sources"]


def is_restore(event: dict) -> bool:
    return event.get("event") == "rules restored after outside change"


NFT_DAMAGE = [
    pytest.param(["nft", "delete", "element", "ip", "masqd", "nonmasq4", "{ 10.0.0.0/8 }"], id="element-deleted"),
    pytest.param(["nft", "add", "element", "ip", "masqd", "nonmasq4", "{ 203.0.113.0/24 }"], id="element-added"),
    pytest.param(["nft", "flush", "set", "ip", "masqd", "nonmasq4"], id="set-flushed"),
    pytest.param(["nft", "flush", "chain", "ip", "masqd", "nat"], id="chain-flushed"),
    pytest.param(["nft", "insert", "rule", "ip", "masqd", "nat", "accept"], id="rule-inserted"),
    pytest.param(["nft", "delete", "table", "ip", "masqd"], id="table-deleted"),
    pytest.param(["nft", "flush", "ruleset"], id="ruleset-flushed"),
]


@pytest.mark.netns
@pytest.mark.parametrize("damage", NFT_DAMAGE)
def test_nft_monitor_restores_masqd_tables_at_once(node_ns, daemon, damage):
    d = daemon(HOUR, backend="nftables")
    assert "kernel-monitor" in started_sources(d)
    good = tables(node_ns)
    netns.run(node_ns, *damage)
    restored = d.next_event(is_restore)
    assert restored["trigger"] == "kernel-monitor"
    assert tables(node_ns) == good
    seen = [e for e in d.events if e.get("event") == "another process changed masqd's rules; restoring them"]
    assert len(seen) == 1 and " masqd" in seen[0]["change"]


@pytest.mark.netns
def monitor_listening(process) -> None:
    """Wait for the pass the kernel monitor asks for once it listens (maybe the first pass itself)."""
    if not any("kernel-monitor" in e.get("trigger", "") for e in process.events):
        process.next_event(lambda e: "kernel-monitor" in e.get("trigger", ""))


def test_nft_monitor_ignores_masqd_own_writes(node_ns, daemon, tmp_path):
    d = daemon(HOUR, backend="nftables")
    monitor_listening(d)
    seen = len(d.events)
    for n, cidr in enumerate(["192.0.2.0/24", "203.0.113.0/24", "100.64.0.0/10"]):
        (tmp_path / "staged").write_text(f"resyncInterval: 1h\nnonMasqueradeCIDRs: [{cidr}]\n")
        os.replace(tmp_path / "staged", tmp_path / "config")
        d.next_event(lambda e: e.get("event") == "rules updated" and e["cidrs_added"] == [cidr])
    # the monitor reports in order: once this outside change is restored, it has read past all of
    # masqd's own writes, and none of them may have caused a pass
    netns.run(node_ns, "nft", "delete", "element", "ip", "masqd", "nonmasq4", "{ 100.64.0.0/10 }")
    d.next_event(is_restore)
    passes = [e for e in d.events[seen:] if "kernel-monitor" in e.get("trigger", "")]
    assert [e["event"] for e in passes] == ["rules restored after outside change"]


def monitor_pids(masqd_pid: int) -> list[int]:
    """The ``nft monitor`` processes masqd runs (once started: they begin as a small Python
    wrapper that then becomes nft)."""
    return [child for child in children(masqd_pid) if (cmdline(child) or [])[:2] == ["nft", "monitor"]]


def monitor_pid(masqd_pid: int) -> int:
    assert netns.wait_for(lambda: len(monitor_pids(masqd_pid)) == 1), f"masqd {masqd_pid} runs no nft monitor"
    (pid,) = monitor_pids(masqd_pid)
    return pid


@pytest.mark.netns
def test_a_killed_nft_monitor_is_restarted_and_heals_again(node_ns, daemon):
    d = daemon(HOUR, backend="nftables")
    first = monitor_pid(d.proc.pid)
    os.kill(first, signal.SIGKILL)
    failed = d.next_event(lambda e: e.get("event", "").startswith("cannot follow the kernel's changes"))
    assert "nft monitor: exited with status -9" in failed["error"]
    assert failed["read_back_every_s"] == drift.DRIFT_CHECK_SECONDS
    # a pass at once, since changes may have been missed; the monitor is started again after 1 s
    d.next_event(lambda e: e.get("trigger") == "kernel-monitor" and e.get("event") == "in sync")
    assert netns.wait_for(lambda: monitor_pids(d.proc.pid) not in ([], [first]), timeout=5)
    netns.run(node_ns, "nft", "flush", "set", "ip", "masqd", "nonmasq4")
    assert d.next_event(is_restore)["trigger"] == "kernel-monitor"


@pytest.mark.netns
def test_nft_monitor_dies_with_a_killed_masqd(node_ns, daemon):
    """SIGKILL gives masqd no chance to stop its monitor: the kernel kills it (parent-death
    signal), instead of leaving it blocked on netlink, holding the namespace, until some later
    nftables change makes it write to the closed pipe."""
    d = daemon(HOUR, backend="nftables")
    monitor = monitor_pid(d.proc.pid)
    d.proc.kill()
    d.proc.wait(timeout=10)
    assert netns.wait_for(lambda: dead(monitor), timeout=5), "nft monitor outlived the killed masqd"


IPTABLES_DAMAGE = [
    pytest.param(["iptables", "-t", "nat", "-F", CHAIN], id="chain-flushed"),
    pytest.param(["iptables", "-t", "nat", "-F", "POSTROUTING"], id="jump-flushed"),
    pytest.param(["iptables", "-t", "nat", "-I", CHAIN, "1", "-j", "RETURN"], id="rule-inserted"),
    pytest.param(["iptables", "-t", "nat", "-D", CHAIN, "2"], id="rule-deleted"),
]


@pytest.mark.netns
@pytest.mark.parametrize("damage", IPTABLES_DAMAGE)
def test_drift_check_restores_the_iptables_chain_between_resyncs(node_ns, daemon, damage):
    d = daemon(HOUR, "--drift-check-interval=100ms")
    assert "drift-check" in started_sources(d)
    good_chain = chain_lines(node_ns)
    netns.run(node_ns, *damage)
    assert d.next_event(is_restore)["trigger"] == "drift-check"
    assert chain_lines(node_ns) == good_chain and jumps(node_ns) == 1


@pytest.mark.netns
def test_drift_check_of_an_unchanged_chain_writes_nothing(node_ns, daemon):
    d = daemon(HOUR, "--drift-check-interval=100ms")
    listing = netns.run(node_ns, "nft", "-a", "list", "table", "ip", "nat").stdout
    for _ in range(10):
        d.next_event(lambda e: e.get("event") == "drift check: the kernel holds the rules last applied")
    assert d.writes()[1:] == []
    assert netns.run(node_ns, "nft", "-a", "list", "table", "ip", "nat").stdout == listing


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_drift_check_interval_zero_turns_drift_sources_off(node_ns, daemon, backend):
    d = daemon(HOUR, "--drift-check-interval=0", backend=backend)
    assert started_sources(d) == ["file", "timer", "addresses"]


def fights(process) -> list[dict]:
    return [e for e in process.events if e.get("event", "").startswith("masqd's rules keep being changed")]


@pytest.mark.netns
def test_two_masqd_fighting_over_the_tables_slow_down_and_say_so(node_ns, tmp_path):
    """A second masqd with another config on the same node (a botched rollout): each one's write
    is an outside change to the other. Both restore a burst at once, then at most one per
    REPAIR_REFILL_SECONDS, and each says once that something else keeps changing its rules."""
    from masqd_proc import DaemonProcess

    daemons = []
    try:
        for n, cidr in enumerate(["10.0.0.0/8", "192.0.2.0/24"]):
            config = tmp_path / f"config{n}"
            config.write_text(f"resyncInterval: 1h\nnonMasqueradeCIDRs: [{cidr}]\n")
            daemons.append(DaemonProcess(node_ns, config, "--http-address=", backend="nftables"))
            daemons[-1].next_event(lambda e: e.get("event") in ("rules applied", "rules updated"))
        started = time.monotonic()
        # the one that runs out of budget first says so, and stops writing: the other then sees
        # no more changes (until the first one's next repair, REPAIR_REFILL_SECONDS later)
        deadline = started + 20
        while not any(fights(d) for d in daemons) and time.monotonic() < deadline:
            for d in daemons:
                if (line := d.lines.readline(0.05)) is not None and line.startswith("{"):
                    d.events.append(json.loads(line))
        for d in daemons:  # stop both, reading their logs to the end
            d.proc.terminate()
        for d in daemons:
            d.next_event(lambda e: e.get("event") == "masqd stopped")
        elapsed = time.monotonic() - started
        assert [len(fights(d)) for d in daemons] in ([1, 0], [0, 1], [1, 1])
        (fight,) = [f for d in daemons for f in fights(d)][:1]
        # the other masqd: by nft (a table replaced) or itself (elements changed over netlink)
        assert re.search(r"; by process \d+ \((nft|masqd)\)$", fight["change"]), fight
        for d in daemons:
            restores = [e for e in d.events if e.get("event") == "rules restored after outside change"]
            # the burst, plus what the budget refilled while the test watched (an upper bound)
            assert len(restores) <= drift.REPAIR_BURST + 1 + elapsed / drift.REPAIR_REFILL_SECONDS, len(restores)
    finally:
        for d in daemons:
            d.kill()
