"""The config file: reading it, and watching it for changes with inotify on the event loop.

A Kubernetes ConfigMap mount updates by writing a new timestamped directory and swapping the
``..data`` symlink, so the file's own inode never changes. The watcher therefore watches the
*directory* holding the config path, re-reads the file after every burst of events, and asks for
a reconcile only when the content hash changed (or the file appeared or disappeared).

A directory that is removed, renamed or replaced is reported by its own watch and watched
afresh. While the directory does not exist, and while its path is a symlink (which can be swapped
without touching the directory), its nearest existing ancestor is watched too, for the path
component leading to it: a directory that appears is taken up at once, a swapped symlink
followed. Otherwise the ancestor is not watched, so a busy parent (``/tmp``) wakes nobody.
Nothing here wakes while nothing changes (:mod:`masqd.sources.inotify`: no thread, no timer).
Where inotify cannot be used (``fs.inotify.max_user_instances`` or ``max_user_watches``
exhausted, no inotify at all) the source says so once and polls instead, every
:data:`POLL_DELAY_MS`, comparing ``stat`` results and reading the file only when they change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from masqd.config import MAX_CONFIG_BYTES, too_large_problem
from masqd.errors import ConfigError
from masqd.events import Notify
from masqd.sources.inotify import (ENTRY_CHANGES, IN_ATTRIB, IN_CLOSE_WRITE, IN_DELETE_SELF, IN_MODIFY, IN_MOVE_SELF,
                                   IN_ONLYDIR, IN_Q_OVERFLOW, SELF_GONE, Inotify, InotifyEvent)

#: Milliseconds without a new event after which a burst of events is over and the config is
#: checked, so a writer's truncate and write are one change (watchfiles' ``step``, as masqd used
#: it). Armed only after an event: an idle watch has no timer.
QUIET_MS = 10
#: Milliseconds a burst of events may last before the config is checked anyway.
MAX_BURST_MS = 1600
#: Poll period when inotify cannot be used (e.g. fs.inotify.max_user_instances exhausted).
POLL_DELAY_MS = 300

#: What the directory holding the config is watched for: any change to its entries (a check).
_DIRECTORY_MASK = ENTRY_CHANGES | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
#: What its nearest existing ancestor is watched for: the next path component toward it changing.
_ANCESTOR_MASK = ENTRY_CHANGES | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
_CHECK, _REWATCH = "check", "rewatch"

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


#: Bytes read at once from a config file (a typical one is read in one piece).
READ_PIECE_BYTES = 256 * 1024


def _read_bounded(path: str | os.PathLike[str]) -> tuple[int, bytes]:
    """``(size, bytes)``: the file's bytes when it holds at most MAX_CONFIG_BYTES; for a bigger one
    its size (as ``stat`` says, or more than the limit when it grew or is not a regular file) and
    at most the first MAX_CONFIG_BYTES + 1 bytes, or none when ``stat`` already told."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            return size, b""
        data = read_limited(file, MAX_CONFIG_BYTES + 1)
    return max(size, len(data)), data


def read_limited(file, limit: int) -> bytes:
    """At most ``limit`` bytes of ``file``, read by pieces: ``read(limit)`` would reserve the whole
    limit (16 MiB for a config) however small the file."""
    pieces: list[bytes] = []
    held = 0
    while held < limit and (piece := file.read(min(READ_PIECE_BYTES, limit - held))):
        pieces.append(piece)
        held += len(piece)
    return b"".join(pieces)


