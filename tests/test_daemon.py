"""The event-driven daemon, in process, on the dry-run backend: reacts to file changes without
waiting for the resync, keeps the last good rules on a bad config, coalesces bursts, retries."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import structlog

from support import NO_RESYNC, agent, cidrs_of, write_atomically

from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.errors import ApplyError
from masqd.hookspecs import hookimpl
from masqd.plugins import Plugins
from masqd.reconcile import Reconciler
from masqd.testing import netns, running, wait_until

WAIT = 10  # seconds before a test gives up waiting for the masqd process (a failure, not a timing claim)


def swap_configmap(directory: Path, text: str, generation: int) -> None:
    """Update a ConfigMap-style mount: new timestamped dir, then swap the ..data symlink."""
    data_dir = directory / f"..2026_11_24_{generation:04d}"
    data_dir.mkdir()
    (data_dir / "config").write_text(text)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(data_dir.name)
    os.replace(tmp_link, directory / "..data")


async def test_config_change_applied_without_waiting_for_resync(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    backend = DryRunBackend()
    async with running(agent(backend, config)) as daemon:
        assert cidrs_of(backend.applied) == ["169.254.0.0/16", "10.0.0.0/8"]
        write_atomically(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n")
        await wait_until(lambda: backend.writes == 2, "the new list")
        assert cidrs_of(backend.applied) == ["169.254.0.0/16", "10.0.0.0/8", "198.51.100.0/24"]
        assert "-A IP-MASQ-AGENT -d 198.51.100.0/24" in backend.last_rendered
        assert daemon.status.last_error is None


async def test_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    swap_configmap(tmp_path, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8]\n", 1)
    config = tmp_path / "config"
    config.symlink_to("..data/config")
    backend = DryRunBackend()
    async with running(agent(backend, config)):
        assert cidrs_of(backend.applied)[1:] == ["10.0.0.0/8"]
        swap_configmap(tmp_path, NO_RESYNC + "nonMasqueradeCIDRs: [203.0.113.0/24]\n", 2)
        await wait_until(lambda: backend.writes == 2, "the swapped ConfigMap")
        assert cidrs_of(backend.applied)[1:] == ["203.0.113.0/24"]


async def test_missing_file_means_defaults_and_creation_is_seen(tmp_path: Path) -> None:
    config = tmp_path / "config"
    backend = DryRunBackend()
    async with running(agent(backend, config)):
        assert cidrs_of(backend.applied)[1:] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
        write_atomically(config, NO_RESYNC + "nonMasqueradeCIDRs: [192.0.2.0/24]\n")
        await wait_until(lambda: backend.writes == 2, "the created file")
        assert cidrs_of(backend.applied)[1:] == ["192.0.2.0/24"]
        config.unlink()
        await wait_until(lambda: backend.writes == 3, "defaults after deletion")
        assert cidrs_of(backend.applied)[1:] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]


async def test_bad_config_keeps_last_rules_and_recovers(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    backend = DryRunBackend()
    async with running(agent(backend, config)) as daemon:
        good = backend.applied
        write_atomically(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.1/8]\n")
        await wait_until(lambda: daemon.status.errors == 1, "the rejection")
        assert backend.applied == good and backend.writes == 1
        assert "10.0.0.0/8" in str(daemon.status.last_error)  # names the aligned form
        write_atomically(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/16]\n")
        await wait_until(lambda: backend.writes == 2, "recovery")
        assert cidrs_of(backend.applied)[1:] == ["10.0.0.0/16"]
        assert daemon.status.last_error is None


async def test_resync_interval_from_config_drives_the_timer(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    backend = DryRunBackend()
    async with running(agent(backend, config)) as daemon:
        start = daemon.status.generation
        write_atomically(config, "resyncInterval: 100ms\n")
        # the shorter interval takes effect at once, not after the old hour has passed
        await wait_until(lambda: daemon.status.generation >= start + 6, "timer ticks")
        assert backend.writes == 1  # ticks re-check but an unchanged state is never rewritten


class FailingBackend(DryRunBackend):
    """A dry-run backend whose next ``failures`` syncs raise ``make_error()``."""

    def __init__(self, failures: int, make_error):
        super().__init__()
        self.failures = failures
        self.make_error = make_error

    async def sync(self, ruleset):
        if self.failures:
            self.failures -= 1
            raise self.make_error()
        return await super().sync(ruleset)


def lock_held() -> ApplyError:
    """What a busy kernel answers."""
    return ApplyError(["iptables-restore"], 4, "Another app is currently holding the xtables lock")


async def test_failed_apply_is_retried_without_an_event(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    backend = FailingBackend(2, lock_held)
    async with running(agent(backend, config, retry_initial_seconds=0.01), first_pass=False) as daemon:
        await wait_until(lambda: backend.writes == 1, "the retried apply")
    assert daemon.status.errors == 2 and daemon.status.last_error is None


async def test_burst_of_events_is_coalesced(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    backend = DryRunBackend()
    reconciler = Reconciler(backend, AgentOptions(), config)
    send, receive = anyio.create_memory_object_stream(100)
    from masqd.events import Event

    for i in range(50):
        send.send_nowait(Event("file", str(i)))
    send.close()
    await reconciler.run(receive)  # returns when the stream ends
    assert reconciler.status.generation == 1 and backend.writes == 1


def start_masqd(config: Path, *flags: str) -> tuple[subprocess.Popen, netns.LineReader]:
    masqd = Path(sys.executable).with_name("masqd")
    proc = subprocess.Popen([str(masqd), "run", "--backend", "dry-run", "--config", str(config),
                             "--log-format", "json", "--http-address=127.0.0.1:0", *flags], stderr=subprocess.PIPE)
    return proc, netns.LineReader(proc.stderr)


def read_until(lines: netns.LineReader, needle: str) -> str:
    """The first log line containing ``needle``; fails the test after WAIT seconds of silence."""
    while (line := lines.readline(WAIT)) is not None:
        if needle in line:
            return line
    pytest.fail(f"masqd never logged {needle!r}")


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_signal_exits_cleanly(tmp_path: Path, signal_name: str) -> None:
    """The real command: started, given a signal, exits 0 and says it stopped."""
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    proc, lines = start_masqd(config)
    try:
        read_until(lines, "would apply")
        proc.send_signal(getattr(signal, signal_name))
        read_until(lines, '"masqd stopped"')
        assert proc.wait(timeout=WAIT) == 0
    finally:
        proc.kill()
        proc.wait()
        lines.close()


def test_sighup_triggers_a_sync(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    proc, lines = start_masqd(config, "--v=4")
    try:
        read_until(lines, "would apply")
        proc.send_signal(signal.SIGHUP)
        assert '"trigger":"sighup"' in read_until(lines, '"in sync"')
    finally:
        proc.kill()
        proc.wait()
        lines.close()


async def test_unexpected_error_is_logged_and_retried_not_fatal(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    backend = FailingBackend(1, lambda: KeyError("a bug"))  # not a MasqdError: a bug
    with structlog.testing.capture_logs() as logs:
        async with running(agent(backend, config)) as daemon:
            await wait_until(lambda: backend.writes == 1, "the retry after the bug")
            assert daemon.status.errors == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "internal error during sync; kernel keeps its previous rules"]


async def test_repeated_identical_sync_errors_are_logged_once(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    backend = FailingBackend(4, lock_held)
    with structlog.testing.capture_logs() as logs:
        async with running(agent(backend, config, retry_initial_seconds=0.01), first_pass=False):
            await wait_until(lambda: backend.writes == 1, "success after four failures")
    failures = [e for e in logs if e["event"].startswith("sync failed")]
    assert len(failures) == 4
    assert [e["log_level"] for e in failures] == ["error", "debug", "debug", "debug"]


def _limit_writable(limit: str) -> str | None:
    """Why a user namespace whose ``/proc/sys/user/LIMIT`` can be set is not to be had here, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "no unshare command"
    probe = subprocess.run([unshare, "--user", "--map-root-user", "sh", "-c", f"echo 0 > /proc/sys/user/{limit}"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot set {limit} in a user namespace: {probe.stderr.strip()}"


@pytest.mark.parametrize("limit", ["max_inotify_instances", "max_inotify_watches"])
def test_inotify_exhausted_falls_back_to_polling(tmp_path: Path, limit: str) -> None:
    """A node whose inotify instances (``fs.inotify.max_user_instances``: EMFILE) or watches
    (``max_user_watches``: ENOSPC) are used up: the real command says so once and still sees a
    change, by polling. The limit is the kernel's own, set to 0 in a user namespace of the test's."""
    reason = _limit_writable(limit)
    if reason is not None:
        pytest.skip(reason)
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    masqd = Path(sys.executable).with_name("masqd")
    script = f'echo 0 > /proc/sys/user/{limit} && exec "$@"'
    proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh", str(masqd), "run",
                             "--backend", "dry-run", "--config", str(config), "--log-format", "json",
                             "--http-address=", "--v=4"], stderr=subprocess.PIPE)
    lines = netns.LineReader(proc.stderr)
    try:
        seen = {}  # the first apply and the warning, in whichever order they come
        while len(seen) < 2:
            line = read_until(lines, '"event":"')
            seen.update({key: line for key in ("cannot watch config directory", "would apply") if key in line})
        warning = seen["cannot watch config directory"]
        assert str(tmp_path) in warning and ("max_user_instances" if "instances" in limit else "max_user_watches") in warning
        write_atomically(config, NO_RESYNC + "nonMasqueradeCIDRs: [192.0.2.0/24]\n")
        assert "-A IP-MASQ-AGENT -d 192.0.2.0/24" in read_until(lines, "would apply")
    finally:
        proc.kill()
        proc.wait()
        lines.close()


