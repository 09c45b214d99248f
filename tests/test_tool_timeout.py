"""A kernel tool that hangs is killed after a deadline, reaped, and reported as a failed sync.

The hung tools are real processes: small shell scripts standing in for ``iptables-save``,
``iptables-restore`` and ``nft``, handed to the executors as their binaries. They write their
pids to a file, so the tests can check that nothing they started is left running (or left as a
zombie). The deadline is lowered to half a second; the scripts sleep at most 60 s, so a deadline
that does not work fails a test instead of hanging it (a shielded scope cannot be cut short by a
guard from outside).
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import stat
import time
from pathlib import Path

import anyio
import pytest
import structlog

from masqd.backends import tools
from masqd.backends.iptables import LOCK_WAIT_SECONDS, IptablesBackend, SubprocessExecutor
from masqd.backends.iptables_mode import Binaries
from masqd.backends.nftables import NftSubprocessExecutor
from masqd.agent import build_agent
from masqd.backends.iptables.backend import _save_or_none
from masqd.config import AgentOptions
from masqd.errors import BackendError, ReadBackError, ToolMissingError, ToolTimeoutError
from masqd.status import HEALTH_DEADLINE_SECONDS
from masqd.testing import netns, running, wait_until
from masqd.testing.processes import dead, reaped

DEADLINE = 0.5  # seconds: TOOL_TIMEOUT_SECONDS in these tests
GUARD = 10  # seconds before a test gives up (a failure, not a timing claim)
NO_RESYNC = "resyncInterval: 1h\n"


@pytest.fixture(autouse=True)
def _short_deadline(monkeypatch) -> None:
    monkeypatch.setattr(tools, "TOOL_TIMEOUT_SECONDS", DEADLINE)


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_iptables(directory: Path) -> tuple[Binaries, Path, Path]:
    """``iptables-save`` / ``iptables-restore`` stand-ins over a state file: restore stores its
    input (from an empty table, the restore text reads back like a save), save prints it. A tool
    hangs while a file named ``<tool>.hang`` exists next to it. Returns the binaries, the pid
    file (one pid per run) and the state file."""
    pids, state = directory / "pids", directory / "state"
    body = (f'echo $$ >> "{pids}"\n'
            'if [ -e "$0.hang" ]; then exec sleep 60; fi\n'
            'case "$0" in\n'
            f'  *-save) cat "{state}" 2>/dev/null || true ;;\n'
            f'  *-restore) cat > "{state}" ;;\n'
            '  *) echo "iptables v1.8.9 (fake)" ;;\n'
            'esac\n')
    names = [write_script(directory / name, body) for name in ("iptables-save", "iptables-restore", "iptables")]
    return Binaries(*map(str, names)), pids, state


def hung_tool(directory: Path, name: str = "nft") -> tuple[Path, Path]:
    """A tool that records its pid and sleeps without reading its input."""
    pid_file = directory / f"{name}.pid"
    return write_script(directory / name, f'echo $$ > "{pid_file}"\nexec sleep 60\n'), pid_file


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def timeout_text(command: str, wrote: bool = False) -> str:
    held = ("the kernel holds either the rules it had or all of the new ones (a write is committed whole or not at "
            "all), which is read back on the next sync" if wrote else
            "nothing was written; the next sync reads back again")
    return f"{command} did not finish within 0.5 s and was killed; {held}"


# --- the deadline itself ------------------------------------------------------------------------------


async def test_hung_iptables_save_is_killed_reaped_and_named(tmp_path: Path) -> None:
    binaries, pids, _ = fake_iptables(tmp_path)
    Path(binaries.save + ".hang").touch()
    with anyio.fail_after(GUARD), pytest.raises(ToolTimeoutError) as caught:
        await SubprocessExecutor({4: binaries}).save(4)
    assert str(caught.value) == timeout_text(f"{binaries.save} -t nat")
    assert isinstance(caught.value, BackendError)
    assert caught.value.command == [binaries.save, "-t", "nat"] and caught.value.timeout == DEADLINE
    assert caught.value.exited
    [pid] = pids_in(pids)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_hung_iptables_restore_is_killed(tmp_path: Path) -> None:
    binaries, pids, _ = fake_iptables(tmp_path)
    Path(binaries.restore + ".hang").touch()
    with anyio.fail_after(GUARD), pytest.raises(ToolTimeoutError) as caught:
        await SubprocessExecutor({4: binaries}).restore(4, "*nat\n:IP-MASQ-AGENT - [0:0]\nCOMMIT\n")
    assert str(caught.value) == timeout_text(f"{binaries.restore} -w {LOCK_WAIT_SECONDS} --noflush", wrote=True)
    assert all(reaped(pid) for pid in pids_in(pids))


async def test_hung_nft_is_killed_even_while_its_input_is_unread(tmp_path: Path) -> None:
    """The script is far larger than a pipe holds and the tool never reads it: the write of the
    input blocks, and the deadline still ends it."""
    nft, pid_file = hung_tool(tmp_path)
    script = "add element ip masqd keep { 10.0.0.0/8 }\n" * 50_000
    with anyio.fail_after(GUARD), pytest.raises(ToolTimeoutError) as caught:
        await NftSubprocessExecutor(binary=str(nft)).apply(script)
    assert str(caught.value) == timeout_text(f"{nft} -f -", wrote=True)
    assert reaped(int(pid_file.read_text()))


async def test_hung_nft_listing_is_killed(tmp_path: Path) -> None:
    nft, pid_file = hung_tool(tmp_path)
    with anyio.fail_after(GUARD), pytest.raises(ToolTimeoutError, match=r" --json list table ip masqd did not finish"):
        await NftSubprocessExecutor(binary=str(nft)).list_table(4)
    assert reaped(int(pid_file.read_text()))


async def test_deadline_holds_inside_a_shielded_scope(tmp_path: Path) -> None:
    """The reconciler's sync runs shielded from cancellation: the deadline must still end it."""
    binaries, pids, _ = fake_iptables(tmp_path)
    Path(binaries.save + ".hang").touch()
    with anyio.CancelScope() as outer:
        outer.cancel()  # what shutdown does; the shield keeps it out
        with anyio.CancelScope(shield=True), pytest.raises(ToolTimeoutError):
            await SubprocessExecutor({4: binaries}).save(4)
    assert all(reaped(pid) for pid in pids_in(pids))


