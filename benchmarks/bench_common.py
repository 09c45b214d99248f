"""Helpers shared by the benchmark scripts (imported as ``bench_common`` when a script runs).

Namespaces, commands run inside them and what ``/proc`` says about a process come from masqd's
test support, shared with the tests: :mod:`masqd.testing.netns`, :mod:`masqd.testing.processes`.
What is here is the benchmarks' own: signals, inputs, timestamped output, and the in-process
breakdowns (:func:`pass_stages`, :func:`sync_pieces`), which time masqd's public entry points
directly.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time

from masqd.testing import netns

# --- signals and preconditions ---------------------------------------------------------------------


def _exit_on_signal(signum, _frame):
    ignore_signals()
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGTERM/SIGINT raise SystemExit, so ``finally`` blocks (and ``with netns.namespace()``)
    delete the namespaces created."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)


def ignore_signals() -> None:
    """While cleaning up: a second signal must not cut the cleanup short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def namespaces_usable() -> bool:
    """Whether this benchmark can create network namespaces here (root, iproute2, nftables and the
    nf_tables variant of iptables, whose writes ``nft monitor`` announces); if not, say why on
    stderr. When it can, SIGTERM/SIGINT are turned into SystemExit (:func:`exit_on_signals`), so
    every namespace is deleted, also under ``timeout``."""
    reason = netns.netns_available()
    if reason is not None:
        print(f"this benchmark creates its own network namespaces: {reason}", file=sys.stderr)
        return False
    exit_on_signals()
    return True


# --- inputs and processes -----------------------------------------------------------------------------


def cidr_blocks(count: int, offset: int = 0) -> list[str]:
    """``count`` /28 blocks, 32 addresses apart, from ``offset`` addresses into 10.0.0.0/8:
    no two adjacent, so merging them changes nothing (config text only: no traffic is sent)."""
    out = []
    for i in range(count):
        a = (10 << 24) + offset + 32 * i
        out.append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/28")
    return out


