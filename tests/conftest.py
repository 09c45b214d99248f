"""Shared fixtures. Kernel-facing ones (``topology``, ``node_ns``, ``masqd``, ``daemon``) create
their own network namespaces and always delete them; they skip, with the reason, where namespaces
cannot be created (not root, no ``ip netns``). ``api`` is the in-process Kubernetes API server.
Shared helpers that are not fixtures live in ``tests/support.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from masqd.testing import netns
from masqd.testing import topology as layout

#: The console scripts installed next to the interpreter running the tests.
MASQD = Path(sys.executable).parent / "masqd"
IP_MASQ_AGENT = Path(sys.executable).parent / "ip-masq-agent"


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch) -> None:
    """masqd's own tests see only the plugins they register: the example plugins installed in
    the same environment are not loaded (a test that wants one sets MASQD_PLUGINS itself)."""
    monkeypatch.setenv("MASQD_PLUGINS", "")


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """``masqd.cli.main`` configures structlog globally (level filter, renderer); put the previous
    configuration back so a later test's ``capture_logs`` sees every level again."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def netns_supported() -> None:
    """Skip the requesting test when network namespaces cannot be created here."""
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def topology(netns_supported) -> Iterator[layout.Topology]:
    """pod -> node -> dest namespaces (see :mod:`masqd.testing.netns`), deleted after the test."""
    topo = layout.Topology()
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture
def node_ns(netns_supported) -> Iterator[str]:
    """One empty namespace (loopback up) for tests that only program rules, deleted after the test."""
    with netns.namespace() as name:
        yield name


@pytest.fixture
def api():
    """The in-process Kubernetes API server (``tests/kubeapi.py``), without periodic bookmarks;
    stopped after the test."""
    from kubeapi import FakeKubeAPI

    with FakeKubeAPI(bookmark_interval=None) as server:
        yield server


class MasqdRunner:
    """Runs ``masqd run --once --backend BACKEND`` (or the ``ip-masq-agent`` alias) in a namespace.

    ``config``: ``None`` means no config file (the path given does not exist: defaults); a string
    is written to the config file first. ``backend`` defaults to ``iptables``. Returns the
    finished process; never raises on exit codes.
    """

    def __init__(self, config_path: Path):
        self.config_path = config_path

    def __call__(self, ns: str, *flags: str, config: str | None = None, alias: bool = False,
                 backend: str = "iptables", timeout: float = 60,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        if config is None:
            self.config_path.unlink(missing_ok=True)
        else:
            self.config_path.write_text(config)
        command = [str(IP_MASQ_AGENT)] if alias else [str(MASQD), "run"]
        command += ["--once", "--backend", backend, "--config", str(self.config_path), *flags]
        return netns.run(ns, *command, check=False, timeout=timeout, env=None if env is None else {**os.environ, **env})

    def ok(self, ns: str, *flags: str, config: str | None = None, alias: bool = False,
           backend: str = "iptables", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Like calling the runner, but fail the test unless it exits 0. ``env``: variables added
        to the environment (e.g. ``MASQD_PLUGINS``)."""
        result = self(ns, *flags, config=config, alias=alias, backend=backend, env=env)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(result.args)} exited {result.returncode}:\n{result.stderr}")
        return result


@pytest.fixture
def masqd(tmp_path: Path) -> MasqdRunner:
    """A :class:`MasqdRunner` with its config file in the test's temporary directory."""
    return MasqdRunner(tmp_path / "ip-masq-agent")


@pytest.fixture
def daemon(node_ns, tmp_path):
    """Start ``masqd run`` in ``node_ns`` on a config text; waits for its first apply. Stopped
    (killed if need be) at teardown."""
    from masqd_proc import DaemonProcess

    started: list[DaemonProcess] = []

    def start(config_text: str, *flags: str, backend: str = "iptables") -> DaemonProcess:
        config = tmp_path / "config"
        config.write_text(config_text)
        process = DaemonProcess(node_ns, config, *flags, backend=backend)
        started.append(process)
        process.next_event(lambda e: e.get("event") == "rules applied")
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch):
    """``install_plugin(module, source, entry_point=NAME or NAME = module:object)``: a third-party
    plugin installed for this test as a package would be (a module and a ``.dist-info`` with a
    ``masqd`` entry point on ``sys.path``), and loaded alone (``MASQD_PLUGINS``), so ``masqd.cli.main``
    loads it exactly as it loads a plugin installed with pip."""
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))

    def install(module: str, source: str, entry_point: str) -> None:
        name, _, target = entry_point.partition(" = ")
        info = site / f"{module}-0.1.dist-info"
        info.mkdir(parents=True)
        (site / f"{module}.py").write_text(source)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[masqd]\n{name} = {target or module}\n")
        monkeypatch.delitem(sys.modules, module, raising=False)
        monkeypatch.setenv("MASQD_PLUGINS", name)

    return install


@pytest.fixture
def monitor(node_ns):
    """``nft monitor`` in the test's node namespace (:class:`support.NftMonitor`)."""
    from support import NftMonitor

    watcher = NftMonitor(node_ns)
    try:
        yield watcher
    finally:
        watcher.close()
