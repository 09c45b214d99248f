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
import queue
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_common import cpu_ticks, exit_on_signals

UPSTREAM_RESYNC_S = 60.0


def _ns(name: str, *argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", name, *argv], **kwargs)


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((time.perf_counter(), line))


def _wait_for(lines: queue.Queue, needle: str, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            stamp, line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if needle in line:
            return stamp
    raise TimeoutError(f"kernel never showed {needle!r} within {timeout} s")


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
    if os.geteuid() != 0 or not shutil.which("nft"):
        print("needs root, iproute2 and nftables (it creates its own network namespace)", file=sys.stderr)
        return 2
    exit_on_signals()  # so the namespace is always deleted, also under `timeout`
    masqd = Path(sys.executable).with_name("masqd")
    ns = f"mq-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    config = workdir / "config"
    config.write_text(config_text("192.0.2.0/24"))
    procs: list[subprocess.Popen] = []
    try:
        lines: queue.Queue = queue.Queue()
        monitor = _ns(ns, "nft", "monitor", stdout=subprocess.PIPE, text=True)
        procs.append(monitor)
        threading.Thread(target=_reader, args=(monitor.stdout, lines), daemon=True).start()
        # the monitor is subscribed once it reports a table we create for that purpose
        while True:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "add", "table", "ip", "probe"], check=True)
            try:
                _wait_for(lines, "table ip probe", timeout=0.5)
                break
            except TimeoutError:
                subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "ip", "probe"], check=True)
        daemon = _ns(ns, str(masqd), "run", "--backend", "iptables", "--config", str(config),
                     "--log-format", "json", stderr=subprocess.DEVNULL)
        procs.append(daemon)
        _wait_for(lines, "ip daddr 192.0.2.0/24")

        latencies = []
        for i in range(args.changes):
            cidr = f"10.{100 + i // 256}.{i % 256}.0/24"  # config only: no traffic is sent
            staged = workdir / ".config.tmp"
            staged.write_text(config_text(cidr))
            start = time.perf_counter()
            os.replace(staged, config)
            seen = _wait_for(lines, f"ip daddr {cidr}")
            latencies.append((seen - start) * 1000)
            print(f"change {i + 1:2d}: {latencies[-1]:7.2f} ms")
            _wait_for(lines, "masquerade")  # the rest of that write: the chain's last rule
        # idle cost: the daemon with nothing to do (file watch armed, resync 1h)
        before = _cpu_seconds(daemon.pid)
        time.sleep(args.idle_seconds)
        idle_cpu = (_cpu_seconds(daemon.pid) - before) / args.idle_seconds
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(workdir, ignore_errors=True)

    ordered = sorted(latencies)
    median = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print()
    print(f"changes: {len(ordered)}")
    print(f"median:  {median:.2f} ms   (target < 50 ms)")
    print(f"p95:     {p95:.2f} ms")
    print(f"max:     {ordered[-1]:.2f} ms")
    print(f"upstream ip-masq-agent waits for its next resync: up to {UPSTREAM_RESYNC_S:.0f} s, "
          f"{UPSTREAM_RESYNC_S / 2:.0f} s on average")
    print(f"ratio (upstream average / masqd median): {UPSTREAM_RESYNC_S / 2 * 1000 / median:,.0f}x")
    print(f"idle CPU of the daemon over {args.idle_seconds:.0f} s: {idle_cpu * 100:.2f}% of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
