"""Helpers shared by the benchmark scripts (imported as ``bench_common`` when a script runs)."""

from __future__ import annotations

import signal
from pathlib import Path


def _exit_on_signal(signum, _frame):
    ignore_signals()
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGTERM/SIGINT raise SystemExit, so ``finally`` blocks delete the namespaces created."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)


def ignore_signals() -> None:
    """While cleaning up: a second signal must not cut the cleanup short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cidr_blocks(count: int, offset: int = 0) -> list[str]:
    """``count`` /28 blocks, 32 addresses apart, from ``offset`` addresses into 10.0.0.0/8:
    no two adjacent, so merging them changes nothing (config text only: no traffic is sent)."""
    out = []
    for i in range(count):
        a = (10 << 24) + offset + 32 * i
        out.append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/28")
    return out


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of ``pid``, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
