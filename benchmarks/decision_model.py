#!/usr/bin/env python3
"""What the decision model (issue 16) costs: per reconcile pass, per edit in the kernel, per new flow.

The decision model's keys (``masqueradeCIDRs``, ``masqueradeSourceCIDRs``,
``nonMasqueradeSourceCIDRs``, ``outputInterfaces``) against the same config without them. Four
configs, each on the same kept CIDRs:

  (a) none of the new keys: the baseline, upstream's rules;
  (b) ``masqueradeCIDRs``: a /32 hole (the range's address + 7) in each of ``--holes`` (50) kept
      ranges, evenly spread over the list, and the metadata example 169.254.169.254/32 (a hole in
      the implicit link-local keep entry): those ranges are flattened into the longest-prefix
      result, the rest is written as listed;
  (c) (b) plus ``masqueradeSourceCIDRs: [10.244.0.0/16]``, ``nonMasqueradeSourceCIDRs:
      [10.244.9.0/24]`` and ``outputInterfaces: [eth0, ens+]``;
  (d) one ``masqueradeCIDRs`` entry that no kept range holds (192.0.2.0/24): it changes no
      decision, so it should cost next to nothing.

Parts (``--parts``, default all three):

  pure   no kernel, no root. Kept CIDRs: ``--sizes`` (10k and 100k) distinct random /24s (fixed
         seed) anywhere in unicast IPv4 outside 0/8, 127/8, 169.254/16 and the documentation
         ranges, in address order (config text only: nothing is sent to them). Per config, the
         median of ``--repeats`` passes (interleaved over the configs) of each step a reconcile
         pass runs on a new config: ``parse_config`` (text to a validated config, no earlier
         parse to reuse), ``compute_ruleset``, the iptables backend's ``render_ruleset``
         (iptables-restore text), the nftables backend's ``render_ruleset`` (the nft script of a
         full replace) and ``desired_state`` of each family (what an nftables sync compares with
         the kernel), and ``gc``: the cyclic garbage collector runs as in the daemon, but its
         time (``gc.callbacks``) is charged to this column, not to the step it falls in (at 100k
         one full collection takes tens of ms, and which step crosses the threshold differs
         between the configs); each pass starts after a collection. In ms and as a ratio to (a),
         then the sum of the medians, the median CPU time of the whole pass and the full
         collections per pass. Then a one-line edit as the daemon computes it, with the previous
         config's parse and rules alive: the config with one more kept /24 parsed with the
         networks of the previous parse (``known``, as the config loader does), ``plan_rules``
         (``compute_ruleset`` and the checks across lists), ``desired_state``, and the
         collector; for (b) also an edit adding one more hole. Those should cost what the change
         costs, not what the total does.
  edit   the kernel, nftables: ``benchmarks/edit_latency.py``'s method (a fresh namespace, an
         independent ``nft monitor``, ``masqd run --backend nftables`` on ``--edit-size`` (100k)
         /28 blocks, atomic replaces of the config, each timed from ``os.replace`` to the
         monitor's line showing the change), two daemons in turn: without the new keys
         (``--edits`` of edit_latency's own edits: one kept /28 in 198.18.0.0/15 added, then
         removed again), and with (c)'s keys (holes in 50 of the /28 blocks), where pairs of
         edits take turns: the same kept-/28 edits (outside every cut range); a new hole (one
         more ``masqueradeCIDRs`` /32 in a kept block no hole cuts yet: the block's element is
         replaced by two intervals) cut, then removed again; one of the holes the daemon
         started with dropped, then put back. ``--edits`` of each kind, all timed in the same
         daemon under the same load. Whether the kernel saw element changes or the table
         written whole is read from the independent monitor (the daemon's log reason says "set
         elements differ" for both).
  flow   new UDP flows per second through the node, ``benchmarks/flow_rate.py``'s method and
         topology (pod -> node -> dest namespaces; a raw-socket sender in the pod, every datagram
         a new flow; the kernel counts what dest receives, masqueraded or not) at
         ``--flow-cidrs`` (1k) kept /28 blocks: the plain config against (c)'s keys on the same
         blocks, with ``outputInterfaces: [eth0, ens+, vdst]`` (vdst: the node's dest-facing link,
         last, so a flow passes the two others first) and the pod 10.244.1.2 inside
         ``masqueradeSourceCIDRs``, so every flow is still masqueraded (the counters say if not,
         and the script fails). Both backends, ``--flow-repeats`` runs of up to ``--flow-seconds``
         each, interleaved (config order alternating).

Namespaces are created by this script (the kernel parts need root) and always deleted, also on
SIGTERM/SIGINT.

    sudo .venv/bin/python benchmarks/decision_model.py [--sizes 10000,100000] [--repeats 5]
        [--edit-size 100000] [--edits 6] [--flow-cidrs 1000] [--flow-seconds 2] [--flow-repeats 3]
        [--holes 50] [--parts pure,edit,flow]

Output: the figures, and ratios to the same without the new keys. Nothing is asserted about them;
the exit status is 0 when every part ran, 1 when one failed (the daemon failed, a change never
reached the kernel, flows were not masqueraded), 2 when the kernel parts cannot run here.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from bench_common import (
    cidr_blocks,
    exit_on_signals,
    ignore_signals,
    namespaces_usable,
    percentiles,
)

from masqd.backends import iptables as iptables_backend
from masqd.backends import nftables as nftables_backend
from masqd.config import AgentOptions, parse_config
from masqd.reconcile import plan_rules
from masqd.ruleset import compute_ruleset
from masqd.testing import netns

OPTIONS = AgentOptions()
METADATA = "169.254.169.254/32"
#: (d): no kept range holds it (the random /24s avoid the documentation ranges).
UNHELD = "192.0.2.0/24"
#: Where a hole is cut in a kept range: its address + this, as a /32.
HOLE_OFFSET = 7
SOURCE_KEYS = "masqueradeSourceCIDRs:\n- 10.244.0.0/16\nnonMasqueradeSourceCIDRs:\n- 10.244.9.0/24\n"
INTERFACES = ("eth0", "ens+")
#: For the flows: the node's dest-facing link (masqd.testing.topology.Topology) must be listed.
FLOW_INTERFACES = ("eth0", "ens+", "vdst")
VARIANTS = ("a", "b", "c", "d")
LABELS = {
    "a": "(a) none of the new keys",
    "b": "(b) masqueradeCIDRs holes",
    "c": "(c) (b) + sources + interfaces",
    "d": "(d) masqueradeCIDRs held by none",
}
#: The random kept /24s avoid these (first 24 bits): link-local, loopback, 0/8, documentation.
_AVOID_OCTETS = (0, 127)
_AVOID_24 = frozenset((192 << 16 | 2, 198 << 16 | 51 << 8 | 100, 203 << 16 | 113))


# --- inputs ------------------------------------------------------------------------------------------


def random_24s(count: int, seed: int = 16) -> list[str]:
    """``count`` distinct random /24s in unicast IPv4 (1.0.0.0 to 223.255.255.0) outside 127/8,
    169.254/16 and the documentation ranges, in address order."""
    rng = random.Random(seed)
    chosen: set[int] = set()
    while len(chosen) < count:
        prefix = rng.randrange(1 << 16, 224 << 16)  # the first 24 bits
        if prefix >> 16 in _AVOID_OCTETS or prefix >> 8 == 169 << 8 | 254 or prefix in _AVOID_24:
            continue
        chosen.add(prefix)
    return [f"{p >> 16}.{(p >> 8) & 255}.{p & 255}.0/24" for p in sorted(chosen)]


def holes_in(kept: list[str], count: int, phase: float = 0.5) -> list[str]:
    """A /32 hole (address + :data:`HOLE_OFFSET`) in each of ``count`` kept ranges, evenly spread
    over the list (``phase``: where in each stretch, 0 to 1, so two calls can pick other ranges)."""
    count = min(count, len(kept))
    step = len(kept) / count
    return [hole(kept[int(step * (i + phase))]) for i in range(count)]


def hole(cidr: str) -> str:
    net = ipaddress.ip_network(cidr)
    return f"{net.network_address + HOLE_OFFSET}/32"


def keys_text(variant: str, holes: list[str], interfaces: tuple[str, ...] = INTERFACES) -> str:
    """The decision-model keys of ``variant`` (``a``: none), as YAML starting at column 0."""
    if variant == "a":
        return ""
    if variant == "d":
        return f"masqueradeCIDRs:\n- {UNHELD}\n"
    text = "masqueradeCIDRs:\n" + "".join(f"- {h}\n" for h in [*holes, METADATA])
    if variant == "c":
        text += SOURCE_KEYS + "outputInterfaces:\n" + "".join(f"- {name}\n" for name in interfaces)
    return text


def config_text(kept: list[str], keys: str) -> str:
    return f"cidrLimit: {len(kept) + 16}\nresyncInterval: 1h\nnonMasqueradeCIDRs:\n" + "".join(
        f"- {c}\n" for c in kept) + keys


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --- part 1: the pure cost ----------------------------------------------------------------------------

PASS_STEPS = ("parse_config", "compute_ruleset", "iptables render", "nft render", "nft desired", "gc")
EDIT_STEPS = ("parse (known)", "plan_rules", "nft desired", "gc")


class _Collector:
    """The cyclic garbage collector's time, measured through ``gc.callbacks``: it runs as in the
    daemon, but a collection is charged to the column ``gc``, not to the step it falls in (at
    100k CIDRs a full collection takes tens of milliseconds, and which step crosses the
    collector's threshold differs between configs)."""

    def __init__(self):
        self.seconds = 0.0  # every collection so far, all generations
        self.full = 0  # full (generation 2) collections so far
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.full += info["generation"] == 2


_COLLECTOR = _Collector()


def _timed(times: dict[str, list[float]], label: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, its wall time less the collector's added to ``times[label]``."""
    collected = _COLLECTOR.seconds
    start = time.perf_counter()
    result = call(*args, **kwargs)
    times.setdefault(label, []).append(time.perf_counter() - start - (_COLLECTOR.seconds - collected))
    return result


class _pass_counted:
    """One pass: its collector time (``gc``), full collections (``full gcs``) and this thread's
    CPU time (``cpu``: steadier than the wall time on a loaded machine, where time spent waiting
    for a CPU is not counted)."""

    def __init__(self, times: dict[str, list[float]]):
        self.times = times

    def __enter__(self):
        self.collected, self.full, self.cpu = _COLLECTOR.seconds, _COLLECTOR.full, time.thread_time()
        return self

    def __exit__(self, *exc):
        self.times.setdefault("cpu", []).append(time.thread_time() - self.cpu)
        self.times.setdefault("gc", []).append(_COLLECTOR.seconds - self.collected)
        self.times.setdefault("full gcs", []).append(_COLLECTOR.full - self.full)
        return False


def pass_once(text: str, times: dict[str, list[float]]):
    """One reconcile pass's pure steps on a config seen for the first time, each timed."""
    with _pass_counted(times):
        parsed = _timed(times, "parse_config", parse_config, text, OPTIONS)
        ruleset = _timed(times, "compute_ruleset", compute_ruleset, parsed.config, OPTIONS)
        _timed(times, "iptables render", iptables_backend.render_ruleset, ruleset)
        _timed(times, "nft render", nftables_backend.render_ruleset, ruleset)
        _timed(times, "nft desired", _desired_states, ruleset)
    return parsed, ruleset


async def edit_once(previous, text: str, times: dict[str, list[float]]):
    """What the daemon computes for an edited text after ``previous`` (its last parse): the parse
    reusing the previous networks, ``plan_rules`` (no plugins) and the nftables desired state."""
    with _pass_counted(times):
        parsed = _timed(times, "parse (known)", parse_config, text, OPTIONS, known=previous.known_networks())
        collected = _COLLECTOR.seconds
        start = time.perf_counter()
        ruleset, _ = await plan_rules(parsed.config, OPTIONS, None)
        times.setdefault("plan_rules", []).append(time.perf_counter() - start - (_COLLECTOR.seconds - collected))
        _timed(times, "nft desired", _desired_states, ruleset)
    return parsed


def _desired_states(ruleset):
    return [nftables_backend.desired_state(f, ruleset.masquerade, ruleset.interfaces) for f in ruleset.families]


_CELL = 16


def _row(label: str, steps: tuple[str, ...], times: dict[str, list[float]], base: dict[str, list[float]] | None,
         width: int = 36) -> str:
    """Median ms of each step, the sum of those medians, and the median CPU time of the whole;
    each with its ratio to ``base`` (the same without the new keys); then the full collections
    per pass (mean)."""
    cells = []
    medians = {step: statistics.median(times[step]) for step in (*steps, "cpu")}
    base_medians = None if base is None else {step: statistics.median(base[step]) for step in (*steps, "cpu")}
    for step in (*steps, "total", "cpu"):
        value = sum(medians[s] for s in steps) if step == "total" else medians[step]
        text = _ms(value)
        if base_medians is not None:
            reference = sum(base_medians[s] for s in steps) if step == "total" else base_medians[step]
            text += f" ({value / reference:.2f}x)" if reference > 0 else ""
        cells.append(f"{text:>{_CELL}s}")
    full = times["full gcs"]
    return f"  {label:{width}s}" + "".join(cells) + f"{sum(full) / len(full):9.1f}"


def _header(steps: tuple[str, ...], width: int = 36) -> str:
    return (f"  {'ms (x the same without the new keys)':{width}s}"
            + "".join(f"{s:>{_CELL}s}" for s in (*steps, "total", "total CPU")) + f"{'full gcs':>9s}")


def pure_part(sizes: list[int], repeats: int, hole_count: int) -> None:
    print(f"1. pure cost (no kernel): kept CIDRs are distinct random /24s in address order; median of {repeats} "
          f"passes per config, interleaved; ms and the ratio to (a)", flush=True)
    for size in sizes:
        kept = random_24s(size + 1)
        kept, edit_extra = kept[:-1], kept[-1]  # the /24 an edit adds (anywhere in the list: it goes last)
        holes = holes_in(kept, hole_count)
        extra_hole = next((h for h in holes_in(kept, hole_count, phase=0.25) if h not in holes), hole(kept[0]))
        texts = {v: config_text(kept, keys_text(v, holes)) for v in VARIANTS}
        times: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
        shapes = {}
        for repeat in range(repeats):
            for variant in (VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]):
                gc.collect()  # untimed: each pass starts from the same collector state
                parsed, ruleset = pass_once(texts[variant], times[variant])
                if repeat == 0:
                    nft_state = nftables_backend.desired_state(ruleset.ipv4, ruleset.masquerade, ruleset.interfaces)
                    shapes[variant] = (f"{len(ruleset.ipv4.nonmasq):,} kept CIDRs written "
                                       f"({len(ruleset.ipv4.listed):,} listed, link-local included), "
                                       f"{len(nft_state.intervals):,} nft set intervals, "
                                       f"{len(iptables_backend.family_rules(ruleset, ruleset.ipv4, True)):,} iptables rules")
                    if parsed.warnings:
                        shapes[variant] += f"; warnings: {[str(w) for w in parsed.warnings[:3]]}"
                del parsed, ruleset
        print(f"\n  {size:,} kept CIDRs, a pass on a new config:")
        print(_header(PASS_STEPS))
        for variant in VARIANTS:
            print(_row(LABELS[variant], PASS_STEPS, times[variant], None if variant == "a" else times["a"]))
        for variant in VARIANTS:
            print(f"    {variant}: {shapes[variant]}")

        # a one-line edit, as the daemon computes it
        edits = {v: (texts[v], config_text([*kept, edit_extra], keys_text(v, holes))) for v in VARIANTS}
        edits["b+hole"] = (texts["b"], config_text(kept, keys_text("b", [*holes, extra_hole])))
        edit_times: dict[str, dict[str, list[float]]] = {v: {} for v in edits}
        anyio.run(_run_edits, edits, edit_times, repeats)
        print(f"\n  {size:,} kept CIDRs, a one-line edit as the daemon computes it (the previous parse's networks "
              f"reused; plan_rules without plugins):")
        print(_header(EDIT_STEPS))
        for variant in VARIANTS:
            print(_row(f"{LABELS[variant][:3]} add one kept /24", EDIT_STEPS, edit_times[variant],
                       None if variant == "a" else edit_times["a"]))
        print(_row(f"(b) add one more hole ({extra_hole})", EDIT_STEPS, edit_times["b+hole"], edit_times["a"]))
        gc.collect()


async def _run_edits(edits: dict[str, tuple[str, str]], times: dict[str, dict[str, list[float]]],
                     repeats: int) -> None:
    """:func:`edit_once` of each ``(before, after)`` pair of texts, ``repeats`` times, interleaved.
    Before each, untimed, what the daemon holds when an edit arrives: the parse of ``before``
    and the rules computed from it (one config's, as in the daemon), then a collection, so each
    pass starts from the same collector state."""
    for repeat in range(repeats):
        for variant in (list(edits) if repeat % 2 == 0 else list(edits)[::-1]):
            before, after = edits[variant]
            previous = parse_config(before, OPTIONS)
            applied = compute_ruleset(previous.config, OPTIONS)
            gc.collect()
            await edit_once(previous, after, times[variant])
            del previous, applied


# --- part 2: edits in the kernel ----------------------------------------------------------------------


def edit_part(size: int, edits: int, hole_count: int) -> bool:
    import edit_latency

    masqd = Path(sys.executable).with_name("masqd")
    base = cidr_blocks(size)  # edit_latency's kept /28 blocks
    holes = holes_in(base, hole_count)
    keys = keys_text("c", holes)
    keys_base_text = edit_latency.config_text(base, keys)
    # the new holes: in blocks between the cut ones (so outside every cut range)
    new_holes = [h for h in holes_in(base, hole_count, phase=0.25) if h not in holes]
    if not new_holes:
        print(f"FAILED: {size} blocks are too few for {hole_count} holes and new ones beside them", file=sys.stderr)
        return False
    def first_element(line: str) -> bool:
        return line.startswith(f"add element {edit_latency.SET} ")

    rewritten: set[int] = set()  # the edits the kernel saw as masqd's table written whole

    def watched(i: int, predicate):
        """``predicate``, also noting whether the lines before the change replace the whole table
        (``delete table ip masqd``): the daemon's log says "set elements differ" either way."""
        def check(line: str) -> bool:
            if line.split()[:4] == ["delete", "table", "ip", "masqd"]:
                rewritten.add(i)
            return predicate(line)
        return check

    def new_hole_edit(k: int):
        """Alternately cut a new hole (one more masqueradeCIDRs /32 in a block no hole cuts yet)
        and remove it again: the monitor shows the block's element replaced (cut) or back (uncut)."""
        new = new_holes[(k // 2) % len(new_holes)]
        if k % 2 == 0:
            return "cut", new, edit_latency.config_text(base, keys_text("c", [*holes, new])), first_element
        block = str(ipaddress.ip_network(f"{new.split('/')[0]}/28", strict=False))
        return "uncut", new, keys_base_text, lambda line: first_element(line) and edit_latency._names(line, block)

    def start_hole_edit(k: int):
        """Alternately remove one of the holes the daemon started with and put it back."""
        old = holes[(k // 2) % len(holes)]
        if k % 2 == 0:
            return "drop", old, edit_latency.config_text(base, keys_text("c", [h for h in holes if h != old])), \
                first_element
        return "redo", old, keys_base_text, first_element

    def mixed_edit(i: int):
        """Pairs of edits, in turn edit_latency's own (add a kept /28, remove it), a new hole's
        (cut, uncut) and a start-up hole's (drop, redo), so the kinds are timed in the same daemon
        at the same time."""
        k = i // 6 * 2 + i % 2
        kind, cidr, text, predicate = (
            edit_latency.kept_cidr_edit("nftables", base, keys_base_text, keys, k),
            new_hole_edit(k), start_hole_edit(k))[i // 2 % 3]
        return kind, cidr, text, watched(i, predicate)

    print(f"\n2. one edit -> the kernel, nftables, daemon running on {size:,} kept /28 blocks "
          f"(edit_latency.py's method: os.replace -> the nft monitor line)", flush=True)
    print("  without the new keys, add/remove one kept /28 (edit_latency.py's edits):", flush=True)
    points = []
    try:
        points.append(edit_latency.measure(masqd, "nftables", size, edits))
        print(f"  with (c)'s keys ({len(holes)} holes + {METADATA}, sources, interfaces), pairs of edits in turn: add/remove "
              f"one kept /28 (outside every cut range); cut/uncut a new hole (one more masqueradeCIDRs /32 in a kept block "
              f"no hole cuts); drop/redo one of the holes the daemon started with:", flush=True)
        points.append(edit_latency.measure(masqd, "nftables", size, 3 * edits, keys, mixed_edit))
    except (edit_latency.BenchmarkFailure, netns.CommandError, subprocess.SubprocessError, OSError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return False
    plain, with_keys = points
    numbered = list(enumerate(with_keys.edits))
    rows = (
        ("no new keys: add/remove a kept /28", [(None, e) for e in plain.edits]),
        ("(c)'s keys: add/remove a kept /28", [(i, e) for i, e in numbered if e.kind in ("add", "remove")]),
        ("(c)'s keys: cut/uncut a new hole", [(i, e) for i, e in numbered if e.kind in ("cut", "uncut")]),
        ("(c)'s keys: drop a start-up hole", [(i, e) for i, e in numbered if e.kind == "drop"]),
        ("(c)'s keys: redo it", [(i, e) for i, e in numbered if e.kind == "redo"]),
    )
    base_latency = statistics.median(e.latency_ms for _, e in rows[0][1])
    base_pass = _median_pass([e for _, e in rows[0][1]])
    print(f"\n  summary, {size:,} kept CIDRs (ms; x the first row; written: as the independent monitor saw it, element "
          f"changes or the table replaced whole; the lines above say 'in place' from the daemon's log reason, "
          f"'set elements differ', which it also gives when it falls back to writing the table whole):")
    print(f"    {'':38s} {'edit -> kernel':>16s} {'p95':>7s} {'max':>7s} {'daemon pass':>16s}  written")
    for title, chosen in rows:
        if not chosen:
            continue
        edits_ = [e for _, e in chosen]
        median, p95, worst = percentiles([e.latency_ms for e in edits_])
        passes = _median_pass(edits_)
        whole = sum(1 for i, _ in chosen if i in rewritten)
        how = ("elements" if not whole else "table whole" if whole == len(chosen)
               else f"table whole in {whole}, elements in {len(chosen) - whole}")
        pass_text = _opt(passes) + (f" ({passes / base_pass:.2f}x)" if passes and base_pass else "")
        print(f"    {title:38s} {f'{median:.1f} ({median / base_latency:.2f}x)':>16s} {p95:7.1f} {worst:7.1f} "
              f"{pass_text:>16s}  {how} ({len(chosen)} edits)")
    print(f"    start-up to rules applied: {plain.to_rules_s:.2f} s without the keys, {with_keys.to_rules_s:.2f} s with; "
          f"RSS after the edits {plain.rss_mib:.0f} / {with_keys.rss_mib:.0f} MiB")
    return True


def _median_pass(edits: list) -> float | None:
    passes = [e.pass_ms for e in edits if e.pass_ms is not None]
    return statistics.median(passes) if passes else None


def _opt(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


# --- part 3: new flows through the node ------------------------------------------------------------


def flow_part(cidrs: int, seconds: float, repeats: int, hole_count: int) -> bool:
    import flow_rate

    kept = cidr_blocks(cidrs)  # flow_rate's kept /28 blocks
    holes = holes_in(kept, hole_count)
    workdir = Path(tempfile.mkdtemp(prefix="masqd-dm-flows-"))
    configs = {
        "plain": workdir / "plain.yaml",
        "keys": workdir / "keys.yaml",
    }
    configs["plain"].write_text(config_text(kept, ""))
    configs["keys"].write_text(config_text(kept, keys_text("c", holes, FLOW_INTERFACES)))
    label = {"plain": "plain", "keys": "(c) keys"}
    rates: dict[tuple[str, str], list[float]] = {}
    costs: dict[tuple[str, str], list[float]] = {}
    problems: list[str] = []
    print(f"\n3. new UDP flows/s through the node (flow_rate.py's method), {cidrs:,} kept /28 blocks: plain against (c)'s "
          f"keys ({len(holes)} holes + {METADATA}; sources 10.244.0.0/16 minus 10.244.9.0/24; outputInterfaces "
          f"{list(FLOW_INTERFACES)}); {repeats} runs of up to {seconds:g} s each, interleaved", flush=True)
    topo = None
    try:
        topo = flow_rate.Topology()
        conntrack_max = int(flow_rate.run(topo.node, "cat", "/proc/sys/net/netfilter/nf_conntrack_max"))
        limit = int(conntrack_max * 0.9)
        dport = flow_rate.FIRST_PORT
        for repeat in range(repeats):
            order = ("plain", "keys") if repeat % 2 == 0 else ("keys", "plain")
            for variant in order:
                for backend in flow_rate.BACKENDS:
                    flow_rate.apply_masqd(topo, backend, configs[variant])
                    if repeat == 0:
                        print(f"    {backend} {label[variant]}: {_rule_count(topo, backend)}", flush=True)
                    run, dport = flow_rate.measure_run(topo, 1, seconds, limit, dport)
                    rates.setdefault((backend, variant), []).append(run.rate)
                    costs.setdefault((backend, variant), []).append(run.cpu / run.sent * 1e6)
                    print(f"  {backend:8s} {label[variant]:9s} run {repeat + 1}: {run.rate:10,.0f} flows/s, "
                          f"{run.cpu / run.sent * 1e6:5.2f} CPU us/flow, {run.elapsed:.2f} s (sent {run.sent:,}, "
                          f"masqueraded {run.got['masqueraded']:,}, NOT masqueraded {run.got['other']:,}, new conntrack "
                          f"entries {run.got['new_flows']:,}" + (f", send errors {run.errors:,}" if run.errors else "")
                          + (f", conntrack {run.trouble}" if run.trouble else "") + ")", flush=True)
                    if run.got["other"]:
                        problems.append(f"{backend} {label[variant]}: {run.got['other']:,} datagrams reached dest "
                                        f"NOT masqueraded")
                    if run.got["new_flows"] < run.got["masqueraded"]:
                        problems.append(f"{backend} {label[variant]}: fewer new conntrack entries than datagrams")
                    if dport > 65535 - 100:
                        raise RuntimeError("destination ports exhausted: fewer runs or shorter ones")
    except (netns.CommandError, subprocess.SubprocessError, OSError, RuntimeError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return False
    finally:
        ignore_signals()
        if topo is not None:
            topo.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        exit_on_signals()
    print(f"\n  {'backend':9s} {'config':9s} {'flows/s':>10s} {'min':>10s} {'max':>10s} {'us/flow':>8s} {'min':>6s} "
          f"{'max':>6s}")
    for backend in flow_rate.BACKENDS:
        for variant in ("plain", "keys"):
            r, c = rates[(backend, variant)], costs[(backend, variant)]
            print(f"  {backend:9s} {label[variant]:9s} {statistics.median(r):10,.0f} {min(r):10,.0f} {max(r):10,.0f} "
                  f"{statistics.median(c):8.2f} {min(c):6.2f} {max(c):6.2f}")
    print()
    for backend in flow_rate.BACKENDS:
        plain_r, keys_r = rates[(backend, "plain")], rates[(backend, "keys")]
        plain_c, keys_c = costs[(backend, "plain")], costs[(backend, "keys")]
        noise = max(flow_rate.rel_spread(plain_c), flow_rate.rel_spread(keys_c))
        print(f"  {backend}: (c)'s keys / plain: flows/s {statistics.median(keys_r) / statistics.median(plain_r):.3f}x, "
              f"CPU per flow {statistics.median(keys_c) / statistics.median(plain_c):.3f}x "
              f"(run-to-run spread of CPU per flow up to {noise:.0f}%)")
    for problem in problems:
        print(f"  !! {problem}")
    return not problems


def _rule_count(topo, backend: str) -> str:
    if backend == "nftables":
        out = netns.run(topo.node, "nft", "list", "chain", "ip", "masqd", "nat").stdout
        rules = [line.strip() for line in out.splitlines()
                 if line.strip() and not line.strip().startswith(("table", "chain", "type", "comment", "}"))]
        elements = netns.set_intervals(topo.node, 4) or ()
        return f"{len(elements):,} set elements; chain: " + " | ".join(rules)
    lines = netns.chain_lines(topo.node)
    return f"{len(lines):,} chain rules, last {len(lines) - sum('-j RETURN' in line for line in lines)} not RETURN"


# --- main ---------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"positive counts, got {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_ints, default=[10_000, 100_000],
                        help="pure part: kept CIDR counts (default 10000,100000)")
    parser.add_argument("--repeats", type=int, default=5, help="pure part: passes per config (default 5)")
    parser.add_argument("--holes", type=int, default=50, help="kept ranges (b) cuts a hole in (default 50)")
    parser.add_argument("--edit-size", type=int, default=100_000, help="edit part: kept /28 blocks (default 100000)")
    parser.add_argument("--edits", type=int, default=6, help="edit part: edits per daemon, alternately adding and "
                                                             "removing (default 6)")
    parser.add_argument("--flow-cidrs", type=int, default=1000, help="flow part: kept /28 blocks (default 1000)")
    parser.add_argument("--flow-seconds", type=float, default=2.0, help="flow part: seconds per run (default 2)")
    parser.add_argument("--flow-repeats", type=int, default=3, help="flow part: runs per point (default 3)")
    parser.add_argument("--parts", default="pure,edit,flow", help="which parts, comma-separated (default all)")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"pure", "edit", "flow"} or not parts:
        parser.error(f"--parts: some of pure, edit, flow; got {args.parts!r}")
    if min(args.repeats, args.edits, args.flow_repeats, args.holes, args.edit_size, args.flow_cidrs) < 1:
        parser.error("counts must be at least 1")
    started = time.perf_counter()
    print(f"load average at the start: {load_average()} (the figures are wall-clock; other load inflates them)",
          flush=True)
    kernel = parts & {"edit", "flow"}
    if kernel and not namespaces_usable():
        kernel = set()
        failed_kernel = True
    else:
        failed_kernel = False
    ok = True
    if "pure" in parts:
        pure_part(args.sizes, args.repeats, args.holes)
    if "edit" in kernel:
        ok = edit_part(args.edit_size, args.edits, args.holes) and ok
    if "flow" in kernel:
        ok = flow_part(args.flow_cidrs, args.flow_seconds, args.flow_repeats, args.holes) and ok
    print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s; load average at the end: {load_average()})")
    if failed_kernel:
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
