#!/usr/bin/env python3
"""Apply time for 100, 1k, 10k and 100k non-masquerade CIDRs, nftables vs iptables backend.

Everything runs inside network namespaces this script creates (needs root) and always deletes,
also on SIGTERM/SIGINT. The CIDR lists are /28 blocks spaced 32 addresses apart inside
10.0.0.0/8 (set A starts at 10.0.0.0, set B at 10.0.0.16, i.e. in A's gaps), so collapsing merges
nothing and A and B share no element: a replace rewrites every element.

Per backend and size, each repeat uses a fresh, empty namespace and measures:

  run A     wall time of ``masqd run --once --backend X --config A`` (process start, imports,
            config parse, read-back, nft --check, write, read-back verification, removal of the
            other backend's leftovers, exit);
  log A     the ``duration_ms`` of its "rules applied" JSON log event: the same minus process
            start-up and imports (config load + ruleset + read-back + check + write + verify +
            leftovers);
  run B     wall time of a second ``run --once`` with set B: a full replace of an equal-sized set;
  log B     its ``duration_ms``;
  no-op     wall time of a third ``run --once`` with B again (read-back only, nothing written).

Raw kernel tool cost, in another fresh namespace, fed the text ``masqd render --backend X`` prints:

  nftables: ``nft --check -f`` (what masqd runs before applying), ``nft -f`` into the empty
            namespace, ``nft -f`` of B's script over A (the replace), ``nft --json list table``
            (masqd's read-back);
  iptables: ``iptables-restore --noflush`` into the empty namespace, a restore of B over A
            (B's chain text, the already-present POSTROUTING jump left out),
            ``iptables-save -t nat`` (masqd's read-back).

Finally one in-process run per backend and size splits ``log A`` / ``log B`` into components, to
show which one dominates: a child interpreter inside a fresh namespace wraps masqd's functions in
timers (nothing is edited) and calls ``masqd.cli.main(["run", "--once", ...])`` twice, A then B;
then A and B again with the backend object kept from one call to the next ("B kept"), as the
daemon keeps it: the nftables backend remembers the set it wrote, so a changed set is written
without reading the old one back first.

    sudo .venv/bin/python benchmarks/apply_time.py [--sizes 100,1000,10000,100000] [--repeats 3]

Reading the output: every figure is a median over the repeats, in milliseconds, with the spread
(max - min) where it matters. "masqd/raw" is masqd's end-to-end write time over the raw tool's
write of the same text: the price of Python start-up, read-back, check and verification. The
"ipt/nft" ratios are iptables over nftables (above 1: nftables is faster). Each subprocess is
started through ``ip netns exec``, which adds about the "ip netns exec true" baseline printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import child_script, cidr_blocks, exit_on_signals, ignore_signals

BACKENDS = ("nftables", "iptables")
TARGET_100K_NFT_S = 0.5
MASQD = Path(sys.executable).with_name("masqd")

# --- namespaces and cleanup -------------------------------------------------------------------------

_namespaces: list[str] = []


def new_namespace() -> str:
    name = f"mq-bench-{secrets.token_hex(3)}"
    _namespaces.append(name)  # recorded first: a half-created namespace is still deleted
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    return name


def delete_namespace(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], check=False, stderr=subprocess.DEVNULL)
    if name in _namespaces:
        _namespaces.remove(name)


def delete_all_namespaces() -> None:
    for name in list(_namespaces):
        delete_namespace(name)


def in_ns(ns: str, *argv: str, stdin: bytes | None = None, timeout: float = 300) -> tuple[float, subprocess.CompletedProcess]:
    """Run argv inside ``ns``; return (wall seconds, result). Raises on a non-zero exit."""
    start = time.perf_counter()
    result = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        shown = " ".join(a if len(a) < 60 else a[:20] + "..." for a in argv[:6])
        raise RuntimeError(f"{shown} exited {result.returncode}: "
                           f"{result.stderr.decode(errors='replace')[-2000:]}")
    return elapsed, result


# --- inputs -----------------------------------------------------------------------------------------




def config_text(cidrs: list[str]) -> str:
    return (f"cidrLimit: {len(cidrs) + 10}\nresyncInterval: 1h\nnonMasqueradeCIDRs:\n"
            + "".join(f"  - {c}\n" for c in cidrs))


def masqd_log_duration(stderr: bytes) -> float | None:
    """duration_ms of the "rules applied"/"rules updated" JSON event, in seconds."""
    for line in stderr.decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in ("rules applied", "rules updated") and "duration_ms" in event:
            return event["duration_ms"] / 1000
    return None


def rendered(ns: str, backend: str, config: Path) -> str:
    """``masqd render`` output: exactly the script (masqd logs to stderr)."""
    _, result = in_ns(ns, str(MASQD), "render", "--backend", backend, "--config", str(config))
    return result.stdout.decode()


# --- in-process breakdown (runs inside a namespace, in a child interpreter) --------------------------

_BREAKDOWN = r"""
import json, sys, time
import masqd.reconcile as rec, masqd.backends.nftables as nft, masqd.backends.iptables as ipt