async def test_cancelled_caller_leaves_no_process(tmp_path: Path) -> None:
    nft, pid_file = hung_tool(tmp_path)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(NftSubprocessExecutor(binary=str(nft)).list_structure)
            await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), "the tool started", timeout=GUARD)
            tg.cancel_scope.cancel()
    assert reaped(int(pid_file.read_text()))


async def test_the_tools_children_are_killed_too(tmp_path: Path) -> None:
    """A wrapper script that runs the real binary as a child (and does not exec it): the child
    holds the output pipe open, and is killed with the wrapper (the whole process group)."""
    pid_file, child_file = tmp_path / "wrapper.pid", tmp_path / "child.pid"
    wrapper = write_script(tmp_path / "iptables-save",
                           f'echo $$ > "{pid_file}"\nsleep 60 &\necho $! > "{child_file}"\nwait\n')
    with anyio.fail_after(GUARD), pytest.raises(ToolTimeoutError):
        await tools.run_tool([str(wrapper), "-t", "nat"])
    assert reaped(int(pid_file.read_text()))
    child = int(child_file.read_text())  # reparented to init, which reaps it
    await wait_until(lambda: dead(child), "the wrapper's child killed", timeout=GUARD)


async def test_a_process_stuck_in_the_kernel_is_reported_without_waiting_for_it(tmp_path: Path, monkeypatch) -> None:
    """SIGKILL acts only when a process leaves the kernel; one in uninterruptible I/O cannot be
    waited for. Simulated by a kill that does nothing: the error says so, the sync does not hang,
    and the process is reaped once it does exit."""
    monkeypatch.setattr(tools, "_kill_process_group", lambda pid: None)
    monkeypatch.setattr(tools, "KILL_GRACE_SECONDS", 0.2)
    nft, pid_file = hung_tool(tmp_path)
    with anyio.fail_after(GUARD), pytest.raises(ToolTimeoutError) as caught:
        await NftSubprocessExecutor(binary=str(nft)).list_structure()
    assert not caught.value.exited
    assert str(caught.value).endswith("; it has not exited yet (stuck in the kernel: a wedged lock or "
                                      "uninterruptible I/O), and is reaped when it does")
    pid = int(pid_file.read_text())
    assert not reaped(pid)
    os.kill(pid, signal.SIGKILL)  # the kernel call returns at last
    await wait_until(lambda: reaped(pid), "the stuck tool reaped", timeout=GUARD)


