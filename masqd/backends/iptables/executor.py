"""The iptables backend's executor: the only part of it that runs binaries (``iptables-save``,
``iptables-restore``, ``iptables --version``, through :mod:`masqd.backends.tools`).

:class:`IptablesExecutor` is the seam: the backend takes any object with its three methods, so
tests inject a fake kernel the way httpx swaps transports. :class:`SubprocessExecutor` is the
real one; while a restore waits for the xtables lock it says so once in the log.
"""

from __future__ import annotations

import os
import re
from typing import Protocol

import anyio
import structlog

from masqd.backends.iptables_mode import Binaries, binaries_for, legacy_tables
from masqd.backends.tools import ReadDeadlines, run_tool, script_line, tool_deadline
from masqd.errors import ApplyError, ReadBackError

log = structlog.get_logger("masqd.backend.iptables")

#: Seconds iptables-restore waits for a held xtables lock before giving up (the reconciler retries).
LOCK_WAIT_SECONDS = 10
#: How often a running iptables-restore is checked for waiting on the xtables lock (logged once).
LOCK_CHECK_SECONDS = 0.25


class IptablesExecutor(Protocol):
    """Runs iptables binaries for one family (4 or 6)."""

    async def save(self, family: int) -> str: ...

    async def restore(self, family: int, text: str) -> None: ...

    async def version(self, family: int) -> str: ...


DEFAULT_BINARIES = binaries_for("system")

_ERROR_LINE = re.compile(r"(?:Error occurred at line: (\d+)|line (\d+) failed)")


class SubprocessExecutor:
    """Runs the real ``iptables-save`` / ``iptables-restore -w --noflush`` through anyio. A binary
    that cannot be started raises :class:`~masqd.errors.ToolMissingError`.

    Each run's deadline grows with the rules of the nat table (:func:`~masqd.backends.tools.tool_deadline`:
    the nft variant's save takes time growing with their square), as this executor knows them: the
    lines of the last save, plus the lines written since. A save that still runs out of time
    (after a restart the table may hold far more than masqd knows of, and other writers' chains,
    kube-proxy's, grow without masqd writing) doubles the next save's deadline, up to
    :data:`~masqd.backends.tools.MAX_READ_SECONDS`, until one succeeds (:class:`~masqd.backends.tools.ReadDeadlines`).
    """

    def __init__(self, binaries: dict[int, Binaries] | None = None):
        self.binaries = binaries or DEFAULT_BINARIES
        self._lock_wait_logged = False  # until a restore gets the lock: retries do not log it again
        #: per family, about how many lines the nat table holds (an upper bound: see above)
        self._reads = ReadDeadlines(square=True)
        self._writes = 0  # restores begun

    def read_deadline(self, family: int) -> float:
        """Seconds the next save of ``family`` may take before it is killed."""
        return self._reads.deadline(family)

    async def save(self, family: int) -> str:
        binaries = self.binaries[family]
        if binaries.legacy and "nat" not in legacy_tables(family):
            return ""  # no legacy nat table, so nothing of masqd's; reading it would create it
        command = [binaries.save, "-t", "nat"]
        writes = self._writes
        result = await self._reads.read(family, command)
        if result.returncode != 0:
            raise ReadBackError(command, result.stderr.decode(errors="replace") or f"exit {result.returncode}")
        lines, sizes = result.stdout.count(b"\n"), self._reads.sizes
        # a restore that began meanwhile (a drift check's save overlapping a pass) may have grown it
        sizes[family] = lines if writes == self._writes else max(lines, sizes.get(family, 0))
        return result.stdout.decode(errors="replace")

    async def restore(self, family: int, text: str) -> None:
        command = [self.binaries[family].restore, "-w", str(LOCK_WAIT_SECONDS), "--noflush"]
        error: Exception | None = None
        # the nft variant reads the chains a restore edits (to delete rules by their text) first
        rules = self._reads.sizes.get(family, 0) + text.count("\n")
        self._reads.sizes[family] = rules  # whatever the outcome: a killed write may have committed
        self._writes += 1
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._log_lock_wait, command)
            try:
                result = await run_tool(command, text.encode(), timeout=tool_deadline(rules))
            except Exception as exc:  # raised as it is below, not wrapped in an exception group
                error = exc
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            raise ApplyError(command, result.returncode, stderr, _failed_line(stderr, text))
        self._lock_wait_logged = False

    async def _log_lock_wait(self, command: list[str]) -> None:
        """While the restore runs: say once that it waits for the xtables lock (iptables 1.8.8
        and later print nothing when the wait ends in success, and a failure after the wait is
        logged by the reconciler); not again on retries until a restore has had the lock.
        Earlier versions poll the lock instead of blocking on it, so they are not seen waiting
        here; their own message is in the error when the wait fails."""
        while not self._lock_wait_logged:
            await anyio.sleep(LOCK_CHECK_SECONDS)
            if _child_waits_for_xtables_lock():
                log.warning("waiting for the xtables lock, held by another process", command=" ".join(command),
                            wait_seconds=LOCK_WAIT_SECONDS, lock=xtables_lock_path())
                self._lock_wait_logged = True

    async def version(self, family: int) -> str:
        command = [self.binaries[family].main, "--version"]
        result = await run_tool(command, None)
        if result.returncode != 0:
            raise ReadBackError(command, result.stderr.decode(errors="replace"))
        return result.stdout.decode(errors="replace")


def xtables_lock_path() -> str:
    """The xtables lock file legacy iptables takes: ``XTABLES_LOCKFILE``, else ``/run/xtables.lock``."""
    return os.environ.get("XTABLES_LOCKFILE") or "/run/xtables.lock"


def _child_waits_for_xtables_lock() -> bool:
    """Whether a child of this process (the running iptables-restore) is blocked on a flock of
    the xtables lock file, as ``/proc/locks`` lists waiters (``N: -> FLOCK ADVISORY WRITE PID
    MAJ:MIN:INODE ...``); the nft variant takes no lock and is never seen waiting."""
    try:
        lock = os.stat(xtables_lock_path())
        with open("/proc/locks") as locks:
            waiters = [line.split() for line in locks if " -> FLOCK " in line]
    except OSError:
        return False
    device = f"{os.major(lock.st_dev):02x}:{os.minor(lock.st_dev):02x}:{lock.st_ino}"
    return any(len(fields) > 6 and fields[6] == device and parent_pid(fields[5]) == os.getpid()
               for fields in waiters)


def parent_pid(pid: str | int) -> int | None:
    """The parent of process ``pid`` (``/proc/PID/stat``), or None when it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _failed_line(stderr: str, text: str) -> str | None:
    match = _ERROR_LINE.search(stderr)
    return script_line(text, int(match.group(1) or match.group(2))) if match else None
