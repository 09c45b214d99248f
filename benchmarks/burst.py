#!/usr/bin/env python3
"""A burst of config changes: how many passes, how long until the last one is applied, and the
daemon's memory before and after (no root needed: dry-run backend, no kernel touched).

The real command runs as a child process:

    masqd run --backend dry-run --config F --log-format json --v=4 --http-address=

F is replaced (write + rename, as kubelet and editors do) N times as fast as this script can,
each time with a different CIDR; the script then waits for the daemon's log line applying the
last one. RSS is VmRSS from /proc/PID/status, read after the first apply and again after the
burst (plus a second burst of the same size, to tell a one-off from growth).

    .venv/bin/python benchmarks/burst.py [--changes 10000]

Output: passes (reconciles) and writes for N changes, seconds from the first write to the last
config applied, and RSS before, after one burst and after two, in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from masqd.testing.netns import LineReader
from masqd.testing.processes import rss_kib

MASQD = Path(sys.executable).with_name("masqd")


def cidr(i: int) -> str:
    return f"10.{(i >> 8) & 255}.{i & 255}.0/24"


def burst(config: Path, start: int, count: int) -> None:
    tmp = config.with_name(".config.tmp")
    for i in range(start, start + count):
        tmp.write_text(f"resyncInterval: 1h\nnonMasqueradeCIDRs: [{cidr(i)}]\n")
        os.replace(tmp, config)


def wait_for(lines: LineReader, counts: dict, wanted: str) -> None:
    """Read log events, counting passes and writes, until the rules hold ``wanted``."""
    while (line := lines.readline(60)) is not None:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") in ("rules applied", "rules updated", "in sync"):
            counts["passes"] += 1
        if event.get("event") in ("rules applied", "rules updated"):
            counts["writes"] += 1
            if wanted in event.get("cidrs_added", []):
                return
    raise SystemExit(f"masqd never applied {wanted}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "config"
        config.write_text("resyncInterval: 1h\nnonMasqueradeCIDRs: [192.0.2.0/24]\n")
        proc = subprocess.Popen([str(MASQD), "run", "--backend", "dry-run", "--config", str(config), "--log-format",
                                 "json", "--v=4", "--http-address="], stderr=subprocess.PIPE)
        lines = LineReader(proc.stderr)
        try:
            counts = {"passes": 0, "writes": 0}
            wait_for(lines, counts, "192.0.2.0/24")
            before = rss_kib(proc.pid) / 1024
            results = []
            for round_ in range(2):
                counts = {"passes": 0, "writes": 0}
                start = time.perf_counter()
                burst(config, round_ * args.changes, args.changes)
                wait_for(lines, counts, cidr(round_ * args.changes + args.changes - 1))
                results.append((counts, time.perf_counter() - start, rss_kib(proc.pid) / 1024))
        finally:
            proc.terminate()
            proc.wait(10)
            lines.close()
    for round_, (counts, seconds, rss) in enumerate(results, 1):
        print(f"burst {round_}: {args.changes} changes -> {counts['passes']} passes, {counts['writes']} writes "
              f"({args.changes / max(counts['passes'], 1):.0f} changes per pass); last config applied "
              f"{seconds:.2f} s after the first write; RSS {rss:.1f} MiB")
    print(f"RSS after the first apply {before:.1f} MiB; growth over two bursts "
          f"{results[-1][2] - before:+.1f} MiB")


if __name__ == "__main__":
    main()