async def test_failing_source_is_restarted_and_daemon_keeps_running(tmp_path: Path) -> None:
    class CrashOnce:
        name = "crashy"
        runs = 0

        async def run(self, notify):
            CrashOnce.runs += 1
            if CrashOnce.runs == 1:
                raise RuntimeError("lost the watch")
            await anyio.sleep_forever()

    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    backend = DryRunBackend()

    class CrashySource:
        @hookimpl
        def register_sources(self, register):
            register(CrashOnce())

    plugins = Plugins.load(entry_points=False, extra=[("crashy", CrashySource())])
    with structlog.testing.capture_logs() as logs:
        async with running(agent(backend, config, plugins=plugins)) as daemon:
            # the restart emits an event: the reconciler runs again after the crash
            await wait_until(lambda: CrashOnce.runs == 2 and daemon.status.generation >= 2, "the restart")
    assert backend.writes == 1
    (failed,) = [e for e in logs if e["event"] == "event source failed; restarting it"]
    assert failed["source"] == "crashy" and failed["plugin"] == "crashy" and "lost the watch" in failed["error"]


async def test_bad_config_is_logged_once_not_on_every_resync(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("resyncInterval: 100ms\n")
    backend = DryRunBackend()
    with structlog.testing.capture_logs() as logs:
        async with running(agent(backend, config)) as daemon:
            write_atomically(config, "resyncInterval: 100ms\nnonMasqueradeCIDRs: [10.0.0.1/8]\n")
            await wait_until(lambda: daemon.status.errors >= 5, "several resyncs on the bad file")
    rejected = [e for e in logs if e["event"] == "config rejected; keeping the rules last applied"]
    assert len(rejected) == 1
    assert rejected[0]["problems"] == [
        "nonMasqueradeCIDRs[0]: '10.0.0.1/8': not aligned to a CIDR block: host bits are set; did you mean '10.0.0.0/8'?"]


class CleanupFailsOnce(DryRunBackend):
    """Another backend whose leftovers cannot be removed the first time (a busy chain, a held lock)."""

    name = "other"

    def __init__(self):
        super().__init__()
        self.attempts = 0

    async def cleanup(self, chain: str) -> tuple[str, ...]:
        self.attempts += 1
        if self.attempts == 1:
            raise ApplyError(["iptables-restore"], 1, "CHAIN_DEL failed (Device or resource busy)")
        return (f"ipv4 chain {chain}",)


async def test_leftover_removal_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    other = CleanupFailsOnce()
    reconciler = Reconciler(DryRunBackend(), AgentOptions(), config, leftovers=lambda active: (other,))
    with structlog.testing.capture_logs() as logs:
        await reconciler.reconcile()
        await reconciler.reconcile()
        await reconciler.reconcile()
    assert other.attempts == 2  # failed, retried after the next sync, then never again
    assert [e["event"] for e in logs if e.get("backend") == "other"] == [
        "could not remove another backend's leftovers; will retry", "removed another backend's leftovers"]


def test_each_apply_is_logged_with_trigger_changes_and_duration_and_big_changes_are_counted(tmp_path: Path) -> None:
    """The audit trail in the logs: the first apply and every change name the trigger, the CIDRs
    added and removed (at most LOGGED_CIDRS listed, the rest counted) and the duration."""
    from masqd.events import Event
    from masqd.reconcile import LOGGED_CIDRS

    config = tmp_path / "config"
    many = [f"10.{i // 256}.{i % 256}.0/24" for i in range(LOGGED_CIDRS + 30)]
    config.write_text(f"cidrLimit: 1000\nnonMasqueradeCIDRs: [{', '.join(many)}]\n")
    reconciler = Reconciler(DryRunBackend(), AgentOptions(), config)
    with structlog.testing.capture_logs() as logs:
        anyio.run(reconciler.reconcile, (Event("startup"),))
        config.write_text("nonMasqueradeCIDRs: [10.0.0.0/24, 198.51.100.0/24]\n")
        anyio.run(reconciler.reconcile, (Event("file"), Event("timer")))
    first, update = [e for e in logs if e["event"] in ("rules applied", "rules updated")]
    assert first["event"] == "rules applied" and first["trigger"] == "startup"
    assert len(first["cidrs_added"]) == LOGGED_CIDRS and first["cidrs_added_count"] == LOGGED_CIDRS + 31
    assert first["cidrs_removed"] == [] and first["duration_ms"] >= 0
    assert update["trigger"] == "file,timer" and update["cidrs_added"] == ["198.51.100.0/24"]
    assert len(update["cidrs_removed"]) == LOGGED_CIDRS and update["cidrs_removed_count"] == LOGGED_CIDRS + 29
    assert "cidrs_added_count" not in update and update["duration_ms"] >= 0


async def test_a_missing_config_file_is_named_once_at_start_and_its_appearance_logged(tmp_path: Path) -> None:
    config = tmp_path / "config"
    backend = DryRunBackend()
    with structlog.testing.capture_logs() as logs:
        async with running(agent(backend, config)) as daemon:
            await daemon.reconciler.reconcile()  # a resync: nothing said again
            write_atomically(config, NO_RESYNC + "nonMasqueradeCIDRs: [192.0.2.0/24]\n")
            await wait_until(lambda: backend.writes == 2, "the created file")
    said = [(e["event"], e.get("path")) for e in logs if "config file" in e["event"]]
    assert said == [
        ("config file: no such file; the defaults apply (a missing config file is allowed, as for an optional "
         "ConfigMap)", str(config)),
        ("config file present now; its config applies", str(config)),
    ]
