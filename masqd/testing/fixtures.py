"""The pytest fixtures masqd installs for plugin authors (a ``pytest11`` plugin: active in any test
run that has pytest, nothing to import): ``masqd_plugins`` and ``masqd_dry_run`` (see
:mod:`masqd.testing`)."""

from __future__ import annotations

import pytest

from masqd.config import AgentOptions
from masqd.plugins import HOOK_TIMEOUT_SECONDS
from masqd.testing.harness import DryRunAgent, make_plugins


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
