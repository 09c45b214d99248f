"""Hostile config paths (issue "Hostile environments", items 1, 2 and 4).

1. Something that is not a regular file at the config path (a FIFO above all, whose ``open()``
   blocks until a writer comes) is refused by name without blocking: the daemon goes on serving
   HTTP, repairing drift and handling signals, and keeps the rules last applied.
2. A config directory removed and created again, renamed away, or exchanged for another one is
   watched afresh at once (and says so), and the config in it is read again.
3. A file written in place is read when its writer closes it, not half-written after its first
   write; a writer that keeps it open is still read after a bounded quiet period.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import structlog

from masqd.backends.dryrun import DryRunBackend
from masqd.errors import ConfigError
from masqd.inputs import DirectoryInput
from masqd.sources import files
from masqd.sources.files import ConfigFileSource, content_digest, read_config_text
from masqd.testing import netns, running, wait_until

from masqd_proc import MASQD
from support import NO_RESYNC, agent, cidrs_of, write_atomically

#: Seconds a test waits for masqd (in process or not) before failing: a hang guard, not a timing claim.
WAIT = 10
#: Seconds after which whatever a source does with what happened so far is done (a burst ends
#: QUIET_MS after its last event, or at the close that ends a write).
SETTLE = 0.3


def make_fifo(path: Path) -> Path:
    """A FIFO at ``path``, put there as the issue does: created beside it, renamed into place."""
    staged = path.with_name(".fifo")
    os.mkfifo(staged)
    os.replace(staged, path)
    return path


def release_fifo(path: Path) -> None:
    """Let a reader blocked opening the FIFO at ``path`` go (a writer opening it wakes it)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def within(seconds: float, call: Callable[[], object], fifo: Path | None = None) -> object:
    """``call()``, made in a thread so that one blocking on ``fifo`` fails the test (the FIFO is
    then released so the thread ends) instead of hanging it."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("value", call()))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            release_fifo(fifo)
        thread.join(seconds)
        pytest.fail(f"{call} blocked for {seconds} s")
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


# --- 1. not a regular file: refused by name, never blocking ------------------------------------------


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "FIFO"


def _socket(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))  # the socket file stays after the socket is closed
    return "socket"


def _directory(path: Path) -> str:
    path.mkdir()
    return "directory"


def _device_link(path: Path) -> str:
    path.symlink_to("/dev/zero")  # symlinks are followed: what counts is what they point at
    return "character device"


@pytest.mark.parametrize("make", [_fifo, _socket, _directory, _device_link], ids=lambda make: make.__name__[1:])
def test_what_is_not_a_regular_file_is_refused_by_name_without_blocking(tmp_path: Path, make):
    path = tmp_path / "ip-masq-agent"
    kind = make(path)
    with pytest.raises(ConfigError) as caught:
        within(WAIT, lambda: read_config_text(path), path)
    assert f"not a regular file (a {kind})" in str(caught.value)
    assert caught.value.source == str(path)
    assert within(WAIT, lambda: content_digest(path), path) == f"not-regular:{kind}"


def test_the_null_device_still_reads_as_an_empty_config(tmp_path: Path):
    """``--config /dev/null`` (examples/README.md runs ``validate`` so) is an empty config."""
    assert read_config_text("/dev/null") == ""
    link = tmp_path / "config"
    link.symlink_to("/dev/null")
    assert read_config_text(link) == ""


def test_a_missing_file_and_a_symlink_loop_keep_their_meaning(tmp_path: Path):
    assert read_config_text(tmp_path / "absent") is None
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OSError, match="symbolic links"):
        read_config_text(tmp_path / "a")


def test_validate_names_a_fifo_and_exits(tmp_path: Path):
    fifo = make_fifo(tmp_path / "ip-masq-agent")
    try:
        result = subprocess.run([str(MASQD), "validate", "--config", str(fifo)], capture_output=True, text=True,
                                timeout=WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"masqd validate --config FIFO still ran after {WAIT} s")
    assert result.returncode == 1
    assert f"error: {fifo}: <file>: not a regular file (a FIFO)" in result.stderr, result.stderr


class DryRunDaemon:
    """``masqd run --backend dry-run`` in this namespace (the dry-run backend touches no kernel
    state), its JSON log read from stderr under a deadline, its HTTP endpoint on a free port."""

    def __init__(self, config: Path):
        self.proc = subprocess.Popen(
            [str(MASQD), "run", "--backend", "dry-run", "--config", str(config), "--log-format", "json",
             "--http-address=127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines = netns.LineReader(self.proc.stderr)
        self.events: list[dict] = []
        self.address: str | None = None

    def next_event(self, predicate: Callable[[dict], bool]) -> dict:
        deadline = time.monotonic() + WAIT
        while (remaining := deadline - time.monotonic()) > 0 and (line := self.lines.readline(remaining)) is not None:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "HTTP endpoint listening":
                self.address = event["addresses"][0]
            if predicate(event):
                return event
        pytest.fail(f"no matching log event within {WAIT} s; saw: {[e.get('event') for e in self.events][-10:]}")

    def logged(self, predicate: Callable[[dict], bool]) -> dict:
        """An event satisfying ``predicate``, already read or the next one."""
        return next((event for event in self.events if predicate(event)), None) or self.next_event(predicate)

    def listening(self) -> None:
        self.logged(lambda event: event.get("event") == "HTTP endpoint listening")

    def get(self, path: str) -> int:
        """The status ``path`` answers with (a hang guard: no answer within 5 s fails the test)."""
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError as exc:
            pytest.fail(f"{path} did not answer: {exc}")

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"masqd still ran {WAIT} s after SIGTERM")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        self.lines.close()
        self.proc.stderr.close()


@pytest.fixture
def dry_run_daemon() -> Iterator[Callable[[Path], DryRunDaemon]]:
    started: list[DryRunDaemon] = []

    def start(config: Path) -> DryRunDaemon:
        started.append(DryRunDaemon(config))
        return started[-1]

    yield start
    for process in started:
        process.close()


def names_fifo(event: dict) -> bool:
    return (event.get("event", "").startswith("config rejected")
            and any("not a regular file (a FIFO)" in problem for problem in event.get("problems", ())))


def test_a_fifo_swapped_in_while_running_freezes_nothing(tmp_path: Path, dry_run_daemon):
    config = tmp_path / "ip-masq-agent"
    config.write_text(NO_RESYNC)
    daemon = dry_run_daemon(config)
    daemon.next_event(lambda event: event.get("event") == "rules applied")
    daemon.listening()
    make_fifo(config)
    daemon.next_event(names_fifo)
    assert daemon.get("/healthz") in (200, 503)
    assert daemon.terminate() == 0


def test_a_daemon_started_on_a_fifo_serves_http_and_takes_the_file_that_replaces_it(tmp_path: Path, dry_run_daemon):
    config = make_fifo(tmp_path / "ip-masq-agent")
    daemon = dry_run_daemon(config)
    daemon.listening()
    daemon.logged(names_fifo)
    assert daemon.get("/healthz") in (200, 503)
    write_atomically(config, NO_RESYNC + "nonMasqueradeCIDRs: [192.0.2.0/24]\n")
    daemon.next_event(lambda event: event.get("event") == "rules applied")
    assert daemon.terminate() == 0


@pytest.mark.netns
def test_drift_is_repaired_while_a_fifo_sits_at_the_config_path(node_ns, daemon, tmp_path: Path):
    process = daemon(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n", backend="nftables")
    good = netns.tables(node_ns)
    make_fifo(tmp_path / "config")
    process.next_event(names_fifo)
    netns.nft(node_ns, "flush", "ruleset")
    assert netns.wait_for(lambda: netns.tables(node_ns) == good, timeout=WAIT, interval=0.1), \
        "the flushed rules were not restored"


# --- 2. a config directory replaced: watched afresh at once, and read again ------------------------------


class Seen:
    """What the watched config held each time its source asked for a reconcile."""

    def __init__(self, read: Callable[[], object]):
        self.read = read
        self.contents: list[object] = []

    def __call__(self, reason: str | None = None) -> None:
        self.contents.append(self.read())

    async def more_than(self, count: int, what: str) -> None:
        await wait_until(lambda: len(self.contents) > count, what, timeout=WAIT)


def file_content(path: Path) -> Callable[[], str | None]:
    def read() -> str | None:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None

    return read


@asynccontextmanager
async def watching(source: ConfigFileSource, seen: Seen) -> AsyncIterator[None]:
    """``source`` running (on inotify) for the duration of the block."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(source.run, seen)
        await wait_until(lambda: source.watching, "the watch to be in place", timeout=WAIT)
        yield
        assert source.watching == "inotify"
        tg.cancel_scope.cancel()


