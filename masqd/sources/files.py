"""The config file: reading it, and watching it for changes with watchfiles.

A Kubernetes ConfigMap mount updates by writing a new timestamped directory and swapping the
``..data`` symlink, so the file's own inode never changes. The watcher therefore watches the
*directory* holding the config path, re-reads the file on every batch of events, and asks for a
reconcile only when the content hash changed (or the file appeared or disappeared).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import structlog
import watchfiles

from masqd.config import MAX_CONFIG_BYTES, too_large_problem
from masqd.errors import ConfigError
from masqd.events import Notify

#: Milliseconds watchfiles waits for more changes before yielding a batch (its default is 50): a
#: shorter step sees a change sooner and wakes the idle daemon more often (reload latency and idle
#: cost: benchmarks/RESULTS.md, from reload_latency.py and idle_cost.py).
WATCH_STEP_MS = 10
#: Seconds between checks while the config directory does not exist.
MISSING_DIR_POLL_SECONDS = 1.0
#: Seconds after an inotify watch starts before the file is checked once more (see _watch).
SETTLE_SECONDS = 0.1
#: Poll period when inotify cannot be used (e.g. fs.inotify.max_user_instances exhausted).
POLL_DELAY_MS = 300

log = structlog.get_logger("masqd.sources.files")


def read_config_text(path: str | os.PathLike[str]) -> str | None:
    """The config file's text, or ``None`` if there is no file. Other read errors propagate.

    Undecodable bytes raise ``UnicodeDecodeError``; a UTF-8 byte-order mark is dropped. A file
    of more than :data:`~masqd.config.MAX_CONFIG_BYTES` raises :class:`ConfigError` (named by
    ``str(path)``) without being read into memory.
    """
    try:
        size, data = _read_bounded(path)
    except FileNotFoundError:
        return None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), [too_large_problem("<file>", f"{size} bytes")])
    return data.decode("utf-8-sig")


def _read_bounded(path: str | os.PathLike[str]) -> tuple[int, bytes]:
    """``(size, bytes)``: the file's bytes when it holds at most MAX_CONFIG_BYTES; for a bigger one
    its size (as ``stat`` says, or more than the limit when it grew or is not a regular file) and
    at most the first MAX_CONFIG_BYTES + 1 bytes, or none when ``stat`` already told."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            return size, b""
        data = file.read(MAX_CONFIG_BYTES + 1)
    return max(size, len(data)), data


def content_digest(path: str | os.PathLike[str]) -> str:
    """A fingerprint of the file: sha256 of its bytes, ``missing``, or the read error's name.
    A file over the size limit (refused when read) is fingerprinted by its size (and the bytes read)."""
    try:
        size, data = _read_bounded(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    digest = hashlib.sha256(data).hexdigest()
    return digest if size <= MAX_CONFIG_BYTES else f"too-large:{size}:{digest}"


class ConfigFileSource:
    """Asks for a reconcile whenever the config file's content changes."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str], *, force_polling: bool | None = None, watch=watchfiles.awatch):
        self.path = Path(path)
        self.directory = self.path.parent
        self.force_polling = force_polling
        self._watch_changes = watch  # watchfiles.awatch, or a stand-in with its signature in tests

    def digest(self) -> str:
        """What changes whenever the watched config changes (see :func:`content_digest`)."""
        return content_digest(self.path)

    async def run(self, notify: Notify) -> None:
        # watchfiles runs its watcher in a thread that only returns on a change, a timeout or its
        # stop event; set that event as soon as this task is cancelled so shutdown is immediate.
        stop = anyio.Event()
        self._digest = self.digest()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_when_cancelled, stop)
            await self._watch(notify, stop, tg)

    async def _watch(self, notify: Notify, stop: anyio.Event, tg: anyio.abc.TaskGroup) -> None:
        directory = self.directory
        while True:
            if not directory.is_dir():
                await anyio.sleep(MISSING_DIR_POLL_SECONDS)
            else:
                # A change made after the last check but before the new watcher took its first
                # look would go unseen until the next resync: check once more when it has settled.
                tg.start_soon(self._settle_check, notify)
                try:
                    async for _changes in self._watch_changes(
                        directory,
                        watch_filter=None,
                        recursive=False,
                        step=WATCH_STEP_MS,
                        stop_event=stop,
                        force_polling=self.force_polling,
                        poll_delay_ms=POLL_DELAY_MS,
                        ignore_permission_denied=True,
                    ):
                        self._check(notify)
                        if not directory.is_dir():
                            break
                except (OSError, RuntimeError) as exc:  # watchfiles' errors derive from RuntimeError
                    if self.force_polling:
                        raise
                    log.warning("cannot watch config directory with inotify; polling it instead",
                                directory=str(directory), error=str(exc), poll_ms=POLL_DELAY_MS)
                    self.force_polling = True
            self._check(notify)
            await anyio.sleep(0)  # a checkpoint: after a stop, cancellation is delivered here

    async def _settle_check(self, notify: Notify) -> None:
        await anyio.sleep(2 * POLL_DELAY_MS / 1000 if self.force_polling else SETTLE_SECONDS)
        self._check(notify)

    def _check(self, notify: Notify) -> None:
        digest = self.digest()
        if digest != self._digest:
            self._digest = digest
            notify(str(self.path))


class ConfigDirectorySource(ConfigFileSource):
    """Asks for a reconcile whenever the set of config files in a directory (``files()``) or the
    content of any of them changes. The directory itself is watched, as for a single file."""

    name = "config-dir"

    def __init__(self, directory: str | os.PathLike[str], files: Callable[[], list[Path]], **kwargs):
        super().__init__(directory, **kwargs)
        self.directory = self.path  # the directory itself is watched, not its parent
        self._files = files

    def digest(self) -> str:
        try:
            files = self._files()
        except Exception as exc:  # unreadable directory: the reconciler reports why
            return f"error:{type(exc).__name__}"
        return hashlib.sha256("\0".join(f"{path.name}:{content_digest(path)}" for path in files).encode()).hexdigest()


async def _set_when_cancelled(event: anyio.Event) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        event.set()
