#!/usr/bin/env python3
"""Reload latency: time from an atomic config replace to the new rule being in the kernel.

Runs ``masqd run --backend iptables`` inside a fresh network namespace (needs root), replaces its
config file N times with ``os.replace`` (as kubelet's ConfigMap swap does), and timestamps the
moment the kernel reports the new rule through ``nft monitor`` (iptables here is the
nf_tables variant, so every rule iptables-restore writes is announced). No polling on our side:
the figure is file replace -> watch event -> reconcile -> iptables-restore -> kernel.

    sudo .venv/bin/python benchmarks/reload_latency.py [--changes 20]

Prints each latency, then median / p95 / max, and the ratio to the upstream agent, which only
re-reads its config at the next resync (every 60 s by default: 30 s on average).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import namespaces_usable, nft_monitor, percentiles, stop_process, wait_for_line

from masqd.testing import netns
from masqd.testing.processes import cpu_ticks

UPSTREAM_RESYNC_S = 60.0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    return cpu_ticks(pid)[0] / os.sysconf("SC_CLK_TCK")


def config_text(cidr: str) -> str:
    return f"resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8, {cidr}]\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="how long to measure idle CPU")
    args = parser.parse_args()
    if not namespaces_usable():
        return 2
    masqd = Path(sys.executable).with_name("masqd")
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    config = workdir / "config"
    config.write_text(config_text("192.0.2.0/24"))
    procs: list[subprocess.Popen] = []
    with netns.namespace("bench") as ns:
        try:
            monitor, lines = nft_monitor(ns)
            procs.append(monitor)
            daemon = netns.popen(ns, str(masqd), "run", "--backend", "iptables", "--config", str(config),
                                 "--log-format", "json", stderr=subprocess.DEVNULL)
            procs.append(daemon)
            wait_for_line(lines, "ip daddr 192.0.2.0/24")

            latencies = []
            for i in range(args.changes):
                cidr = f"10.{100 + i // 256}.{i % 256}.0/24"  # config only: no traffic is sent
                staged = workdir / ".config.tmp"
                staged.write_text(config_text(cidr))
                start = time.perf_counter()
                os.replace(staged, config)
                seen = wait_for_line(lines, f"ip daddr {cidr}")
                latencies.append((seen - start) * 1000)
                print(f"change {i + 1:2d}: {latencies[-1]:7.2f} ms")
                wait_for_line(lines, "# new generation")  # the end of that write's transaction
            # idle cost: the daemon with nothing to do (file watch armed, resync 1h)
            before = _cpu_seconds(daemon.pid)
            time.sleep(args.idle_seconds)
            idle_cpu = (_cpu_seconds(daemon.pid) - before) / args.idle_seconds
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            shutil.rmtree(workdir, ignore_errors=True)

    median, p95, worst = percentiles(latencies)
    print()
    print(f"changes: {len(latencies)}")
    print(f"median:  {median:.2f} ms   (target < 50 ms)")
    print(f"p95:     {p95:.2f} ms")
    print(f"max:     {worst:.2f} ms")
    print(f"upstream ip-masq-agent waits for its next resync: up to {UPSTREAM_RESYNC_S:.0f} s, "
          f"{UPSTREAM_RESYNC_S / 2:.0f} s on average")
    print(f"ratio (upstream average / masqd median): {UPSTREAM_RESYNC_S / 2 * 1000 / median:,.0f}x")
    print(f"idle CPU of the daemon over {args.idle_seconds:.0f} s: {idle_cpu * 100:.2f}% of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
