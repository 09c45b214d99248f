#!/usr/bin/env python3
"""No-op resync at 10k CIDRs: CPU time per resync tick and kernel writes (target: zero writes).

For each backend, in a fresh network namespace (needs root; always deleted, also on SIGTERM or
SIGINT), the script starts ``nft monitor``, then the daemon:

    masqd run --backend X --config F --log-format json --v=4       (F: 10k CIDRs, resyncInterval 1s)

waits for the initial write and the first "in sync" tick, and then measures N further ticks
(each tick ends with the daemon's "in sync" debug event, or a "rules ..." event if it wrote).

CPU: utime + stime of the daemon (all its threads) and cutime + cstime (its children, once reaped)
from /proc/<pid>/stat, sampled right after the window's first and last tick (the daemon is idle
then: its next tick is up to a second away). Every nft / iptables-save masqd runs is awaited
(anyio.run_process), so its CPU time lands in the daemon's cutime/cstime; ``ip netns exec`` execs
masqd in place, so the Popen pid is the daemon itself (checked). No cgroup needed. Resolution is
one clock tick (10 ms at USER_HZ 100) over the whole window, i.e. 10 ms / N per tick.

Writes: every kernel write shows up in ``nft monitor`` (iptables here is iptables-nft, whose rules
are nf_tables objects). The window is fenced by two marker tables the script adds (``inet``
family, which neither backend reads), so the count is exact: the add/delete/replace/flush/insert
events and "new generation" commits between the markers, excluding the markers themselves.
A positive control follows: one element (nftables) or one rule (iptables) is deleted by hand and
the writes of the healing tick are counted the same way, proving the monitor sees masqd's writes.

For scale, the raw read-back tool masqd runs once per tick (``nft --json list table ip masqd`` /
``iptables-save -t nat``) is timed too (CPU of 5 runs, from the children's rusage). Then, with the
daemon stopped, a child interpreter in the same namespace builds the agent (``build_agent``) and
times masqd's public entry points directly, each the mean of 5 no-op passes: the whole pass
(``Reconciler.reconcile()``), its stages one after the other (``ConfigLoader.load()``,
``plan_rules``, the backend's ``sync``; "rest" is the rest of the pass), and the pieces of the
sync, each called alone on the same inputs (the tool's read-back, ``parse_listing`` /
``parse_nat_state``, ``desired_state`` / ``plan_restore``, and the backend's ``render`` and
``read_back``, which the drift check runs): where a tick's time goes.

    sudo .venv/bin/python benchmarks/noop_resync.py [--cidrs 10000] [--ticks 10] [--interval 1s]

Output: per backend, CPU ms per tick (daemon itself, its children, total), the share of one core
at the chosen interval, CPU of one raw read for comparison, and the writes counted in the window.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (breakdown_exit_status, breakdown_text, check_execed_in_place, cidr_blocks, ignore_signals,
                          namespaces_usable, next_line, nft_monitor, pass_stages, run_breakdown, stamped_lines,
                          stop_process, sync_pieces, timed)

from masqd.testing import netns
from masqd.testing.processes import cpu_ticks

BACKENDS = ("nftables", "iptables")
MASQD = Path(sys.executable).with_name("masqd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRITE_VERBS = ("add ", "delete ", "insert ", "replace ", "flush ", "update ", "destroy ", "reset ")
TICK_EVENTS = ("in sync", "rules applied", "rules updated", "rules restored after outside change")
TIMEOUT_S = 60.0  # any single wait


def wait_event(log, names: tuple[str, ...], timeout: float = TIMEOUT_S) -> dict:
    """The next JSON log event of the daemon named in ``names`` (``log``: its stamped stderr)."""
    deadline = time.monotonic() + timeout
    while True:
        line = next_line(log, deadline)
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in names:
            return event
        if isinstance(event, dict) and event.get("level") == "error":
            print(f"    daemon error: {line[:300]}", file=sys.stderr)


def add_marker(ns: str, name: str) -> None:
    netns.nft(ns, "add", "table", "inet", name)


def monitor_between(monitor, start: str, end: str) -> tuple[int, int, list[str]]:
    """(write events, commits, sample lines) strictly between the two marker tables' creation."""
    deadline = time.monotonic() + TIMEOUT_S
    inside = skip_generation = False
    writes = commits = 0
    sample: list[str] = []
    while True:
        line = next_line(monitor, deadline)
        if line.startswith("add table inet "):
            name = line.split()[3]
            if name == start:
                inside = skip_generation = True  # the marker's own "# new generation" line follows
                continue
            if name == end:
                return writes, commits, sample
        if not inside:
            continue
        if line.startswith("# new generation"):
            if skip_generation:
                skip_generation = False
            else:
                commits += 1
        elif line.startswith(WRITE_VERBS):
            writes += 1
            if len(sample) < 3:
                sample.append(line[:160])


