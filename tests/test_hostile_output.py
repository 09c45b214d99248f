"""Tools that print without end, and a config that keeps changing while invalid (issue "Hostile
environments", items 5 and 8): what masqd keeps of them, logs and serves stays small and printable,
repeats of one failure are logged once a minute, and a rejected config is not read back on every
change.

The flooding tools are real processes: small Python scripts standing in for ``iptables-restore``,
``nft`` and a monitor, each printing 10 MB of text that differs on every run, with escape
sequences, NULs and carriage returns in it, on stderr, and exiting 1.
"""

from __future__ import annotations

import os
import stat
import sys
import tracemalloc
from pathlib import Path

import anyio
import pytest
import structlog

from masqd.agent import build_agent
from masqd.backends import tools
from masqd.backends.dryrun import DryRunBackend
from masqd.backends.iptables import IptablesBackend, SubprocessExecutor
from masqd.backends.iptables_mode import Binaries
from masqd.backends.nftables import NftSubprocessExecutor
from masqd.config import MAX_CONFIG_BYTES, AgentOptions
from masqd.errors import ApplyError, ConfigError, ToolExitedError, ToolTimeoutError
from masqd.events import Event
from masqd.http import Address
from masqd.reconcile import REPEAT_ERROR_LOG_SECONDS, Reconciler
from masqd.testing import running, wait_until
from support import request

FLOOD_BYTES = 10 * 1024 * 1024
#: What an error message, a status text or a /readyz body may grow to from a tool's output: the
#: 4 KiB kept of it, and the words around it (a few KiB, against the 10 MB printed).
SMALL = 8 * 1024
GUARD = 20  # seconds before a test gives up waiting (a failure, not a timing claim)
GOOD = "resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8]\n"
REJECTED = "config rejected; keeping the rules last applied"

_FLOOD = """\
import os, sys
err = sys.stderr.buffer
run = os.getpid()
sys.stdout.buffer.write({stdout!r})
sys.stdout.flush()
err.write({head!r} + b" (run %d)\\x1b[31m red\\x00\\r\\n" % run)
line = b"%d.%d: \\x1b[2J\\x07 junk\\r\\x00 and text that differs on every run\\n"
written, number = 0, 0
while written < {size}:
    block = b"".join(line % (run, number + i) for i in range(1000))
    err.write(block)
    written, number = written + len(block), number + 1000
err.write({tail!r})
err.flush()
sys.exit(1)
"""


def flooding_tool(path: Path, *, head: bytes = b"fake tool v1.8.9", tail: bytes = b"", stdout: bytes = b"",
                  size: int = FLOOD_BYTES) -> Path:
    """A tool printing ``stdout``, then ``head``, ``size`` bytes of varying junk and ``tail`` on stderr;
    exits 1."""
    path.write_text(f"#!{sys.executable}\n" + _FLOOD.format(head=head, tail=tail, stdout=stdout, size=size))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_iptables(directory: Path) -> Binaries:
    """An ``iptables-save`` answering with an empty nat table, an ``iptables`` saying its version,
    and an ``iptables-restore`` that floods stderr and fails, naming input line 3 at the end."""
    save = directory / "iptables-save"
    save.write_text("#!/bin/sh\nprintf '*nat\\n:POSTROUTING ACCEPT [0:0]\\nCOMMIT\\n'\n")
    main = directory / "iptables"
    main.write_text("#!/bin/sh\necho 'iptables v1.8.9 (nf_tables)'\n")
    for path in (save, main):
        path.chmod(0o755)
    restore = flooding_tool(directory / "iptables-restore", head=b"iptables-restore v1.8.9 (nf_tables):",
                            tail=b"Error occurred at line: 3\nTry `iptables-restore -h' for more information.\n")
    return Binaries(str(save), str(restore), str(main))


def is_printable(text: str) -> bool:
    """Nothing in ``text`` can move a terminal's cursor or end a line early: every character
    printable, newlines and tabs aside (no ESC, NUL, CR)."""
    return all(character.isprintable() or character in "\n\t" for character in text)


