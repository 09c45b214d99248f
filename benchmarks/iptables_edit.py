#!/usr/bin/env python3
"""A one-line config edit at 1k and 10k CIDRs, iptables backend, against ``iptables-restore`` of the chain.

The target (issue 15): in the daemon's situation, a sync of a config that differs from the last
applied one by one CIDR costs no more than ``iptables-restore --noflush`` of the same chain into a
fresh namespace, plus 50 ms.

Everything runs inside network namespaces this script creates (needs root) and always deletes,
also on SIGTERM/SIGINT. The CIDRs are /28 blocks 32 addresses apart in 10.0.0.0/8 (config A);
config B is A with its middle block replaced by one from A's gaps: one rule deleted, one added.
Per iptables variant (``--modes``) and size:

  baseline  a child interpreter inside a fresh namespace times ``iptables-restore -w 10 --noflush``
            fed the text ``IptablesBackend.render`` gives for A (the chain and the POSTROUTING
            jump), run the way masqd runs its tools (``masqd.backends.tools.run_tool``), so both
            sides pay the same process start; then the same chain text again over the chain now
            there (a whole-chain rewrite, as upstream does at every resync); repeated in a fresh
            namespace each time;
  edit      a child interpreter inside another fresh namespace makes the backend the daemon makes
            (``Plugins.make_backend``), syncs A once (the first write), then times
            ``backend.sync`` of B, A, B... with that one backend object kept, as the daemon keeps
            it: each sync is a one-line edit from what the backend wrote last. The rule sets are
            computed before each timed sync (config parse and planning are not the backend's:
            see the whole-pass line). The tool runs inside those syncs are timed through a proxy
            around the backend's executor, so a sync splits into ``iptables-save`` (read-back,
            and any verification read-back), ``iptables-restore``, and Python (the rest);
  pieces    masqd's pure steps, each called alone on the same inputs: ``parse_nat_state`` of the
            read-back, ``RenderedRules.rules`` (the desired chain as a sync renders it, only the
            new network formatted), ``family_rules`` (every line formatted, for comparison),
            ``plan_edit`` (what the edit writes) and ``plan_restore`` (the in-sync check, and a
            whole-chain plan);
  no-op     ``backend.sync`` of the config the kernel already holds (a resync tick);
  pass      for context, ``Reconciler.reconcile()`` of an agent built as the daemon builds it,
            its config file rewritten between passes (config load and planning included).

    sudo .venv/bin/python benchmarks/iptables_edit.py [--sizes 1000,10000] [--repeats 5] [--modes nft,legacy]

Every figure is a median over the repeats, in milliseconds. The summary gives, per point, the
target (baseline + 50 ms), the edit, their difference and the ratio edit / baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_common import breakdown_exit_status, cidr_blocks, ignore_signals, namespaces_usable, run_breakdown

from masqd.testing import netns

MODES = ("nft", "legacy")
#: The target's allowance over the baseline restore, in seconds.
ALLOWANCE_S = 0.050


def config_text(cidrs: list[str]) -> str:
    return (f"cidrLimit: {len(cidrs) + 10}\nresyncInterval: 1h\nnonMasqueradeCIDRs:\n"
            + "".join(f"  - {c}\n" for c in cidrs))


def configs(n: int) -> tuple[str, str]:
    """Config A (``n`` blocks) and B: A with its middle block replaced by one from A's gaps."""
    a = cidr_blocks(n)
    b = list(a)
    b[n // 2] = cidr_blocks(1, 16 + 32 * (n // 2))[0]
    return config_text(a), config_text(b)


# --- the children (each inside a fresh namespace) -----------------------------------------------------


class _TimedExecutor:
    """The backend's executor, each call's wall time recorded as ``(what, seconds)``."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[str, float]] = []

    async def _timed(self, what: str, call, *args):
        start = time.perf_counter()
        try:
            return await call(*args)
        finally:
            self.calls.append((what, time.perf_counter() - start))

    async def save(self, family: int) -> str:
        return await self._timed("iptables-save", self.inner.save, family)

    async def restore(self, family: int, text: str) -> None:
        return await self._timed("iptables-restore", self.inner.restore, family, text)

    async def version(self, family: int) -> str:
        return await self._timed("version", self.inner.version, family)


def _options_and_plugins():
    import logging

    from masqd.config import AgentOptions
    from masqd.logs import configure_logging
    from masqd.plugins import Plugins

    configure_logging(logging.WARNING, "json")  # logs to stderr: stdout carries the JSON result
    return AgentOptions(), Plugins.load()


async def _ruleset(options, plugins, text: str):
    """The RuleSet of config ``text``, as a reconcile pass computes it."""
    from masqd.config import parse_config
    from masqd.reconcile import plan_rules

    ruleset, _ = await plan_rules(parse_config(text, options).config, options, plugins)
    return ruleset


async def _baseline_child(mode: str, config_a: str) -> dict:
    """``iptables-restore`` of A's chain (and jump) into this empty namespace, then again over it."""
    from masqd.backends.iptables import IptablesBackend
    from masqd.backends.iptables_mode import binaries_for
    from masqd.backends.tools import run_tool

    options, plugins = _options_and_plugins()
    ruleset = await _ruleset(options, plugins, Path(config_a).read_text())
    text = IptablesBackend(random_fully_supported=True).render(ruleset).split("\n", 1)[1]  # no "# tool" line
    chain_only = "".join(line + "\n" for line in text.splitlines() if not line.startswith("-A POSTROUTING"))
    command = [binaries_for(mode)[4].restore, "-w", "10", "--noflush"]
    out = {}
    for key, script in (("fresh", text), ("over itself", chain_only)):
        start = time.perf_counter()
        result = await run_tool(command, script.encode())
        out[key] = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.decode(errors='replace')}")
    return out


