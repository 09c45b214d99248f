#!/usr/bin/env python3
"""Idle cost: CPU, memory and wake-ups of the running daemon with nothing to do, per backend.

For each backend, in a fresh network namespace of its own (needs root; always deleted, also on
SIGTERM or SIGINT), the production command with its defaults runs:

    masqd run --backend X --config <absent file> --log-format json

(no config file: the default CIDRs and resyncInterval 60s; the HTTP endpoint on :9142 inside the
namespace; the iptables variant picked by ``auto``), once with the plugins installed in this
environment and once with the built-in plugins alone (``MASQD_PLUGINS=""``, as in an image that
ships no third-party plugin): ``--plugins`` picks. The daemons run side by side, one per
namespace: an idle daemon barely touches the CPU, so they do not disturb each other, and the
window is shared. After the first apply and ``--settle`` seconds (start-up work done), the
window of ``--seconds`` is measured from /proc:

  masqd CPU     CPU time of the daemon's threads (``/proc/PID/task/*/schedstat``, nanoseconds), as
                a share of one core; ``ticks`` is the same from utime + stime (clock ticks);
  helpers CPU   what its child processes used: the ones it ran and reaped (cutime + cstime: the
                iptables-save of a resync or a drift check) plus the ones still running (the
                nftables backend's ``nft monitor``);
  RSS           VmRSS of the daemon at the start and the end of the window, and VmHWM (its peak
                since start-up, i.e. including the first apply); helpers' VmRSS at the end;
  wake-ups/s    voluntary + involuntary context switches of all the daemon's threads: how often
                it leaves the CPU, i.e. how often something wakes it;
  log lines     what it printed during the window (an idle daemon should print nothing).

``ip netns exec`` execs masqd in place, so the Popen pid is the daemon itself (checked). The
helpers' CPU has the resolution of one clock tick (10 ms at USER_HZ 100) over the whole window.

The iptables backend's idle cost is its drift check (``--drift-check-interval``, default 30 s:
one ``iptables-save -t nat`` per family). ``--drift-probe N`` (default 10; 0: skip) measures one
check precisely: an extra iptables daemon checks every 100 ms for N seconds, and the CPU of it and
its helpers, divided by the checks made, is one check's cost; the line after the table says what
that costs per second at the default interval.

    sudo .venv/bin/python benchmarks/idle_cost.py [--seconds 60] [--settle 5] [--backends nftables,iptables]
                                                  [--plugins installed,none] [--drift-probe 10]

Output: one line per backend and plugin set with the figures above, then the drift check's cost.
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

from masqd.sources.drift import DRIFT_CHECK_SECONDS
from masqd.testing import netns
from masqd.testing.processes import children, cpu_ticks, rss_kib

BACKENDS = ("nftables", "iptables")
#: Plugin sets: those installed here (entry points), or the built-in ones alone.
PLUGIN_SETS = {"installed": None, "none": ""}
MASQD = Path(sys.executable).with_name("masqd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Seconds between two drift checks of the --drift-probe daemon.
PROBE_INTERVAL = 0.1


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


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of every live thread of ``pid`` so far (``schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except OSError:
            continue  # a thread that ended
    return total


def sample(pid: int) -> dict:
    """CPU time, context switches and resident sizes of the daemon and its children, now."""
    own, reaped = cpu_ticks(pid)
    live = {}
    for child in children(pid):
        try:
            live[child] = (cpu_ticks(child)[0], rss_kib(child) / 1024, Path(f"/proc/{child}/comm").read_text().strip())
        except (OSError, LookupError):
            continue  # exited meanwhile
    return {"own": own, "ns": cpu_ns(pid), "reaped": reaped, "live": live, "switches": context_switches(pid),
            "rss": rss_kib(pid) / 1024,
            "hwm": rss_kib(pid, "VmHWM") / 1024, "when": time.monotonic()}


class Daemon:
    def __init__(self, backend: str, plugins: str, ns: str, config: Path, *flags: str):
        self.backend = backend
        self.label = f"{backend} ({'installed' if PLUGIN_SETS[plugins] is None else 'built-in'} plugins)"
        env = dict(os.environ)
        env.pop("MASQD_PLUGINS", None)
        if PLUGIN_SETS[plugins] is not None:
            env["MASQD_PLUGINS"] = PLUGIN_SETS[plugins]
        self.proc = netns.popen(ns, str(MASQD), "run", "--backend", backend, "--config", str(config), "--log-format",
                                "json", *flags, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
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


def report(label: str, before: dict, after: dict, log_lines: int) -> str:
    wall = after["when"] - before["when"]
    own_ticks = (after["own"] - before["own"]) / CLK_TCK
    own = (after["ns"] - before["ns"]) / 1e9
    # children still running at the end, counted from the start (or from their birth: 0)
    live = sum(ticks - before["live"].get(pid, (0,))[0] for pid, (ticks, _, _) in after["live"].items()) / CLK_TCK
    helpers = (after["reaped"] - before["reaped"]) / CLK_TCK + live
    helper_rss = ", ".join(f"{comm} {rss:.1f} MiB" for _, rss, comm in after["live"].values()) or "none running"
    wakeups = (after["switches"] - before["switches"]) / wall
    return (f"{label:30s} {own / wall * 100:9.4f}% {own_ticks / wall * 100:7.3f}% {helpers / wall * 100:11.3f}% "
            f"{(own + helpers) / wall * 100:8.4f}% {before['rss']:9.1f} {after['rss']:9.1f} {after['hwm']:9.1f} "
            f"{wakeups:10.2f} {log_lines:9d}   helpers' RSS: {helper_rss}")


def drift_probe(daemon: Daemon, seconds: float) -> str:
    """One drift check's CPU, from ``daemon`` checking every PROBE_INTERVAL for ``seconds``."""
    before = sample(daemon.proc.pid)
    time.sleep(seconds)
    after = sample(daemon.proc.pid)
    checks = (after["when"] - before["when"]) / PROBE_INTERVAL
    # clock ticks, not schedstat: they count the threads that ended too (a child watcher's), and
    # hundreds of checks make their resolution fine enough
    own = (after["own"] - before["own"]) / CLK_TCK / checks
    helpers = (after["reaped"] - before["reaped"]) / CLK_TCK / checks
    per_second = (own + helpers) / DRIFT_CHECK_SECONDS  # at the default --drift-check-interval
    return (f"iptables drift check: {(own + helpers) * 1000:.2f} ms CPU per check (masqd {own * 1000:.2f} ms, "
            f"iptables-save {helpers * 1000:.2f} ms; {checks:.0f} checks at {PROBE_INTERVAL * 1000:g} ms); at the "
            f"default --drift-check-interval {DRIFT_CHECK_SECONDS:g}s that is {per_second * 100:.4f}% of a core")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle window (default 60)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds between the first apply and the window (default 5)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--plugins", default=",".join(PLUGIN_SETS),
                        help="plugin sets: installed (the entry points here), none (built-ins alone); default both")
    parser.add_argument("--drift-probe", type=float, default=10.0,
                        help="seconds of the iptables drift check probe (default 10; 0: skip)")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    plugin_sets = [p for p in args.plugins.split(",") if p]
    if unknown := set(plugin_sets) - set(PLUGIN_SETS):
        parser.error(f"--plugins: {', '.join(sorted(unknown))}: expected installed and/or none")
    if not namespaces_usable():
        return 2
    daemons: list[Daemon] = []
    probe: Daemon | None = None
    probed = ""
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    namespaces = ExitStack()  # each daemon runs in a namespace of its own, deleted after it stopped
    try:
        for backend in backends:
            for plugins in plugin_sets:
                ns = namespaces.enter_context(netns.namespace("bench"))
                daemons.append(Daemon(backend, plugins, ns, workdir / "absent-config"))
        for daemon in daemons:
            daemon.started()
        time.sleep(args.settle)
        for daemon in daemons:
            daemon.drain()
        before = {d.label: sample(d.proc.pid) for d in daemons}
        time.sleep(args.seconds)
        after = {d.label: sample(d.proc.pid) for d in daemons}
        logged = {d.label: d.drain() for d in daemons}
        for daemon in daemons:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"the {daemon.label} daemon exited ({daemon.proc.returncode}) during the window")
        if args.drift_probe > 0 and "iptables" in backends:  # after the window: it would disturb it
            ns = namespaces.enter_context(netns.namespace("bench"))
            probe = Daemon("iptables", plugin_sets[-1], ns, workdir / "absent-config",
                           f"--drift-check-interval={PROBE_INTERVAL * 1000:g}ms")
            probe.started()
            time.sleep(1)
            probed = drift_probe(probe, args.drift_probe)
    finally:
        ignore_signals()
        for daemon in daemons + ([probe] if probe else []):
            daemon.stop()
        namespaces.close()
        os.rmdir(workdir)

    print(f"idle daemon, default config (no config file: resyncInterval 60s), {args.seconds:g} s window after "
          f"{args.settle:g} s settling; {os.cpu_count()} CPUs; CPU as a share of one core (masqd: schedstat, ns; "
          f"ticks and helpers: resolution {100 / CLK_TCK / args.seconds:.3f}%); RSS in MiB")
    print(f"{'backend (plugins)':30s} {'masqd CPU':>10s} {'ticks':>8s} {'helpers CPU':>12s} {'total':>9s} "
          f"{'RSS start':>9s} {'RSS end':>9s} {'peak RSS':>9s} {'wakeups/s':>10s} {'log lines':>9s}")
    for daemon in daemons:
        print(report(daemon.label, before[daemon.label], after[daemon.label], logged[daemon.label]))
    if probed:
        print(probed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
