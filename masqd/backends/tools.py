"""Running the kernel tools (iptables-*, nft): the one place backends start processes.

Every command runs under a deadline (:data:`TOOL_TIMEOUT_SECONDS`). A tool that hangs (waiting on
a wedged kernel lock, an unreachable filesystem it was loaded from, a netlink call that never
returns) would otherwise stall the reconciler for good: the sync is shielded from cancellation,
so only ``/healthz`` turning 503 and the kubelet restarting the pod would end it, with no line
in the log saying why. Instead the tool is killed (SIGKILL, its whole process group, so a wrapper
script's children go too), reaped, and :class:`~masqd.errors.ToolTimeoutError` is raised; the
reconciler handles it like any failed sync (logged, counted, ``/readyz`` not ready, retried with
back-off).

Killing a write half-way is safe: ``iptables-restore`` commits each table in one step at
``COMMIT`` (legacy: one ``IPT_SO_SET_REPLACE`` of the whole table; nft variant: one nf_tables
transaction), and ``nft -f`` sends its whole script as one netlink batch that the kernel applies
all or nothing. A killed write therefore leaves the kernel with the old rules or the new ones,
never a mix; the next sync reads back which and writes again when needed.

The input is never fed through a pipe. If masqd were killed (OOM, ``kill -9``, a node drain
that does not wait) while writing a script into ``nft -f -``, nft would read end-of-file early
and, when the cut fell between two statements, commit the first half as a complete transaction:
a ``delete table`` without the table that replaces it, leaving pods unmasqueraded. Instead the
whole script is written to an in-memory file first (``memfd_create``) and that file is the tool's
standard input, so the tool reads all of it or is never started.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ByteReceiveStream, Process

from masqd.aio import deadline_listener, stopping
from masqd.errors import KEPT_OUTPUT, ToolExitedError, ToolMissingError, ToolStoppedError, ToolTimeoutError, left_out

#: The tools' messages are parsed ("No such file or directory", "line N failed"): keep them English.
_ENV = {**os.environ, "LC_ALL": "C"}

#: Seconds one tool run (``iptables-save``, ``iptables-restore``, ``nft``) may take before it is
#: killed and the sync fails. Longer than anything a healthy tool does: iptables-restore waits at
#: most :data:`~masqd.backends.iptables.executor.LOCK_WAIT_SECONDS` (10 s) for the xtables lock,
#: and one run at 100k CIDRs takes a small part of this (``apply_time`` in
#: ``benchmarks/RESULTS.md``). Well under :data:`masqd.status.HEALTH_DEADLINE_SECONDS` (60 s), even
#: with :data:`KILL_GRACE_SECONDS` added, so a hung tool shows up as a failed sync that names the
#: command, not as a silent liveness failure and a pod restart.
TOOL_TIMEOUT_SECONDS = 30.0
#: Seconds to wait for a killed tool to exit. SIGKILL takes effect only when the process leaves
#: the kernel; one stuck in uninterruptible I/O (state D) exits later, and is reaped then (by the
#: event loop's child watcher), while the sync reports the failure without waiting for it.
KILL_GRACE_SECONDS = 5.0
#: How a tool's deadline grows with the rules it reads or writes (:func:`tool_deadline`). The
#: nft variant of ``iptables-save`` takes time growing with the square of the rules in the table
#: (the kernel's rule dump restarts from the chain's start for every batch it returns): on the
#: 2-core machine of benchmarks/RESULTS.md ("Size limits"), 0.6 s at 50k rules, 1.7 s at 100k,
#: 15 s at 200k when quiet, three to four times that under load (43 s once at 200k). The deadline
#: allows about four times the slowest, plus 0.1 ms per rule for the linear part (legacy
#: iptables, ``nft -f``): 80 s at 100k rules, 210 s at 200k.
SECONDS_PER_RULE = 1e-4
SECONDS_PER_RULE_SQUARED = 4e-9

#: The longest deadline a read-back (``iptables-save``, ``nft list table``) gets after reads that
#: ran out of time (doubled each time from the one scaled to what masqd knows of the table): room
#: for about 350k rules of iptables' nft variant (:data:`SECONDS_PER_RULE_SQUARED`), while a read
#: that hangs for good holds a pass (and a config change waiting behind it) no more than 10
#: minutes at a time.
MAX_READ_SECONDS = 600.0


def tool_deadline(rules: int = 0, *, square: bool = True) -> float:
    """Seconds a tool run that reads or writes about ``rules`` rules may take before it is killed:
    :data:`TOOL_TIMEOUT_SECONDS`, plus what the rules cost (see :data:`SECONDS_PER_RULE_SQUARED`;
    ``square=False`` for a tool whose time grows linearly, as ``nft`` with set elements does)."""
    return TOOL_TIMEOUT_SECONDS + rules * SECONDS_PER_RULE + square * rules * rules * SECONDS_PER_RULE_SQUARED


class ReadDeadlines:
    """Per family, the deadline of the next read-back of a table whose read time grows with its
    size: :func:`tool_deadline` of the size last known (``sizes``, which the executor keeps:
    the lines of an ``iptables-save``, the commas of an ``nft --json`` listing), and after a read
    that ran out of time at least twice that read's deadline, up to :data:`MAX_READ_SECONDS`,
    until a read succeeds. After a restart the table may hold far more than masqd knows of, and
    other writers' chains (kube-proxy's) grow without masqd writing."""

    def __init__(self, *, square: bool):
        self.square = square
        #: per family, about how big the table is (an upper bound)
        self.sizes: dict[int, int] = {}
        self._floor: dict[int, float] = {}  # per family, the least deadline after a read that ran out of time

    def deadline(self, family: int) -> float:
        """Seconds the next read of ``family`` may take before it is killed."""
        return max(tool_deadline(self.sizes.get(family, 0), square=self.square), self._floor.get(family, 0.0))

    async def read(self, family: int, command: list[str]) -> subprocess.CompletedProcess[bytes]:
        """Run the read ``command`` under :meth:`deadline` (see :func:`run_tool`)."""
        deadline = self.deadline(family)
        try:
            result = await run_tool(command, None, timeout=deadline)
        except ToolTimeoutError:  # the table may be far bigger than masqd knows: allow more next time
            self._floor[family] = min(2 * deadline, MAX_READ_SECONDS)
            raise
        if result.returncode == 0:
            self._floor.pop(family, None)
        return result


async def run_tool(command: list[str], stdin: bytes | None = None, *,
                   timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` to completion, capturing its output (``stdin``: its whole standard input).

    A binary that cannot be started is a :class:`~masqd.errors.ToolMissingError`; a run longer than
    ``timeout`` seconds (default :data:`TOOL_TIMEOUT_SECONDS`; :func:`tool_deadline` for a run
    whose work grows with the rules) is killed and raises :class:`~masqd.errors.ToolTimeoutError`.
    The deadline holds inside a shielded cancel scope (the reconciler's sync) too. When the
    caller is cancelled instead, the tool is killed and reaped just the same. A run that only
    reads (no ``stdin``) is also killed when the daemon is asked to stop (:data:`masqd.aio.stopping`),
    however far its deadline, and raises :class:`~masqd.errors.ToolStoppedError`: a read of a
    huge table must not hold SIGTERM up for minutes. (A write is finished: it is short.)
    """
    timeout = TOOL_TIMEOUT_SECONDS if timeout is None else timeout
    listener = deadline_listener.get()
    if listener is not None:
        listener(timeout + KILL_GRACE_SECONDS)
    stop = stopping.get() if stdin is None else None
    process = await _spawn(command, stdin)
    output: list[bytes] = [b"", b""]
    finished = exited = False
    stopped: list[bool] = []
    try:
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as watching:
                if stop is not None:
                    watching.start_soon(_cancel_when_set, stop, watching.cancel_scope, stopped)
                async with anyio.create_task_group() as tg:
                    assert process.stdout is not None and process.stderr is not None
                    tg.start_soon(_drain, process.stdout, output, 0)
                    tg.start_soon(_drain, process.stderr, output, 1, STDERR_KEPT_BYTES)
                    await process.wait()
                watching.cancel_scope.cancel()  # done: stop watching for the stop
            finished = not stopped
    finally:
        if not finished:  # the deadline passed, the daemon is stopping, or the caller was cancelled or failed
            exited = await _kill_and_reap(process)
    if stopped or (not finished and stop is not None and stop.is_set()):  # the stop, not the deadline, ended it
        raise ToolStoppedError(command)
    if not finished:
        raise ToolTimeoutError(command, timeout, exited=exited, wrote=stdin is not None)
    await process.aclose()  # it has exited: closes the pipes, returns at once
    assert process.returncode is not None
    return subprocess.CompletedProcess(command, process.returncode, output[0], output[1])


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope, stopped: list[bool]) -> None:
    await event.wait()
    stopped.append(True)
    scope.cancel()