def exchange(first: Path, second: Path) -> None:
    """``renameat2(RENAME_EXCHANGE)``: the two paths swap what they name, atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("the C library has no renameat2")
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) != 0:
        pytest.skip(f"renameat2(RENAME_EXCHANGE): {os.strerror(ctypes.get_errno())}")


def watched_inodes() -> set[int]:
    """The inodes every inotify descriptor of this process watches (from ``/proc/self/fdinfo``)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        for line in info.splitlines():  # "inotify wd:1 ino:3f7e8 sdev:fe00000 mask:..."
            if line.startswith("inotify "):
                inodes |= {int(field[4:], 16) for field in line.split() if field.startswith("ino:")}
    return inodes


def ancestor_inodes(directory: Path) -> set[int]:
    return {ancestor.stat().st_ino for ancestor in directory.parents if ancestor != ancestor.parent}


def removed_and_made_again(directory: Path) -> None:
    shutil.rmtree(directory)  # rm -rf D && mkdir D
    directory.mkdir()


def renamed_away(directory: Path) -> None:
    os.rename(directory, directory.with_name("config.old"))  # mv D D.old && mkdir D
    directory.mkdir()


def exchanged(directory: Path) -> None:
    other = directory.with_name("config.new")  # the other directory, swapped in
    other.mkdir()
    exchange(other, directory)