SCRIPT = "*nat\n:IP-MASQ-AGENT - [0:0]\n-A IP-MASQ-AGENT -j MASQUERADE\nCOMMIT\n"


# --- what is kept of a tool's stderr --------------------------------------------------------------------


async def test_a_restore_flooding_stderr_fails_with_a_short_printable_error_naming_the_line(tmp_path: Path) -> None:
    binaries = fake_iptables(tmp_path)
    with anyio.fail_after(GUARD), pytest.raises(ApplyError) as caught:
        await SubprocessExecutor({4: binaries}).restore(4, SCRIPT)
    message = str(caught.value)
    assert len(message) < SMALL, len(message)
    assert is_printable(message), repr(message[:300])
    assert message.startswith(f"{binaries.restore} -w 10 --noflush exited 1: "
                              "iptables-restore v1.8.9 (nf_tables): (run ")
    assert "\\x1b[31m red\\x00\\r" in message  # what the control bytes were, shown as escapes
    assert " bytes left out ...]" in message
    assert "Error occurred at line: 3" in message  # the end is kept: iptables names the line there
    assert caught.value.line == "-A IP-MASQ-AGENT -j MASQUERADE"
    assert message.endswith("(input line: -A IP-MASQ-AGENT -j MASQUERADE)")


async def test_nft_flooding_stderr_still_names_its_first_error_and_line(tmp_path: Path) -> None:
    nft = flooding_tool(tmp_path / "nft",
                        head=b"/dev/stdin:2:1-5: Error: Could not process rule:\x1b[1m No such file\x1b[0m",
                        tail=b"/dev/stdin:9:1-5: Error: the last one\n")
    script = "table ip masqd {}\nadd rule ip masqd post masquerade\n"
    with anyio.fail_after(GUARD), pytest.raises(ApplyError) as caught:
        await NftSubprocessExecutor(binary=str(nft)).apply(script)
    message = str(caught.value)
    assert len(message) < SMALL and is_printable(message), repr(message[:300])
    assert "/dev/stdin:2:1-5: Error: Could not process rule:\\x1b[1m No such file\\x1b[0m (run " in message
    assert caught.value.line == "add rule ip masqd post masquerade"


async def test_stderr_is_bounded_while_it_is_read_and_stdout_is_kept_whole(tmp_path: Path) -> None:
    """Not 10 MB gathered and then cut: what is kept of stderr stays a few KiB all along (the
    Python allocations of one run peak well below what the tool printed). Standard output, the
    read-back, is kept whole."""
    stdout = b"*nat\n" + b"-A IP-MASQ-AGENT -d 10.0.0.0/8 -j RETURN\n" * 25_000  # 1 MB
    tool = flooding_tool(tmp_path / "iptables-save", head=b"HEAD", tail=b"TAIL\n", stdout=stdout)
    tracemalloc.start()
    try:
        with anyio.fail_after(GUARD):
            result = await tools.run_tool([str(tool)])
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.returncode == 1 and result.stdout == stdout
    assert result.stderr.startswith(b"HEAD (run ") and result.stderr.endswith(b"TAIL\n")
    assert len(result.stderr) < tools.STDERR_KEPT_BYTES + 100
    # stdout's pieces and their join: twice its size; stderr's 10 MB: a few KiB (it was 20 MB)
    assert peak < 2 * len(stdout) + 1024 * 1024, f"one run peaked at {peak} bytes for 10 MB of stderr"


async def test_a_monitor_that_exits_flooding_stderr_gives_a_short_printable_error(tmp_path: Path) -> None:
    tool = flooding_tool(tmp_path / "monitor", head=b"\x1b]0;title\x07monitor failed")
    with anyio.fail_after(GUARD), pytest.raises(ToolExitedError) as caught:
        async with tools.tool_output([str(tool)]) as stream:
            async for _chunk in stream:
                pass
    message = str(caught.value)
    assert len(message) < SMALL and is_printable(message), repr(message[:300])
    assert "\\x1b]0;title\\x07monitor failed (run " in message
    assert message.rstrip().endswith("left out ...]")


