"""Helpers shared by masqd's test modules (each test module imports support modules, never
another test module). What reads the kernel or ``/proc`` is shipped with masqd instead, for the
benchmarks too: :mod:`masqd.testing.netns`, :mod:`masqd.testing.processes`.

- config files: :data:`NO_RESYNC`, :func:`write_atomically`, :func:`cidrs_of`, :func:`agent`;
- the Kubernetes API (against ``tests/kubeapi.py``): :data:`REF`, :func:`configmap`,
  :func:`policy`, :func:`cidrs_only`, :func:`watch_settings`, :class:`KubeAgent`,
  :func:`configmap_reflector`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

from masqd.agent import build_agent
from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.http import HttpServer
from masqd.inputs import ConfigMapInput, config_inputs
from masqd.kube import KubeSettings, ObjectRef, Reflector
from masqd.ruleset import RuleSet
from masqd.testing import event_source, netns, running, wait_until
from masqd.testing.netns import nft

# --- config files -------------------------------------------------------------------------------------

#: A resync far in the future: anything applied during a test came from an event.
NO_RESYNC = "resyncInterval: 1h\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` the way kubelet and editors do: write a sibling, rename over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cidrs_of(ruleset: RuleSet | None) -> list[str]:
    """The IPv4 non-masquerade CIDRs of ``ruleset``, in rule order (link-local first)."""
    assert ruleset is not None
    return [str(n) for n in ruleset.ipv4.nonmasq]


def agent(backend, config: Path, **settings):
    """The daemon's agent on ``backend`` (a test backend), reading ``config``."""
    return build_agent(AgentOptions(), backend=backend, config=config, **settings)


# --- the Kubernetes API -----------------------------------------------------------------------------

#: The ConfigMap the agent watches (``--kube-configmap kube-system/ip-masq-agent``).
REF = ObjectRef("kube-system", "ip-masq-agent")


def configmap(text: str | None, name: str = REF.name, namespace: str = REF.namespace) -> dict:
    """A ConfigMap holding ``text`` under ``config`` (``None``: no such key)."""
    data = {} if text is None else {"config": text}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace}, "data": data}


def policy(name: str, action: str, *cidrs: str) -> dict:
    """An ``EgressNATPolicy`` with ``action`` for ``cidrs``."""
    return {"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy", "metadata": {"name": name},
            "spec": {"action": action, "destinations": [{"cidr": c} for c in cidrs]}}


def cidrs_only(text: str) -> str:
    """A config text listing the space-separated CIDRs of ``text``, resync an hour away."""
    return f"nonMasqueradeCIDRs: [{', '.join(text.split())}]\nresyncInterval: 1h\n"


def watch_settings(api, directory: Path, **kubeconfig) -> KubeSettings:
    """Both watches (the ConfigMap :data:`REF` and the policies) against the fake API server
    ``api``, with short back-offs and request timeouts for tests; the kubeconfig is written in
    ``directory`` (``kubeconfig``: more of ``api.write_kubeconfig``'s arguments, e.g. ``token``)."""
    path = api.write_kubeconfig(directory / "kubeconfig", **kubeconfig)
    return KubeSettings(configmap=REF, egress_nat_policies=True, kubeconfig=str(path),
                        backoff_initial=0.05, backoff_max=0.4, request_timeout=5)


class KubeAgent:
    """``masqd run --kube-configmap ... --egress-nat-policies`` in process, on the dry-run backend,
    with a config file that may or may not exist next to the ConfigMap; ``async with`` runs it."""

    def __init__(self, settings: KubeSettings, file: Path, options: AgentOptions = AgentOptions()):
        self.backend = DryRunBackend()
        self.agent = build_agent(options, backend=self.backend, config=config_inputs([str(file)], (), settings),
                                 kube=settings)
        self.status = self.agent.status
        self.configmap = next(i for i in self.agent.loader.inputs if isinstance(i, ConfigMapInput))

    def applied(self) -> set[str]:
        """The IPv4 non-masquerade CIDRs applied, link-local left out."""
        ruleset = self.status.applied
        return set() if ruleset is None else {str(n) for n in ruleset.ipv4.nonmasq} - {"169.254.0.0/16"}

    async def until_applied(self, cidrs: set[str], what: str = "") -> None:
        await wait_until(lambda: self.applied() == cidrs, what or f"rules {sorted(cidrs)}")

    async def __aenter__(self):
        self._running = running(self.agent)
        await self._running.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self._running.__aexit__(*exc)


def configmap_reflector(agent: KubeAgent) -> Reflector:
    """The running ConfigMap watch's reflector."""
    return event_source(agent.agent, "configmap").reflector


class NftMonitor:
    """``nft monitor`` in a namespace: every transaction committed there, as nft prints it.

    :meth:`transactions` adds and deletes a marker table and returns the transactions committed
    since the previous call (marker transactions left out), each a list of the lines nft printed
    for it. The marker makes this exact without sleeping: once it is seen, everything committed
    before it has been printed.
    """

    def __init__(self, ns: str):
        self.ns = ns
        self.proc = netns.popen(ns, "nft", "monitor", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = netns.LineReader(self.proc.stdout)
        self.transactions(startup=True)

    def transactions(self, *, startup: bool = False, timeout: float = 15.0) -> list[list[str]]:
        deadline = time.monotonic() + timeout
        seen: list[list[str]] = []
        current: list[str] = []
        while time.monotonic() < deadline:
            marker = f"mqmark{secrets.token_hex(4)}"
            nft(self.ns, "add", "table", "inet", marker)
            nft(self.ns, "delete", "table", "inet", marker)
            # until the monitor listens, markers go unseen: then send another (startup only)
            while (line := self.lines.readline(0.5 if startup else deadline - time.monotonic())) is not None:
                if line.startswith("# new generation"):
                    if not any("mqmark" in entry for entry in current):
                        seen.append(current)
                    current = []
                    continue
                current.append(line)
                if line == f"delete table inet {marker}":
                    self.lines.readline(5.0)  # its "# new generation" line
                    return [] if startup else seen
        pytest.fail(f"nft monitor in {self.ns} never showed the marker table")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=netns.COMMAND_TIMEOUT)
        self.lines.close()
        self.proc.stdout.close()
        self.proc.stderr.close()


class Served:
    """An :class:`~masqd.http.HttpServer` on 127.0.0.1 with the given routes, deadlines and limits,
    serving in a task group of its own while the ``async with`` lasts (``port``: where)."""

    def __init__(self, routes, **limits):
        self.server = HttpServer(routes, **limits)

    async def __aenter__(self) -> Served:
        self.listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = self.listener.extra(anyio.abc.SocketAttribute.local_port)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self.server.serve, self.listener)
        return self

    async def __aexit__(self, *exc):
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)


async def request(port: int, raw: bytes, *, local_host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` to 127.0.0.1:``port`` (from ``local_host``, e.g. 127.0.0.2) and read the whole
    answer (the server closes the connection): status, headers, body."""
    with anyio.fail_after(10):  # seconds: a failure, not a timing claim
        async with await anyio.connect_tcp("127.0.0.1", port, local_host=local_host) as stream:
            await stream.send(raw)
            data = b""
            try:
                while True:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in header_lines)}
    return int(status_line.split(" ")[1]), headers, body