def content_digest(path: str | os.PathLike[str]) -> str:
    """A fingerprint of the file: its size and a 64-bit keyed hash of its bytes (Python's own
    SipHash: no hashing library loaded), ``missing``, or the read error's name. A file over the
    size limit (refused when read) is fingerprinted by its size (and the bytes read)."""
    try:
        size, data = _read_bounded(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    digest = f"{size}:{hash(data) & 0xFFFFFFFFFFFFFFFF:016x}"
    return digest if size <= MAX_CONFIG_BYTES else f"too-large:{digest}"


def stat_key(path: str | os.PathLike[str]) -> tuple | str:
    """What polling compares: the file's identity, size and times (symlinks followed), ``missing``,
    or the error's name. Changes whenever the content may have changed (an in-place edit, an
    atomic replace, a swapped ConfigMap symlink)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ConfigFileSource:
    """Asks for a reconcile whenever the config file's content changes.

    ``force_polling``: poll from the start instead of trying inotify (set when the source falls
    back to polling). ``watching`` says how it watches once its watch is in place: ``inotify`` or
    ``polling`` (``None`` before)."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str], *, force_polling: bool | None = None):
        self.path = Path(path)
        self.directory = self.path.parent
        self.force_polling = bool(force_polling)
        self.watching: str | None = None
        #: the paths inotify watches now (the directory, and its ancestor while needed)
        self.watched: tuple[str, ...] = ()

    def digest(self) -> str:
        """What changes whenever the watched config changes (see :func:`content_digest`)."""
        return content_digest(self.path)

    def signature(self) -> object:
        """A cheap stand-in for :meth:`digest` that polling compares (``stat``, no reading)."""
        return stat_key(self.path)

    async def run(self, notify: Notify) -> None:
        self.watching = None
        self._digest = self.digest()
        if not self.force_polling:
            try:
                await self._watch(notify)
            except OSError as exc:  # no inotify instance or watch to be had here: poll
                log.warning("cannot watch config directory with inotify; polling it instead",
                            directory=str(self.directory), error=str(exc), poll_ms=POLL_DELAY_MS)
                self.force_polling = True
        await self._poll(notify)

    async def _watch(self, notify: Notify) -> None:
        directory = Path(os.path.abspath(self.directory))
        try:
            with Inotify() as inotify:
                roles = self._add_watches(inotify, directory)
                self._check(notify)  # after the watches exist: a change from now on is seen here or reported
                self.watching = "inotify"
                while True:
                    if await self._next_change(inotify, roles):
                        for wd in roles:
                            inotify.remove_watch(wd)
                        roles = self._add_watches(inotify, directory)
                    self._check(notify)
        finally:
            self.watched = ()

    def _add_watches(self, inotify: Inotify, directory: Path) -> dict[int, str | None]:
        """Watch ``directory`` (role ``None``: a change of its entries asks for a check) and, while
        it is missing or a symlink, its nearest existing ancestor (role: the name of the next
        component toward it, whose creation, removal or renaming asks for the watches to be set
        up again). The ancestor is watched before the components below it are looked at, so a
        directory created meanwhile is either found here or reported by the ancestor's watch."""
        while True:
            roles: dict[int, str | None] = {}
            child = directory
            while child != child.parent:
                try:
                    roles[inotify.add_watch(child.parent, _ANCESTOR_MASK)] = child.name
                    break
                except (FileNotFoundError, NotADirectoryError):
                    child = child.parent
            if child != directory and os.path.isdir(child):  # created since it was looked at: look again
                for wd in roles:
                    inotify.remove_watch(wd)
                continue
            watched = [f"{child.parent} (for {child.name})"] if roles else []
            try:
                roles[inotify.add_watch(directory, _DIRECTORY_MASK)] = None
            except (FileNotFoundError, NotADirectoryError):
                pass  # not there (yet): its ancestor's watch says when it appears
            else:
                if not os.path.islink(directory):  # a directory of its own: its watch reports its removal
                    for wd in [wd for wd, role in roles.items() if role is not None]:
                        inotify.remove_watch(wd)
                        del roles[wd]
                    watched = []
                watched.append(str(directory))
            self.watched = tuple(watched)
            log.debug("watching the config directory with inotify", directory=str(directory), watches=watched)
            return roles

    async def _next_change(self, inotify: Inotify, roles: dict[int, str | None]) -> bool:
        """Wait for events that matter, then take them until :data:`QUIET_MS` pass without one
        (at most :data:`MAX_BURST_MS`). True when the watches must be set up again."""
        found: set[str] = set()
        while not found:
            found = _classify(await inotify.read(), roles)
        with anyio.move_on_after(MAX_BURST_MS / 1000):
            while True:
                with anyio.move_on_after(QUIET_MS / 1000) as quiet:
                    more: set[str] = set()
                    while not more:
                        more = _classify(await inotify.read(), roles)
                    found |= more
                if quiet.cancelled_caught:
                    break
        return _REWATCH in found

    async def _poll(self, notify: Notify) -> None:
        signature = self.signature()
        self._check(notify)  # what changed while the watch was being tried
        self.watching = "polling"
        while True:
            await anyio.sleep(POLL_DELAY_MS / 1000)
            current = self.signature()
            if current != signature:
                signature = current
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
        return "\0".join(f"{path.name}:{content_digest(path)}" for path in files)

    def signature(self) -> object:
        try:
            files = self._files()
        except Exception as exc:
            return f"error:{type(exc).__name__}"
        return tuple((path.name, stat_key(path)) for path in files)


def _classify(events: list[InotifyEvent], roles: dict[int, str | None]) -> set[str]:
    """What ``events`` ask for: a check (an entry of the directory changed), setting the watches
    up again (the directory or the path to it changed, a watch is gone, events were lost), or
    nothing (another entry of the ancestor, a watch removed earlier)."""
    found = set()
    for event in events:
        if event.mask & IN_Q_OVERFLOW:
            found.add(_REWATCH)
        elif event.wd not in roles:
            continue
        elif event.mask & SELF_GONE and not event.name:
            found.add(_REWATCH)
        elif roles[event.wd] is None:
            found.add(_CHECK)
        elif event.name == roles[event.wd]:
            found.add(_REWATCH)
    return found
