"""Helpers for tests that run the real ``masqd`` command: its JSON log events, and the daemon
running in a network namespace with its stderr read line by line under a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from masqd.testing import netns

MASQD = Path(sys.executable).with_name("masqd")


def log_events(stderr: str) -> list[dict]:
    """The JSON log events a run printed on stderr."""
    events = []
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def writes_logged(stderr: str) -> list[dict]:
    """The log events of a run that report a write to the kernel."""
    return [event for event in log_events(stderr) if "written" in event]


class DaemonProcess:
    """``masqd run`` (no ``--once``) inside namespace ``ns``, debug JSON logs read from stderr.
    ``command``: what stands for ``masqd`` (e.g. an interpreter running a script that adjusts a
    constant, then calls ``masqd.cli.main``)."""

    def __init__(self, ns: str, config: Path, *flags: str, backend: str = "iptables",
                 env: dict[str, str] | None = None, command: tuple[str, ...] = (str(MASQD),)):
        self.proc = netns.popen(
            ns, *command, "run", "--backend", backend, "--config", str(config), "--log-format", "json", "--v=4", *flags,
            stderr=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env},
        )
        self.lines = netns.LineReader(self.proc.stderr)
        self.events: list[dict] = []

    def next_event(self, predicate, timeout: float = 10.0) -> dict:
        """Read log events until one satisfies ``predicate``; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            line = self.lines.readline(remaining)
            if line is None:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if predicate(event):
                return event
        pytest.fail(f"no matching log event; saw: {[e.get('event') for e in self.events][-10:]}")

    def writes(self) -> list[dict]:
        return [e for e in self.events if "written" in e]

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=10)
        finally:
            self.lines.close()
            self.proc.stderr.close()

    def kill(self) -> None:
        """Teardown: kill the daemon unless it has exited, and stop reading its stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.lines.close()
