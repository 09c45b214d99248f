"""The HTTP endpoint: what a Prometheus scrape and the kubelet's probes see after applies,
rejections and failures, readiness and liveness transitions, and clients that misbehave.

The daemon runs in process on the dry-run backend (or a backend the test controls) with the
endpoint on 127.0.0.1 and a port the kernel picks; requests go over a real TCP socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from masqd.testing import netns
from kubeapi import FakeKubeAPI
from masqd import __version__
from masqd.agent import build_agent
from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.errors import ApplyError, FlagError
from masqd.hookspecs import hookimpl
from masqd.http import Address, BadRequest, HttpServer, Request, Response, parse_listen_address, parse_request_head
from masqd.inputs import ConfigLoader, ConfigMapInput, FileInput
from masqd.kube import KubeSettings, ObjectRef
from masqd.plugins import Plugins
from masqd.reconcile import Reconciler
from masqd.testing import event_source, running, wait_until
from support import Served, request

NO_RESYNC = "resyncInterval: 1h\n"
WAIT = 10  # seconds before a test gives up waiting (a failure, not a timing claim)


# --- a tiny HTTP client over a real socket ----------------------------------------------------------


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    status, _, body = await request(port, f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return status, body.decode()


async def ready(port: int) -> bool:
    return (await get(port, "/readyz"))[0] == 200


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics answer, keyed by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


# --- the agent under test ---------------------------------------------------------------------------


class ControlledBackend(DryRunBackend):
    """The dry-run backend, whose syncs fail while ``broken`` and wait while ``gate`` is closed.
    ``applied`` is its "kernel": setting it to ``None`` is someone flushing the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.gate: anyio.Event | None = None

    async def sync(self, ruleset):
        if self.gate is not None:
            await self.gate.wait()
        if self.broken:
            raise ApplyError(["iptables-restore"], 4, "Another app is currently holding the xtables lock")
        return await super().sync(ruleset)


class Agent:
    """``masqd run --http-address 127.0.0.1:0`` in process: the agent :func:`build_agent` makes,
    run by :func:`masqd.testing.running`."""

    def __init__(self, config: Path, *, backend=None, plugins: Plugins | None = None, kube: KubeSettings | None = None,
                 loader: ConfigLoader | None = None, options: AgentOptions = AgentOptions(),
                 address: Address = Address("127.0.0.1", 0)):
        self.backend = backend or ControlledBackend()
        self.agent = build_agent(options, backend=self.backend, config=loader or config, plugins=plugins, kube=kube,
                                 http_address=address, retry_initial_seconds=0.01)
        self.status = self.agent.status
        self.port = 0

    def _bound(self, addresses: list[str]) -> None:
        self.port = int(addresses[0].rsplit(":", 1)[1])

    async def __aenter__(self) -> Agent:
        self._running = running(self.agent, first_pass=False, on_http_ready=self._bound)
        await self._running.__aenter__()
        await wait_until(lambda: self.status.running, "the reconciler to start")
        return self

    async def __aexit__(self, *exc):
        return await self._running.__aexit__(*exc)

    async def listening(self) -> None:
        await wait_until(lambda: self.port, "the endpoint to listen")

    async def metrics(self) -> dict:
        await self.listening()
        status, text = await get(self.port, "/metrics")
        assert status == 200
        return samples(text)

    async def passes(self, count: int) -> None:
        await wait_until(lambda: self.status.generation >= count, f"{count} passes")
        await self.listening()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ip-masq-agent"
    path.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n")
    return path


def replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- metrics content ----------------------------------------------------------------------------------