async def test_a_tool_that_exits_without_reading_its_input_is_reported_by_its_exit(tmp_path: Path) -> None:
    nft = write_script(tmp_path / "nft", 'echo "Error: unknown option" >&2\nexit 1\n')
    with anyio.fail_after(GUARD), pytest.raises(BackendError, match="exited 1: Error: unknown option"):
        await NftSubprocessExecutor(binary=str(nft)).apply("flush ruleset\n" * 100_000)


# --- a tool that cannot be started -------------------------------------------------------------------


def not_executable(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n")  # no execute bit
    return path


@pytest.mark.parametrize(("why", "reason"), [
    pytest.param("missing", "No such file or directory", id="missing"),
    pytest.param("not-executable", "Permission denied", id="not-executable"),
])
async def test_a_tool_that_cannot_be_started_is_a_tool_missing_error_naming_it(tmp_path: Path, why, reason) -> None:
    binary = str(tmp_path / "nft") if why == "missing" else str(not_executable(tmp_path, "nft"))
    with pytest.raises(ToolMissingError) as caught:
        await tools.run_tool([binary, "--json", "list", "ruleset"])
    assert str(caught.value) == f"{binary} --json list ruleset: cannot run {binary}: {reason}"
    assert caught.value.command == [binary, "--json", "list", "ruleset"]
    assert isinstance(caught.value, BackendError) and not isinstance(caught.value, ReadBackError)


async def test_a_missing_tool_during_a_write_is_a_tool_missing_error_not_a_read_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    with pytest.raises(ToolMissingError, match=f"cannot run {missing}: No such file or directory"):
        await SubprocessExecutor({4: Binaries(missing, missing, missing)}).restore(4, "*nat\nCOMMIT\n")
    with pytest.raises(ToolMissingError, match=f"cannot run {missing}: No such file or directory"):
        await NftSubprocessExecutor(binary=missing).apply("add table ip masqd\n")


async def test_cleanup_skips_an_ipv6_family_whose_tool_is_missing(tmp_path: Path) -> None:
    """As on a node without ip6tables: IPv6 has nothing of masqd's; IPv4 is still cleaned."""
    binaries, _, state = fake_iptables(tmp_path)
    state.write_text("*nat\n:IP-MASQ-AGENT - [0:0]\nCOMMIT\n")
    missing = str(tmp_path / "absent")
    executor = SubprocessExecutor({4: binaries, 6: Binaries(missing, missing, missing)})
    assert await IptablesBackend(executor).cleanup("IP-MASQ-AGENT") == ("ipv4 chain IP-MASQ-AGENT",)
    assert state.read_text() == "*nat\n-F IP-MASQ-AGENT\n-X IP-MASQ-AGENT\nCOMMIT\n"


async def test_mode_detection_reads_a_missing_save_binary_as_no_output(tmp_path: Path) -> None:
    assert await _save_or_none([str(tmp_path / "iptables-nft-save")]) is None


DEFAULT_DEADLINE = tools.TOOL_TIMEOUT_SECONDS  # read at import, before any test lowers it


def test_deadline_fits_between_the_lock_wait_and_the_health_deadline() -> None:
    """Longer than iptables-restore's own wait for the xtables lock; short enough (with the grace
    for a killed tool to exit) that a hung tool is a reported sync failure before /healthz fails."""
    assert LOCK_WAIT_SECONDS < DEFAULT_DEADLINE == 30
    assert DEFAULT_DEADLINE + tools.KILL_GRACE_SECONDS < HEALTH_DEADLINE_SECONDS


# --- the reconciler's view ------------------------------------------------------------------------------


@pytest.mark.parametrize("hung", [pytest.param("iptables-save", id="read"),
                                  pytest.param("iptables-restore", id="write")])
async def test_daemon_reports_a_hung_tool_stays_healthy_and_recovers(tmp_path: Path, hung: str) -> None:
    binaries, pids, state = fake_iptables(tmp_path)
    hang = tmp_path / f"{hung}.hang"
    hang.touch()
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    backend = IptablesBackend(SubprocessExecutor({4: binaries}), random_fully_supported=True)
    agent = build_agent(AgentOptions(), backend=backend, config=config, retry_initial_seconds=0.01,
                        drift_check_interval=0)
    status = agent.status
    with structlog.testing.capture_logs() as logs:
        async with running(agent, first_pass=False):
            await wait_until(lambda: status.errors >= 1 and status.busy_since is None, "the hung tool's failure",
                             timeout=GUARD)
            error = status.last_error
            assert isinstance(error, ToolTimeoutError) and error.command[0] == str(tmp_path / hung)
            assert status.health()[0], status.health()
            ready, why = status.readiness()
            assert not ready
            if hung == "iptables-restore":
                assert error.written == ()
                assert "did not finish within 0.5 s and was killed" in why
            else:  # the chain is replaced without reading it first; its read-back then hung too
                assert error.written == ("ipv4",)
                assert "iptables-save -t nat did not finish within 1 s and was killed" in why
                assert "-A IP-MASQ-AGENT -d 10.0.0.0/8 " in state.read_text()

            hang.unlink()  # the tool answers again: the back-off retry applies the rules
            await wait_until(lambda: status.readiness()[0], "the retry to apply", timeout=GUARD)
            assert status.health()[0]
            assert "-A IP-MASQ-AGENT -d 10.0.0.0/8 " in state.read_text()
    failures = [e for e in logs if e["event"].startswith("sync failed")]
    assert failures and failures[0]["log_level"] == "error"
    assert "did not finish within" in failures[0]["error"] and "s and was killed" in failures[0]["error"]
    assert all(reaped(pid) for pid in pids_in(pids))


# --- the kernel: a killed `nft -f` leaves the old table or the new one, never a mix -------------------


def _table(elements: int) -> str:
    """A whole ``ip masqtest`` table whose set holds ``elements`` /32s, replacing any older one."""
    items = ", ".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(elements))
    return ("table ip masqtest {}\ndelete table ip masqtest\n"
            "table ip masqtest {\n"
            f"  set keep {{ type ipv4_addr; elements = {{ {items} }} }}\n"
            "  chain post { type nat hook postrouting priority srcnat; ip daddr @keep return; masquerade; }\n"
            "}\n")


