"""masqd plugin: every apply attempt as one JSON line in a file.

Set in masqd's environment:

``MASQD_AUDIT_LOG``            the file, e.g. ``/var/log/masqd/audit.jsonl`` (its directory is
                               created when missing). Unset: the plugin writes nothing, so merely
                               installing it never writes to the disk.
``MASQD_AUDIT_LOG_MAX_BYTES``  rotate when the file would grow past this (default 10485760).
``MASQD_AUDIT_LOG_BACKUPS``    rotated files kept: ``audit.jsonl.1`` (newest) .. ``.N`` (default 5).

The ``audit`` hook only puts the event on a bounded queue and returns: a writer thread appends
the line, flushes and fsyncs it, and rotates. masqd's reconciler never waits for the disk. When
the queue is full (the disk stalls for thousands of applies) an event is dropped and counted;
the next line written carries ``"dropped_before": N``. A write error is reported on stderr once
per distinct error and the writer keeps going with the next event.
"""

from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import orjson

import masqd

__version__ = "0.1.0"

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
QUEUE_SIZE = 10_000


class AuditLog:
    """The plugin object; ``plugin`` below is the one built from the environment."""

    name = "audit-log"

    def __init__(self, path: Path | None, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 queue_size: int = QUEUE_SIZE):
        if max_bytes <= 0 or backups < 0:
            raise ValueError(f"max_bytes must be positive and backups 0 or more, got {max_bytes}, {backups}")
        self.path = None if path is None else Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.dropped = 0
        self._queue: queue.Queue[dict | None] = queue.Queue(queue_size)
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._dropped_lock = threading.Lock()
        self._last_error: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> AuditLog:
        path = environ.get("MASQD_AUDIT_LOG")
        return cls(Path(path) if path else None,
                   int(environ.get("MASQD_AUDIT_LOG_MAX_BYTES") or DEFAULT_MAX_BYTES),
                   int(environ.get("MASQD_AUDIT_LOG_BACKUPS") or DEFAULT_BACKUPS))

    @masqd.hookimpl
    def audit(self, event):
        if self.path is None:
            return
        self._start()
        try:
            self._queue.put_nowait(event.as_dict())
        except queue.Full:
            with self._dropped_lock:
                self.dropped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event is on disk (True) or ``timeout`` passed (False)."""
        done = threading.Event()
        if self._writer is None:
            return True
        try:
            self._queue.put({"__flush__": done}, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    # --- the writer thread -------------------------------------------------------------------------

    def _start(self) -> None:
        if self._writer is None:
            with self._start_lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_forever, name="masqd audit-log", daemon=True)
                    self._writer.start()
                    atexit.register(self.flush, 2.0)

    def _write_forever(self) -> None:
        while True:
            record = self._queue.get()
            if "__flush__" in record:
                record["__flush__"].set()
                continue
            with self._dropped_lock:
                dropped, self.dropped = self.dropped, 0
            if dropped:
                record = {**record, "dropped_before": dropped}
            try:
                self._append(orjson.dumps(record) + b"\n")
            except OSError as exc:
                self._report(exc)

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last_error = None

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _report(self, exc: OSError) -> None:
        text = f"masqd audit-log: cannot write {self.path}: {exc}"
        if text != self._last_error:
            print(text, file=sys.stderr, flush=True)
            self._last_error = text


plugin = AuditLog.from_environment()
