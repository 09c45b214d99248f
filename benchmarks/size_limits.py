#!/usr/bin/env python3
"""Practical size limits of each backend: how reading the rules back grows with the CIDRs, and
how much room masqd's tool deadline leaves (issue 19, item 3).

Every pass and every drift check of the iptables backend reads the nat table back
(``iptables-save``), and the nftables backend reads its table (``nft --json list table``). For
the nft variant of iptables that read takes time growing with the square of the rules (the
kernel's rule dump restarts from the chain's start for each batch it returns), so past some size
each pass costs tens of seconds of a core. Per backend and size, in a fresh network namespace:

  run A     wall time of ``masqd run --once`` into the empty namespace (write + read-back check);
  no-op     wall time of a second ``run --once`` with the same config (read-back only);
  read      the raw read-back tool alone on that table;
  deadline  the deadline masqd gives that read (``masqd.backends.tools.tool_deadline`` of the
            table's lines; for nft, linear in the listing's commas); "room" is deadline / read:
            above 1, the read finishes in time.

    sudo .venv/bin/python benchmarks/size_limits.py [--sizes 10000,50000,100000,200000]

Reading the output: the practical limit of a backend is where "no-op" (what every resync and
drift check costs) stops being small against the 30 s drift-check interval; masqd then spaces
its drift checks out (at most a tenth of the time reading back) and still applies, but each
config change waits for reads of that length.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench_common import cidr_blocks, namespaces_usable

from masqd.backends.tools import tool_deadline
from masqd.testing import netns

MASQD = Path(sys.executable).with_name("masqd")
#: backend label -> (masqd flags, the raw read-back command)
BACKENDS = {
    "iptables-nft": (("--backend", "iptables", "--iptables-mode", "nft"), ("iptables-nft-save", "-t", "nat")),
    "iptables-legacy": (("--backend", "iptables", "--iptables-mode", "legacy"), ("iptables-legacy-save", "-t", "nat")),
    "nftables": (("--backend", "nftables"), ("nft", "--json", "list", "table", "ip", "masqd")),
}


def timed(ns: str, *argv: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = netns.run(ns, *argv, timeout=1800)
    return time.perf_counter() - started, result.stdout


def measure(label: str, size: int, directory: Path) -> dict[str, float]:
    flags, read = BACKENDS[label]
    config = directory / f"config-{size}"
    config.write_text(f"cidrLimit: {size + 10}\nresyncInterval: 1h\nnonMasqueradeCIDRs:\n"
                      + "".join(f"  - {cidr}\n" for cidr in cidr_blocks(size)))
    run = (str(MASQD), "run", "--once", *flags, "--config", str(config), "--log-format", "json",
           "--drift-check-interval", "0")
    with netns.namespace("bench") as ns:
        first, _ = timed(ns, *run)
        noop, _ = timed(ns, *run)
        seconds, output = timed(ns, *read)
    if label == "nftables":  # as the nft executor scales it: linear in the listing's commas
        deadline = tool_deadline(output.count(","), square=False)
    else:
        deadline = tool_deadline(output.count("\n"))
    return {"run A": first, "no-op": noop, "read": seconds, "deadline": deadline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,100000,200000")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args(argv)
    if not namespaces_usable():
        print("skipped: needs root and network namespaces")
        return 0
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for label in args.backends.split(","):
            for size in sizes:
                figures = measure(label, size, Path(directory))
                rows.append((label, size, figures))
                print(f"  {label:16} {size:>7}: run A {figures['run A']:.2f} s, no-op {figures['no-op']:.2f} s, "
                      f"read {figures['read']:.2f} s", flush=True)
    print("\nbackend             CIDRs    run A    no-op     read  deadline    room")
    for label, size, f in rows:
        print(f"{label:16} {size:>8} {f['run A']:>7.2f}s {f['no-op']:>7.2f}s {f['read']:>7.2f}s "
              f"{f['deadline']:>8.0f}s {f['deadline'] / f['read']:>6.1f}x")
    print("\nread-back growth per doubling of the CIDRs (read at 2N / read at N):")
    for label in args.backends.split(","):
        reads = {size: f["read"] for name, size, f in rows if name == label}
        steps = [f"{a // 1000}k->{b // 1000}k {reads[b] / reads[a]:.1f}x" for a, b in zip(sizes, sizes[1:])
                 if b == 2 * a and reads[a] > 0.01]
        print(f"  {label:16} {', '.join(steps) or '(no doubling among the sizes, or reads too short to compare)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
