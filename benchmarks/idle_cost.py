#!/usr/bin/env python3
"""Idle cost: CPU, memory and wake-ups of the running daemon with nothing to do, per backend.

For each backend, in a fresh network namespace of its own (needs root; always deleted, also on
SIGTERM or SIGINT), the production command with its defaults runs:

    masqd run --backend X --config <absent file> --log-format json

(no config file: the default CIDRs and resyncInterval 60s; the HTTP endpoint on :9142 inside the
namespace; the iptables variant picked by ``auto``). The backends' daemons run side by side, one
per namespace: an idle daemon barely touches the CPU, so they do not disturb each other, and the
window is shared. After the first apply and ``--settle`` seconds (start-up work done), the
window of ``--seconds`` is measured from /proc:

  masqd CPU     utime + stime of the daemon (all its threads), as a share of one core;
  helpers CPU   what its child processes used: the ones it ran and reaped (cutime + cstime: the
                iptables-save of a resync or a drift check) plus the ones still running (the
                nftables backend's ``nft monitor``);
  RSS           VmRSS of the daemon at the start and the end of the window, and VmHWM (its peak
                since start-up, i.e. including the first apply); helpers' VmRSS at the end;
  wake-ups/s    voluntary + involuntary context switches of all the daemon's threads: how often
                it leaves the CPU, i.e. how often something wakes it;
  log lines     what it printed during the window (an idle daemon should print nothing).

``ip netns exec`` execs masqd in place, so the Popen pid is the daemon itself (checked).
CPU resolution is one clock tick (10 ms at USER_HZ 100) over the whole window.

    sudo .venv/bin/python benchmarks/idle_cost.py [--seconds 60] [--settle 5] [--backends nftables,iptables]

Output: one line per backend with the figures above.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench_common import (check_execed_in_place, ignore_signals, namespaces_usable, stamped_lines, stop_process,
                          wait_for_line)

from masqd.testing import netns
from masqd.testing.processes import children, cpu_ticks, rss_kib

BACKENDS = ("nftables", "iptables")
MASQD = Path(sys.executable).with_name("masqd")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of ``pid`` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except OSError:
            continue  # a thread that ended
    return total


def sample(pid: int) -> dict:
    """CPU ticks, context switches and resident sizes of the daemon and its children, now."""
    own, reaped = cpu_ticks(pid)
    live = {}
    for child in children(pid):
        try:
            live[child] = (cpu_ticks(child)[0], rss_kib(child) / 1024, Path(f"/proc/{child}/comm").read_text().strip())
        except (OSError, LookupError):
            continue  # exited meanwhile
    return {"own": own, "reaped": reaped, "live": live, "switches": context_switches(pid), "rss": rss_kib(pid) / 1024,
            "hwm": rss_kib(pid, "VmHWM") / 1024, "when": time.monotonic()}


class Daemon:
    def __init__(self, backend: str, ns: str, config: Path):
        self.backend = backend
        self.proc = netns.popen(ns, str(MASQD), "run", "--backend", backend, "--config", str(config), "--log-format",
                                "json", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = stamped_lines(self.proc.stderr)

    def started(self) -> None:
        wait_for_line(self.lines, '"rules applied"', timeout=60)
        check_execed_in_place(self.proc.pid)

    def drain(self) -> int:
        """Log lines printed since the last call."""
        count = 0
        while not self.lines.empty():
            self.lines.get_nowait()
            count += 1
        return count

    def stop(self) -> None:
        stop_process(self.proc)


def report(backend: str, before: dict, after: dict, log_lines: int) -> str:
    wall = after["when"] - before["when"]
    own = (after["own"] - before["own"]) / CLK_TCK
    # children still running at the end, counted from the start (or from their birth: 0)
    live = sum(ticks - before["live"].get(pid, (0,))[0] for pid, (ticks, _, _) in after["live"].items()) / CLK_TCK
    helpers = (after["reaped"] - before["reaped"]) / CLK_TCK + live
    helper_rss = ", ".join(f"{comm} {rss:.1f} MiB" for _, rss, comm in after["live"].values()) or "none running"
    wakeups = (after["switches"] - before["switches"]) / wall
    return (f"{backend:9s} {own / wall * 100:9.3f}% {helpers / wall * 100:11.3f}% {(own + helpers) / wall * 100:8.3f}% "
            f"{before['rss']:9.1f} {after['rss']:9.1f} {after['hwm']:9.1f} {wakeups:10.1f} {log_lines:9d}   "
            f"helpers' RSS: {helper_rss}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle window (default 60)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds between the first apply and the window (default 5)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if not namespaces_usable():
        return 2
    daemons: list[Daemon] = []
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    namespaces = ExitStack()  # each daemon runs in a namespace of its own, deleted after it stopped
    try:
        for backend in backends:
            ns = namespaces.enter_context(netns.namespace("bench"))
            daemons.append(Daemon(backend, ns, workdir / "absent-config"))
        for daemon in daemons:
            daemon.started()
        time.sleep(args.settle)
        for daemon in daemons:
            daemon.drain()
        before = {d.backend: sample(d.proc.pid) for d in daemons}
        time.sleep(args.seconds)
        after = {d.backend: sample(d.proc.pid) for d in daemons}
        logged = {d.backend: d.drain() for d in daemons}
        for daemon in daemons:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"the {daemon.backend} daemon exited ({daemon.proc.returncode}) during the window")
    finally:
        ignore_signals()
        for daemon in daemons:
            daemon.stop()
        namespaces.close()
        os.rmdir(workdir)

    print(f"idle daemon, default config (no config file: resyncInterval 60s), {args.seconds:g} s window after "
          f"{args.settle:g} s settling; {os.cpu_count()} CPUs; CPU as a share of one core (resolution "
          f"{100 / CLK_TCK / args.seconds:.3f}%); RSS in MiB")
    print(f"{'backend':9s} {'masqd CPU':>10s} {'helpers CPU':>12s} {'total':>9s} {'RSS start':>9s} {'RSS end':>9s} "
          f"{'peak RSS':>9s} {'wakeups/s':>10s} {'log lines':>9s}")
    for backend in backends:
        print(report(backend, before[backend], after[backend], logged[backend]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
