"""The agent harness: run a complete agent in a test, wait for what it should do, and the
dry-run agent the ``masqd_dry_run`` fixture hands out (see :mod:`masqd.testing`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio

from masqd.agent import Agent, build_agent
from masqd.audit import AuditEvent
from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.errors import MasqdError
from masqd.plugins import HOOK_TIMEOUT_SECONDS, Plugins

#: Seconds :func:`wait_until` waits by default before the test fails.
WAIT_SECONDS = 15.0


async def wait_until(predicate: Callable[[], object], what: str = "the condition", *,
                     timeout: float = WAIT_SECONDS, interval: float = 0.005):
    """Poll ``predicate()`` until it returns something true, and return that; fail the test
    (``TimeoutError`` naming ``what``) when it does not within ``timeout`` seconds (a hang guard,
    not a timing claim). ``predicate`` may be a coroutine function."""
    result = None
    try:
        with anyio.fail_after(timeout):
            while True:
                result = predicate()
                if hasattr(result, "__await__"):
                    result = await result
                if result:
                    return result
                await anyio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"waited {timeout:g} s for {what}; last value: {result!r}") from None


@asynccontextmanager
async def running(agent: Agent, *, first_pass: bool = True,
                  on_http_ready: Callable[[list[str]], None] | None = None) -> AsyncIterator[Agent]:
    """Run ``agent`` as the daemon runs it (no signal handling) for the duration of the block,
    and stop it when the block ends, even after a failed assertion. ``first_pass``: wait for the
    first pass (successful or not) before entering the block."""
    from masqd.daemon import run_daemon

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(run_daemon, agent, handle_signals=False, on_http_ready=on_http_ready))
        try:
            if first_pass:
                await wait_until(lambda: agent.status.generation >= 1, "the first pass")
            yield agent
        finally:
            tg.cancel_scope.cancel()


def event_source(agent: Agent, name: str):
    """The event source called ``name`` that ``agent`` runs (``configmap``, ``timer``,
    ``egress-nat-policies``, a plugin's): to look at its state in a test (a watch's
    ``reflector``). Raises ``LookupError`` naming the sources it has."""
    for registered in agent.sources:
        if registered.name == name:
            return registered.source
    raise LookupError(f"no event source {name!r}; the agent has: {', '.join(s.name for s in agent.sources)}")


@dataclass
class DryRunResult:
    """What one :meth:`DryRunAgent.apply` left behind."""

    rules: str | None  # the iptables-restore text the dry-run backend holds (None: nothing applied yet)
    nonmasq: dict[int, list[str]]  # family (4, 6) -> non-masquerade CIDRs in rule order, link-local included
    contributions: dict[str, list[str]]  # plugin -> CIDRs it added (of the last accepted state)
    audits: list[AuditEvent] = field(default_factory=list)  # this apply's audit events
    error: MasqdError | None = None  # why the new state was rejected or failed
    overrides: dict[str, list[str]] = field(default_factory=dict)  # plugin -> its masquerade_cidrs entries


class DryRunAgent:
    """masqd's agent on the dry-run backend, with the given plugins."""

    def __init__(self, plugins: Plugins, config_path: Path, options: AgentOptions = AgentOptions()):
        self.plugins = plugins
        self.config_path = config_path
        self.backend = DryRunBackend()
        self.agent = build_agent(options, backend=self.backend, config=config_path, plugins=plugins, once=True)
        self._audits: list[AuditEvent] = []
        self.agent.audit.listeners.append(self._audits.append)

    @property
    def reconciler(self):
        return self.agent.reconciler

    def apply(self, config_text: str | None = None) -> DryRunResult:
        """Write the config file (or remove it for ``None``) and reconcile once."""
        if config_text is None:
            self.config_path.unlink(missing_ok=True)
        else:
            self.config_path.write_text(config_text)
        return anyio.run(self.apply_async)

    async def apply_async(self) -> DryRunResult:
        """One pass of the config file as it is now, from a test that runs an event loop."""
        self._audits.clear()
        error = None
        try:
            await self.agent.run_once()
        except MasqdError as exc:
            error = exc
        applied = self.backend.applied
        return DryRunResult(
            rules=self.backend.last_rendered,
            nonmasq={} if applied is None else {f.family: [str(n) for n in f.nonmasq] for f in applied.families},
            contributions={c.plugin: [str(n) for n in c.cidrs] for c in self.agent.reconciler.contributions
                           if not c.masquerade},
            audits=list(self._audits),
            error=error,
            overrides={c.plugin: [str(n) for n in c.cidrs] for c in self.agent.reconciler.contributions
                       if c.masquerade},
        )


def make_plugins(*plugins: object, hook_timeout: float = HOOK_TIMEOUT_SECONDS) -> Plugins:
    """The default plugins plus ``plugins``, each registered under its ``__name__`` (modules),
    its class name (instances), or ``name`` attribute when it has one."""
    return Plugins.load(entry_points=False, hook_timeout=hook_timeout,
                        extra=[(_plugin_name(plugin), plugin) for plugin in plugins])


def _plugin_name(plugin: object) -> str:
    name = getattr(plugin, "name", None) or getattr(plugin, "__name__", None) or type(plugin).__name__
    return str(name)