async def _edit_child(mode: str, config_a: str, config_b: str, repeats: str) -> dict:
    """The kept backend's one-line edits, their tool runs, the pure pieces, a no-op, whole passes."""
    from masqd.agent import build_agent
    from masqd.backends.base import BackendSettings
    from masqd.backends.iptables import RenderedRules, family_rules, parse_nat_state, plan_edit, plan_restore

    options, plugins = _options_and_plugins()
    texts = [Path(config_a).read_text(), Path(config_b).read_text()]
    backend = plugins.make_backend("iptables", BackendSettings(options, iptables_mode=mode))
    await backend.probe()
    timed_executor = backend.executor = _TimedExecutor(backend.executor)
    first = await backend.sync(await _ruleset(options, plugins, texts[0]))
    assert first.changed, "the first sync wrote nothing"
    edits = []
    for index in range(int(repeats)):
        ruleset = await _ruleset(options, plugins, texts[(index + 1) % 2])  # B, A, B, ...
        timed_executor.calls.clear()
        start = time.perf_counter()
        result = await backend.sync(ruleset)
        whole = time.perf_counter() - start
        assert result.changed, "an edit wrote nothing"
        edits.append({"sync": whole, "tools": list(timed_executor.calls)})
    # the pure pieces, each alone, on the state the kernel now holds and the other config
    saved = await timed_executor.inner.save(4)
    pieces: dict[str, list[float]] = {}

    def piece(label, call, *args):
        start = time.perf_counter()
        value = call(*args)
        pieces.setdefault(label, []).append(time.perf_counter() - start)
        return value

    supported = bool(backend.random_fully_supported)
    for _ in range(int(repeats)):
        held = await _ruleset(options, plugins, texts[int(repeats) % 2])  # what the kernel holds
        other = await _ruleset(options, plugins, texts[(int(repeats) + 1) % 2])  # the next edit
        state = piece("parse_nat_state", parse_nat_state, saved, ruleset.chain)
        rendered = RenderedRules()
        rendered.rules(held, held.ipv4, supported)
        desired = piece("RenderedRules (as a sync renders: one network new)", rendered.rules, other, other.ipv4,
                        supported)
        piece("family_rules (every line rendered)", family_rules, other, other.ipv4, supported)
        piece("plan_edit", plan_edit, state.rules, desired, ruleset.chain)
        piece("plan_restore (whole chain)", plan_restore, desired, state, ruleset.chain)
    noop = []
    for _ in range(int(repeats)):
        ruleset = await _ruleset(options, plugins, texts[int(repeats) % 2])
        start = time.perf_counter()
        result = await backend.sync(ruleset)
        noop.append(time.perf_counter() - start)
        assert not result.changed, "a no-op sync wrote"
    # whole passes of an agent built as the daemon builds it, its config file rewritten in between
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "config.yaml"
        path.write_text(texts[0])
        agent = build_agent(options, backend=backend, config=str(path), plugins=plugins, once=True)
        await agent.reconciler.reconcile()
        passes = []
        for index in range(int(repeats)):
            path.write_text(texts[(index + 1) % 2])
            start = time.perf_counter()
            await agent.reconciler.reconcile()
            passes.append(time.perf_counter() - start)
    return {"edits": edits, "pieces": pieces, "noop": noop, "passes": passes}


