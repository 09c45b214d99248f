"""Helpers shared by the benchmark scripts (imported as ``bench_common`` when a script runs)."""

from __future__ import annotations

import inspect
import signal
import subprocess
import time
from pathlib import Path


def _exit_on_signal(signum, _frame):
    ignore_signals()
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGTERM/SIGINT raise SystemExit, so ``finally`` blocks delete the namespaces created."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)


def ignore_signals() -> None:
    """While cleaning up: a second signal must not cut the cleanup short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cidr_blocks(count: int, offset: int = 0) -> list[str]:
    """``count`` /28 blocks, 32 addresses apart, from ``offset`` addresses into 10.0.0.0/8:
    no two adjacent, so merging them changes nothing (config text only: no traffic is sent)."""
    out = []
    for i in range(count):
        a = (10 << 24) + offset + 32 * i
        out.append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/28")
    return out


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of ``pid``, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of ``pid`` from /proc/PID/status, in MiB: ``VmRSS`` (resident now) or
    ``VmHWM`` (the peak resident size since it started)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


class CallTimer:
    """Wall time per label of the functions :meth:`wrap` instruments. A timed call made inside
    another timed call counts only in the outer one, so the parts never add up to more than
    the whole (used by the in-process breakdowns, which replace masqd functions by timed ones)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._depth = 0

    def wrap(self, owner, name: str, label: str) -> None:
        """Replace ``owner.name`` (a function or method, sync or async) by a timed version."""
        call = getattr(owner, name)
        if inspect.iscoroutinefunction(call):
            async def timed(*args, **kwargs):
                start, outer = self._enter()
                try:
                    return await call(*args, **kwargs)
                finally:
                    self._leave(label, start, outer)
        else:
            def timed(*args, **kwargs):
                start, outer = self._enter()
                try:
                    return call(*args, **kwargs)
                finally:
                    self._leave(label, start, outer)
        setattr(owner, name, timed)

    def _enter(self) -> tuple[float, bool]:
        outer = self._depth == 0
        self._depth += 1
        return time.perf_counter(), outer

    def _leave(self, label: str, start: float, outer: bool) -> None:
        self._depth -= 1
        if outer:
            self.times[label] = self.times.get(label, 0.0) + time.perf_counter() - start


def child_script(body: str) -> str:
    """``body`` as a ``python -c`` script that can import this module (and so :class:`CallTimer`)."""
    return f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" + body


def _stamp_lines(stream, lines) -> None:
    for line in stream:
        lines.put((time.perf_counter(), line))


def stamped_lines(stream):
    """A queue of ``(time.perf_counter() stamp, line)`` for every line of the text ``stream``
    (a child's stdout or stderr), read by a daemon thread as the lines arrive."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_stamp_lines, args=(stream, lines), daemon=True).start()
    return lines


def wait_for_line(lines, needle: str, timeout: float = 10.0) -> float:
    """The ``time.perf_counter()`` stamp of the next line holding ``needle`` (earlier lines are
    consumed); raises ``TimeoutError``."""
    import queue

    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            stamp, line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if needle in line:
            return stamp
    raise TimeoutError(f"no line with {needle!r} within {timeout} s")


def nft_monitor(ns: str):
    """``nft monitor`` in namespace ``ns``, subscribed: ``(process, queue of (stamp, line))``.
    Every rule a write adds is announced as it lands (iptables here is the nf_tables variant)."""

    monitor = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "monitor"], stdout=subprocess.PIPE, text=True)
    lines = stamped_lines(monitor.stdout)
    # subscribed once it reports a table created for that purpose
    while True:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "add", "table", "ip", "probe"], check=True)
        try:
            wait_for_line(lines, "table ip probe", timeout=0.5)
            break
        except TimeoutError:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "ip", "probe"], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "ip", "probe"], check=True)
    return monitor, lines


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p95, max) of ``values``."""
    import statistics

    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], ordered[-1]


def bench_namespace() -> str | None:
    """A fresh network namespace (loopback up) for a benchmark, with SIGTERM/SIGINT turned into
    SystemExit so the caller's ``finally`` deletes it; ``None`` (after saying why) without root
    or nft."""
    import os
    import secrets
    import shutil
    import sys

    if os.geteuid() != 0 or not shutil.which("nft"):
        print("needs root, iproute2 and nftables (it creates its own network namespace)", file=sys.stderr)
        return None
    exit_on_signals()  # so the namespace is always deleted, also under `timeout`
    ns = f"mq-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    return ns


def stop_process(proc) -> None:
    """SIGTERM a process still running, SIGKILL it after 10 s, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def delete_namespace(ns: str) -> None:
    """Delete a namespace :func:`bench_namespace` made (quietly: it may be gone already)."""

    subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)


def wrap_config_stages(timer: CallTimer) -> None:
    """Time the config pipeline every reconcile runs, under the labels both breakdowns print:
    reading the sources (``config read``), parsing a changed one (``config parse``) and
    computing the rule set (``ruleset``)."""
    import masqd.inputs as inputs
    import masqd.reconcile as reconcile

    timer.wrap(inputs, "read_inputs", "config read")
    timer.wrap(inputs.ConfigLoader, "_parse", "config parse")
    timer.wrap(reconcile, "compute_ruleset", "ruleset")