async def test_metrics_after_the_first_apply(config: Path) -> None:
    async with Agent(config) as agent:
        await agent.passes(1)
        status, headers, body = await request(agent.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=")
        metrics = samples(body.decode())
    assert value(metrics, "masqd_build_info", version=__version__, python=sys.version.split()[0],
                 backend="dry-run") == 1
    assert value(metrics, "masqd_reconciles_total", trigger="startup", result="applied") == 1
    assert value(metrics, "masqd_reconcile_duration_seconds_count", result="applied") == 1
    assert value(metrics, "masqd_reconcile_duration_seconds_count", result="failed") == 0
    assert value(metrics, "masqd_ready") == 1 and value(metrics, "masqd_config_valid") == 1
    assert value(metrics, "masqd_nonmasq_cidrs", family="ipv4", source="config") == 2
    assert value(metrics, "masqd_nonmasq_cidrs", family="ipv4", source="link-local") == 1
    assert value(metrics, "masqd_config_errors_total") == 0 and value(metrics, "masqd_drift_repairs_total") == 0
    assert value(metrics, "masqd_last_successful_apply_timestamp_seconds") == agent.status.applied_at
    assert not any(name.endswith("_created") for name, _ in metrics)


async def test_an_edit_is_counted_under_its_trigger_and_the_cidr_counts_follow(config: Path, tmp_path: Path) -> None:
    async with Agent(config) as agent:
        await agent.passes(1)
        replace(config, NO_RESYNC + "nonMasqueradeCIDRs: [198.51.100.0/24]\n")
        await agent.passes(2)
        metrics = await agent.metrics()
    assert value(metrics, "masqd_reconciles_total", trigger="file", result="applied") == 1
    assert value(metrics, "masqd_nonmasq_cidrs", family="ipv4", source="config") == 1


async def test_defaults_and_reserved_ranges_are_counted_as_such(tmp_path: Path) -> None:
    options = AgentOptions(nomasq_all_reserved_ranges=True)
    async with Agent(tmp_path / "absent", options=options) as agent:
        await agent.passes(1)
        metrics = await agent.metrics()
    assert value(metrics, "masqd_nonmasq_cidrs", family="ipv4", source="defaults") == 3
    assert value(metrics, "masqd_nonmasq_cidrs", family="ipv4", source="reserved-ranges") == 8


async def test_a_rejected_config_is_counted_and_leaves_the_agent_ready(config: Path) -> None:
    async with Agent(config) as agent:
        await agent.passes(1)
        replace(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.1/8]\n")
        await agent.passes(2)
        metrics = await agent.metrics()
        status, text = await get(agent.port, "/readyz")
    assert value(metrics, "masqd_config_errors_total") == 1
    assert value(metrics, "masqd_config_valid") == 0
    assert value(metrics, "masqd_reconciles_total", trigger="file", result="rejected") == 1
    assert value(metrics, "masqd_ready") == 1
    assert value(metrics, "masqd_nonmasq_cidrs", family="ipv4", source="config") == 2  # the rules kept
    assert status == 200
    assert "the newest config was rejected" in text and "10.0.0.0/8" in text  # the aligned form is named


async def test_a_plugin_that_raises_is_counted_by_plugin_and_hook(config: Path, masqd_plugins) -> None:
    class Broken:
        @hookimpl
        def nonmasq_cidrs(self, config, options):
            raise RuntimeError("CIDR service down")

    async with Agent(config, plugins=masqd_plugins(Broken())) as agent:
        await agent.passes(1)
        metrics = await agent.metrics()
        status, text = await get(agent.port, "/readyz")
    (plugin,) = {dict(labels)["plugin"] for (name, labels), count in metrics.items()
                 if name == "masqd_plugin_errors_total" and count}  # the others' series are at 0
    assert value(metrics, "masqd_plugin_errors_total", plugin=plugin, hook="nonmasq_cidrs") >= 1
    assert value(metrics, "masqd_plugin_errors_total", plugin="masqd.default_plugins.egress", hook="nonmasq_cidrs") == 0
    assert value(metrics, "masqd_reconciles_total", trigger="startup", result="rejected") == 1
    assert status == 503 and "no rules applied yet" in text and "CIDR service down" in text


async def test_drift_repair_is_counted(tmp_path: Path) -> None:
    config = tmp_path / "ip-masq-agent"
    config.write_text("resyncInterval: 100ms\n")
    async with Agent(config) as agent:
        await agent.passes(1)
        agent.backend.applied = None  # someone flushed the chain
        await wait_until(lambda: agent.backend.writes == 2, "the resync to restore the rules")
        metrics = await agent.metrics()
    assert value(metrics, "masqd_drift_repairs_total") == 1
    assert value(metrics, "masqd_reconciles_total", trigger="timer", result="applied") == 1


# --- readiness and liveness ---------------------------------------------------------------------------


async def test_a_failed_apply_makes_the_agent_unready_until_an_apply_succeeds(config: Path) -> None:
    async with Agent(config) as agent:
        await agent.passes(1)
        assert (await get(agent.port, "/readyz"))[0] == 200
        agent.backend.broken = True
        replace(config, NO_RESYNC + "nonMasqueradeCIDRs: [203.0.113.0/24]\n")
        await wait_until(lambda: agent.status.sync_failure is not None, "a failed apply")
        status, text = await get(agent.port, "/readyz")
        assert status == 503
        assert "the last apply failed" in text and "xtables lock" in text
        metrics = await agent.metrics()
        assert value(metrics, "masqd_ready") == 0
        assert value(metrics, "masqd_reconciles_total", trigger="file", result="failed") == 1
        assert value(metrics, "masqd_reconcile_duration_seconds_count", result="failed") >= 1
        assert (await get(agent.port, "/healthz"))[0] == 200  # failing, but alive and retrying
        agent.backend.broken = False
        await wait_until(lambda: agent.status.sync_failure is None, "the retry to succeed")
        status, text = await get(agent.port, "/readyz")
        assert status == 200 and "1 CIDRs" not in text and "2 CIDRs" in text  # link-local + 203.0.113.0/24
        metrics = await agent.metrics()
    assert value(metrics, "masqd_reconciles_total", trigger="retry", result="applied") == 1


async def test_not_ready_before_the_first_sync_and_unhealthy_when_a_pass_hangs(config: Path) -> None:
    backend = ControlledBackend()
    backend.gate = anyio.Event()
    async with Agent(config, backend=backend) as agent:
        await wait_until(lambda: agent.status.busy_since is not None, "the first pass to start")
        status, text = await get(agent.port, "/readyz")
        assert status == 503 and "no rules applied yet; waiting for the first sync" in text
        status, text = await get(agent.port, "/healthz")
        assert status == 200 and "in a pass" in text
        agent.status.health_deadline = 0.05
        await anyio.sleep(0.1)
        status, text = await get(agent.port, "/healthz")
        assert status == 503 and "reconciler stuck" in text and "deadline 0.05 s" in text
        backend.gate.set()
        await agent.passes(1)
        assert (await get(agent.port, "/healthz"))[0] == 200
        assert (await get(agent.port, "/readyz"))[0] == 200


async def test_unhealthy_once_the_reconciler_loop_has_stopped(config: Path) -> None:
    reconciler = Reconciler(DryRunBackend(), AgentOptions(), config)
    assert reconciler.status.health() == (False, "reconciler loop is not running")
    send, receive = anyio.create_memory_object_stream(1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reconciler.run, receive)
        await wait_until(lambda: reconciler.status.running, "the loop to start")
        assert reconciler.status.health()[0]
        await send.aclose()
    assert not reconciler.status.health()[0]


# --- Kubernetes watches ---------------------------------------------------------------------------------


async def test_watch_restarts_and_sync_are_exported(tmp_path: Path) -> None:
    ref = ObjectRef("kube-system", "ip-masq-agent")
    with FakeKubeAPI() as api:
        api.bookmark_interval = None
        api.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": ref.name, "namespace": ref.namespace},
                 "data": {"config": "nonMasqueradeCIDRs: [10.0.0.0/8]\n"}})
        settings = KubeSettings(configmap=ref, kubeconfig=str(api.write_kubeconfig(tmp_path / "kubeconfig")),
                                backoff_initial=0.05, backoff_max=0.2, request_timeout=5)
        loader = ConfigLoader([FileInput(tmp_path / "absent"), ConfigMapInput(ref, settings)], AgentOptions())
        async with Agent(tmp_path / "absent", kube=settings, loader=loader) as agent:
            await wait_until(lambda: api.watch_count == 1, "the watch to open")
            api.compact()
            api.expire_watches()
            watch = event_source(agent.agent, "configmap")
            await wait_until(lambda: watch.reflector.relists == 1, "a relist after 410")
            metrics = await agent.metrics()
    watch = "configmap kube-system/ip-masq-agent"
    assert value(metrics, "masqd_kube_watch_restarts_total", watch=watch, reason="expired") == 1
    assert value(metrics, "masqd_kube_watch_restarts_total", watch=watch, reason="stalled") == 0
    assert value(metrics, "masqd_kube_watch_synced", watch=watch) == 1