# --- the parent ----------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def tool_split(edits: list[dict]) -> str:
    """``iptables-save 78.0 + iptables-restore 85.1 + Python 17.0`` (medians over the edits), and
    the tool runs each edit made, in order."""
    totals: dict[str, list[float]] = {}
    for edit in edits:
        per: dict[str, float] = {}
        for what, seconds in edit["tools"]:
            per[what] = per.get(what, 0.0) + seconds
        per["Python (the rest)"] = edit["sync"] - sum(seconds for _, seconds in edit["tools"])
        for what, seconds in per.items():
            totals.setdefault(what, []).append(seconds)
    runs = sorted({" -> ".join(what for what, _ in edit["tools"]) for edit in edits})
    return (" + ".join(f"{what} {ms(med(values))}" for what, values in totals.items())
            + f"; tool runs per edit: {' | '.join(runs)}")


def measure(mode: str, n: int, repeats: int, workdir: Path) -> dict | str:
    config_a, config_b = workdir / f"a-{n}.yaml", workdir / f"b-{n}.yaml"
    text_a, text_b = configs(n)
    config_a.write_text(text_a)
    config_b.write_text(text_b)
    baseline: dict[str, list[float]] = {}
    for _ in range(repeats):
        with netns.namespace("bench") as ns:
            result = run_breakdown(ns, __file__, "baseline", mode, str(config_a))
        if isinstance(result, str):
            return result
        for key, value in result.items():
            baseline.setdefault(key, []).append(value)
    with netns.namespace("bench") as ns:
        edit = run_breakdown(ns, __file__, "edit", mode, str(config_a), str(config_b), str(repeats), timeout=900)
    if isinstance(edit, str):
        return edit
    return {"baseline": baseline, **edit}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated CIDR counts")
    parser.add_argument("--repeats", type=int, default=5, help="edits (and baseline restores) per point")
    parser.add_argument("--modes", default=",".join(MODES), help="iptables variants: nft, legacy")
    parser.add_argument("--breakdown", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.breakdown:  # a child, inside its namespace
        import anyio

        child = {"baseline": _baseline_child, "edit": _edit_child}[args.breakdown[0]]
        print(json.dumps(anyio.run(child, *args.breakdown[1:])))
        return 0
    if not namespaces_usable():
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    results: dict[tuple[str, int], dict | str] = {}
    started = time.perf_counter()
    try:
        for mode in modes:
            for n in sizes:
                results[(mode, n)] = r = measure(mode, n, args.repeats, workdir)
                label = f"iptables-{mode} {size_label(n)} CIDRs"
                if isinstance(r, str):
                    print(f"{label}: {r}\n", flush=True)
                    continue
                base, base_over = med(r["baseline"]["fresh"]), med(r["baseline"]["over itself"])
                edit = med([e["sync"] for e in r["edits"]])
                print(f"{label} (median of {args.repeats}, ms; {time.perf_counter() - started:.0f} s elapsed)")
                print(f"  baseline: iptables-restore --noflush of the chain into a fresh namespace {ms(base)}; "
                      f"the same chain again over itself {ms(base_over)}")
                print(f"  masqd one-line edit, backend.sync with the backend kept: {ms(edit)} "
                      f"(min {ms(min(e['sync'] for e in r['edits']))}, max {ms(max(e['sync'] for e in r['edits']))})")
                print(f"    = {tool_split(r['edits'])}")
                print("    pure pieces, each alone: " + ", ".join(f"{k} {ms(med(v))}" for k, v in r["pieces"].items()))
                print(f"  no-op sync (a resync tick, nothing to write): {ms(med(r['noop']))}")
                print(f"  whole reconcile pass with the edited config file (config load and planning included): "
                      f"{ms(med(r['passes']))}")
                print(flush=True)
    finally:
        ignore_signals()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    print(f"target: one-line edit <= iptables-restore of the chain + {ALLOWANCE_S * 1000:.0f} ms")
    print(f"{'variant':15s} {'CIDRs':>6s} {'restore':>9s} {'target':>9s} {'edit':>9s} {'edit-restore':>13s} "
          f"{'edit/restore':>13s}  verdict")
    for (mode, n), r in results.items():
        if isinstance(r, str):
            print(f"{'iptables-' + mode:15s} {size_label(n):>6s}  (failed)")
            continue
        base = med(r["baseline"]["fresh"])
        edit = med([e["sync"] for e in r["edits"]])
        verdict = "MET" if edit <= base + ALLOWANCE_S else "NOT MET"
        print(f"{'iptables-' + mode:15s} {size_label(n):>6s} {ms(base):>9s} {ms(base + ALLOWANCE_S):>9s} "
              f"{ms(edit):>9s} {(edit - base) * 1000:+13.1f} {edit / base:12.2f}x  {verdict}")
    print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)")
    return breakdown_exit_status([f"iptables-{m} {size_label(n)}" for (m, n), r in results.items() if isinstance(r, str)])


if __name__ == "__main__":
    sys.exit(main())
