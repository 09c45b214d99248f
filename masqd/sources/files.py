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
Each time, the watch is set up again at once, says so (at info level), and the file is read again.
Nothing here wakes while nothing changes (:mod:`masqd.sources.inotify`: no thread, no timer).
Where inotify cannot be used (``fs.inotify.max_user_instances`` or ``max_user_watches``
exhausted, no inotify at all) the source says so once and polls instead, every
:data:`POLL_DELAY_MS`, comparing ``stat`` results and reading the file only when they change.

A file written in place is read when its writer closes it, never half-written. A config entry
written (``IN_MODIFY``) or created as a new file, and not yet closed (``IN_CLOSE_WRITE``), is
*being written*, and while one is, the check waits for its close; a writer that keeps the file
open is read after :data:`WRITE_QUIET_MS` (1 s) without a write, or :data:`MAX_WRITE_MS` (5 s)
after the burst began when it writes on and on. Writers pause far less than a second between two
pieces of one file and nearly all close it, so the wait costs little, where reading early applied
a half-written list (its missing CIDRs masqueraded, in conntrack for the life of each flow
opened meanwhile). Every other change means a file is in place, and is checked
after :data:`QUIET_MS` without another event: a close, a rename onto the path (an atomic replace,
a ConfigMap's ``..data`` swap), a hard link or symlink created there, a removal, an attribute
change.

Only a regular file (after symlinks) is read, opened non-blocking: anything else at the path is
refused by name (:class:`NotRegularFileError`) without being opened, as it could block the event
loop (a FIFO's ``open()`` waits for a writer), and the rules last applied stay. The null device
reads as an empty config (``--config /dev/null``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from masqd.config import MAX_CONFIG_BYTES, too_large_problem
from masqd.errors import ConfigError, Problem
from masqd.events import Notify
from masqd.sources.inotify import (ENTRY_CHANGES, IN_ATTRIB, IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_DELETE_SELF,
                                   IN_MASK_ADD, IN_MODIFY, IN_MOVE_SELF, IN_MOVED_FROM, IN_MOVED_TO, IN_ONLYDIR,
                                   IN_Q_OVERFLOW, SELF_GONE, Inotify, InotifyEvent)

#: Milliseconds without a new event after which a burst of events is over and the config is
#: checked, when no config file is being written (watchfiles' ``step``, as masqd used it): the
#: events of one replace come microseconds apart. Armed only after an event: an idle watch has no timer.
QUIET_MS = 10
#: Milliseconds a burst of events may last before the config is checked anyway.
MAX_BURST_MS = 1600
#: Milliseconds without a write after which a file its writer keeps open is read anyway. Writers
#: pause far less between two pieces of one file (the issue's 100 ms), and one that never closes
#: (rare: editors, ``cp``, kubelet all close) costs a second of delay, where reading too early
#: applied a half-written list for as long as the pause. (A file built by several writers that
#: each close it, ``echo >>`` after ``echo >>``, is read after each: write it elsewhere and rename
#: it into place.)
WRITE_QUIET_MS = 1000
#: Milliseconds after its first event that a burst with a file still being written is checked
#: anyway, even though writes go on: a file growing forever is still read (every few seconds).
MAX_WRITE_MS = 5000
#: Poll period when inotify cannot be used (e.g. fs.inotify.max_user_instances exhausted).
POLL_DELAY_MS = 300

#: What the directory holding the config is watched for: any change to its entries (a check).
_DIRECTORY_MASK = ENTRY_CHANGES | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
#: What its nearest existing ancestor is watched for: the next path component toward it changing.
_ANCESTOR_MASK = ENTRY_CHANGES | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
#: What every directory above it is watched for: its own removal or renaming, nothing else.
_ANCESTOR_SELF_MASK = IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_MASK_ADD
#: The role of such a watch: no entry has this name, and its events name none.
_SELF_ONLY = "/"
#: Why the watches are set up again (logged, at info level, each time they are).
_GONE = "config directory removed, renamed or replaced"
_PATH = "path to the config directory changed"
_LOST = "inotify events lost (queue overflow)"
#: ``st_rdev`` of the null device (Linux's documented 1:3), read as an empty config.
_NULL_DEVICE = os.makedev(1, 3)

log = structlog.get_logger("masqd.sources.files")


def read_config_text(path: str | os.PathLike[str]) -> str | None:
    """The config file's text, or ``None`` if there is no file. Other read errors propagate.

    Undecodable bytes raise ``UnicodeDecodeError``; a UTF-8 byte-order mark is dropped. A file
    of more than :data:`~masqd.config.MAX_CONFIG_BYTES` raises :class:`ConfigError` (named by
    ``str(path)``) without being read into memory, and so does anything but a regular file (see
    :func:`_read_bounded`).
    """
    try:
        size, data = _read_bounded(path)
    except FileNotFoundError:
        return None
    except NotRegularFileError as exc:
        piped = "; validate, render and explain read a config from a pipe with --config -" if exc.kind == "FIFO" else ""
        raise ConfigError(str(path), [Problem("<file>", None, f"{exc.strerror}: a config file must be a regular "
                                                              f"file, or a symlink to one{piped}")]) from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), [too_large_problem("<file>", f"{size} bytes")])
    return data.decode("utf-8-sig")


#: Bytes read at once from a config file (a typical one is read in one piece).
READ_PIECE_BYTES = 256 * 1024


class NotRegularFileError(OSError):
    """The config path names (after symlinks) something that is not a regular file: a FIFO, a
    socket, a device, a directory. ``kind`` names it ("FIFO", "socket", ...)."""

    def __init__(self, path: str | os.PathLike[str], kind: str):
        super().__init__(errno.EINVAL, f"not a regular file (a {kind})", os.fspath(path))
        self.kind = kind


def _require_regular(path: str | os.PathLike[str], st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        mode = st.st_mode
        kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else
                "directory" if stat.S_ISDIR(mode) else "character device" if stat.S_ISCHR(mode) else
                "block device" if stat.S_ISBLK(mode) else "special file")
        raise NotRegularFileError(path, kind)


def _read_bounded(path: str | os.PathLike[str]) -> tuple[int, bytes]:
    """``(size, bytes)``: the file's bytes when it holds at most MAX_CONFIG_BYTES; for a bigger one
    its size (as ``stat`` says, or more than the limit when it grew) and at most the first
    MAX_CONFIG_BYTES + 1 bytes, or none when ``stat`` already told.

    Never blocks on what the path names: anything but a regular file raises
    :class:`NotRegularFileError` without being opened (opening a FIFO waits for a writer; opening
    a device may act on it), and the file is opened non-blocking and checked again, for one
    swapped in between. The null device is an empty file."""
    st = os.stat(path)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == _NULL_DEVICE:
        return 0, b""
    _require_regular(path, st)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(fd)
        _require_regular(path, st)
        if st.st_size > MAX_CONFIG_BYTES:
            return st.st_size, b""
        data = read_limited(file, MAX_CONFIG_BYTES + 1)
    return max(st.st_size, len(data)), data


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
    SipHash: no hashing library loaded), ``missing``, ``not-regular:KIND`` (a FIFO...: never
    opened), or the read error's name. A file over the size limit (refused when read) is
    fingerprinted by its size (and the bytes read)."""
    try:
        size, data = _read_bounded(path)
    except FileNotFoundError:
        return "missing"
    except NotRegularFileError as exc:
        return f"not-regular:{exc.kind}"
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
                    if (why := await self._next_change(inotify, roles, directory)) is not None:
                        for wd in roles:
                            inotify.remove_watch(wd)
                        roles = self._add_watches(inotify, directory)
                        log.info(f"{why}; watching the config directory afresh and reading the config again",
                                 directory=str(directory), watches=list(self.watched))
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
            self._watch_ancestors(inotify, directory, roles)
            self.watched = tuple(watched)
            log.debug("watching the config directory with inotify", directory=str(directory), watches=watched)
            return roles

    @staticmethod
    def _watch_ancestors(inotify: Inotify, directory: Path, roles: dict[int, str | None]) -> None:
        """Watch every directory above ``directory`` on its path as given for its own removal or
        renaming only (events about their entries are not asked for, so a busy ``/tmp`` wakes
        nobody): a parent moved away or replaced takes the config directory with it, and the
        watches are set up again. Added to a watch already there (``IN_MASK_ADD``), keeping its
        role. (A parent that is a symlink retargeted elsewhere is not seen: only the resync reads
        through it then.)"""
        for ancestor in directory.parents:
            if ancestor == ancestor.parent:
                break  # the root cannot be removed or renamed
            try:
                wd = inotify.add_watch(ancestor, _ANCESTOR_SELF_MASK)
            except OSError as exc:  # not there (its nearest existing ancestor's watch says when it
                # appears), not readable (mode 0711 without CAP_DAC_READ_SEARCH), no watch left:
                # the config directory's own watch still stands
                log.debug("not watching a directory above the config directory", directory=str(ancestor),
                          error=str(exc))
                continue
            roles.setdefault(wd, _SELF_ONLY)

    async def _next_change(self, inotify: Inotify, roles: dict[int, str | None], directory: Path) -> str | None:
        """Wait for events that matter, then take them until the burst is over: :data:`QUIET_MS`
        without one (at most :data:`MAX_BURST_MS`), or, while a config file is being written and
        the watches stand, :data:`WRITE_QUIET_MS` without one (at most :data:`MAX_WRITE_MS`).
        Returns why the watches must be set up again, or ``None``."""
        burst = _Burst(directory, self._holds_config)
        while not burst.take(await inotify.read(), roles):
            pass
        started = anyio.current_time()
        while True:
            writing = bool(burst.writing) and burst.rewatch is None
            quiet_ms, limit_ms = (WRITE_QUIET_MS, MAX_WRITE_MS) if writing else (QUIET_MS, MAX_BURST_MS)
            wait = min(quiet_ms / 1000, started + limit_ms / 1000 - anyio.current_time())
            if wait <= 0:
                return burst.rewatch
            with anyio.move_on_after(wait) as quiet:
                while not burst.take(await inotify.read(), roles):
                    pass
            if quiet.cancelled_caught:
                return burst.rewatch

    def _holds_config(self, name: str) -> bool:
        """Whether the directory entry ``name`` is the config file read here (its name, or the file
        it is a symlink to in the same directory): a write to it not yet closed holds the check back."""
        if name == self.path.name:
            return True
        target = os.path.realpath(self.path)
        return os.path.basename(target) == name and os.path.dirname(target) == os.path.realpath(self.directory)

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

    def __init__(self, directory: str | os.PathLike[str], files: Callable[[], list[Path]], *, prefix: str = "",
                 **kwargs):
        super().__init__(directory, **kwargs)
        self.directory = self.path  # the directory itself is watched, not its parent
        self._files = files
        self.prefix = prefix  # the names config files have (``files()`` reads no others)

    def digest(self) -> str:
        try:
            files = self._files()
        except Exception as exc:  # unreadable directory: the reconciler reports why
            return f"error:{type(exc).__name__}"
        return "\0".join(f"{path.name}:{content_digest(path)}" for path in files)

    def _holds_config(self, name: str) -> bool:
        """A config file (a file written under another name and renamed into place is read on its
        rename), or the target in this directory of a config file that is a symlink."""
        if name.startswith(self.prefix):
            return True
        try:
            with os.scandir(self.path) as entries:
                links = [entry.path for entry in entries if entry.name.startswith(self.prefix) and entry.is_symlink()]
        except OSError:
            return True  # cannot tell: hold the check back, as for a config file
        here = os.path.realpath(self.path)
        return any(os.path.basename(target) == name and os.path.dirname(target) == here
                   for target in map(os.path.realpath, links))

    def signature(self) -> object:
        try:
            files = self._files()
        except Exception as exc:
            return f"error:{type(exc).__name__}"
        return tuple((path.name, stat_key(path)) for path in files)


class _Burst:
    """What a burst of events asks for: ``rewatch``, why the watches must be set up again (the
    directory or the path to it changed, a watch is gone, events were lost) or ``None``; and
    ``writing``, the config entries of the directory written and not yet closed."""

    def __init__(self, directory: Path, holds_config: Callable[[str], bool]):
        self.directory = directory
        self.holds_config = holds_config
        self.rewatch: str | None = None
        self.writing: set[str] = set()

    def take(self, events: list[InotifyEvent], roles: dict[int, str | None]) -> bool:
        """Take ``events``; True when one matters: a change of an entry of the directory (a check),
        or a reason to set the watches up again. Others (another entry of the ancestor, a watch
        removed earlier) do not."""
        mattered = False
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                self.rewatch = self.rewatch or _LOST
            elif event.wd not in roles:
                continue
            elif event.mask & SELF_GONE and not event.name:
                self.rewatch = _GONE
            elif roles[event.wd] is None:
                self._entry_changed(event)
            elif event.name == roles[event.wd]:
                self.rewatch = self.rewatch or _PATH
            else:
                continue
            mattered = True
        return mattered

    def _entry_changed(self, event: InotifyEvent) -> None:
        name = event.name
        if not self.holds_config(name):
            return
        if event.mask & (IN_CLOSE_WRITE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO):
            self.writing.discard(name)  # closed, or another file (or none) in its place now
        elif event.mask & IN_MODIFY or event.mask & IN_CREATE and self._created_to_be_written(name):
            self.writing.add(name)

    def _created_to_be_written(self, name: str) -> bool:
        """A new regular file (its creator writes it, then closes it); not a symlink, a directory,
        a FIFO, nor a hard link to an existing file (those are in place as they appear)."""
        try:
            st = os.lstat(self.directory / name)
        except OSError:
            return False  # gone already: its removal is in this burst too
        return stat.S_ISREG(st.st_mode) and st.st_nlink == 1