# --- the protocol and misbehaving clients ---------------------------------------------------------------


ROUTES = {"/a": lambda: Response.text(200, "a")}


@pytest.mark.parametrize("raw, status", [
    pytest.param(b"GET /a HTTP/1.1\r\n\r\n", 200, id="get"),
    pytest.param(b"GET /a?x=1&y HTTP/1.1\r\n\r\n", 200, id="query-ignored"),
    pytest.param(b"GET /a HTTP/1.0\n\n", 200, id="http-1.0-bare-newlines"),
    pytest.param(b"GET /b HTTP/1.1\r\n\r\n", 404, id="unknown-path"),
    pytest.param(b"POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, id="post"),
    pytest.param(b"GET /a HTTP/2.0\r\n\r\n", 505, id="http-2"),
    pytest.param(b"GET\r\n\r\n", 400, id="no-target"),
    pytest.param(b"GET a HTTP/1.1\r\n\r\n", 400, id="not-a-path"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, id="tls-hello"),
    pytest.param(b"GET /a HTTP/1.1\r\nX: " + b"y" * 9000 + b"\r\n\r\n", 431, id="head-too-long"),
])
async def test_requests_are_answered_or_refused_with_the_right_status(raw: bytes, status: int) -> None:
    async with Served(ROUTES) as served:
        answer, headers, body = await request(served.port, raw)
    assert answer == status
    assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)