from bench_common import CallTimer, wrap_config_stages

backend_name, config_a, config_b = sys.argv[1:4]
timer = CallTimer()
wrap, times = timer.wrap, timer.times

wrap_config_stages(timer)
wrap(rec.Reconciler, "_remove_leftovers", "other backend leftovers")
wrap(nft, "desired_state", "desired model")
wrap(nft, "parse_listing", "parse read-back JSON")
wrap(nft, "render_replace", "render script")
wrap(nft.NftSubprocessExecutor, "list_table", "nft --json list (read-back)")
wrap(nft.NftSubprocessExecutor, "check", "nft --check")
wrap(nft.NftSubprocessExecutor, "apply", "nft -f (write)")
wrap(ipt.IptablesBackend, "probe", "iptables mode/version probe")
wrap(ipt, "parse_nat_state", "parse iptables-save")
wrap(ipt, "plan", "plan+render")
wrap(ipt.SubprocessExecutor, "save", "iptables-save (read-back)")
wrap(ipt.SubprocessExecutor, "restore", "iptables-restore (write)")

import masqd.cli as cli

def one(config):
    # the production path, in-process: what `masqd run --once` does after its imports
    times.clear()
    start = time.perf_counter()
    code = cli.main(["run", "--once", "--backend", backend_name, "--config", config, "--log-format", "json"])
    total = time.perf_counter() - start
    if code != 0:
        sys.exit(f"masqd run --once exited {code}")
    out = dict(times)
    out["(unattributed)"] = total - sum(times.values())
    return {"total": total, "parts": out}