def _elements(ns: str) -> int:
    listing = json.loads(netns.run(ns, "nft", "--json", "list", "set", "ip", "masqtest", "keep").stdout)
    [entry] = [item["set"] for item in listing["nftables"] if "set" in item]
    return len(entry.get("elem", []))


@pytest.mark.netns
async def test_killed_nft_transaction_leaves_old_or_new_table(node_ns: str, tmp_path: Path, monkeypatch) -> None:
    """Kill ``nft -f`` at points spread over its run: the set then holds all the old elements or
    all the new ones. (Where the kill lands is up to the scheduler; no count in between is ever
    allowed.)"""
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    nft = write_script(tmp_path / "nft", f'exec ip netns exec {node_ns} nft "$@"\n')
    executor = NftSubprocessExecutor(binary=str(nft))
    small, large = 1, 30_000
    monkeypatch.setattr(tools, "TOOL_TIMEOUT_SECONDS", 60)
    monkeypatch.setattr(tools, "SECONDS_PER_RULE", 0.0)  # the deadline is TOOL_TIMEOUT_SECONDS alone
    await executor.apply(_table(small))
    started = time.perf_counter()
    await executor.apply(_table(large))
    full = time.perf_counter() - started
    counts, killed = {small, large}, 0
    for step in range(12):
        want = small if step % 2 else large
        monkeypatch.setattr(tools, "TOOL_TIMEOUT_SECONDS", full * (0.1 + 0.08 * step))
        try:
            await executor.apply(_table(want))
        except ToolTimeoutError:
            killed += 1
        assert _elements(node_ns) in counts
    assert killed  # at least one run was cut short
