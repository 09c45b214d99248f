#!/usr/bin/env python3
"""Cost of the HTTP endpoint: scrape and probe latency at 10k-100k CIDRs, and while clients misbehave.

In process, on the dry-run backend (no root needed, no kernel touched), the daemon's agent
(``masqd.agent.build_agent``, run by ``masqd.testing.running`` as ``masqd run`` runs it) serves the
endpoint on 127.0.0.1 (a free port) with a config of N non-masquerade CIDRs; for each N it times:

- the first ``/metrics`` after an apply (the CIDR-by-origin counts are computed once per applied
  state), then the median of 50 more (the cached counts);
- the median ``/readyz`` and ``/healthz`` of 50 each;
- the median ``/healthz`` while 60 idle connections (from several loopback addresses, each just
  under the per-peer connection limit, so the probes from 127.0.0.1 are not refused) and one
  client that never reads a 64 MiB answer are held open: a misbehaving client must not slow the
  probes down.

Every request is a fresh connection over a real socket, timed from connect to the server's close.

    .venv/bin/python benchmarks/http_scrape.py [--cidrs 10000,100000]

Output: one line per N with those times in milliseconds, and the size of the /metrics answer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import anyio
from bench_common import cidr_blocks

from masqd.agent import build_agent
from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.http import MAX_PER_PEER, Address, HttpServer, Response
from masqd.logs import configure_logging
from masqd.testing import running, wait_until

REPEATS = 50
IDLE_CLIENTS = 60


async def fetch(port: int, path: str) -> tuple[float, int]:
    """Seconds for one GET (connect to close) and the answer's size."""
    start = time.perf_counter()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        size = 0
        try:
            while True:
                size += len(await stream.receive(65536))
        except anyio.EndOfStream:
            pass
    return time.perf_counter() - start, size


async def median_ms(port: int, path: str) -> float:
    return statistics.median([(await fetch(port, path))[0] for _ in range(REPEATS)]) * 1000


async def measure(count: int, workdir: Path) -> str:
    config = workdir / f"config-{count}"
    config.write_text(f"resyncInterval: 1h\ncidrLimit: {count}\nnonMasqueradeCIDRs:\n"
                      + "".join(f"- {c}\n" for c in cidr_blocks(count)))
    agent = build_agent(AgentOptions(), backend=DryRunBackend(), config=config, http_address=Address("127.0.0.1", 0))
    bound: list[int] = []
    async with running(agent, on_http_ready=lambda a: bound.append(int(a[0].rsplit(":", 1)[1]))):  # first pass done
        port = (await wait_until(lambda: bound, "the endpoint listening"))[0]
        first, size = await fetch(port, "/metrics")
        metrics = await median_ms(port, "/metrics")
        ready = await median_ms(port, "/readyz")
        health = await median_ms(port, "/healthz")
        idle = [await anyio.connect_tcp("127.0.0.1", port, local_host=idle_peer(i)) for i in range(IDLE_CLIENTS)]
        busy = await misbehaving_health(port)
        for stream in idle:
            await stream.aclose()
    return (f"{count:>7} CIDRs: /metrics first {first * 1000:7.1f} ms, then {metrics:5.2f} ms ({size} bytes); "
            f"/readyz {ready:5.2f} ms; /healthz {health:5.2f} ms, with {IDLE_CLIENTS} idle clients and a "
            f"non-reader {busy:5.2f} ms")


def idle_peer(index: int) -> str:
    """The loopback address idle client ``index`` connects from: at most MAX_PER_PEER - 1 per
    address, none from 127.0.0.1 (the probes' own address)."""
    return f"127.0.0.{2 + index // (MAX_PER_PEER - 1)}"


async def misbehaving_health(port: int) -> float:
    """Median /healthz of the daemon at ``port`` while a client on a second server sits on a
    64 MiB answer it never reads (the same server class, same event loop)."""
    big = Response(200, b"x" * (64 << 20))
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    other_port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(HttpServer({"/big": lambda: big}, write_timeout=30).serve, listener)
        stuck = await anyio.connect_tcp("127.0.0.1", other_port)
        await stuck.send(b"GET /big HTTP/1.1\r\n\r\n")
        result = await median_ms(port, "/healthz")
        await stuck.aclose()
        tg.cancel_scope.cancel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cidrs", default="10000,100000", help="comma-separated list sizes")
    args = parser.parse_args()
    configure_logging(30, "json")  # warnings only: the dry-run log of 100k rules is not the subject
    with tempfile.TemporaryDirectory() as workdir:
        for count in (int(c) for c in args.cidrs.split(",")):
            print(anyio.run(measure, count, Path(workdir)), flush=True)


if __name__ == "__main__":
    main()