async def test_unknown_path_names_the_known_ones_and_post_says_what_is_allowed() -> None:
    async with Served(ROUTES) as served:
        status, text = await get(served.port, "/metrix")
        assert status == 404 and "'/metrix'" in text and "/a" in text
        status, headers, _ = await request(served.port, b"DELETE /a HTTP/1.1\r\n\r\n")
        assert status == 405 and headers["allow"] == "GET, HEAD"


async def test_head_has_the_headers_of_get_and_no_body() -> None:
    async with Served(ROUTES) as served:
        _, get_headers, get_body = await request(served.port, b"GET /a HTTP/1.1\r\n\r\n")
        status, headers, body = await request(served.port, b"HEAD /a HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(get_body)) == "2"


async def test_a_failing_handler_answers_500_and_the_server_goes_on() -> None:
    def broken() -> Response:
        raise ValueError("boom")

    async with Served({**ROUTES, "/broken": broken}) as served:
        status, text = await get(served.port, "/broken")
        assert status == 500 and "boom" in text
        assert (await get(served.port, "/a"))[0] == 200


async def test_an_idle_client_does_not_delay_others_and_is_dropped() -> None:
    async with Served(ROUTES, read_timeout=0.3) as served:
        async with await anyio.connect_tcp("127.0.0.1", served.port) as idle:
            assert (await get(served.port, "/a"))[0] == 200  # answered while the idle one waits
            assert served.server.dropped == 0
            with anyio.fail_after(WAIT):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await idle.receive()  # closed without an answer
    assert served.server.dropped == 1 and served.server.active == 0


async def test_a_trickling_client_is_dropped_at_the_deadline() -> None:
    async with Served(ROUTES, read_timeout=0.3) as served:
        async with await anyio.connect_tcp("127.0.0.1", served.port) as slow:
            closed = False
            with anyio.fail_after(WAIT):
                for byte in b"GET /a HTTP/1.1\r\nX-Padding: " + b"y" * 10_000:
                    try:
                        await slow.send(bytes([byte]))
                    except (anyio.BrokenResourceError, OSError):
                        closed = True
                        break
                    await anyio.sleep(0.01)
            assert closed, "the server kept reading a request that never ends"
    assert served.server.dropped == 1


async def test_a_client_that_never_reads_its_answer_is_dropped_and_others_are_served() -> None:
    big = Response(200, b"x" * (64 << 20))
    async with Served({**ROUTES, "/big": lambda: big}, write_timeout=0.3) as served:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", served.port))
        try:
            sock.sendall(b"GET /big HTTP/1.1\r\n\r\n")
            await wait_until(lambda: served.server.active == 1, "the big answer to be in flight")
            assert (await get(served.port, "/a"))[0] == 200  # not blocked by the stuck one
            await wait_until(lambda: served.server.dropped == 1, "the stuck answer to be dropped")
        finally:
            sock.close()
    assert served.server.active == 0


async def test_beyond_max_connections_the_newest_is_served_and_the_oldest_idle_one_closed() -> None:
    async with Served(ROUTES, read_timeout=WAIT, max_connections=2) as served:
        async with await anyio.connect_tcp("127.0.0.1", served.port) as one, \
                await anyio.connect_tcp("127.0.0.1", served.port) as two:
            await wait_until(lambda: served.server.active == 2, "two held connections")
            assert (await get(served.port, "/a"))[0] == 200  # a third: served, not refused
            with anyio.fail_after(WAIT):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await one.receive()  # the oldest idle one made room
            assert served.server.evicted == 1 and served.server.active == 1  # `two` is still held
            await two.send(b"GET /a HTTP/1.1\r\n\r\n")
            with anyio.fail_after(WAIT):
                assert (await two.receive()).startswith(b"HTTP/1.1 200 ")


# --- the flag and the real command ---------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    pytest.param(":9142", Address(None, 9142), id="every-interface"),
    pytest.param("127.0.0.1:9142", Address("127.0.0.1", 9142), id="ipv4"),
    pytest.param("[::1]:9142", Address("::1", 9142), id="ipv6"),
    pytest.param("localhost:0", Address("localhost", 0), id="name-and-any-port"),
    pytest.param("", None, id="empty-disables"),
])
def test_http_address_flag(text: str, expected: Address | None) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text, reason", [
    pytest.param("9142", "expected HOST:PORT", id="no-colon"),
    pytest.param(":65536", "not a number from 0 to 65535", id="port-too-big"),
    pytest.param(":http", "not a number", id="port-name"),
    pytest.param("::1:9142", "brackets", id="bare-ipv6"),
    pytest.param("a b:9142", "not an address", id="space"),
])
def test_http_address_flag_errors_say_what_is_valid(text: str, reason: str) -> None:
    with pytest.raises(FlagError, match=reason) as caught:
        parse_listen_address(text)
    assert caught.value.flag == "http-address"