async def _breakdown_child(backend_name: str, config: str, rounds: int) -> dict:
    """``--breakdown``: no-op passes of a fresh agent over ``config``, in the namespace this process
    runs in (whose kernel already holds the rules): the mean wall time of the whole pass, of its
    stages and of the sync's pieces."""
    import logging

    from masqd.agent import build_agent
    from masqd.backends.base import BackendSettings
    from masqd.config import AgentOptions
    from masqd.logs import configure_logging
    from masqd.plugins import Plugins

    configure_logging(logging.WARNING, "json")  # logs to stderr: stdout carries the JSON result
    options = AgentOptions()
    plugins = Plugins.load()
    agent = build_agent(options, backend=plugins.make_backend(backend_name, BackendSettings(options)), config=config,
                        plugins=plugins, once=True)
    await agent.reconciler.reconcile()  # first pass: probes, caches; the daemon's ticks come after it
    whole: dict[str, float] = {}
    stages: dict[str, float] = {}
    pieces: dict[str, float] = {}
    for _ in range(rounds):
        if (await timed(whole, "pass", agent.reconciler.reconcile)).changed:
            sys.exit("a no-op reconcile wrote")
    for _ in range(rounds):
        await pass_stages(agent, stages)
    scratch = plugins.make_backend(backend_name, BackendSettings(options))
    for _ in range(rounds):
        await sync_pieces(scratch, agent.status.applied, pieces, writes=False)
    return {"total": whole["pass"] / rounds, "stages": {k: v / rounds for k, v in stages.items()},
            "pieces": {k: v / rounds for k, v in pieces.items()}}