async def _spawn(command: list[str], stdin: bytes | None, stderr: int = subprocess.PIPE) -> Process:
    """Start ``command`` in a session of its own, ``stdin`` (or nothing) as its standard input.
    A binary that cannot be started (missing, not executable) is a
    :class:`~masqd.errors.ToolMissingError` naming it, whether the run was to read or to write."""
    source = _input_file(stdin) if stdin is not None else subprocess.DEVNULL
    try:
        # A session of its own: the whole group can be killed, and a terminal's Ctrl-C reaches
        # masqd (which finishes the sync in progress), not the tool half-way through a write.
        return await anyio.open_process(command, stdin=source, stderr=stderr, env=_ENV, start_new_session=True)
    except OSError as exc:  # binary missing or not executable
        raise ToolMissingError(command, exc.strerror or str(exc)) from None
    finally:
        if stdin is not None:
            os.close(source)  # the tool holds its own copy as its standard input


#: At most this much of what a tool printed on stderr is kept for its error (:data:`masqd.errors.KEPT_OUTPUT`):
#: of a run, its first and last half (iptables-restore names the failed line at the end); of a tool
#: that reports until stopped, its start. Standard output, the read-back, is kept whole.
STDERR_KEPT_BYTES = KEPT_OUTPUT


@asynccontextmanager
async def tool_output(command: list[str]) -> AsyncIterator[ByteReceiveStream]:
    """Run a tool that reports until stopped (``nft monitor``) and yield its standard output.

    It has no deadline. A block that is cancelled or raises has the tool killed and reaped, and
    its exception propagates as it is. A block that ends normally has read to the end of the
    output, which means the tool exited on its own: that raises
    :class:`~masqd.errors.ToolExitedError` with its exit status and the start of what it printed
    on stderr (a tool still running then is killed first). If masqd itself dies without a chance
    to kill it (SIGKILL, the OOM killer), the kernel kills the tool too (see :func:`_dies_with_masqd`).
    The tool is started through a small Python wrapper, so a tool that cannot be started exits at
    once (status 127, ``cannot run TOOL: ...``): that too is a ``ToolExitedError``.
    """
    errors = _bounded_file(STDERR_KEPT_BYTES + 1)  # read after exit: no task draining a pipe
    try:
        process = await _spawn(_dies_with_masqd(command), None, stderr=errors)
        exited = False
        try:
            assert process.stdout is not None
            yield process.stdout
            with anyio.move_on_after(KILL_GRACE_SECONDS):
                await process.wait()
            exited = process.returncode is not None
        finally:
            await _kill_and_reap(process)
        printed = os.pread(errors, STDERR_KEPT_BYTES + 1, 0).rstrip(b"\0")
        if len(printed) > STDERR_KEPT_BYTES:  # it printed more than is kept (the last byte tells)
            printed = printed[:STDERR_KEPT_BYTES] + b"\n[... more left out ...]"
    finally:
        os.close(errors)
    raise ToolExitedError(command, process.returncode if exited else -signal.SIGKILL,
                          printed.decode(errors="replace"))


