#!/usr/bin/env python3
"""Run every benchmark and write benchmarks/RESULTS.md: the machine, then each benchmark's output.

Each benchmark script runs as a subprocess of its own (a failing or hanging one is recorded in
the report, and the rest still run), with explicit size arguments so the report shows exactly
what was measured. Its output is shown as it arrives and copied into the report under its own
heading, with a one-line statement of what it measures, its command line, its outcome and how
long it took. A script still running past its time limit gets SIGTERM (the scripts then delete
their network namespaces), and SIGKILL for its whole process group 30 s later.

    sudo .venv/bin/python benchmarks/run_all.py             # the full set (about 13 minutes on 2 cores)
    sudo .venv/bin/python benchmarks/run_all.py --quick     # smoke run: small sizes, few repeats (about 30 s)
    .venv/bin/python benchmarks/run_all.py --list           # what would run, with which arguments

Most benchmarks need root (they create network namespaces); without it they are reported as
failed with their reason. Run it on a quiet machine: the figures are wall-clock and CPU times.
``--quick`` writes to RESULTS-quick.md by default, so a smoke run never replaces real results.
Exit status: 0 when every benchmark succeeded, 1 otherwise (the report is written either way).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Scripts in benchmarks/ that are not benchmarks.
NOT_BENCHMARKS = frozenset({"bench_common.py", "run_all.py"})
#: Seconds a benchmark may run in a --quick run.
QUICK_TIMEOUT_S = 180.0
#: Seconds between SIGTERM and SIGKILL for a benchmark past its time limit.
KILL_GRACE_S = 30.0


@dataclass(frozen=True)
class Benchmark:
    """One benchmark run: ``script`` (a file in benchmarks/, or a path) with ``full`` or ``quick``
    arguments; ``what`` is the one-line statement of what it measures; ``timeout`` seconds for a
    full run."""

    name: str
    script: str
    what: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    timeout: float = 300.0

    def path(self) -> Path:
        return Path(self.script) if os.path.isabs(self.script) else HERE / self.script

    def argv(self, quick: bool) -> list[str]:
        return [sys.executable, str(self.path()), *(self.quick if quick else self.full)]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("Reload latency", "reload_latency.py",
              "Time from an atomic replace of the config file to the new rule in the kernel (iptables backend, "
              "seen by `nft monitor`), against the upstream agent's resync; then the daemon's idle CPU.",
              ("--changes", "20", "--idle-seconds", "20"), ("--changes", "3", "--idle-seconds", "1")),
    Benchmark("Apply time vs CIDR count", "apply_time.py",
              "`masqd run --once` into an empty kernel, a full replace and a no-op run at 100 to 100k CIDRs, both "
              "backends, against the raw `nft` / `iptables-restore` writing the same text; where the time goes.",
              ("--sizes", "100,1000,10000,100000", "--repeats", "3"), ("--sizes", "100", "--repeats", "1"),
              timeout=900),
    Benchmark("Size limits", "size_limits.py",
              "How the read-back every pass and drift check does grows from 10k to 200k CIDRs, each backend "
              "(iptables nft and legacy variants, nftables), with `run --once` and no-op run times, and the room "
              "masqd's scaled tool deadline leaves over the read.",
              ("--sizes", "10000,50000,100000,200000"), ("--sizes", "1000",), timeout=1800),
    Benchmark("One-line edit, iptables", "iptables_edit.py",
              "A config edit of one CIDR at 1k and 10k CIDRs synced by the daemon's kept iptables backend (nft and "
              "legacy variants), split into iptables-save, iptables-restore and Python, against `iptables-restore` "
              "of the same chain into a fresh namespace; target: no slower than that restore plus 50 ms.",
              ("--sizes", "1000,10000", "--repeats", "7"), ("--sizes", "100", "--repeats", "1")),
    Benchmark("One-line edit at scale, nftables", "edit_latency.py",
              "Time from an atomic replace of the config adding or removing one CIDR to that element in the kernel "
              "(seen by `nft monitor`), daemon running with 100, 10k and 100k CIDRs, nftables backend; start-up "
              "times and RSS; targets: median <= 100 ms at 10k, <= 500 ms at 100k; upstream waits for its resync.",
              ("--sizes", "100,10000,100000", "--edits", "10"), ("--sizes", "100", "--edits", "3")),
    Benchmark("No-op resync cost", "noop_resync.py",
              "CPU per resync tick at 10k CIDRs when nothing changed, and the kernel writes counted during those "
              "ticks (target: zero), both backends.",
              ("--cidrs", "10000", "--ticks", "10", "--interval", "1s"),
              ("--cidrs", "100", "--ticks", "2", "--interval", "200ms")),
    Benchmark("New-flow rate vs CIDR count", "flow_rate.py",
              "New UDP flows per second masqueraded through the node, and sender CPU per flow, at 10 to 10k CIDRs, "
              "nftables vs iptables.",
              ("--sizes", "10,1000,10000", "--seconds", "3", "--repeats", "5"),
              ("--sizes", "10", "--seconds", "0.3", "--repeats", "1"), timeout=600),
    Benchmark("Idle RSS and CPU", "idle_cost.py",
              "CPU share, resident memory and wake-ups of the running daemon (default config) with nothing to do, "
              "both backends, with the installed plugins and with the built-in ones alone; the iptables drift "
              "check's cost per check.",
              ("--seconds", "60", "--settle", "5", "--drift-probe", "20"),
              ("--seconds", "1", "--settle", "0.5", "--drift-probe", "1")),
    Benchmark("Short commands", "short_commands.py",
              "`masqd validate` and `masqd render` of the example config, wall-clock and CPU, beside `python -c pass` "
              "and the libraries they need, with the installed plugins and with the built-in ones alone.",
              ("--runs", "15"), ("--runs", "2")),
    Benchmark("Start-up time to first apply", "startup_time.py",
              "From exec of `masqd run` to its 'rules applied' log line and to the rules in the kernel, default "
              "config, both backends.",
              ("--runs", "7"), ("--runs", "2")),
    Benchmark("Kubernetes latency (iptables)", "kube_latency.py",
              "Time from a ConfigMap / EgressNATPolicy write on the tests' in-process API server to the new rule in "
              "the kernel, iptables backend.",
              ("--changes", "30", "--backend", "iptables"), ("--changes", "3", "--backend", "iptables")),
    Benchmark("Kubernetes latency (nftables)", "kube_latency.py",
              "The same with the nftables backend.",
              ("--changes", "30", "--backend", "nftables"), ("--changes", "3", "--backend", "nftables")),
    Benchmark("Burst of config changes", "burst.py",
              "10,000 config replaces as fast as possible (dry-run backend): reconcile passes, time until the last "
              "config is applied, RSS before and after two bursts.",
              ("--changes", "10000",), ("--changes", "200",)),
    Benchmark("HTTP endpoint", "http_scrape.py",
              "/metrics, /readyz and /healthz latency at 10k and 100k CIDRs (dry-run backend, in process), also "
              "with idle clients and one that never reads its answer.",
              ("--cidrs", "10000,100000"), ("--cidrs", "1000",)),
    Benchmark("Decision model cost", "decision_model.py",
              "What the decision model's keys (masqueradeCIDRs holes, source lists, outputInterfaces) cost against "
              "the same config without them: the pure steps of a pass and of a one-line edit at 10k and 100k CIDRs; "
              "one edit -> the kernel at 100k (nftables, a kept CIDR and a new hole); new flows/s at 1k CIDRs, both "
              "backends.",
              ("--sizes", "10000,100000", "--repeats", "5", "--edit-size", "100000", "--edits", "6",
               "--flow-cidrs", "1000", "--flow-seconds", "2", "--flow-repeats", "3"),
              ("--sizes", "1000", "--repeats", "1", "--edit-size", "1000", "--edits", "2",
               "--flow-cidrs", "100", "--flow-seconds", "0.2", "--flow-repeats", "1"),
              timeout=600),
    Benchmark("Live flows after an apply", "conntrack_reconcile.py",
              "--conntrack-reconcile after an apply that keeps 5% of the destinations of 10k and 100k source-NATed "
              "conntrack entries: dump, select and delete over ctnetlink, udp and all modes; against the conntrack "
              "tool deleting the same entries one process each, and one CIDR-filtered conntrack -D.",
              ("--sizes", "10000,100000", "--tool-sample", "20"), ("--sizes", "1000", "--tool-sample", "3")),
)


@dataclass
class Outcome:
    benchmark: Benchmark
    argv: list[str]
    output: str
    seconds: float
    returncode: int | None  # None: killed after its time limit

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def status(self) -> str:
        if self.returncode is None:
            return "FAILED: still running after its time limit, stopped"
        if self.returncode != 0:
            return f"FAILED: exit status {self.returncode}"
        return "ok"


# --- the machine ------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _command(*argv: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc})"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _field(text: str, key: str, sep: str = ":") -> str | None:
    for line in text.splitlines():
        name, _, value = line.partition(sep)
        if name.strip() == key:
            return value.strip().strip('"')
    return None


def machine() -> list[tuple[str, str]]:
    """(label, value) rows describing the machine and the software measured."""
    cpuinfo = _read("/proc/cpuinfo")
    model = _field(cpuinfo, "model name") or _field(cpuinfo, "Hardware") or platform.processor() or "?"
    mem_kib = int((_field(_read("/proc/meminfo"), "MemTotal") or "0 kB").split()[0])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = [
        ("CPU", f"{model}; {os.cpu_count()} logical CPUs ({usable} usable here)"),
        ("Memory", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("Kernel", " ".join(platform.uname()[i] for i in (0, 2, 3, 4))),
        ("Distribution", _field(_read("/etc/os-release"), "PRETTY_NAME", "=") or "?"),
    ]
    if shutil.which("systemd-detect-virt"):
        rows.append(("Virtualization", _command("systemd-detect-virt")))
    masqd = Path(sys.executable).with_name("masqd")
    commit = _command("git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD")
    rows += [
        ("Python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
        ("iptables", _command("iptables", "--version")),
        ("nft", _command("nft", "--version")),
        ("masqd", f"{_command(str(masqd), '--version')}; commit {commit} (uncommitted changes not shown)"),
        ("Plugins loaded", _third_party_plugins(masqd)),
    ]
    return rows


def _third_party_plugins(masqd: Path) -> str:
    """The entry-point plugins a ``masqd`` started by the benchmarks loads (not the built-ins)."""
    try:
        out = subprocess.run([str(masqd), "plugins"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc})"
    names = [line.split("  ", 1)[0] + " " + line.split("  ", 2)[1] for line in out.splitlines()
             if "  (" in line and "(built-in)" not in line]
    setting = f" (MASQD_PLUGINS={os.environ['MASQD_PLUGINS']!r})" if "MASQD_PLUGINS" in os.environ else ""
    return (", ".join(names) or "none besides the built-ins") + setting


def load_average() -> str:
    return " ".join(_read("/proc/loadavg").split()[:3]) or "?"


# --- running ----------------------------------------------------------------------------------------


def _pump(stream, sink: list[str], prefix: str) -> None:
    for line in stream:
        sink.append(line)
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def run_benchmark(benchmark: Benchmark, quick: bool, timeout: float | None = None) -> Outcome:
    """Run one benchmark to completion (or its time limit), echoing its output as it comes."""
    argv = benchmark.argv(quick)
    limit = timeout if timeout is not None else (QUICK_TIMEOUT_S if quick else benchmark.timeout)
    lines: list[str] = []
    start = time.monotonic()
    # a session of its own: after a timeout, whatever it started can be killed with it
    proc = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines, "  | "), daemon=True)
    reader.start()
    returncode: int | None
    try:
        returncode = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        returncode = None
        lines.append(f"\n[run_all: still running after {limit:g} s: SIGTERM]\n")
        _stop(proc, lines)
    except BaseException:  # Ctrl-C: stop the benchmark too, letting it clean up
        _stop(proc, lines)
        raise
    finally:
        _kill_group(proc.pid)  # whatever the benchmark started and left behind
    reader.join(timeout=10)
    return Outcome(benchmark, argv, "".join(lines), time.monotonic() - start, returncode)


def _stop(proc: subprocess.Popen, lines: list[str]) -> None:
    """SIGTERM (the scripts delete their namespaces on it), then SIGKILL to the whole group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        lines.append(f"[run_all: still running {KILL_GRACE_S:g} s later: SIGKILL to its process group]\n")
        _kill_group(proc.pid)
        proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # nothing of it is left
        pass


