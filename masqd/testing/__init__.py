"""pytest fixtures for plugin authors (a ``pytest11`` plugin: installed with masqd, active in any
test run that has pytest; nothing to import).

``masqd_plugins(*plugins, hook_timeout=...)``
    A :class:`masqd.plugins.Plugins` with masqd's default plugins and the given plugin objects
    (modules, classes' instances) registered, exactly as masqd registers entry-point plugins,
    so hook names and signatures are checked the same way. Installed entry-point plugins are not
    loaded, so the test sees only what it registers.

``masqd_dry_run(*plugins, options=AgentOptions(), hook_timeout=...)``
    A :class:`DryRunAgent`: masqd's reconciler on the dry-run backend with those plugins.
    ``agent.apply(config_text)`` runs one reconcile (as ``masqd run --once`` does) against a
    config file holding ``config_text`` (``None``: no file, the defaults) and returns a
    :class:`DryRunResult`: the rules the dry-run backend now holds (iptables-restore text), the
    non-masquerade CIDRs per family, each plugin's contributions, the audit events, and the error
    if the new state was rejected. The agent keeps its state between calls, like the daemon:
    after a rejected state the rules last applied stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from masqd.audit import AuditEvent
from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.errors import MasqdError
from masqd.plugins import HOOK_TIMEOUT_SECONDS, Contribution, Plugins
from masqd.reconcile import Reconciler, reconcile_once


@dataclass
class DryRunResult:
    """What one :meth:`DryRunAgent.apply` left behind."""

    rules: str | None  # the iptables-restore text the dry-run backend holds (None: nothing applied yet)
    nonmasq: dict[int, list[str]]  # family (4, 6) -> non-masquerade CIDRs in rule order, link-local included
    contributions: dict[str, list[str]]  # plugin -> CIDRs it added (of the last accepted state)
    audits: list[AuditEvent] = field(default_factory=list)  # this apply's audit events
    error: MasqdError | None = None  # why the new state was rejected or failed


class DryRunAgent:
    """masqd's reconciler on the dry-run backend, with the given plugins."""

    def __init__(self, plugins: Plugins, config_path: Path, options: AgentOptions = AgentOptions()):
        self.plugins = plugins
        self.config_path = config_path
        self.backend = DryRunBackend()
        self._audits: list[AuditEvent] = []
        self.reconciler = Reconciler(self.backend, options, config_path, plugins=plugins,
                                     on_audit=self._audits.append)

    def apply(self, config_text: str | None = None) -> DryRunResult:
        """Write the config file (or remove it for ``None``) and reconcile once."""
        if config_text is None:
            self.config_path.unlink(missing_ok=True)
        else:
            self.config_path.write_text(config_text)
        return anyio.run(self.apply_async)

    async def apply_async(self) -> DryRunResult:
        """One reconcile of the config file as it is now, from a test that runs an event loop."""
        self._audits.clear()
        error = None
        try:
            await reconcile_once(self.reconciler, self._audits)
        except MasqdError as exc:
            error = exc
        applied = self.backend.applied
        return DryRunResult(
            rules=self.backend.last_rendered,
            nonmasq={} if applied is None else {f.family: [str(n) for n in f.nonmasq] for f in applied.families},
            contributions={c.plugin: [str(n) for n in c.cidrs] for c in self.reconciler.contributions},
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


__all__: Sequence[str] = ("DryRunAgent", "DryRunResult", "make_plugins", "masqd_dry_run", "masqd_plugins")
