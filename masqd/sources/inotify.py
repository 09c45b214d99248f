"""inotify on the event loop: a non-blocking inotify descriptor awaited with anyio.

The kernel queues an event on the descriptor for every change under a watched directory; the
event loop is woken only then (``anyio.wait_readable``), so a watch costs nothing while nothing
changes: no thread, no timer (see docs/how-it-runs.md for the figures that made masqd
leave watchfiles, whose watcher thread wakes every ``step`` whether or not anything happened).

libc's ``inotify_init1`` / ``inotify_add_watch`` / ``inotify_rm_watch`` are called through ctypes;
the events are read with ``os.read`` and parsed by :func:`parse_events` (pure). Failures are
``OSError`` with the errno the kernel gave: ``EMFILE`` from :class:`Inotify` when
``fs.inotify.max_user_instances`` is exhausted, ``ENOSPC`` from :meth:`Inotify.add_watch` when
``fs.inotify.max_user_watches`` is, ``ENOSYS`` where libc has no inotify.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import NamedTuple

import anyio

# Event bits (<sys/inotify.h>).
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
# Flags for add_watch.
IN_ONLYDIR = 0x1000000
IN_MASK_ADD = 0x20000000
#: Set on an event about a directory entry that is itself a directory.
IN_ISDIR = 0x40000000

#: An entry of a watched directory was created, removed or renamed.
ENTRY_CHANGES = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
#: The watched directory itself went away: its watch is gone (``IN_IGNORED`` follows, or is this).
SELF_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED

_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
#: Bytes read at once: room for hundreds of events (one is at most 16 + NAME_MAX + 1 bytes).
READ_BYTES = 64 * 1024


class InotifyEvent(NamedTuple):
    """One event: the watch it is for (``wd``, -1 for ``IN_Q_OVERFLOW``), its bits, the cookie
    pairing a rename's two halves, and the entry's name ("" for the watched directory itself)."""

    wd: int
    mask: int
    cookie: int
    name: str


def parse_events(data: bytes) -> list[InotifyEvent]:
    """The events in what one ``read`` of an inotify descriptor returned (whole events only:
    the kernel never splits one across reads)."""
    events = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        name = data[offset:offset + length].split(b"\0", 1)[0]
        offset += length
        events.append(InotifyEvent(wd, mask, cookie, os.fsdecode(name)))
    return events


class Inotify:
    """One inotify instance (a non-blocking, close-on-exec descriptor). Use it as a context
    manager, or :meth:`close` it; :meth:`read` from one task at a time."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _error("inotify_init1")
        self.fd: int | None = fd

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch ``path`` (symlinks followed) for ``mask``; returns the watch descriptor. The same
        inode watched again gives the same descriptor (its mask replaced, or ORed with
        ``IN_MASK_ADD``). Raises ``FileNotFoundError`` / ``NotADirectoryError`` (``IN_ONLYDIR``)
        for a path that is not there, other ``OSError`` when the watch cannot be had."""
        wd = self._libc.inotify_add_watch(self._fileno(), os.fsencode(path), mask)
        if wd < 0:
            raise _error("inotify_add_watch", path)
        return wd

    def remove_watch(self, wd: int) -> None:
        """Stop watching ``wd``; one the kernel already dropped (its directory is gone) is fine."""
        if self._libc.inotify_rm_watch(self._fileno(), wd) < 0:
            exc = _error("inotify_rm_watch")
            if exc.errno != errno.EINVAL:
                raise exc

    async def read(self) -> list[InotifyEvent]:
        """The events queued now, waiting (on the event loop, no thread) until there is one."""
        while True:
            await anyio.wait_readable(self._fileno())
            try:
                data = os.read(self._fileno(), READ_BYTES)
            except BlockingIOError:
                continue
            return parse_events(data)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fileno(self) -> int:
        if self.fd is None:
            raise ValueError("the inotify descriptor is closed")
        return self.fd


_LIBC = None


def _libc():
    """libc's inotify functions (ctypes is imported only by a process that watches files)."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter is linked with
        try:
            functions = [(libc.inotify_init1, [ctypes.c_int]),
                         (libc.inotify_add_watch, [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]),
                         (libc.inotify_rm_watch, [ctypes.c_int, ctypes.c_int])]
        except AttributeError:
            raise OSError(errno.ENOSYS, "the C library has no inotify functions") from None
        for function, argtypes in functions:
            function.argtypes = argtypes
            function.restype = ctypes.c_int
        _LIBC = libc
    return _LIBC


def _error(call: str, path: str | os.PathLike[str] | None = None) -> OSError:
    import ctypes

    code = ctypes.get_errno()
    message = f"{call}: {os.strerror(code)}"
    if code == errno.EMFILE and call == "inotify_init1":
        message += " (fs.inotify.max_user_instances reached?)"
    elif code == errno.ENOSPC and call == "inotify_add_watch":
        message += " (fs.inotify.max_user_watches reached?)"
    return OSError(code, message) if path is None else OSError(code, message, os.fspath(path))