def stop_process(proc) -> None:
    """SIGTERM a process still running, SIGKILL it after 10 s, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_execed_in_place(pid: int) -> None:
    """``ip netns exec`` execs masqd in place, so the Popen pid is the daemon itself (whose
    ``/proc`` figures the benchmark reads): raise if it is not."""
    from masqd.testing.processes import cmdline

    argv = cmdline(pid) or []
    if not any("masqd" in part for part in argv[:2]):
        raise RuntimeError(f"pid {pid} is not masqd ({argv[:3]}): ip netns exec did not exec in place")


# --- timestamped output ------------------------------------------------------------------------------


def _stamp_lines(stream, lines) -> None:
    for line in stream:
        lines.put((time.perf_counter(), line))
    lines.put((time.perf_counter(), None))


def stamped_lines(stream):
    """A queue of ``(time.perf_counter() stamp, line)`` for every line of the text ``stream``
    (a child's stdout or stderr), read by a daemon thread as the lines arrive; ``(stamp, None)``
    once the stream has ended."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_stamp_lines, args=(stream, lines), daemon=True).start()
    return lines


def wait_for_line(lines, needle, timeout: float = 10.0) -> float:
    """The ``time.perf_counter()`` stamp of the next line holding ``needle`` (a string), or for
    which ``needle(line)`` holds (a function of the line without its newline); earlier lines are
    consumed. Raises ``TimeoutError``, or ``EOFError`` when the stream ends."""
    import queue

    matches = needle if callable(needle) else lambda line: needle in line
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            stamp, line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            raise EOFError(f"the stream ended without a line with {needle!r}")
        if matches(line.rstrip("\n")):
            return stamp
    raise TimeoutError(f"no line with {needle!r} within {timeout} s")


def next_line(lines, deadline: float) -> str:
    """The next line of a :func:`stamped_lines` queue, without its newline. Raises
    ``TimeoutError`` at ``deadline`` (a ``time.monotonic()`` value), ``EOFError`` at its end."""
    import queue

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("timed out")
    try:
        _, line = lines.get(timeout=remaining)
    except queue.Empty:
        raise TimeoutError("timed out") from None
    if line is None:
        raise EOFError("stream closed")
    return line.rstrip("\n")


def nft_monitor(ns: str):
    """``nft monitor`` in namespace ``ns``, subscribed: ``(process, queue of (stamp, line))``.
    Every rule a write adds is announced as it lands (iptables here is the nf_tables variant)."""
    monitor = netns.popen(ns, "nft", "monitor", stdout=subprocess.PIPE, text=True)
    lines = stamped_lines(monitor.stdout)
    # subscribed once it reports a table created for that purpose
    while True:
        netns.nft(ns, "add", "table", "ip", "probe")
        try:
            wait_for_line(lines, "table ip probe", timeout=0.5)
            break
        except TimeoutError:
            netns.nft(ns, "delete", "table", "ip", "probe")
    netns.nft(ns, "delete", "table", "ip", "probe")
    return monitor, lines


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p95, max) of ``values``."""
    import statistics

    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], ordered[-1]


# --- in-process breakdowns: masqd's public entry points, timed directly ------------------------------


async def timed(times: dict[str, float], label: str, call, *args):
    """``call(*args)`` (awaited when it returns an awaitable), its wall time added to ``times[label]``."""
    start = time.perf_counter()
    result = call(*args)
    if inspect.isawaitable(result):
        result = await result
    times[label] = times.get(label, 0.0) + time.perf_counter() - start
    return result


async def pass_stages(agent, times: dict[str, float]):
    """The stages of one reconcile pass of ``agent`` (a :class:`masqd.agent.Agent`), run one after
    the other and each timed: ``config load`` (:meth:`ConfigLoader.load`: read every input, parse
    what changed, merge), ``plan_rules`` (:func:`masqd.reconcile.plan_rules`: the plugins heard,
    the RuleSet) and ``sync`` (the backend's ``sync``: read back, write what differs, verify).
    What :meth:`Reconciler.reconcile` does besides (other backends' leftovers, status, audit,
    logs) is the whole pass minus these. Returns the RuleSet."""
    from masqd.reconcile import plan_rules

    loaded = await timed(times, "config load", agent.loader.load)
    ruleset, _ = await timed(times, "plan_rules", plan_rules, loaded.config, agent.options, agent.plugins)
    await timed(times, "sync", agent.backend.sync, ruleset)
    return ruleset


async def sync_pieces(backend, ruleset, times: dict[str, float], *, writes: bool) -> None:
    """What a sync of ``ruleset`` is made of, each piece called alone through masqd's public
    functions on the same inputs and the kernel as it is: the backend's ``render`` and
    ``read_back``; for nftables ``nft --json list`` (the executor's read-back),
    :func:`desired_state`, :func:`parse_listing`, and when the sync ``writes``,
    :func:`render_replace` and ``nft -f`` (the executor's write); for iptables
    ``iptables-save``, :func:`parse_nat_state`, :func:`plan_restore` (the comparison, and the text
    to write) and, when the sync ``writes``, ``iptables-restore``. With ``writes`` the kernel then
    holds ``ruleset`` (not read back); without, nothing is written. ``backend`` should be one of
    its own (it is probed first, untimed), not the one under test."""
    await backend.probe()
    await timed(times, "render (full text)", backend.render, ruleset)
    await timed(times, "read_back", backend.read_back, ruleset)
    if backend.name == "nftables":
        from masqd.backends.nftables import desired_state, parse_listing, render_replace

        states = []
        for family in ruleset.families:
            text = await timed(times, "nft --json list", backend.executor.list_table, family.family)
            states.append(await timed(times, "desired_state", desired_state, family, ruleset.masquerade))
            if text is not None:
                await timed(times, "parse_listing", parse_listing, text, family.family)
        if writes:
            script = await timed(times, "render_replace", render_replace, states)
            await timed(times, "nft -f (write)", backend.executor.apply, script)
    elif backend.name == "iptables":
        from masqd.backends.iptables import family_rules, parse_nat_state, plan_restore

        for family in ruleset.families:
            text = await timed(times, "iptables-save", backend.executor.save, family.family)
            state = await timed(times, "parse_nat_state", parse_nat_state, text, ruleset.chain)
            desired = family_rules(ruleset, family, bool(backend.random_fully_supported))
            text, _ = await timed(times, "plan_restore", plan_restore, desired, state, ruleset.chain)
            if writes and text is not None:
                await timed(times, "iptables-restore (write)", backend.executor.restore, family.family, text)


def breakdown_text(whole: float, stages: dict[str, float], pieces: dict[str, float] | None = None) -> str:
    """``pass 12.3 = config load 1.0 + plan_rules 0.5 + sync 9.0 + rest 1.8; sync's pieces alone:
    ...`` (milliseconds, largest piece first)."""
    rest = whole - sum(stages.values())
    text = (f"pass {whole * 1000:.1f} = " + " + ".join(f"{name} {v * 1000:.1f}" for name, v in stages.items())
            + f" + rest {rest * 1000:.1f}" + (" (below zero: noise, the pass and its stages are timed apart)"
                                              if rest < 0 else ""))
    if pieces:
        items = sorted(pieces.items(), key=lambda kv: -kv[1])
        text += "; the sync's pieces, each alone: " + ", ".join(f"{name} {v * 1000:.1f}" for name, v in items)
    return text


def run_breakdown(ns: str, script: str, *args: str, timeout: float = 300) -> dict | str:
    """Run ``script --breakdown ARGS`` (a benchmark's own in-process breakdown, which prints JSON)
    in a child interpreter inside namespace ``ns``: its result, or why it failed."""
    try:
        result = netns.run(ns, sys.executable, os.path.abspath(script), "--breakdown", *args, timeout=timeout)
        return json.loads(result.stdout)
    except (netns.CommandError, ValueError) as exc:
        return f"breakdown failed: {str(exc)[-2000:]}"


def breakdown_exit_status(failed: list[str]) -> int:
    """The benchmark's exit status: 1 after naming the points whose in-process breakdown failed
    (a benchmark that no longer measures what it prints must not pass as ok), else 0."""
    if failed:
        print(f"the in-process breakdown failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