def read_cpu_per_run(ns: str, argv: list[str], runs: int = 5) -> float:
    """Mean CPU seconds (user + system) of one run of argv inside ns."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        netns.run(ns, *argv, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / runs


def measure(backend: str, config: Path, ticks: int) -> dict:
    procs: list[subprocess.Popen] = []
    with netns.namespace("bench") as ns:
        try:
            monitor_proc, monitor = nft_monitor(ns)
            procs.append(monitor_proc)
            daemon = netns.popen(
                # the resync tick alone (a drift check between ticks reads the kernel the same way, and
                # costs what a tick costs; the nftables monitor would heal the control before the tick)
                ns, str(MASQD), "run", "--backend", backend, "--config", str(config), "--log-format", "json", "--v=4",
                "--drift-check-interval=0", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(daemon)
            log = stamped_lines(daemon.stderr)
            wait_event(log, ("rules applied",))
            check_execed_in_place(daemon.pid)
            wait_event(log, TICK_EVENTS)  # the first resync: steady state from here

            add_marker(ns, "mqbench_start")
            cpu0, wall0 = cpu_ticks(daemon.pid), time.monotonic()
            outcomes = [wait_event(log, TICK_EVENTS)["event"] for _ in range(ticks)]
            cpu1, wall1 = cpu_ticks(daemon.pid), time.monotonic()
            add_marker(ns, "mqbench_end")
            writes, commits, sample = monitor_between(monitor, "mqbench_start", "mqbench_end")

            # positive control: an outside change must be healed, and its writes seen by the monitor
            add_marker(ns, "mqbench_heal_start")
            if backend == "nftables":
                netns.nft(ns, "delete", "element", "ip", "masqd", "nonmasq4", "{ 10.0.0.0/28 }")
            else:
                netns.run(ns, "iptables", "-w", "-t", "nat", "-D", "IP-MASQ-AGENT", "2")
            heal = wait_event(log, ("rules restored after outside change",), timeout=10)
            add_marker(ns, "mqbench_heal_end")
            heal_writes, heal_commits, _ = monitor_between(monitor, "mqbench_heal_start", "mqbench_heal_end")
            heal_writes -= 1  # our own hand-made delete, and its commit
            heal_commits -= 1

            read_argv = (["nft", "--json", "list", "table", "ip", "masqd"] if backend == "nftables"
                         else ["iptables-save", "-t", "nat"])
            raw_read = read_cpu_per_run(ns, read_argv)
            stop_process(daemon)  # the breakdown runs alone (the daemon would heal nothing anyway)
            parts = run_breakdown(ns, __file__, backend, str(config), "5")  # no-op passes, in process
        finally:
            for proc in reversed(procs):
                stop_process(proc)
    return {
        "self": (cpu1[0] - cpu0[0]) / CLK_TCK / ticks,
        "children": (cpu1[1] - cpu0[1]) / CLK_TCK / ticks,
        "wall_per_tick": (wall1 - wall0) / ticks,
        "outcomes": outcomes,
        "writes": writes,
        "commits": commits,
        "sample": sample,
        "heal_writes": heal_writes,
        "heal_commits": heal_commits,
        "heal_ms": heal.get("duration_ms"),
        "raw_read": raw_read,
        "parts": parts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cidrs", type=int, default=10000)
    parser.add_argument("--ticks", type=int, default=10, help="resync ticks measured (default 10)")
    parser.add_argument("--interval", default="1s", help="resyncInterval, Go duration (default 1s)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--breakdown", nargs=3, metavar=("BACKEND", "CONFIG", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.breakdown:  # the child of tick_breakdown(), inside the namespace
        import anyio

        backend, config, rounds = args.breakdown
        print(json.dumps(anyio.run(_breakdown_child, backend, config, int(rounds))))
        return 0
    if not namespaces_usable():
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    config = workdir / "config.yaml"
    config.write_text(f"cidrLimit: {args.cidrs + 10}\nresyncInterval: {args.interval}\nnonMasqueradeCIDRs:\n"
                      + "".join(f"  - {c}\n" for c in cidr_blocks(args.cidrs)))
    results = {}
    try:
        for backend in args.backends.split(","):
            print(f"  {backend}: {args.ticks} ticks at resyncInterval {args.interval} ...", flush=True)
            results[backend] = measure(backend, config, args.ticks)
    finally:
        ignore_signals()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"no-op resync, {args.cidrs} CIDRs, {args.ticks} ticks (CPU per tick, ms; resolution "
          f"{1000 / CLK_TCK / args.ticks:.1f} ms)")
    print(f"{'backend':9s} {'masqd':>7s} {'children':>9s} {'total':>7s} {'core %':>7s} {'raw read':>9s} "
          f"{'total/raw':>9s} {'writes':>7s} {'commits':>8s}  outcome of the ticks")
    for backend, r in results.items():
        total = r["self"] + r["children"]
        kinds = ", ".join(f"{n}x {e}" for e in dict.fromkeys(r["outcomes"]) if (n := r["outcomes"].count(e)))
        print(f"{backend:9s} {r['self'] * 1000:7.1f} {r['children'] * 1000:9.1f} {total * 1000:7.1f} "
              f"{total / r['wall_per_tick'] * 100:6.1f}% {r['raw_read'] * 1000:9.1f} {total / r['raw_read']:8.1f}x "
              f"{r['writes']:7d} {r['commits']:8d}  {kinds}")
        for line in r["sample"]:
            print(f"    write seen: {line}")
    print()
    for backend, r in results.items():
        print(f"positive control, {backend}: after one hand-deleted {'element' if backend == 'nftables' else 'rule'} "
              f"the healing tick wrote {r['heal_writes']} events in {r['heal_commits']} commit(s) "
              f"(logged duration {r['heal_ms']} ms): the monitor does see masqd's writes")
    print()
    print("where a no-op tick's wall time goes (in process, mean of 5 passes, ms; pass: Reconciler.reconcile(); its "
          "stages one after the other: ConfigLoader.load(), plan_rules, the backend's sync; rest: the rest of the pass; "
          "then the sync's pieces, each called alone on the same inputs)")
    for backend, r in results.items():
        p = r["parts"]
        if isinstance(p, str):
            print(f"  {backend}: {p}")
            continue
        print(f"  {backend:8s} {breakdown_text(p['total'], p['stages'], p['pieces'])}")
    if len(results) == 2:
        n, i = results["nftables"], results["iptables"]
        if n["self"] + n["children"] > 0:
            ratio = (i["self"] + i["children"]) / (n["self"] + n["children"])
            print(f"ratio CPU per no-op tick iptables / nftables: {ratio:.2f}x")
        else:  # a small run: the CPU clock's resolution is coarser than the ticks' cost
            print("ratio CPU per no-op tick iptables / nftables: n/a (nftables below the CPU clock's resolution)")
    met = all(r["writes"] == 0 and r["commits"] == 0 for r in results.values())
    print(f"target zero writes during no-op resyncs: {'MET' if met else 'NOT MET'}")
    return breakdown_exit_status([backend for backend, r in results.items() if isinstance(r["parts"], str)])


if __name__ == "__main__":
    sys.exit(main())
