#!/usr/bin/env python3
"""Short commands: wall-clock and CPU time of ``masqd validate`` and ``masqd render`` on the
example config, beside ``python -c pass`` of the same interpreter, in the same run.

The commands are the README's, run as a user runs them:

    masqd validate --config examples/config.yaml
    masqd render   --config examples/config.yaml       (iptables, the variant picked by ``auto``)

each in a fresh network namespace made for this run (needs root; deleted at the end, also on
SIGTERM or SIGINT): ``render`` reads the kernel's iptables state to pick the variant and the
``--random-fully`` support, and here that state is empty and private. Every command is started
the same way, ``ip netns exec NS ...``, so the baseline ``python -c pass`` carries the same cost;
``ip netns exec NS true`` alone is printed too.

Two more lines put the figures in context: ``libraries`` is an interpreter importing the
libraries these commands cannot do without (anyio with its asyncio loop run once, structlog,
PyYAML, pluggy, importlib.metadata for the plugins' entry points), so the difference to it is
masqd's own; and each masqd command runs once with the plugins installed here and once with the
built-in plugins alone (``MASQD_PLUGINS=""``, an image that ships no third-party plugin).

Bytecode is cached as in an installed package: ``PYTHONDONTWRITEBYTECODE`` is removed from the
commands' environment and each command runs once before the measured runs. The runs of all
commands are interleaved, so a slow moment of the machine hits each of them alike.

    sudo .venv/bin/python benchmarks/short_commands.py [--runs 15]

Output: per command the median and minimum wall-clock milliseconds, the median CPU milliseconds
(user + system, the command and its children), and the ratio and difference to ``python -c pass``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import ignore_signals, namespaces_usable

from masqd.testing import netns

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.yaml"
MASQD = Path(sys.executable).with_name("masqd")
#: What ``validate`` and ``render`` need from outside masqd, loaded and run once.
LIBRARIES = ("import anyio, structlog, yaml, pluggy, importlib.metadata as m; m.entry_points(group='masqd'); "
             "anyio.run(anyio.sleep, 0)")


def commands() -> dict[str, tuple[list[str], dict[str, str]]]:
    """label -> (argv, environment changes)."""
    builtin = {"MASQD_PLUGINS": ""}
    found = {
        "python -c pass": ([sys.executable, "-c", "pass"], {}),
        "libraries": ([sys.executable, "-c", LIBRARIES], {}),
    }
    for plugins, env in (("installed plugins", {}), ("built-in plugins", builtin)):
        found[f"validate ({plugins})"] = ([str(MASQD), "validate", "--config", str(EXAMPLE)], env)
        found[f"render ({plugins})"] = ([str(MASQD), "render", "--config", str(EXAMPLE)], env)
    return found


def environment(changes: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "MASQD_PLUGINS")}
    env.update(changes)
    return env


def timed(ns: str, argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one run of ``argv`` in ``ns``; fails on a non-zero exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(["ip", "netns", "exec", ns, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode()[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="measured runs per command (default 15)")
    args = parser.parse_args()
    if not namespaces_usable():
        return 2
    runs = commands()
    walls: dict[str, list[float]] = {label: [] for label in runs}
    cpus: dict[str, list[float]] = {label: [] for label in runs}
    try:
        with netns.namespace("bench") as ns:
            exec_only = statistics.median(timed(ns, ["true"], environment({}))[0] for _ in range(5))
            for argv, changes in runs.values():  # warm-up: bytecode written, files in the page cache
                timed(ns, argv, environment(changes))
            for _ in range(args.runs):
                for label, (argv, changes) in runs.items():
                    wall, cpu = timed(ns, argv, environment(changes))
                    walls[label].append(wall)
                    cpus[label].append(cpu)
    finally:
        ignore_signals()

    base = statistics.median(walls["python -c pass"])
    print(f"short commands on examples/config.yaml, {args.runs} interleaved runs each, every one started with "
          f"`ip netns exec` (alone: {exec_only * 1000:.1f} ms); {os.cpu_count()} CPUs; milliseconds")
    print(f"{'command':32s} {'median':>8s} {'min':>8s} {'CPU':>8s} {'x pass':>7s} {'- pass':>8s}")
    for label in runs:
        median = statistics.median(walls[label])
        print(f"{label:32s} {median * 1000:8.1f} {min(walls[label]) * 1000:8.1f} "
              f"{statistics.median(cpus[label]) * 1000:8.1f} {median / base:6.1f}x {(median - base) * 1000:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
