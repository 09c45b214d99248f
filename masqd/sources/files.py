"""The config file: reading it, and watching it for changes with watchfiles.

A Kubernetes ConfigMap mount updates by writing a new timestamped directory and swapping the
``..data`` symlink, so the file's own inode never changes. The watcher therefore watches the
*directory* holding the config path, re-reads the file on every batch of events, and emits an
event only when the content hash changed (or the file appeared or disappeared).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
import watchfiles

from masqd.events import Emit, Event

#: Milliseconds watchfiles waits for more changes before yielding a batch (its default is 50).
#: A change is seen 10-20 ms after it happens; idle, the watcher costs about 0.4% of one core.
WATCH_STEP_MS = 10
#: Seconds between checks while the config directory does not exist.
MISSING_DIR_POLL_SECONDS = 1.0


def read_config_text(path: str | os.PathLike[str]) -> str | None:
    """The config file's text, or ``None`` if there is no file. Other read errors propagate.

    Undecodable bytes raise ``UnicodeDecodeError``; a UTF-8 byte-order mark is dropped.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return data.decode("utf-8-sig")


def content_digest(path: str | os.PathLike[str]) -> str:
    """A fingerprint of the file: sha256 of its bytes, ``missing``, or the read error's name."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"error:{type(exc).__name__}"


class ConfigFileSource:
    """Emits a ``file`` event whenever the config file's content changes."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str], *, force_polling: bool | None = None):
        self.path = Path(path)
        self.force_polling = force_polling

    async def run(self, emit: Emit) -> None:
        # watchfiles runs its watcher in a thread that only returns on a change, a timeout or its
        # stop event; set that event as soon as this task is cancelled so shutdown is immediate.
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_when_cancelled, stop)
            await self._watch(emit, stop)

    async def _watch(self, emit: Emit, stop: anyio.Event) -> None:
        last = content_digest(self.path)
        directory = self.path.parent
        while True:
            if not directory.is_dir():
                await anyio.sleep(MISSING_DIR_POLL_SECONDS)
            else:
                async for _changes in watchfiles.awatch(
                    directory,
                    watch_filter=None,
                    recursive=False,
                    step=WATCH_STEP_MS,
                    stop_event=stop,
                    force_polling=self.force_polling,
                    ignore_permission_denied=True,
                ):
                    last = self._check(last, emit)
                    if not directory.is_dir():
                        break
            last = self._check(last, emit)
            await anyio.sleep(0)  # a checkpoint: after a stop, cancellation is delivered here

    def _check(self, last: str, emit: Emit) -> str:
        digest = content_digest(self.path)
        if digest != last:
            emit(Event(self.name, str(self.path)))
        return digest


async def _set_when_cancelled(event: anyio.Event) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        event.set()