result = {"A": one(config_a), "B": one(config_b)}
# the same replace in a running daemon, which keeps one backend object between reconciles:
# reuse the backend of a run with A for the run with B (nothing else differs from `run --once`)
import masqd.plugins
kept = {}
make = masqd.plugins.Plugins.make_backend
masqd.plugins.Plugins.make_backend = lambda self, name, settings: kept.setdefault(name, make(self, name, settings))
one(config_a)
result["B kept"] = one(config_b)
print(json.dumps(result))
"""


def breakdown(backend: str, config_a: Path, config_b: Path) -> dict | str:
    ns = new_namespace()
    try:
        _, result = in_ns(ns, sys.executable, "-c", child_script(_BREAKDOWN), backend, str(config_a), str(config_b))
        return json.loads(result.stdout)
    except (RuntimeError, ValueError) as exc:
        return f"breakdown unavailable: {exc}"
    finally:
        delete_namespace(ns)


# --- measurements -----------------------------------------------------------------------------------


def measure_masqd(backend: str, config_a: Path, config_b: Path) -> dict[str, float]:
    ns = new_namespace()
    try:
        out = {}
        for key, config in (("A", config_a), ("B", config_b), ("noop", config_b)):
            wall, result = in_ns(ns, str(MASQD), "run", "--once", "--backend", backend, "--config", str(config),
                                 "--log-format", "json")
            out[f"run {key}"] = wall
            logged = masqd_log_duration(result.stderr)
            if key != "noop":
                if logged is None:
                    raise RuntimeError(f"no 'rules applied' event from masqd ({backend}, {key}): {result.stderr[-500:]!r}")
                out[f"log {key}"] = logged
            elif logged is not None:
                out["noop wrote"] = 1.0  # a no-op run must not write; reported below if it did
        return out
    finally:
        delete_namespace(ns)


def measure_raw(backend: str, text_a: str, text_b: str) -> dict[str, float]:
    ns = new_namespace()
    try:
        if backend == "nftables":
            check, _ = in_ns(ns, "nft", "--check", "-f", "-", stdin=text_a.encode())
            write, _ = in_ns(ns, "nft", "-f", "-", stdin=text_a.encode())
            replace, _ = in_ns(ns, "nft", "-f", "-", stdin=text_b.encode())
            read, _ = in_ns(ns, "nft", "--json", "list", "table", "ip", "masqd")
            return {"check": check, "write": write, "replace": replace, "read": read}
        restore = ["iptables-restore", "-w", "10", "--noflush"]
        write, _ = in_ns(ns, *restore, stdin=text_a.encode())
        b_chain_only = "".join(line + "\n" for line in text_b.splitlines() if not line.startswith("-A POSTROUTING"))
        replace, _ = in_ns(ns, *restore, stdin=b_chain_only.encode())
        read, _ = in_ns(ns, "iptables-save", "-t", "nat")
        return {"write": write, "replace": replace, "read": read}
    finally:
        delete_namespace(ns)


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    return max(values) - min(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000,100000", help="comma-separated CIDR counts")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per backend and size (default 3)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--no-breakdown", action="store_true", help="skip the in-process component breakdown")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("iptables-restore"):
        print("needs root, iproute2, nftables and iptables (it creates its own network namespaces)", file=sys.stderr)
        return 2
    exit_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    raw: dict[tuple[str, int], dict[str, list[float]]] = {}
    parts: dict[tuple[str, int], dict | str] = {}
    started = time.perf_counter()
    try:
        ns = new_namespace()
        baseline = med([in_ns(ns, "true")[0] for _ in range(10)])
        startup = med([in_ns(ns, str(MASQD), "--version")[0] for _ in range(3)])
        delete_namespace(ns)
        print(f"nft: {subprocess.run(['nft', '--version'], capture_output=True, text=True).stdout.strip()}; "
              f"iptables: {subprocess.run(['iptables', '--version'], capture_output=True, text=True).stdout.strip()}; "
              f"{os.cpu_count()} CPUs")
        print(f"baselines: ip netns exec true {baseline * 1000:.1f} ms; masqd --version (interpreter + imports) "
              f"{startup * 1000:.1f} ms")
        print()
        for n in sizes:
            config_a, config_b = workdir / f"a-{n}.yaml", workdir / f"b-{n}.yaml"
            config_a.write_text(config_text(cidr_blocks(n, 0)))
            config_b.write_text(config_text(cidr_blocks(n, 16)))
            for backend in backends:
                ns = new_namespace()
                try:
                    text_a = rendered(ns, backend, config_a)
                    text_b = rendered(ns, backend, config_b)
                finally:
                    delete_namespace(ns)
                runs = results.setdefault((backend, n), {})
                raws = raw.setdefault((backend, n), {})
                for _ in range(args.repeats):
                    for key, value in measure_masqd(backend, config_a, config_b).items():
                        runs.setdefault(key, []).append(value)
                    for key, value in measure_raw(backend, text_a, text_b).items():
                        raws.setdefault(key, []).append(value)
                if not args.no_breakdown:
                    parts[(backend, n)] = breakdown(backend, config_a, config_b)
                r = runs
                print(f"  {backend:8s} {size_label(n):>4s}: run A {ms(med(r['run A'])).strip()} ms, "
                      f"log A {ms(med(r['log A'])).strip()} ms, run B {ms(med(r['run B'])).strip()} ms, "
                      f"no-op {ms(med(r['run noop'])).strip()} ms  ({time.perf_counter() - started:.0f} s elapsed)",
                      flush=True)
    finally:
        ignore_signals()
        delete_all_namespaces()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"masqd end to end (median of {args.repeats}, ms; +spread = max - min)")
    print(f"{'backend':9s} {'CIDRs':>6s} {'run A':>9s} {'+spread':>8s} {'log A':>9s} {'run B':>9s} {'log B':>9s} "
          f"{'no-op run':>9s}")
    for (backend, n), r in results.items():
        print(f"{backend:9s} {size_label(n):>6s} {ms(med(r['run A']))} {spread(r['run A']) * 1000:8.1f} "
              f"{ms(med(r['log A']))} {ms(med(r['run B']))} {ms(med(r['log B']))} {ms(med(r['run noop']))}")
        if "noop wrote" in r:
            print(f"    !! the no-op run wrote rules ({backend}, {n})")
    print()
    print("raw kernel tool on masqd's rendered text (median, ms) and masqd's overhead over it")
    print(f"{'backend':9s} {'CIDRs':>6s} {'check':>9s} {'write':>9s} {'replace':>9s} {'read':>9s} "
          f"{'masqd/raw A':>12s} {'masqd/raw B':>12s}")
    for (backend, n), r in raw.items():
        m = results[(backend, n)]
        check = ms(med(r["check"])) if "check" in r else f"{'-':>9s}"
        print(f"{backend:9s} {size_label(n):>6s} {check} {ms(med(r['write']))} {ms(med(r['replace']))} "
              f"{ms(med(r['read']))} {med(m['run A']) / med(r['write']):11.1f}x {med(m['run B']) / med(r['replace']):11.1f}x")

    if set(backends) >= set(BACKENDS):
        print()
        print("ratio iptables / nftables (median; above 1 means nftables is faster)")
        print(f"{'CIDRs':>6s} {'run A':>8s} {'log A':>8s} {'run B':>8s} {'log B':>8s} {'no-op':>8s} {'raw write':>10s}")
        for n in sizes:
            i, f = results[("iptables", n)], results[("nftables", n)]
            ri, rf = raw[("iptables", n)], raw[("nftables", n)]
            print(f"{size_label(n):>6s} " + " ".join(f"{med(i[k]) / med(f[k]):7.2f}x" for k in
                                                     ("run A", "log A", "run B", "log B", "run noop"))
                  + f" {med(ri['write']) / med(rf['write']):9.2f}x")

    if parts:
        print()
        print("where the time goes (one in-process run per point, ms; A = into empty, B = replace as "
              "`run --once` does it, B kept = the same replace in a running daemon, which keeps its backend)")
        for (backend, n), p in parts.items():
            if isinstance(p, str):
                print(f"  {backend} {size_label(n)}: {p}")
                continue
            for key in ("A", "B", "B kept"):
                items = sorted(p[key]["parts"].items(), key=lambda kv: -kv[1])
                text = ", ".join(f"{name} {v * 1000:.1f}" for name, v in items if v * 1000 >= 0.05)
                print(f"  {backend:8s} {size_label(n):>4s} {key}: total {p[key]['total'] * 1000:.1f} = {text}")

    big = 100000
    if ("nftables", big) in results:
        r, rr = results[("nftables", big)], raw[("nftables", big)]
        print()
        met = med(r["run A"]) < TARGET_100K_NFT_S
        print(f"target: 100k CIDRs on nftables in under {TARGET_100K_NFT_S} s: "
              f"{'MET' if met else 'NOT MET'} (end to end {med(r['run A']):.2f} s, logged apply {med(r['log A']):.2f} s, "
              f"replace {med(r['run B']):.2f} s; raw nft -f alone {med(rr['write']):.2f} s, nft --check alone "
              f"{med(rr['check']):.2f} s, one nft --json read-back {med(rr['read']):.2f} s)")
        p = parts.get(("nftables", big))
        if isinstance(p, dict):
            top = sorted(p["A"]["parts"].items(), key=lambda kv: -kv[1])[:3]
            total = p["A"]["total"]
            print("  dominant components of the apply: "
                  + ", ".join(f"{name} {v:.2f} s ({v / total:.0%})" for name, v in top))
            print(f"  plus interpreter start-up and imports, about {startup:.2f} s per `masqd run --once`")
    print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
