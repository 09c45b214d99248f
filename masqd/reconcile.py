"""The reconciler: the only code that calls a backend.

For every batch of events it recomputes the whole desired state (read the config file, validate,
compute the RuleSet) and asks the backend to sync. Failures never remove rules: a bad config or a
refused apply leaves the kernel as it was, is logged with its cause, counted, and retried on the
next event (or after a short back-off when the apply itself failed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from masqd.backends.base import Backend, SyncResult
from masqd.config import AgentOptions, MasqConfig, ParsedConfig, default_config, parse_config
from masqd.errors import ConfigError, MasqdError, Problem
from masqd.events import Event
from masqd.ruleset import RuleSet, compute_ruleset
from masqd.sources.files import read_config_text

log = structlog.get_logger("masqd.reconcile")

#: First retry delay after a failed apply, doubled per failure up to the resync interval.
RETRY_INITIAL_SECONDS = 0.5


def load_config(path: str | os.PathLike[str], options: AgentOptions) -> ParsedConfig:
    """Read and parse the config file (missing file: defaults). Raises :class:`ConfigError`."""
    try:
        text = read_config_text(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [Problem("<file>", str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except OSError as exc:
        raise ConfigError(str(path), [Problem("<file>", str(path), f"cannot read: {exc.strerror or exc}")]) from None
    return parse_config(text, options, source=str(path))


@dataclass(frozen=True, slots=True)
class Status:
    """A snapshot of the reconciler, for logs, health and tests."""

    generation: int
    writes: int
    errors: int
    last_error: str | None
    applied: RuleSet | None


class Reconciler:
    """Turns events into backend syncs. See the module docstring for the failure rules."""

    def __init__(
        self,
        backend: Backend,
        options: AgentOptions,
        config_path: str | os.PathLike[str],
        *,
        on_resync_interval: Callable[[], None] | None = None,
    ):
        self.backend = backend
        self.options = options
        self.config_path = config_path
        self.on_resync_interval = on_resync_interval
        self.config: MasqConfig = default_config(options)  # last good config
        self.applied: RuleSet | None = None  # last rule set the backend confirmed
        self.last_error: MasqdError | None = None
        self.generation = 0  # completed reconciles, successful or not
        self.writes = 0
        self.errors = 0
        self._retry_delay: float | None = None
        self._reported: tuple[str, ...] = ()  # the config problems/warnings logged last

    @property
    def resync_interval(self) -> float:
        return self.config.resync_interval

    def status(self) -> Status:
        error = None if self.last_error is None else str(self.last_error)
        return Status(self.generation, self.writes, self.errors, error, self.applied)

    def desired(self) -> RuleSet:
        """Load and validate the config, update the last good config, return the desired rules.

        Problems and warnings are logged when they differ from the ones logged last, so a bad
        file is reported once, not on every resync.
        """
        try:
            parsed = load_config(self.config_path, self.options)
        except ConfigError as exc:
            self._report(("error",) + tuple(map(str, exc.problems + exc.warnings)), lambda: log.error(
                "config rejected; keeping the rules last applied", path=str(self.config_path),
                problems=[str(p) for p in exc.problems], warnings=[str(w) for w in exc.warnings]))
            raise
        self._report(("ok",) + tuple(map(str, parsed.warnings)), lambda: [
            log.warning("config warning", path=str(self.config_path), problem=str(w)) for w in parsed.warnings])
        previous = self.config.resync_interval_ns
        self.config = parsed.config
        if parsed.config.resync_interval_ns != previous and self.on_resync_interval is not None:
            self.on_resync_interval()
        return compute_ruleset(parsed.config, self.options)

    def _report(self, key: tuple[str, ...], emit: Callable[[], object]) -> None:
        if key != self._reported:
            emit()
            self._reported = key

    async def reconcile(self, events: tuple[Event, ...] = (Event("manual"),)) -> SyncResult:
        """One full pass. Raises :class:`MasqdError` on failure (after recording it).

        With an invalid config the rules last applied are still synced, so drift made by someone
        else is healed while the config is being fixed; the config error is raised afterwards.
        """
        started = time.perf_counter()
        trigger = ",".join(dict.fromkeys(e.source for e in events))
        config_error: ConfigError | None = None
        try:
            try:
                desired = self.desired()
            except ConfigError as exc:
                if self.applied is None:
                    raise
                config_error, desired = exc, self.applied
            result = await self.backend.sync(desired)
        except MasqdError as exc:
            self._record_error(exc)
            if not isinstance(exc, ConfigError):
                log.error("sync failed; kernel keeps its previous rules", backend=self.backend.name,
                          trigger=trigger, error=str(exc))
            raise
        finally:
            self.generation += 1
        if result.changed:
            self.writes += 1
            self._log_write(desired, result, trigger, started)
        else:
            log.debug("in sync", backend=self.backend.name, trigger=trigger)
        self.applied = desired
        if config_error is not None:
            self._record_error(config_error)
            raise config_error
        self.last_error = None
        return result

    def _record_error(self, exc: MasqdError) -> None:
        self.errors += 1
        self.last_error = exc

    def _log_write(self, desired: RuleSet, result: SyncResult, trigger: str, started: float) -> None:
        before = self.applied.cidrs() if self.applied is not None else frozenset()
        after = desired.cidrs()
        fields = {
            "backend": self.backend.name,
            "trigger": trigger,
            "written": list(result.written),
            "reason": list(result.reasons),
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if self.applied is None:
            log.info("rules applied", cidrs=len(after), **fields)
        elif desired == self.applied:
            log.warning("rules restored after outside change", **fields)
        else:
            log.info("rules updated", cidrs_added=sorted(map(str, after - before)),
                     cidrs_removed=sorted(map(str, before - after)), **fields)

    async def run(self, events: MemoryObjectReceiveStream[Event]) -> None:
        """Reconcile on every batch of events until the stream closes or the task is cancelled."""
        async with events:
            while True:
                batch: list[Event] = [Event("retry")]
                with anyio.move_on_after(self._retry_delay):
                    try:
                        batch = [await events.receive()]
                    except anyio.EndOfStream:
                        return
                while True:  # coalesce everything already queued into this pass
                    try:
                        batch.append(events.receive_nowait())
                    except anyio.WouldBlock:
                        break
                    except anyio.EndOfStream:
                        break
                await self._reconcile_guarded(tuple(batch))

    async def _reconcile_guarded(self, batch: tuple[Event, ...]) -> None:
        try:
            await self.reconcile(batch)
        except ConfigError:
            self._retry_delay = None  # wait for the file to change (or the next resync)
        except MasqdError:
            delay = RETRY_INITIAL_SECONDS if self._retry_delay is None else self._retry_delay * 2
            self._retry_delay = min(delay, self.resync_interval)
        else:
            self._retry_delay = None