#: Run as ``python -c`` before the tool: ask the kernel to SIGKILL this process when its parent
#: (masqd) dies (``PR_SET_PDEATHSIG``, kept across ``exec``), give up if masqd already died, then
#: become the tool. A missing tool exits 127 with one line, like a shell.
_EXEC_DYING_WITH_PARENT = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"cannot run {sys.argv[2]}: {exc.strerror}\\n")
    sys.exit(127)
"""


def _dies_with_masqd(command: list[str]) -> list[str]:
    """``command``, made to die with masqd. A tool that runs until stopped and outlived a killed
    masqd would linger (``nft monitor`` blocks in the kernel and exits only when it next writes to
    the closed pipe), holding a deleted network namespace alive, one more after each restart.
    (In a pod or a systemd unit the container or cgroup goes with masqd anyway; but the kernel
    clears the death signal when exec'ing a binary with file capabilities, as the image's nft has,
    so this is what covers masqd run as root on a host.)"""
    return [sys.executable, "-I", "-S", "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *command]


async def _drain(stream: ByteReceiveStream, output: list[bytes], index: int, limit: int | None = None) -> None:
    """Read ``stream`` to its end into ``output[index]``: all of it, or with ``limit`` its first and
    last ``limit // 2`` bytes (:class:`HeadAndTail`), kept as it is read."""
    if limit is not None:
        kept = HeadAndTail(limit)
        async for chunk in stream:
            kept.add(chunk)
        output[index] = kept.value()
        return
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
    output[index] = b"".join(chunks)