def parent_renamed_away(directory: Path) -> None:
    os.rename(directory.parent, directory.parent.with_name("p.old"))  # mv P P.old && mkdir -p P/config
    directory.mkdir(parents=True)


@pytest.mark.parametrize("replace", [removed_and_made_again, renamed_away, exchanged, parent_renamed_away],
                         ids=lambda replace: replace.__name__.replace("_", "-"))
async def test_a_replaced_config_directory_is_watched_afresh_and_read_again(tmp_path: Path, replace):
    directory = tmp_path / "p" / "config"
    directory.mkdir(parents=True)
    config = directory / "ip-masq-agent"
    config.write_text("old")
    source = ConfigFileSource(config)
    seen = Seen(file_content(config))
    with structlog.testing.capture_logs() as logs:
        async with watching(source, seen):
            replace(directory)
            config.write_text("new")  # in place, in the directory now at the path
            await wait_until(lambda: seen.contents[-1:] == ["new"], "the file in the new directory", timeout=WAIT)
            assert source.watched == (str(directory),)
            # the new directory's (and, for their own removal only, the directories above it): not the old one's
            assert watched_inodes() == {directory.stat().st_ino} | ancestor_inodes(directory)
            config.write_text("newer")
            await wait_until(lambda: seen.contents[-1:] == ["newer"], "a later change in the new directory",
                             timeout=WAIT)
    afresh = [entry for entry in logs if "afresh" in entry["event"]]
    assert afresh and afresh[0]["log_level"] == "info" and afresh[0]["directory"] == str(directory), logs


async def test_the_daemon_applies_a_config_written_into_a_replaced_directory(tmp_path: Path):
    directory = tmp_path / "config"
    directory.mkdir()
    config = directory / "ip-masq-agent"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    backend = DryRunBackend()
    async with running(agent(backend, config)):
        shutil.rmtree(directory)
        directory.mkdir()
        config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [192.0.2.0/24]\n")
        await wait_until(lambda: cidrs_of(backend.applied)[1:] == ["192.0.2.0/24"], "the config in the new directory",
                         timeout=WAIT)


# --- 4. a file written in place: read when it is closed -------------------------------------------------


