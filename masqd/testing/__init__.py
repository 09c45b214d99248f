"""Test support for plugin authors and for masqd's own tests (a ``pytest11`` plugin: installed
with masqd, its fixtures are active in any test run that has pytest; nothing to import).

Fixtures:

``masqd_plugins(*plugins, hook_timeout=...)``
    A :class:`masqd.plugins.Plugins` with masqd's default plugins and the given plugin objects
    (modules, classes' instances) registered, exactly as masqd registers entry-point plugins,
    so hook names and signatures are checked the same way. Installed entry-point plugins are not
    loaded, so the test sees only what it registers. To test ``describe_cidrs`` (called only by
    ``masqd explain``): ``await plugins.describe_cidrs(await plugins.contributions(config, options))``.

``masqd_dry_run(*plugins, options=AgentOptions(), hook_timeout=...)``
    A :class:`DryRunAgent`: masqd's agent on the dry-run backend with those plugins.
    ``agent.apply(config_text)`` runs one pass exactly as ``masqd run --once`` does (each event
    source's ``read_once()`` is awaited first, ``context.once`` is true) against a config file
    holding ``config_text`` (``None``: no file, the defaults) and returns a :class:`DryRunResult`:
    ``rules`` (the iptables-restore text the dry-run backend holds), ``nonmasq`` (family ``4`` /
    ``6`` -> the non-masquerade CIDRs in rule order), ``contributions`` (plugin -> its CIDRs),
    ``audits`` (this pass's :class:`~masqd.audit.AuditEvent` values) and ``error`` (why the new
    state was rejected, else ``None``). The agent keeps its state between calls, like the daemon:
    after a rejected state the rules last applied stay. ``apply_async()`` does the same from an
    async test.

Running a whole agent (from an async test: pytest-asyncio, or anyio's pytest plugin)::

    from masqd.agent import build_agent
    from masqd.backends.dryrun import DryRunBackend
    from masqd.config import AgentOptions
    from masqd.testing import make_plugins, running, wait_until

    backend = DryRunBackend()  # logs what it would apply; backend.applied is the RuleSet it holds
    agent = build_agent(AgentOptions(), backend=backend, config=tmp_path / "config",
                        plugins=make_plugins(MyPlugin()))
    async with running(agent):  # the daemon, without signal handling; stopped when the block ends
        await wait_until(lambda: "192.0.2.0/24" in backend.last_rendered, "my CIDR applied")
        assert agent.status.readiness()[0]  # AgentStatus: what /healthz, /readyz and /metrics read

:func:`masqd.agent.build_agent` takes the flags (``AgentOptions``), a ``backend``, the ``config``
(a path, config inputs, or a loader) and optionally ``plugins``, ``kube`` settings and
``once=True`` for a one-shot agent, whose ``await agent.run_once()`` is one pass as ``masqd run
--once`` makes it (it raises :class:`~masqd.errors.SourceReadError` when a source's ``read_once``
fails, :class:`~masqd.errors.ConfigError` when the new state is rejected).
:func:`wait_until` fails the test with a ``TimeoutError`` naming what it waited for (inside
``running``, wrapped in the task group's ``ExceptionGroup``); :func:`event_source` finds one of
the agent's event sources to look at. :mod:`masqd.testing.fake_nft` is an in-memory ``nft``
that tracks table contents, for backend tests; :mod:`masqd.testing.netns` builds throw-away
network namespaces for kernel-facing tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import pytest

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
            contributions={c.plugin: [str(n) for n in c.cidrs] for c in self.agent.reconciler.contributions},
            audits=list(self._audits),
            error=error,
        )


def make_plugins(*plugins: object, hook_timeout: float = HOOK_TIMEOUT_SECONDS) -> Plugins:
    """The default plugins plus ``plugins``, each registered under its ``__name__`` (modules),
    its class name (instances), or ``name`` attribute when it has one."""
    return Plugins.load(entry_points=False, hook_timeout=hook_timeout,
                        extra=[(_plugin_name(plugin), plugin) for plugin in plugins])


def _plugin_name(plugin: object) -> str:
    name = getattr(plugin, "name", None) or getattr(plugin, "__name__", None) or type(plugin).__name__
    return str(name)


@pytest.fixture
def masqd_plugins():
    """Factory fixture: ``masqd_plugins(*plugins, hook_timeout=5.0) -> Plugins``."""
    return make_plugins


@pytest.fixture
def masqd_dry_run(tmp_path_factory: pytest.TempPathFactory):
    """Factory fixture: ``masqd_dry_run(*plugins, options=AgentOptions(), hook_timeout=5.0) -> DryRunAgent``."""

    def make(*plugins: object, options: AgentOptions = AgentOptions(),
             hook_timeout: float = HOOK_TIMEOUT_SECONDS) -> DryRunAgent:
        path = tmp_path_factory.mktemp("masqd-dry-run") / "config"  # a directory of its own
        return DryRunAgent(make_plugins(*plugins, hook_timeout=hook_timeout), path, options)

    return make


__all__: Sequence[str] = ("DryRunAgent", "DryRunResult", "event_source", "make_plugins", "masqd_dry_run", "masqd_plugins",
                          "running", "wait_until")