class HeadAndTail:
    """The first and the last ``limit // 2`` bytes of a stream, kept as its pieces arrive: a tool
    printing without end costs a few KiB, not what it printed. :meth:`value` puts a marker saying
    how many bytes were left out between the two."""

    def __init__(self, limit: int):
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if len(chunk) >= self.half:
            self.tail[:] = chunk[len(chunk) - self.half:]
        elif chunk:
            self.tail += chunk
            del self.tail[:max(0, len(self.tail) - self.half)]

    def value(self) -> bytes:
        skipped = self.total - len(self.head) - len(self.tail)
        if not skipped:
            return bytes(self.head + self.tail)
        return bytes(self.head) + f"\n{left_out(skipped)}\n".encode() + bytes(self.tail)


def _bounded_file(size: int) -> int:
    """A file descriptor of an in-memory file of ``size`` zero bytes that cannot grow: a tool
    writing to it keeps at most ``size`` bytes, and writes beyond fail (ENOSPC-like ``EPERM``)."""
    fd = os.memfd_create("masqd-output", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _input_file(data: bytes) -> int:
    """A file descriptor of an in-memory file holding all of ``data``, positioned at its start
    (see the module docstring: a tool reading it can never see a truncated script)."""
    fd = os.memfd_create("masqd-input", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kill_process_group(pid: int) -> None:
    """SIGKILL the process group the tool leads (it was started in a session of its own)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has already exited
        pass


async def _kill_and_reap(process: Process) -> bool:
    """Kill the tool and its children and wait (at most :data:`KILL_GRACE_SECONDS`) until it
    has been reaped. Runs shielded, so a cancelled caller still leaves no process behind.
    Returns whether it exited; when it did not, its pipes are closed and it is reaped when
    it finally exits."""
    with anyio.CancelScope(shield=True):
        _kill_process_group(process.pid)
        with anyio.move_on_after(KILL_GRACE_SECONDS):
            await process.wait()
        if process.returncode is not None:
            await process.aclose()  # closes the pipes; waits for nothing more
            return True
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()
        return False


def script_line(script: str, number: int, limit: int = 200) -> str | None:
    """Line ``number`` (1-based) of an input script, shortened to ``limit`` characters."""
    lines = script.splitlines()
    if not 0 < number <= len(lines):
        return None
    line = lines[number - 1]
    return line if len(line) <= limit else line[:limit] + "..."