def cidr_config(count: int, third: int = 0) -> str:
    lines = [f"  - 10.{third}.{index}.0/24" for index in range(count)]
    return NO_RESYNC + "nonMasqueradeCIDRs:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("same", [False, True], ids=["new-content", "same-content"])
async def test_a_file_written_in_place_in_two_pieces_is_read_only_once_closed(tmp_path: Path, same):
    """The issue's case: 150 CIDRs rewritten in place in two writes 100 ms apart removed 75 of
    them meanwhile. The source must never see the half-written file."""
    config = tmp_path / "ip-masq-agent"
    before = cidr_config(150)
    after = before if same else cidr_config(150, third=1)
    config.write_text(before)
    seen = Seen(file_content(config))
    async with watching(ConfigFileSource(config), seen):
        with config.open("w") as writer:
            writer.write(after[:len(after) // 2])
            writer.flush()
            await anyio.sleep(0.25)
            writer.write(after[len(after) // 2:])
        if not same:
            await seen.more_than(0, "the rewritten file")
        await anyio.sleep(SETTLE)
    assert seen.contents == ([] if same else [after])


async def test_a_new_file_is_read_once_its_creator_has_written_and_closed_it(tmp_path: Path):
    """Created empty, written a moment later: never read empty in between (that is no config at
    all: the defaults)."""
    config = tmp_path / "ip-masq-agent"
    seen = Seen(file_content(config))
    async with watching(ConfigFileSource(config), seen):
        with config.open("w") as writer:
            await anyio.sleep(0.25)
            writer.write(NO_RESYNC)
        await seen.more_than(0, "the new file")
        await anyio.sleep(SETTLE)
    assert seen.contents == [NO_RESYNC]


async def test_a_writer_that_keeps_the_file_open_is_read_after_the_quiet_period(tmp_path: Path):
    config = tmp_path / "ip-masq-agent"
    config.write_text("old")
    seen = Seen(file_content(config))
    async with watching(ConfigFileSource(config), seen):
        with config.open("w") as writer:
            writer.write("new")
            writer.flush()
            await seen.more_than(0, "the file its writer still holds open")
            assert seen.contents == ["new"]


async def test_a_file_growing_forever_is_read_within_the_bound(tmp_path: Path, monkeypatch):
    """Writes never pause for the write quiet period: the file is read once the bound is reached
    (the bounds made short here, so the test is short)."""
    monkeypatch.setattr(files, "WRITE_QUIET_MS", 400)
    monkeypatch.setattr(files, "MAX_WRITE_MS", 800)
    config = tmp_path / "ip-masq-agent"
    config.write_text("")
    seen = Seen(file_content(config))
    async with watching(ConfigFileSource(config), seen):
        with config.open("a") as writer:
            with anyio.fail_after(WAIT):
                while not seen.contents:
                    writer.write("# more\n")
                    writer.flush()
                    await anyio.sleep(0.05)


@pytest.mark.parametrize("linked", [False, True], ids=["file", "symlink-target"])
async def test_a_file_of_a_config_directory_written_in_pieces_is_read_whole(tmp_path: Path, linked: bool):
    """A config file of the directory, or the file an ``ip-masq*`` symlink there points to."""
    directory = tmp_path / "conf.d"
    directory.mkdir()
    written = directory / ("agent.yaml" if linked else "ip-masq-agent")
    if linked:
        (directory / "ip-masq-agent").symlink_to("agent.yaml")
    config_input = DirectoryInput(directory)
    seen = Seen(lambda: [text.text for text in config_input.read()])
    text = cidr_config(150)
    async with watching(config_input.watcher(), seen):
        with written.open("w") as writer:
            writer.write(text[:len(text) // 2])
            writer.flush()
            await anyio.sleep(0.25)
            writer.write(text[len(text) // 2:])
        await seen.more_than(0, "the new file")
        await anyio.sleep(SETTLE)
    assert seen.contents == [[text]]


def closed_after_writing(config: Path) -> None:
    config.write_text("in place")


def renamed_into_place(config: Path) -> None:
    write_atomically(config, "in place")


def hard_linked_into_place(config: Path) -> None:
    staged = config.with_name("staged")
    staged.write_text("in place")
    config.unlink()
    os.link(staged, config)


def symlinked_into_place(config: Path) -> None:
    target = config.with_name("target")
    target.write_text("in place")
    config.unlink()
    config.symlink_to(target.name)


def configmap_swapped(config: Path) -> None:
    directory = config.parent
    data = directory / "..2026_12_01_0002"
    data.mkdir()
    (data / "ip-masq-agent").write_text("in place")
    (directory / "..data_tmp").symlink_to(data.name)
    os.replace(directory / "..data_tmp", directory / "..data")


def deleted(config: Path) -> None:
    config.unlink()


@pytest.mark.parametrize("put", [closed_after_writing, renamed_into_place, hard_linked_into_place, symlinked_into_place,
                                 configmap_swapped, deleted], ids=lambda put: put.__name__.replace("_", "-"))
async def test_a_file_in_place_is_read_without_waiting_for_the_write_bounds(tmp_path: Path, monkeypatch, put):
    """A close, a rename, a link or a removal means the file is in place: it is read after the
    short quiet, never after the write bounds (made longer than the test waits)."""
    monkeypatch.setattr(files, "WRITE_QUIET_MS", 60_000)
    monkeypatch.setattr(files, "MAX_WRITE_MS", 60_000)
    data = tmp_path / "..2026_12_01_0001"
    data.mkdir()
    (data / "ip-masq-agent").write_text("before")
    (tmp_path / "..data").symlink_to(data.name)
    config = tmp_path / "ip-masq-agent"
    if put is configmap_swapped:
        config.symlink_to("..data/ip-masq-agent")
    else:
        config.write_text("before")
    seen = Seen(file_content(config))
    async with watching(ConfigFileSource(config), seen):
        put(config)
        await seen.more_than(0, "the change")
    assert seen.contents == [None if put is deleted else "in place"]


async def test_a_symlinked_config_written_in_place_is_read_only_once_closed(tmp_path: Path):
    """``--config D/config`` a symlink to ``D/v2.yaml``: a write to v2.yaml in two pieces is read
    once its writer closes it, as for the config file itself."""
    directory = tmp_path / "config"
    directory.mkdir()
    target = directory / "v2.yaml"
    target.write_text("a" * 50)
    config = directory / "ip-masq-agent"
    config.symlink_to("v2.yaml")
    source = ConfigFileSource(config)
    seen = Seen(file_content(config))
    async with watching(source, seen):
        with open(target, "w") as writer:
            writer.write("b" * 50)
            writer.flush()
            await anyio.sleep(0.25)
            writer.write("c" * 50)
        await wait_until(lambda: seen.contents[-1:] == ["b" * 50 + "c" * 50], "the whole file", timeout=WAIT)
    assert seen.contents == ["b" * 50 + "c" * 50]  # never empty (the truncate), never half


async def test_a_directory_above_that_cannot_be_watched_leaves_the_watch_on_inotify(tmp_path: Path, monkeypatch):
    """A parent readable by its owner only (mode 0711, masqd without CAP_DAC_READ_SEARCH) refuses an
    inotify watch with EACCES: the config directory's own watch still stands, and edits are read
    at their close (a fall back to polling would read a file written in pieces half-way)."""
    import errno

    from masqd.sources.inotify import Inotify

    real_add_watch = Inotify.add_watch

    def add_watch(self, path, mask):
        if mask == files._ANCESTOR_SELF_MASK and Path(path) == tmp_path:
            raise PermissionError(errno.EACCES, "inotify_add_watch: Permission denied", str(path))
        return real_add_watch(self, path, mask)

    monkeypatch.setattr(Inotify, "add_watch", add_watch)
    directory = tmp_path / "config"
    directory.mkdir()
    config = directory / "ip-masq-agent"
    config.write_text("old")
    source = ConfigFileSource(config)
    seen = Seen(file_content(config))
    async with watching(source, seen):
        config.write_text("new")
        await wait_until(lambda: seen.contents[-1:] == ["new"], "the edit", timeout=WAIT)
        assert source.watching == "inotify"
