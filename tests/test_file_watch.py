"""The config watches on their own (:mod:`masqd.sources.files`, :mod:`masqd.sources.inotify`):
every way a config file or directory changes on a node is seen at once, by inotify on the event
loop; an unchanged file asks for nothing; a directory that is missing, removed, replaced or
re-linked is followed; polling takes over where inotify cannot be used; and an idle watch
schedules nothing and starts no thread (the idle daemon costs nothing)."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from masqd.inputs import DirectoryInput
from masqd.sources.files import ConfigDirectorySource, ConfigFileSource
from masqd.sources.inotify import IN_CREATE, IN_ISDIR, IN_Q_OVERFLOW, Inotify, InotifyEvent, parse_events
from masqd.testing import wait_until

from support import write_atomically

#: Seconds a test waits for the source to react before failing (a hang guard, not a timing claim).
WAIT = 10


class Notices:
    """What a running source asked for: the reasons passed to ``notify``, in order."""

    def __init__(self, source: ConfigFileSource):
        self.source = source
        self.reasons: list[str] = []

    def __call__(self, reason: str | None = None) -> None:
        self.reasons.append(reason or "")

    async def more_than(self, count: int, what: str) -> None:
        await wait_until(lambda: len(self.reasons) > count, what, timeout=WAIT)

    async def quiet(self) -> None:
        """Let the source see whatever is pending: a burst ends after QUIET_MS without events, and
        polling looks every POLL_DELAY_MS; waiting past both makes "nothing was asked" meaningful."""
        await anyio.sleep(0.5 if self.source.watching == "polling" else 0.2)


@asynccontextmanager
async def watching(source: ConfigFileSource) -> AsyncIterator[Notices]:
    """``source`` running in the background, its watch in place, for the duration of the block;
    a source asked to use inotify must still be using it at the end (no silent fallback)."""
    notices = Notices(source)
    expected = "polling" if source.force_polling else "inotify"
    async with anyio.create_task_group() as tg:
        tg.start_soon(source.run, notices)
        await wait_until(lambda: source.watching, "the watch to be in place", timeout=WAIT)
        yield notices
        assert source.watching == expected
        tg.cancel_scope.cancel()


def file_source(path: Path, polling: bool) -> ConfigFileSource:
    return ConfigFileSource(path, force_polling=polling)


def swap_configmap(directory: Path, text: str, generation: int) -> None:
    """A ConfigMap volume update: a new timestamped directory, then the ``..data`` link swapped."""
    data = directory / f"..2026_12_01_{generation:04d}"
    data.mkdir()
    (data / "config").write_text(text)
    (directory / "..data_tmp").symlink_to(data.name)
    os.replace(directory / "..data_tmp", directory / "..data")


MODES = [pytest.param(False, id="inotify"), pytest.param(True, id="polling")]


# --- a config file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("polling", MODES)
async def test_an_atomic_replace_is_seen_and_a_touch_that_changes_nothing_is_not(tmp_path: Path, polling):
    config = tmp_path / "config"
    config.write_text("a")
    async with watching(file_source(config, polling)) as notices:
        assert notices.source.watching == ("polling" if polling else "inotify")
        write_atomically(config, "b")
        await notices.more_than(0, "the replaced file")
        seen = len(notices.reasons)
        config.touch()
        write_atomically(config, "b")  # the same bytes again: a new inode, nothing to do
        await notices.quiet()
        assert len(notices.reasons) == seen
    assert set(notices.reasons) == {str(config)}


@pytest.mark.parametrize("polling", MODES)
async def test_an_edit_in_place_a_creation_and_a_deletion_are_seen(tmp_path: Path, polling):
    config = tmp_path / "config"
    async with watching(file_source(config, polling)) as notices:
        config.write_text("created")
        await notices.more_than(0, "the created file")
        with config.open("a") as file:
            file.write(" and appended to")
        await wait_until(lambda: notices.source.digest() == notices.source._digest and len(notices.reasons) >= 2,
                         "the edit in place", timeout=WAIT)
        seen = len(notices.reasons)
        config.unlink()
        await notices.more_than(seen, "the deletion")


@pytest.mark.parametrize("polling", MODES)
async def test_a_configmap_symlink_swap_is_seen(tmp_path: Path, polling):
    swap_configmap(tmp_path, "one", 1)
    config = tmp_path / "config"
    config.symlink_to("..data/config")
    async with watching(file_source(config, polling)) as notices:
        swap_configmap(tmp_path, "two", 2)
        await notices.more_than(0, "the swapped ConfigMap")
        seen = len(notices.reasons)
        swap_configmap(tmp_path, "two", 3)  # kubelet re-syncing the same content
        await notices.quiet()
        assert len(notices.reasons) == seen


# --- the directory holding it -------------------------------------------------------------------------


@pytest.mark.parametrize("polling", MODES)
async def test_a_directory_that_appears_later_is_watched_from_then_on(tmp_path: Path, polling):
    directory = tmp_path / "etc" / "config"  # neither level exists yet
    async with watching(file_source(directory / "config", polling)) as notices:
        await notices.quiet()
        directory.mkdir(parents=True)
        await notices.quiet()
        assert notices.reasons == []  # an empty directory: still no config
        (directory / "config").write_text("first")
        await notices.more_than(0, "the file in the new directory")
        write_atomically(directory / "config", "second")
        await notices.more_than(1, "a change inside the directory that appeared")


@pytest.mark.parametrize("polling", MODES)
async def test_a_removed_directory_and_the_one_created_in_its_place_are_followed(tmp_path: Path, polling):
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "config").write_text("old")
    async with watching(file_source(directory / "config", polling)) as notices:
        shutil.rmtree(directory)
        await notices.more_than(0, "the removal")
        directory.mkdir()
        (directory / "config").write_text("new")
        await notices.more_than(1, "the new directory's file")
        write_atomically(directory / "config", "newer")
        await notices.more_than(2, "a change inside the new directory")


@pytest.mark.parametrize("polling", MODES)
async def test_a_directory_replaced_by_a_rename_is_followed(tmp_path: Path, polling):
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "config").write_text("old")
    async with watching(file_source(directory / "config", polling)) as notices:
        staged = tmp_path / "staged"
        staged.mkdir()
        (staged / "config").write_text("new")
        shutil.rmtree(directory)
        os.rename(staged, directory)
        await wait_until(lambda: notices.source.digest() == notices.source._digest and notices.reasons,
                         "the renamed directory", timeout=WAIT)
        seen = len(notices.reasons)
        write_atomically(directory / "config", "newer")
        await notices.more_than(seen, "a change inside the renamed directory")


@pytest.mark.parametrize("polling", MODES)
async def test_a_swapped_directory_symlink_is_followed_and_the_old_target_forgotten(tmp_path: Path, polling):
    first, second = tmp_path / "first", tmp_path / "second"
    for target, text in ((first, "first"), (second, "second")):
        target.mkdir()
        (target / "config").write_text(text)
    link = tmp_path / "current"
    link.symlink_to(first)
    async with watching(file_source(link / "config", polling)) as notices:
        staged = tmp_path / "staged"
        staged.symlink_to(second)
        os.replace(staged, link)
        await notices.more_than(0, "the swapped link")
        seen = len(notices.reasons)
        write_atomically(first / "config", "no longer read")
        await notices.quiet()
        assert len(notices.reasons) == seen
        write_atomically(second / "config", "read now")
        await notices.more_than(seen, "a change in the new target")


@pytest.mark.parametrize("polling", MODES)
async def test_a_config_directory_sees_files_added_changed_and_removed(tmp_path: Path, polling):
    directory = tmp_path / "conf.d"
    directory.mkdir()
    config_input = DirectoryInput(directory)
    source = ConfigDirectorySource(directory, config_input.files, force_polling=polling)
    async with watching(source) as notices:
        (directory / "unrelated").write_text("not a config file")
        await notices.quiet()
        assert notices.reasons == []
        (directory / "ip-masq-agent").write_text("a")
        await notices.more_than(0, "the added file")
        write_atomically(directory / "ip-masq-agent", "b")
        await notices.more_than(1, "the changed file")
        (directory / "ip-masq-agent").unlink()
        await notices.more_than(2, "the removed file")
    assert set(notices.reasons) == {str(directory)}


# --- cost while idle ----------------------------------------------------------------------------------


async def test_a_busy_parent_is_watched_only_while_needed(tmp_path: Path):
    """The parent directory is watched while the config directory is missing (to see it appear)
    and while its path is a symlink (to see the link swapped), not otherwise: events in a busy
    parent (``/tmp``) then never wake the daemon."""
    directory = tmp_path / "config"
    source = ConfigFileSource(directory / "config")
    async with watching(source) as notices:
        assert source.watched == (f"{tmp_path} (for config)",)
        directory.mkdir()
        await wait_until(lambda: source.watched == (str(directory),), "the watch to move to the directory", timeout=WAIT)
        for index in range(20):
            (tmp_path / f"busy-{index}").write_text("another program's file")
        await notices.quiet()
        assert notices.reasons == [] and source.watched == (str(directory),)
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    source = ConfigFileSource(link / "config")
    async with watching(source):
        assert source.watched == (f"{tmp_path} (for link)", str(link))



async def test_an_idle_watch_schedules_no_timer_and_starts_no_thread(tmp_path: Path):
    """The watch waits on its inotify descriptor alone: nothing wakes the daemon until something
    changes (the timers that gather a burst are armed only after an event, and gone after it)."""
    config = tmp_path / "config"
    config.write_text("a")
    loop = asyncio.get_running_loop()

    def pending_timers() -> int:
        return sum(not handle.cancelled() for handle in loop._scheduled)  # asyncio's timer heap

    timers, threads = pending_timers(), threading.active_count()
    async with watching(ConfigFileSource(config)) as notices:
        assert notices.source.watching == "inotify"
        assert (pending_timers(), threading.active_count()) == (timers, threads)
        write_atomically(config, "b")
        await notices.more_than(0, "the change")
        await notices.quiet()
        assert (pending_timers(), threading.active_count()) == (timers, threads)


# --- inotify itself -----------------------------------------------------------------------------------


def test_events_are_parsed_with_their_names_and_padding():
    def event(wd: int, mask: int, cookie: int, name: bytes) -> bytes:
        padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))
        return struct.pack("iIII", wd, mask, cookie, len(padded)) + padded

    data = event(1, IN_CREATE | IN_ISDIR, 0, b"..2026_12_01") + event(-1, IN_Q_OVERFLOW, 0, b"") + event(2, 0x80, 7, b"\xff")
    assert parse_events(data) == [InotifyEvent(1, IN_CREATE | IN_ISDIR, 0, "..2026_12_01"),
                                  InotifyEvent(-1, IN_Q_OVERFLOW, 0, ""),
                                  InotifyEvent(2, 0x80, 7, os.fsdecode(b"\xff"))]


async def test_inotify_reports_a_change_and_names_a_path_it_cannot_watch(tmp_path: Path):
    with Inotify() as inotify:
        wd = inotify.add_watch(tmp_path, IN_CREATE)
        (tmp_path / "new").write_text("")
        with anyio.fail_after(WAIT):
            events = await inotify.read()
        assert InotifyEvent(wd, IN_CREATE, 0, "new") in events
        with pytest.raises(FileNotFoundError) as caught:
            inotify.add_watch(tmp_path / "absent", IN_CREATE)
        assert caught.value.filename == str(tmp_path / "absent")
        inotify.remove_watch(wd)
        inotify.remove_watch(wd)  # already gone: fine
    assert inotify.fd is None