def _namespaces() -> set[str]:
    if not shutil.which("ip"):
        return set()
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# --- the report -------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds // 60:.0f} min {seconds % 60:.0f} s"


def _from_root(path: str) -> str:
    """``path`` relative to the repository root when it is inside it."""
    try:
        return str(Path(path).relative_to(HERE.parent))
    except ValueError:
        return path


def _interpreter() -> str:
    """This interpreter as a reader would type it from the repository root (the venv's link,
    not the file it points to)."""
    return _from_root(sys.executable)


def _shown(argv: list[str]) -> str:
    """A command line as a reader would type it from the repository root."""
    return shlex.join([_interpreter(), _from_root(argv[1]), *argv[2:]])


def render_report(outcomes: list[Outcome], *, quick: bool, command: str, started: datetime.datetime,
                  seconds: float, rows: list[tuple[str, str]], load: tuple[str, str], leftovers: set[str]) -> str:
    out = ["# masqd benchmark results", ""]
    mode = ("**Quick smoke run** (`--quick`: small sizes, few repetitions): the numbers are not representative."
            if quick else "Full set.")
    out += [f"Run on {started:%Y-%m-%d %H:%M} UTC, taking {_duration(seconds)}. {mode}", "",
            f"Command: `{command}`", "", "## Machine", "", "| | |", "| --- | --- |"]
    out += [f"| {label} | {value.replace('|', '/')} |" for label, value in rows]
    out += [f"| Load average (1, 5, 15 min) | at the start {load[0]}; at the end {load[1]} |", ""]
    failed = [o for o in outcomes if not o.ok]
    out += ["## Summary", "",
            f"{len(outcomes) - len(failed)} of {len(outcomes)} benchmarks succeeded"
            + (f"; failed: {', '.join(o.benchmark.name for o in failed)}." if failed else "."), "",
            "| benchmark | script | result | time |", "| --- | --- | --- | --- |"]
    out += [f"| {o.benchmark.name} | `{o.benchmark.path().name}` | {o.status()} | {_duration(o.seconds)} |"
            for o in outcomes]
    if leftovers:
        out += ["", f"Network namespaces that appeared during the run and were still there at its end (possibly "
                    f"another user's): {', '.join(sorted(leftovers))}."]
    for o in outcomes:
        out += ["", f"## {o.benchmark.name}", "", f"What it measures: {o.benchmark.what}", "",
                f"Command: `{_shown(o.argv)}`", "", f"Result: {o.status()}, after {_duration(o.seconds)}.", "",
                "```text", o.output.rstrip("\n") or "(no output)", "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None, benchmarks: tuple[Benchmark, ...] = BENCHMARKS) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions: a smoke run")
    parser.add_argument("--output", type=Path, help="the report (default benchmarks/RESULTS.md; with --quick "
                                                     "benchmarks/RESULTS-quick.md)")
    parser.add_argument("--only", help="comma-separated script names (e.g. idle_cost,burst): run only those")
    parser.add_argument("--timeout", type=float, help="seconds each benchmark may run (default: its own limit)")
    parser.add_argument("--list", action="store_true", help="print what would run and exit")
    args = parser.parse_args(argv)
    selected = list(benchmarks)
    if args.only:
        wanted = {name.strip().removesuffix(".py") for name in args.only.split(",") if name.strip()}
        unknown = wanted - {b.path().stem for b in benchmarks}
        if unknown:
            parser.error(f"--only: no benchmark script named {', '.join(sorted(unknown))}")
        selected = [b for b in benchmarks if b.path().stem in wanted]
    if args.list:
        for b in selected:
            limit = QUICK_TIMEOUT_S if args.quick else b.timeout
            print(f"{b.name}: {_shown(b.argv(args.quick))}  (limit {limit:g} s)\n    {b.what}")
        return 0
    output = args.output or HERE / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    command = shlex.join([_interpreter(), "benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    command += " (as root)" if os.geteuid() == 0 else " (not as root)"
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    rows, load_start, namespaces_before = machine(), load_average(), _namespaces()
    outcomes = []
    for i, benchmark in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {benchmark.name}: {_shown(benchmark.argv(args.quick))}", flush=True)
        outcome = run_benchmark(benchmark, args.quick, args.timeout)
        outcomes.append(outcome)
        print(f"[{i}/{len(selected)}] {benchmark.name}: {outcome.status()} ({_duration(outcome.seconds)})\n", flush=True)
    leftovers = _namespaces() - namespaces_before
    report = render_report(outcomes, quick=args.quick, command=command, started=started,
                           seconds=time.monotonic() - clock, rows=rows, load=(load_start, load_average()),
                           leftovers=leftovers)
    output.write_text(report)
    failed = [o.benchmark.name for o in outcomes if not o.ok]
    print(f"wrote {output}; " + (f"FAILED: {', '.join(failed)}" if failed else f"all {len(outcomes)} succeeded"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
