#!/usr/bin/env python3
"""What ``--conntrack-reconcile`` costs after an apply, and ctnetlink against the ``conntrack`` tool.

For each size in ``--sizes`` (conntrack entries), a fresh network namespace gets that many
source-NATed entries (``conntrack -R``, a file of ``-I`` lines: 80% TCP established, 20% UDP;
``--stale-percent`` of each to destinations in 203.0.113.0/24, the rest to 198.51.100.0/24).
Then, in that namespace, masqd's step runs as the reconciler runs it after an apply that adds
203.0.113.0/24 to the keep list (``FlowCleanup.run``: read the node's addresses, dump the table
over ctnetlink, select the stale entries, delete them), once per mode, each on a freshly loaded
table: ``udp`` (the kernel filters the dump to UDP) and ``all``. Printed: entries read, stale
entries deleted, wall-clock ms, and microseconds per entry in the table.

Then the alternative the issue allowed: the ``conntrack`` tool deleting the same stale entries one
process per entry (``conntrack -D`` with the entry's tuple; what a caller of the tool that decides
per entry must do), timed on ``--tool-sample`` entries and extrapolated, as a ratio to masqd's
delete. And, for context, the tool's best case, which masqd cannot use in general: one
``conntrack -D --orig-dst 203.0.113.0 --mask-dst 255.255.255.0 -p udp`` that filters by one CIDR
in the kernel's dump (it cannot say "whose decision changed", skip the node's own flows, or
follow a DNAT to the endpoint).

    sudo .venv/bin/python benchmarks/conntrack_reconcile.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import exit_on_signals, namespaces_usable  # noqa: E402

from masqd.testing import netns  # noqa: E402

_STEP = r"""
import json, sys, time, anyio
from masqd.backends.conntrack import ConntrackTable
from masqd.config import AgentOptions, parse_config
from masqd.flow_cleanup import FlowCleanup
from masqd.ruleset import compute_ruleset

mode = sys.argv[1]
options = AgentOptions()
before = compute_ruleset(parse_config("{}", options).config, options)
after = compute_ruleset(parse_config('{"nonMasqueradeCIDRs": ["10.0.0.0/8", "203.0.113.0/24"]}', options).config, options)

async def local():
    return frozenset()

async def main():
    cleanup = FlowCleanup(mode, local, limit=10**7, deadline=600)
    started = time.perf_counter()
    report = await cleanup.run(ConntrackTable(), before, after, True)
    print(json.dumps({"ms": (time.perf_counter() - started) * 1000, "deleted": report.total,
                      "error": report.error}))

anyio.run(main)
"""


def entries_file(path: Path, count: int, stale_percent: float) -> list[tuple[str, str, int, int]]:
    """Write ``count`` ``conntrack -I`` lines; return the stale UDP entries' (src, dst, sport, dport)."""
    stale_every = max(1, round(100 / stale_percent)) if stale_percent > 0 else 0
    stale_udp = []
    with path.open("w") as out:
        for i in range(count):
            protocol = "udp" if i % 5 == 0 else "tcp"
            source = f"10.{244 + i // 60000 % 10}.{i // 250 % 250}.{2 + i % 250}"
            stale = stale_every and (i // 5) % stale_every == 0  # runs of five: one UDP, four TCP
            destination = f"203.0.113.{2 + i % 200}" if stale else f"198.51.100.{2 + i % 200}"
            sport, dport = 1024 + i % 60000, 53 if protocol == "udp" else 443
            state = " --state ESTABLISHED" if protocol == "tcp" else ""
            out.write(f"-I -p {protocol} -s {source} -d {destination} --sport {sport} --dport {dport} "
                      f"--timeout 3600 --src-nat 172.30.0.1{state}\n")
            if stale and protocol == "udp":
                stale_udp.append((source, destination, sport, dport))
    return stale_udp


def load(ns: str, path: Path, count: int) -> None:
    netns.run(ns, "conntrack", "-F", check=False)
    netns.run(ns, "conntrack", "-R", str(path), timeout=300)
    held = int(netns.run(ns, "conntrack", "-C").stdout.strip())
    if held < count:
        raise SystemExit(f"only {held} of {count} entries loaded (net.netfilter.nf_conntrack_max too small?)")


def masqd_step(ns: str, mode: str) -> dict:
    result = netns.run(ns, sys.executable, "-c", _STEP, mode, timeout=900)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--stale-percent", type=float, default=5.0)
    parser.add_argument("--tool-sample", type=int, default=20)
    args = parser.parse_args()
    exit_on_signals()
    if not namespaces_usable():
        print("needs root and network namespaces")
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"entries: 80% TCP established, 20% UDP, all source-NATed; {args.stale_percent:g}% to 203.0.113.0/24, "
          "which the change keeps\n")
    print(f"{'entries':>8} {'mode':>5} {'deleted':>8} {'ms':>9} {'us/entry':>9}")
    with netns.namespace("ctbench") as ns, tempfile.TemporaryDirectory() as tmp:
        netns.run(ns, "sysctl", "-qw", f"net.netfilter.nf_conntrack_max={max(sizes) * 2}", check=False)
        per_delete = {}
        for size in sizes:
            path = Path(tmp) / f"entries-{size}"
            stale_udp = entries_file(path, size, args.stale_percent)
            for mode in ("udp", "all"):
                load(ns, path, size)
                step = masqd_step(ns, mode)
                if step["error"]:
                    print(f"{size:>8} {mode:>5} error: {step['error']}")
                    return 1
                print(f"{size:>8} {mode:>5} {step['deleted']:>8} {step['ms']:>9.1f} {step['ms'] * 1000 / size:>9.2f}")
                if mode == "udp":
                    per_delete[size] = (step["ms"], step["deleted"], stale_udp)
        size = max(sizes)
        masqd_ms, deleted, stale_udp = per_delete[size]
        load(ns, Path(tmp) / f"entries-{size}", size)
        sample = stale_udp[:args.tool_sample]
        started = time.perf_counter()
        for source, destination, sport, dport in sample:
            netns.run(ns, "conntrack", "-D", "-p", "udp", "-s", source, "-d", destination, "--sport", str(sport),
                      "--dport", str(dport), check=False)
        tool_each = (time.perf_counter() - started) * 1000 / max(1, len(sample))
        started = time.perf_counter()
        netns.run(ns, "conntrack", "-D", "-p", "udp", "--orig-dst", "203.0.113.0", "--mask-dst", "255.255.255.0",
                  check=False)
        one_filter = (time.perf_counter() - started) * 1000
        print(f"\nat {size} entries, {deleted} stale UDP entries:")
        print(f"  masqd (dump, select, delete over ctnetlink):  {masqd_ms:9.1f} ms")
        print(f"  conntrack -D per entry ({len(sample)} timed):      {tool_each * deleted:9.1f} ms "
              f"({tool_each:.2f} ms each; {tool_each * deleted / masqd_ms:.0f}x masqd)")
        print(f"  one conntrack -D filtered by the CIDR:         {one_filter:9.1f} ms "
              f"({one_filter / masqd_ms:.2f}x masqd; a single CIDR, no per-flow decision)")
        netns.run(ns, "conntrack", "-F", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
