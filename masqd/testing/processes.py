"""What ``/proc`` says about a process, for tests and benchmarks: its state, whether it is dead or
reaped, its children and command line, its CPU time and resident memory.

Linux only; every function reads ``/proc`` once and never waits. A process that exits meanwhile
is reported as gone (``None``, ``True``, or left out), never as an error, except by
:func:`cpu_ticks` and :func:`rss_kib`, which are asked about a process that must be there.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``D``, ``T``, ``Z``...); ``None`` when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def dead(pid: int) -> bool:
    """The process no longer runs: gone, or a zombie that its parent (not necessarily us) will reap."""
    return process_state(pid) in (None, "Z")


def reaped(pid: int) -> bool:
    """The process is gone: not running, and not a zombie waiting for its parent."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def children(pid: int) -> list[int]:
    """The pids of the children of ``pid`` (of every thread of it), zombies included; empty when
    ``pid`` is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            found += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:  # the thread is gone
            continue
    return found


def cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid``; for a process exiting (its memory already released) its name in
    brackets, ``["[nft]"]``; ``None`` when it is gone."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        return argv or [f"[{Path(f'/proc/{pid}/comm').read_text().strip()}]"]
    except OSError:
        return None


def cpu_ticks(pid: int) -> tuple[int, int]:
    """``(utime + stime, cutime + cstime)`` of ``pid`` in clock ticks (``os.sysconf("SC_CLK_TCK")``
    per second): its own CPU time, all threads, and that of its children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` from ``/proc/PID/status``, in KiB: ``VmRSS`` (resident now) or
    ``VmHWM`` (the peak resident size since it started). Raises ``LookupError`` when it has none
    (a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"no {field} for pid {pid}")


__all__ = ("children", "cmdline", "cpu_ticks", "dead", "process_state", "reaped", "rss_kib")
