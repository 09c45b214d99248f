#!/usr/bin/env python3
"""Start-up time: from exec of ``masqd run`` to the first rules in the kernel, per backend.

Each run uses a fresh, empty network namespace (needs root; always deleted, also on SIGTERM or
SIGINT) with ``nft monitor`` already subscribed in it, then starts the production command:

    masqd run --backend X --config <absent file> --log-format json      (default rules)

and takes three stamps, all measured from just before the process is started:

  started   the daemon's "masqd starting" log line: interpreter start-up, imports, flags parsed,
            plugins loaded;
  logged    its "rules applied" log line (the first sync done, read back and verified);
  kernel    the moment ``nft monitor`` announces masqd's rules (the write committed: for
            nftables its ``table ip masqd``, for iptables, here the nf_tables variant picked by
            ``auto``, its ``IP-MASQ-AGENT`` chain).

Every figure includes ``ip netns exec`` (its own cost, "ip netns exec true", is printed first).
"kernel" usually comes before "logged": after the write masqd reads the rules back to verify
them, and removes the other backend's leftovers, before it logs.

    sudo .venv/bin/python benchmarks/startup_time.py [--runs 7] [--backends nftables,iptables]

Output: each run, then per backend the median / min / max of each stamp in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import ignore_signals, namespaces_usable, nft_monitor, stamped_lines, stop_process, wait_for_line

from masqd.testing import netns

BACKENDS = ("nftables", "iptables")
MASQD = Path(sys.executable).with_name("masqd")
#: What ``nft monitor`` prints for the transaction carrying each backend's first rules.
KERNEL_LINE = {"nftables": "add rule ip masqd ", "iptables": "IP-MASQ-AGENT"}
STAMPS = ("started", "logged", "kernel")


def one_run(backend: str) -> dict[str, float]:
    """The three stamps of one start (seconds)."""
    procs: list[subprocess.Popen] = []
    with netns.namespace("bench") as ns:
        try:
            monitor, kernel = nft_monitor(ns)
            procs.append(monitor)
            start = time.perf_counter()
            daemon = netns.popen(ns, str(MASQD), "run", "--backend", backend, "--config", f"/nonexistent/masqd-bench-{ns}",
                                 "--log-format", "json", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(daemon)
            log = stamped_lines(daemon.stderr)
            started = wait_for_line(log, '"masqd starting"', timeout=60)
            logged = wait_for_line(log, '"rules applied"', timeout=60)
            seen = wait_for_line(kernel, KERNEL_LINE[backend], timeout=10)
            return {"started": started - start, "logged": logged - start, "kernel": seen - start}
        finally:
            for proc in reversed(procs):
                stop_process(proc)


def exec_baseline() -> float:
    """Median seconds of ``ip netns exec NS true``."""
    with netns.namespace("bench") as ns:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            netns.run(ns, "true")
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="starts per backend (default 7)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if not namespaces_usable():
        return 2
    try:
        baseline = exec_baseline()
        results: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
        for run in range(args.runs):
            for backend in backends:  # interleaved: a slow moment of the machine hits both
                stamps = one_run(backend)
                results[backend].append(stamps)
                print(f"  run {run + 1} {backend:8s}: " + ", ".join(f"{k} {v * 1000:6.1f} ms" for k, v in stamps.items()),
                      flush=True)
    finally:
        ignore_signals()

    print()
    print(f"start-up to first apply, default config, {args.runs} runs per backend, ms from exec "
          f"(ip netns exec true alone: {baseline * 1000:.1f} ms)")
    print(f"{'backend':9s} " + " ".join(f"{stamp + ' median':>15s} {'min':>7s} {'max':>7s}" for stamp in STAMPS))
    for backend, runs in results.items():
        cells = []
        for stamp in STAMPS:
            values = [r[stamp] * 1000 for r in runs]
            cells.append(f"{statistics.median(values):15.1f} {min(values):7.1f} {max(values):7.1f}")
        print(f"{backend:9s} " + " ".join(cells))
    if len(results) == 2 and all(results.values()):
        n, i = (statistics.median(r["kernel"] for r in results[b]) for b in BACKENDS)
        print(f"ratio time to rules in the kernel iptables / nftables: {i / n:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
