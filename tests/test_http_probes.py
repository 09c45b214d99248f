"""Probes are never starved (issue 17, section 6): idle connections, even from the address the
kubelet probes from, never make ``/healthz`` or ``/readyz`` fail, and a flood of connections from
one address stays bounded and never costs another address its connections.

Real TCP sockets on 127.0.0.0/8 only (``127.0.0.2`` and up are other peers); every wait has a
deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from masqd.agent import build_agent
from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.http import MAX_PER_PEER, Address, HttpServer, Response
from masqd.testing import running, wait_until
from support import Served, request

WAIT = 10  # seconds before a test gives up (a failure, not a timing claim)
ROUTES = {"/a": lambda: Response.text(200, "a")}


async def get(port: int, path: str, *, local_host: str = "127.0.0.1") -> tuple[int, str]:
    """``GET path`` from ``local_host``; the status and body of the answer."""
    status, _, body = await request(port, f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode(), local_host=local_host)
    return status, body.decode()


@contextmanager
def idle_connections(port: int, count: int, *, local_host: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """``count`` connections from ``local_host`` that never send a byte, closed at the end."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(local_host, 0))
            sock.setblocking(False)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (without an answer: an idle connection gets none)."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def still_open(socks: list[socket.socket]) -> int:
    return sum(not closed_by_server(sock) for sock in socks)


# --- the agent's own endpoint, default limits ------------------------------------------------------


async def test_idle_connections_from_the_probes_address_do_not_fail_the_probes(tmp_path: Path) -> None:
    """A node-local process holds more idle connections than MAX_PER_PEER from the node's address,
    the one the kubelet probes a hostNetwork pod from: both probes still answer."""
    config = tmp_path / "ip-masq-agent"
    config.write_text("resyncInterval: 1h\n")
    bound: list[str] = []
    agent = build_agent(AgentOptions(), backend=DryRunBackend(), config=config,
                        http_address=Address("127.0.0.1", 0), retry_initial_seconds=0.01)
    async with running(agent, on_http_ready=bound.extend):
        await wait_until(lambda: bound, "the endpoint to listen")
        port = int(bound[0].rsplit(":", 1)[1])
        held = MAX_PER_PEER + 8
        with idle_connections(port, held) as socks:
            # the server has taken every one, keeping MAX_PER_PEER and closing the oldest others
            await wait_until(lambda: still_open(socks) == MAX_PER_PEER, "the server to hold MAX_PER_PEER")
            for path in ("/healthz", "/readyz"):
                status, text = await get(port, path)
                assert status == 200, f"{path}: {status} {text}"
            status, text = await get(port, "/metrics")  # beyond the limit too: served, not refused
            assert status == 200 and "masqd_ready 1.0" in text
            # the first request took an idle one's place; the later ones, the place it left
            assert still_open(socks) == MAX_PER_PEER - 1


# --- the limits, on a server of its own ---------------------------------------------------------------


async def test_a_flood_from_one_address_stays_bounded_and_costs_no_one_else() -> None:
    async with Served(ROUTES, read_timeout=WAIT, max_connections=16, max_per_peer=4) as served:
        server = served.server
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, server.active)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            # the kubelet, say: a request half sent when the flood starts
            with anyio.fail_after(WAIT):
                kubelet = await anyio.connect_tcp("127.0.0.1", served.port, local_host="127.0.0.2")
            async with kubelet:
                await kubelet.send(b"GET /a HTTP/1.1\r\n")
                await wait_until(lambda: server.active == 1, "the kubelet's connection")
                flood = 300
                with idle_connections(served.port, flood) as socks:
                    await wait_until(lambda: still_open(socks) == 4, "the flood to be taken in", timeout=WAIT)
                    assert peak <= 5 and server.active == 5  # 4 from the flooder, 1 from the kubelet
                    assert server.evicted == flood - 4  # all from the flooder's own connections
                    await kubelet.send(b"Host: test\r\n\r\n")  # ... and its answer still comes
                    with anyio.fail_after(WAIT):
                        assert (await kubelet.receive()).startswith(b"HTTP/1.1 200 ")
                    assert (await get(served.port, "/a"))[0] == 200  # the flooder's address too
                    assert (await get(served.port, "/a", local_host="127.0.0.3"))[0] == 200
            tg.cancel_scope.cancel()
    assert peak <= 5


async def test_at_max_connections_the_address_holding_most_makes_room() -> None:
    async with Served(ROUTES, read_timeout=WAIT, max_connections=8, max_per_peer=4) as served:
        with idle_connections(served.port, 4, local_host="127.0.0.2") as most, \
                idle_connections(served.port, 3, local_host="127.0.0.3") as fewer, \
                idle_connections(served.port, 1, local_host="127.0.0.4") as one:
            await wait_until(lambda: served.server.active == 8, "eight held connections")
            status, _ = await get(served.port, "/a", local_host="127.0.0.5")  # the kubelet, say
            assert status == 200 and served.server.evicted == 1
            await wait_until(lambda: still_open(most) == 3, "the oldest of 127.0.0.2 to close")
            assert closed_by_server(most[0])
            assert still_open(fewer) == 3 and still_open(one) == 1


async def test_a_connection_being_answered_is_not_closed_while_an_idle_one_can_be() -> None:
    big = Response(200, b"x" * (16 << 20))
    async with Served({**ROUTES, "/big": lambda: big}, read_timeout=WAIT, write_timeout=WAIT,
                      max_per_peer=2) as served:
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(WAIT)
        slow.connect(("127.0.0.1", served.port))
        try:
            slow.sendall(b"GET /big HTTP/1.1\r\n\r\n")  # an answer it is slow to take
            await wait_until(lambda: served.server.active == 1 and served.server.evicted == 0, "the answer in flight")
            with idle_connections(served.port, 1) as (idle,):
                await wait_until(lambda: served.server.active == 2, "the idle one")
                assert (await get(served.port, "/healthz"))[0] == 404  # served, in the idle one's place
                await wait_until(lambda: closed_by_server(idle), "the idle one to close")
            received = 0

            def take_all() -> None:
                nonlocal received
                while chunk := slow.recv(1 << 20):
                    received += len(chunk)

            await anyio.to_thread.run_sync(take_all)
            assert received > len(big.body)  # the whole answer, head and body
        finally:
            slow.close()
    assert served.server.evicted == 1 and served.server.dropped == 0


def test_the_limits_must_admit_at_least_one_connection() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HttpServer(ROUTES, max_per_peer=0)


async def test_hundreds_of_addresses_holding_idle_connections_do_not_keep_a_probe_waiting() -> None:
    """The global cap (MAX_CONNECTIONS, 256) and the per-address eviction fit together: with more
    addresses than the cap each holding an idle connection, a probe from one more address is
    answered at once (an idle connection makes room), never queued behind the read deadlines."""
    from contextlib import ExitStack

    from masqd.http import MAX_CONNECTIONS

    async with Served(ROUTES, read_timeout=WAIT * 10) as served:
        with ExitStack() as stack:
            for index in range(MAX_CONNECTIONS + 20):  # 127.0.1.1 and up: one idle connection each
                peer = f"127.0.{1 + index // 250}.{index % 250 + 1}"
                stack.enter_context(idle_connections(served.port, 1, local_host=peer))
            await wait_until(lambda: served.server.active == MAX_CONNECTIONS, "the cap to be reached", timeout=WAIT)
            with anyio.fail_after(WAIT):  # well inside the idle connections' read deadline
                status, body = await get(served.port, "/a", local_host="127.0.0.2")  # the kubelet, say
            assert (status, body) == (200, "a\n")