@pytest.mark.parametrize("head, parsed", [
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x", Request("GET", "/metrics"), id="get"),
    pytest.param(b"HEAD /readyz?verbose HTTP/1.0", Request("HEAD", "/readyz"), id="head-query"),
])
def test_request_line(head: bytes, parsed: Request) -> None:
    assert parse_request_head(head) == parsed


@pytest.mark.parametrize("head, status", [
    pytest.param(b"get /a HTTP/1.1", 400, id="lowercase-method"),
    pytest.param(b"GET /a HTTP/3", 505, id="http-3"),
    pytest.param(b"GET /a FTP/1.1", 400, id="not-http"),
    pytest.param(b"GET  /a HTTP/1.1", 400, id="double-space"),
    pytest.param("GET /ä HTTP/1.1".encode(), 400, id="not-ascii"),
])
def test_bad_request_lines(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request_head(head)
    assert caught.value.status == status


async def test_a_port_in_use_does_not_stop_masquerading_and_is_bound_once_free(config: Path, monkeypatch) -> None:
    import structlog

    import masqd.http

    monkeypatch.setattr(masqd.http, "BIND_RETRY_SECONDS", 0.05)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with structlog.testing.capture_logs() as logs:
        async with Agent(config, address=Address("127.0.0.1", port)) as agent:
            await wait_until(lambda: agent.status.generation >= 1, "the first pass")
            assert agent.backend.applied is not None  # the rules are there without the endpoint
            await anyio.sleep(0.2)  # several bind attempts
            errors = [e for e in logs if e["event"].startswith("HTTP endpoint cannot listen")]
            assert len(errors) == 1  # the same failure is logged once, not per attempt
            assert f"--http-address=127.0.0.1:{port}: cannot listen there" in errors[0]["error"]
            taken.close()
            await agent.listening()
            assert agent.port == port and (await get(port, "/readyz"))[0] == 200


def test_the_real_command_serves_probes_and_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC)
    masqd = Path(sys.executable).with_name("masqd")
    proc = subprocess.Popen([str(masqd), "run", "--backend", "dry-run", "--config", str(config), "--log-format",
                             "json", "--http-address", "127.0.0.1:0"], stderr=subprocess.PIPE)
    lines = netns.LineReader(proc.stderr)
    try:
        port = None
        while port is None and (line := lines.readline(WAIT)) is not None:
            if "HTTP endpoint listening" in line:
                port = int(line.split('127.0.0.1:')[1].split('"')[0])
        assert port, "masqd never said where it listens"

        async def probe() -> tuple:
            await wait_until(lambda: ready(port), "/readyz to answer 200", timeout=WAIT, interval=0.01)
            return await get(port, "/healthz"), await get(port, "/metrics")

        (health, _), (status, text) = anyio.run(probe)
        assert health == 200 and status == 200 and "masqd_ready 1.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        proc.kill()
        proc.wait()
        lines.close()


