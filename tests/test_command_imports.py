"""What each command loads: a short command (``validate``, ``render``) starts without the
Kubernetes API client (lightkube, httpx2), without watchfiles and without the daemon's parts, and
the daemon without Kubernetes flags loads no API client either. Checked in a fresh interpreter's
``sys.modules``, so a module-level import added anywhere on the way shows up here (start-up time
and idle memory: benchmarks/short_commands.py, benchmarks/idle_cost.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from masqd.testing import netns

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "config.yaml"
#: Seconds before a test gives up on the process it started (a failure, not a timing claim).
WAIT = 30

#: Loaded by no command that does not use them (top-level package names).
NEVER_WITHOUT_KUBE = ("lightkube", "httpx2", "httpx", "httpcore", "watchfiles")
#: What a short command has no use for either: the daemon, the endpoint, explain, the controller,
#: the backends' process code (validate), file watching.
NOT_FOR_SHORT_COMMANDS = ("prometheus_client", "ctypes", "masqd.daemon", "masqd.metrics", "masqd.cli.explain",
                          "masqd.cli.controller", "masqd.controller.loop", "masqd.kube.client",
                          "masqd.backends.leftovers", "masqd.sources.kube")

#: Runs ``masqd.cli.main(argv)`` and prints the loaded modules as JSON on stdout at exit (also
#: after SIGTERM, which the daemon handles as a clean stop).
PROBE = """
import json, sys
from masqd.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print(json.dumps(sorted(sys.modules)))
sys.exit(code)
"""


def loaded(names: list[str], unwanted: tuple[str, ...]) -> list[str]:
    return sorted(name for name in names if name in unwanted or name.split(".")[0] in unwanted)


def modules_of(*argv: str) -> list[str]:
    """The modules a fresh ``masqd ARGV...`` has loaded when it ends (its output checked)."""
    # MASQD_PLUGINS is empty (tests/conftest.py): an installed plugin's own imports are its business
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    *output, modules = result.stdout.splitlines()
    return json.loads(modules)


@pytest.mark.parametrize("argv", [
    pytest.param(("validate", "--config", str(EXAMPLE)), id="validate"),
    pytest.param(("render", "--backend", "dry-run", "--config", str(EXAMPLE)), id="render dry-run"),
    pytest.param(("render", "--backend", "nftables", "--config", str(EXAMPLE)), id="render nftables"),
    pytest.param(("render", "--config", str(EXAMPLE), "--iptables-mode", "nft"), id="render iptables"),
])
def test_short_commands_load_neither_the_api_client_nor_the_daemon(argv):
    modules = modules_of(*argv)
    assert "masqd.cli" in modules  # the probe ran the command
    assert loaded(modules, NEVER_WITHOUT_KUBE + NOT_FOR_SHORT_COMMANDS) == []


def test_validate_with_a_kubernetes_flag_loads_the_api_client(tmp_path):
    """The other side of the rule: the client is imported where it is used (here to read the
    credentials, which are missing: exit 2, naming what was tried)."""
    result = subprocess.run([sys.executable, "-c", PROBE, "validate", "--config", str(EXAMPLE),
                             "--kube-configmap", "kube-system/ip-masq-agent", "--kubeconfig", str(tmp_path / "absent")],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2 and str(tmp_path / "absent") in result.stderr
    assert "lightkube" in json.loads(result.stdout.splitlines()[-1])


def test_the_daemon_without_kubernetes_flags_loads_no_api_client(tmp_path):
    """``masqd run`` with its endpoint, after its first pass: the file watch, the metrics and the
    backends are loaded, the API client and watchfiles are not."""
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "run", "--backend", "dry-run", "--config",
                             str(tmp_path / "config"), "--log-format", "json", "--http-address=127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = netns.LineReader(proc.stderr)
    try:
        while (line := lines.readline(WAIT)) is not None and '"rules applied"' not in line:
            pass
        assert line is not None, "the daemon never applied its rules"
        proc.send_signal(signal.SIGTERM)
        modules = json.loads(proc.communicate(timeout=WAIT)[0].splitlines()[-1])
    finally:
        proc.kill()
        proc.wait()
        lines.close()
    assert {"masqd.daemon", "masqd.metrics", "masqd.sources.inotify"} <= set(modules)
    assert "prometheus_client" in modules  # /metrics
    assert loaded(modules, NEVER_WITHOUT_KUBE) == []