# --- through the reconciler and the daemon -----------------------------------------------------------------


async def test_a_restore_failing_with_varying_stderr_is_logged_once_a_minute_with_a_count(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(GOOD)
    backend = IptablesBackend(SubprocessExecutor({4: fake_iptables(tmp_path)}), random_fully_supported=True)
    reconciler = Reconciler(backend, AgentOptions(), config)
    now = [1000.0]
    reconciler.clock = lambda: now[0]
    with structlog.testing.capture_logs() as logs, anyio.fail_after(GUARD):
        for _ in range(3):  # the first failure, and two retries within the minute
            with pytest.raises(ApplyError):
                await reconciler.reconcile((Event("retry"),))
            now[0] += 1
        now[0] += REPEAT_ERROR_LOG_SECONDS
        with pytest.raises(ApplyError):
            await reconciler.reconcile((Event("retry"),))
    failures = [entry for entry in logs if entry["event"] == "sync failed; kernel keeps its previous rules"]
    assert [entry["log_level"] for entry in failures] == ["error", "debug", "debug", "error"]
    assert "repeats" not in failures[0] and failures[3]["repeats"] == 2
    assert failures[3]["error"] == str(reconciler.status.last_error)  # the newest text
    assert all(len(entry["error"]) < SMALL and is_printable(entry["error"]) for entry in failures)
    status = reconciler.status
    assert len(status.sync_failure) < SMALL and is_printable(status.sync_failure)
    ready, text = status.readiness()
    assert not ready and len(text) < SMALL and is_printable(text), repr(text[:300])


async def test_readyz_stays_small_and_printable_when_the_tool_floods_stderr(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(GOOD)
    backend = IptablesBackend(SubprocessExecutor({4: fake_iptables(tmp_path)}), random_fully_supported=True)
    agent = build_agent(AgentOptions(), backend=backend, config=config, http_address=Address("127.0.0.1", 0),
                        retry_initial_seconds=0.05, drift_check_interval=0)
    ports: list[int] = []

    def bound(addresses: list[str]) -> None:
        ports.append(int(addresses[0].rsplit(":", 1)[1]))

    async with running(agent, first_pass=False, on_http_ready=bound):
        await wait_until(lambda: ports and agent.status.sync_failure is not None, "the failed sync", timeout=GUARD)
        code, _headers, body = await request(ports[0], b"GET /readyz HTTP/1.1\r\nHost: test\r\n\r\n")
    text = body.decode()
    assert code == 503 and "the last attempt failed" in text
    assert "Error occurred at line: 3" in text
    assert len(body) < SMALL and is_printable(text), (len(body), repr(text[:300]))


# --- a write that timed out ----------------------------------------------------------------------------------


class FailingBackend(DryRunBackend):
    """The dry-run backend, whose syncs raise ``error`` while it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = None

    async def sync(self, ruleset):
        if self.error is not None:
            raise self.error
        return await super().sync(ruleset)


def timeout_error(command: list[str], wrote: bool) -> ToolTimeoutError:
    error = ToolTimeoutError(command, 0.5)
    error.wrote = wrote  # (set by run_tool for a tool given input)
    return error


async def test_a_timed_out_write_does_not_claim_the_kernel_kept_its_rules(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(GOOD)
    backend = FailingBackend()
    reconciler = Reconciler(backend, AgentOptions(), config)
    with structlog.testing.capture_logs() as logs:
        backend.error = timeout_error(["iptables-save", "-t", "nat"], wrote=False)
        with pytest.raises(ToolTimeoutError):
            await reconciler.reconcile()
        backend.error = timeout_error(["iptables-restore", "-w", "10", "--noflush"], wrote=True)
        with pytest.raises(ToolTimeoutError):
            await reconciler.reconcile()
    events = [entry["event"] for entry in logs if entry["log_level"] == "error"]
    assert events == ["sync failed; kernel keeps its previous rules",
                      "sync failed; a write timed out, and what the kernel holds is unknown until the next read-back"]


# --- a config that keeps changing while it is invalid --------------------------------------------------------


class CountingBackend(DryRunBackend):
    """The dry-run backend, counting its syncs (each one a full read-back of a real kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    async def sync(self, ruleset):
        self.syncs += 1
        return await super().sync(ruleset)


def file_event(path: Path) -> tuple[Event, ...]:
    return (Event("file", str(path)),)


def rejections(logs: list[dict]) -> list[dict]:
    """The rejections logged above debug level (the repeats left out are debug events, marked ``repeated``)."""
    found = [entry for entry in logs if entry["event"] == REJECTED]
    assert all(entry["repeated"] for entry in found if entry["log_level"] == "debug")
    return [entry for entry in found if entry["log_level"] != "debug"]


async def applied_on_a_clock(config: Path) -> tuple[Reconciler, list[float]]:
    """A reconciler that applied a good config, and the clock its log limits read (to move on)."""
    config.write_text(GOOD)
    reconciler = Reconciler(CountingBackend(), AgentOptions(), config)
    now = [1000.0]
    reconciler.clock = lambda: now[0]
    await reconciler.reconcile()
    return reconciler, now


async def test_a_growing_too_large_config_is_logged_once_and_not_read_back_on_every_change(tmp_path: Path) -> None:
    config = tmp_path / "config"
    reconciler, _ = await applied_on_a_clock(config)
    backend = reconciler.backend
    assert backend.syncs == 1
    with structlog.testing.capture_logs() as logs:
        for step in range(50):  # a file growing past the limit (sparse: its size is all that is read)
            os.truncate(config, MAX_CONFIG_BYTES + 1 + step * 200_000)
            with pytest.raises(ConfigError):
                await reconciler.reconcile(file_event(config))
        assert backend.syncs == 1  # the rules last applied were confirmed a moment ago: not read back again
        status = reconciler.status
        assert status.config_rejections == 50
        assert f"{MAX_CONFIG_BYTES + 1 + 49 * 200_000} bytes" in status.config_failure  # the newest text
        ready, text = status.readiness()
        assert ready and "the newest config was rejected" in text
        config.write_text(GOOD.replace("10.0.0.0/8", "10.0.0.0/8, 192.0.2.0/24"))
        await reconciler.reconcile(file_event(config))
    assert [entry["log_level"] for entry in rejections(logs)] == ["error"]
    assert [entry["event"] for entry in logs if entry["log_level"] in ("info", "warning", "error")
            and not entry["event"].startswith("dry-run")] == [REJECTED, "config accepted again", "rules updated"]
    assert backend.syncs == 2 and reconciler.status.config_failure is None


def broken_yaml(padding: int) -> str:
    """YAML that does not parse, the error's line (and so its text) moving with ``padding``."""
    return "# comment\n" * padding + "nonMasqueradeCIDRs: [10.0.0.0/8\n"


async def test_rejections_of_one_kind_are_logged_once_a_minute_with_the_newest_text_and_a_count(tmp_path: Path) -> None:
    config = tmp_path / "config"
    reconciler, now = await applied_on_a_clock(config)
    with structlog.testing.capture_logs() as logs:
        for padding in range(5):  # five different texts, one kind of problem, within a minute
            config.write_text(broken_yaml(padding))
            with pytest.raises(ConfigError):
                await reconciler.reconcile(file_event(config))
            now[0] += 1
        now[0] += REPEAT_ERROR_LOG_SECONDS
        config.write_text(broken_yaml(7))
        with pytest.raises(ConfigError):
            await reconciler.reconcile(file_event(config))
        config.write_text("nonMasqueradeCIDRs: [10.0.0.1/8]\n")  # another kind of problem: logged at once
        with pytest.raises(ConfigError):
            await reconciler.reconcile(file_event(config))
    logged = rejections(logs)
    assert [entry["log_level"] for entry in logged] == ["error"] * 3
    assert logged[0]["problems"][0].startswith("<line 1, column ") and "repeats" not in logged[0]
    assert logged[1]["problems"][0].startswith("<line 8, column ") and logged[1]["repeats"] == 4
    assert "not aligned" in logged[2]["problems"][0] and "repeats" not in logged[2]


async def test_rejections_alternating_between_two_kinds_are_each_logged_once_a_minute(tmp_path: Path) -> None:
    config = tmp_path / "config"
    reconciler, now = await applied_on_a_clock(config)
    with structlog.testing.capture_logs() as logs:
        for round_ in range(4):  # broken YAML, then a misaligned CIDR, and again, within a minute
            for text in (broken_yaml(round_), f"nonMasqueradeCIDRs: [10.0.0.{round_ + 1}/8]\n"):
                config.write_text(text)
                with pytest.raises(ConfigError):
                    await reconciler.reconcile(file_event(config))
                now[0] += 1
    logged = rejections(logs)
    assert len(logged) == 2, [entry["problems"] for entry in logged]
    assert logged[0]["problems"][0].startswith("<line 1, column ") and "not aligned" in logged[1]["problems"][0]


async def test_a_drift_pass_during_a_rejection_heals_at_once(tmp_path: Path) -> None:
    config = tmp_path / "config"
    reconciler, _ = await applied_on_a_clock(config)
    backend = reconciler.backend
    applied = backend.applied
    config.write_text(broken_yaml(0))
    for _ in range(10):
        with pytest.raises(ConfigError):
            await reconciler.reconcile(file_event(config))
    assert backend.syncs == 1
    for trigger in ("drift-check", "kernel-monitor", "timer"):
        backend.applied = None  # someone flushed the rules
        with pytest.raises(ConfigError):
            await reconciler.reconcile((Event("file", str(config)), Event(trigger)))
        assert backend.applied == applied, trigger  # the rules last applied are back
    assert backend.syncs == 4 and reconciler.status.repaired


@pytest.mark.parametrize("drift_check_interval, resync", [(30.0, "1h"), (0, "45s")])
async def test_a_rejected_change_reads_back_again_once_a_drift_interval_has_passed(tmp_path: Path, drift_check_interval,
                                                                                  resync) -> None:
    """With the drift checks off (0), the resync interval of the rules last applied is the one."""
    config = tmp_path / "config"
    config.write_text(f"resyncInterval: {resync}\n")
    backend = CountingBackend()
    reconciler = Reconciler(backend, AgentOptions(), config, drift_check_interval=drift_check_interval)
    now = [1000.0]
    reconciler.clock = lambda: now[0]
    await reconciler.reconcile()
    interval = drift_check_interval or 45.0
    config.write_text(broken_yaml(0))
    now[0] += interval - 1
    with pytest.raises(ConfigError):
        await reconciler.reconcile(file_event(config))
    assert backend.syncs == 1
    now[0] += 1
    with pytest.raises(ConfigError):
        await reconciler.reconcile(file_event(config))
    assert backend.syncs == 2
    with pytest.raises(ConfigError):
        await reconciler.reconcile(file_event(config))
    assert backend.syncs == 2  # that sync confirmed the rules: counted from then


async def test_a_rejected_change_after_a_failed_sync_syncs_again(tmp_path: Path) -> None:
    """A failed sync leaves the kernel unknown (a family may have been written): the next pass
    syncs, whatever triggered it."""
    config = tmp_path / "config"
    config.write_text(GOOD)
    backend = FailingBackend()
    reconciler = Reconciler(backend, AgentOptions(), config)
    await reconciler.reconcile()
    config.write_text(GOOD.replace("10.0.0.0/8", "192.0.2.0/24"))
    backend.error = ApplyError(["iptables-restore"], 4, "Another app is currently holding the xtables lock")
    with pytest.raises(ApplyError):
        await reconciler.reconcile(file_event(config))
    backend.error = None
    backend.applied = None  # (what the failed write left)
    config.write_text(broken_yaml(0))
    with pytest.raises(ConfigError):
        await reconciler.reconcile(file_event(config))
    assert backend.applied == reconciler.status.applied is not None