# --- the CIDR counts agree with explain's provenance ---------------------------------------------------


@pytest.mark.parametrize("texts, options, contributed", [
    pytest.param({"a": "nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]"}, AgentOptions(), {}, id="one-file"),
    pytest.param({"a": "nonMasqueradeCIDRs: [10.0.0.0/8]", "b": "nonMasqueradeCIDRs: [10.0.0.0/8, fd00::/8]"},
                 AgentOptions(enable_ipv6=True), {}, id="two-files-overlap-ipv6"),
    pytest.param({}, AgentOptions(), {}, id="defaults"),
    pytest.param({"a": "masqLinkLocal: true"}, AgentOptions(nomasq_all_reserved_ranges=True), {},
                 id="reserved-ranges-link-local-masqueraded"),
    pytest.param({"a": "nonMasqueradeCIDRs: [10.0.0.0/8]"}, AgentOptions(enable_ipv6=True),
                 {"cidr-files": ["198.51.100.0/24", "10.0.0.0/8"], "other": ["198.51.100.0/24", "2001:db8::/32"],
                  "egress-nat-policies": ["203.0.113.0/24"]}, id="plugins-and-policies"),
])
def test_cidr_counts_by_origin_agree_with_explains_provenance(texts, options, contributed) -> None:
    from collections import Counter

    from masqd.cidrs import parse_cidr
    from masqd.config import merge_configs, parse_config
    from masqd.plugins import Contribution
    from masqd.provenance import Origin, cidr_origins, origin_counts
    from masqd.ruleset import compute_ruleset

    merged = merge_configs([(name, parse_config(text, options).config) for name, text in texts.items()], options)
    contributions = tuple(Contribution(plugin, tuple(map(parse_cidr, cidrs)),
                                       "policy" if plugin == "egress-nat-policies" else "plugin")
                          for plugin, cidrs in contributed.items())
    extra = tuple(net for c in contributions for net in c.cidrs)
    ruleset = compute_ruleset(merged.config, options, extra)
    policies = {"egress-nat-policies": {net: (Origin("policy", "p"),) for c in contributions
                                        if c.plugin == "egress-nat-policies" for net in c.cidrs}}
    origins = cidr_origins(ruleset, merged, contributions, options, descriptions=policies)
    expected = Counter((f"ipv{net.version}", kind) for net, found in origins.items()
                       for kind in {origin.kind for origin in found})
    assert origin_counts(ruleset, merged, contributions, options) == dict(expected)


# --- review: state transitions and hostile clients -------------------------------------------------------


async def test_healing_old_rules_under_a_bad_config_does_not_make_a_failed_apply_ready(config: Path) -> None:
    """X1 applied; X2 accepted but its apply fails; then the config breaks and the fallback sync
    of X1 succeeds: the kernel still lacks X2, the newest valid state, so not ready."""
    async with Agent(config) as agent:
        await agent.passes(1)
        agent.backend.broken = True
        replace(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24, 198.51.100.0/24]\n")
        await wait_until(lambda: agent.status.sync_failure is not None, "the apply of X2 to fail")
        agent.backend.broken = False
        replace(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.1/8]\n")
        await wait_until(lambda: agent.status.config_failure is not None, "the bad config")
        status, text = await get(agent.port, "/readyz")
        assert status == 503 and "the last apply failed" in text
        metrics = await agent.metrics()
        assert value(metrics, "masqd_ready") == 0 and value(metrics, "masqd_config_valid") == 0
        # (a text other than X2's: a watcher that saw X2, then the bad text and X2 again in one
        # batch, rightly sees no change; the reconciler read the bad text on its retry)
        replace(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24, 198.51.100.0/24]  # fixed\n")
        await wait_until(lambda: agent.status.config_failure is None and agent.status.sync_failure is None,
                         "the fixed config to apply")
        assert (await get(agent.port, "/readyz"))[0] == 200
        assert "198.51.100.0/24" in agent.backend.last_rendered


async def test_config_validity_does_not_depend_on_whether_the_sync_worked(config: Path) -> None:
    async with Agent(config) as agent:
        await agent.passes(1)
        agent.backend.broken = True
        replace(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.1/8]\n")  # bad config, and the heal fails
        await wait_until(lambda: agent.status.config_failure is not None, "the rejection")
        metrics = await agent.metrics()
        # (each retry of the failed heal reads the bad config again: counted once or more)
        assert value(metrics, "masqd_config_valid") == 0 and value(metrics, "masqd_config_errors_total") >= 1
        replace(config, NO_RESYNC + "nonMasqueradeCIDRs: [203.0.113.0/24]\n")  # fixed, but the apply fails
        await wait_until(lambda: agent.status.config_failure is None, "the fixed config")
        rejected, generation = value(await agent.metrics(), "masqd_config_errors_total"), agent.status.generation
        await wait_until(lambda: agent.status.generation > generation, "a retried (failing) apply of it")
        metrics = await agent.metrics()
        assert value(metrics, "masqd_config_valid") == 1 and value(metrics, "masqd_ready") == 0
        assert value(metrics, "masqd_config_errors_total") == rejected  # failed applies are not config errors


async def test_a_repair_made_while_the_config_is_bad_is_counted(tmp_path: Path) -> None:
    config = tmp_path / "ip-masq-agent"
    config.write_text("resyncInterval: 100ms\n")
    async with Agent(config) as agent:
        await agent.passes(1)
        replace(config, "resyncInterval: 100ms\nnonMasqueradeCIDRs: [10.0.0.1/8]\n")
        await wait_until(lambda: agent.status.config_failure is not None, "the rejection")
        agent.backend.applied = None  # someone flushed the chain
        await wait_until(lambda: agent.backend.writes == 2, "the resync to restore the rules")
        metrics = await agent.metrics()
    assert value(metrics, "masqd_drift_repairs_total") == 1


async def test_one_peer_cannot_take_every_connection() -> None:
    async with Served(ROUTES, read_timeout=WAIT, max_per_peer=2) as served:
        async with await anyio.connect_tcp("127.0.0.1", served.port) as _one, \
                await anyio.connect_tcp("127.0.0.1", served.port) as _two:
            await wait_until(lambda: served.server.active == 2, "two held connections")
            status, _ = await get(served.port, "/a")  # a third from the same address: served
            assert status == 200 and served.server.evicted == 1  # in place of its oldest idle one
            other = await request_from("127.0.0.2", served.port)  # the kubelet, say
            assert other[0] == 200
            assert served.server.evicted == 1  # 127.0.0.2 never made 127.0.0.1 lose another


async def request_from(local_host: str, port: int) -> tuple[int, dict[str, str], bytes]:
    with anyio.fail_after(WAIT):
        async with await anyio.connect_tcp("127.0.0.1", port, local_host=local_host) as stream:
            await stream.send(b"GET /a HTTP/1.1\r\n\r\n")
            data = b""
            try:
                while True:
                    data += await stream.receive()
            except anyio.EndOfStream:
                pass
    return int(data.split(b" ")[1]), {}, data


class FlakyListener(anyio.abc.Listener):
    """A real listener whose first ``accept()`` calls fail as they do when the process is out
    of file descriptors."""

    def __init__(self, inner: anyio.abc.Listener, failures: int):
        self.inner = inner
        self.failures = failures

    async def accept(self):
        if self.failures:
            self.failures -= 1
            await anyio.sleep(0)
            raise OSError(24, "Too many open files")
        return await self.inner.accept()

    async def serve(self, handler, task_group=None):
        raise AssertionError("HttpServer runs its own accept loop")

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self):
        return self.inner.extra_attributes


async def test_failing_accepts_are_survived() -> None:
    (inner,) = (await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)).listeners
    port = inner.extra(anyio.abc.SocketAttribute.local_port)
    server = HttpServer(ROUTES)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, FlakyListener(inner, 5))
        assert (await get(port, "/a"))[0] == 200
        tg.cancel_scope.cancel()
    assert server.accept_errors == 5
