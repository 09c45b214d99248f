"""Load: a burst of config changes (or of Kubernetes watch events) is coalesced, other sources are
still served meanwhile, and the agent ends on the last change.

``benchmarks/burst.py`` measures the same with the real command (passes, time, RSS before and
after); here the behaviour is asserted, never a time: in process, and with the real daemon
against the kernel of a network namespace (both backends), where the final rules and the
daemon's memory are checked too.
"""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import anyio
import pytest

from kubeapi import FakeKubeAPI
from support import NO_RESYNC, KubeAgent, agent, cidrs_of, cidrs_only, configmap, policy, watch_settings, write_atomically

from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.default_plugins.egress import EgressNATPolicies
from masqd.events import Event, make_emit
from masqd.reconcile import Reconciler
from masqd.testing import netns, running, wait_until
from masqd.testing.processes import rss_kib

BURST = 10_000


def nth(i: int) -> str:
    return f"10.{i // 256}.{i % 256}.0/24"


async def test_ten_thousand_config_changes_are_coalesced_and_the_last_one_wins(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [192.0.2.0/24]\n")
    backend = DryRunBackend()
    async with running(agent(backend, config)) as daemon:
        for i in range(BURST):
            write_atomically(config, NO_RESYNC + f"nonMasqueradeCIDRs: [{nth(i)}]\n")
            await anyio.sleep(0)  # the watcher and the reconciler run in between, as with a real writer
        await wait_until(lambda: cidrs_of(backend.applied)[1:] == [nth(BURST - 1)], "the last config")
        passes = daemon.status.generation
        assert passes < BURST // 2, f"{passes} passes for {BURST} changes: not coalesced"
        assert backend.writes <= passes and daemon.status.errors == 0
        await anyio.sleep(0.3)  # nothing left queued: no pass after the last state
        assert daemon.status.generation == passes


async def test_an_event_flood_costs_a_bounded_number_of_passes(tmp_path: Path) -> None:
    """A source emitting events as fast as it can: the queue is bounded (EVENT_BUFFER), so the
    flood is dropped rather than queued, and every pass still sees the newest state."""
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [198.51.100.0/24]\n")
    backend = DryRunBackend()
    reconciler = Reconciler(backend, AgentOptions(), config)
    send, receive = anyio.create_memory_object_stream[Event](max_buffer_size=64)
    emit = make_emit(send)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reconciler.run, receive)
        for i in range(BURST):
            emit(Event("flood", str(i)))
            if i % 1000 == 0:
                await anyio.sleep(0)
        await wait_until(lambda: reconciler.status.generation >= 1, "a pass")
        send.close()
    assert reconciler.status.generation <= BURST // 1000 + 2  # one pass per yield at most, not per event
    assert cidrs_of(backend.applied)[1:] == ["198.51.100.0/24"] and backend.writes == 1


# --- a Kubernetes watch that floods events ------------------------------------------------------------

WATCH_FLOOD = 3_000  # the flood sends at least this many MODIFIED events...
WATCH_FLOOD_MAX = 50_000  # ...and at most this many (a starved event loop fails the test, not hangs it)
WAIT_FLOOD = 60


class _Flood:
    """A writer thread replacing one object on the fake API server as fast as it can (each a new
    MODIFIED event on every watch of it), until told to stop once at least ``minimum`` were sent."""

    def __init__(self, api: FakeKubeAPI, make_object, minimum: int = WATCH_FLOOD, maximum: int = WATCH_FLOOD_MAX):
        self.api = api
        self.make_object = make_object
        self.minimum = minimum
        self.maximum = maximum
        self.sent = 0
        self.last: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch-flood", daemon=True)

    def _run(self) -> None:
        while self.sent < self.maximum and (self.sent < self.minimum or not self._stop.is_set()):
            self.last = self.api.put(self.make_object(self.sent))
            self.sent += 1

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_FLOOD)
        assert not self._thread.is_alive(), "the flood did not stop"

    def __enter__(self) -> _Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(WAIT_FLOOD)


def _steady(kind: str, cidr: str) -> dict:
    """The object that is not flooded: edited once during the flood (the other watch)."""
    return policy("steady", "NoSNAT", cidr) if kind == "configmap" else configmap(cidrs_only(cidr))


def _flooded(kind: str, i: int) -> dict:
    return configmap(cidrs_only(nth(i))) if kind == "configmap" else policy("flood", "NoSNAT", nth(i))


@pytest.mark.parametrize("kind", ["configmap", "policy"])
async def test_a_flooding_watch_cannot_starve_the_reconciler(api, tmp_path: Path, kind: str) -> None:
    """One watched object (the ConfigMap, or an EgressNATPolicy) is replaced thousands of times as
    fast as the API server takes it, each replacement streamed to the agent's watch. Meanwhile a
    config-file edit and an edit of the other watched kind are still applied and passes go on
    completing; the flood costs far fewer passes than events, and the agent ends on the last
    object sent."""
    file = tmp_path / "ip-masq-agent"
    file.write_text(cidrs_only("192.0.2.0/24"))
    settings = watch_settings(api, tmp_path)
    api.put(_flooded(kind, 0))
    api.put(_steady(kind, "198.51.100.0/24"))
    async with KubeAgent(settings, file) as agent:
        plugin = next(p for p in agent.agent.plugins.pm.get_plugins() if isinstance(p, EgressNATPolicies))

        def flooded_object():
            """The agent's copy of the flooded object: its config text or spec, and version."""
            if kind == "configmap":
                return agent.configmap.text, agent.configmap.resource_version
            obj = plugin.objects.get("flood") or {"spec": None, "metadata": {}}
            return obj["spec"], obj["metadata"].get("resourceVersion")

        def versions_seen() -> int:
            return int(flooded_object()[1] or 0)

        await wait_until(lambda: {"192.0.2.0/24", "198.51.100.0/24", nth(0)} <= agent.applied(), "the first state")
        start = int(api.resource_version)
        with _Flood(api, lambda i: _flooded(kind, i + 1)) as flood:
            await wait_until(lambda: versions_seen() > start + 100, "the agent's watch receiving the flood")
            passes_before = agent.status.generation
            seen_before = versions_seen()

            write_atomically(file, cidrs_only("192.0.2.0/24 203.0.113.0/24"))  # another source
            await wait_until(lambda: "203.0.113.0/24" in agent.applied(), "the file edit during the flood")
            assert flood.running, "the flood was over before the file edit was applied: nothing shown"
            api.put(_steady(kind, "198.51.100.0/25"))  # another watch
            await wait_until(lambda: "198.51.100.0/25" in agent.applied(), "the other watch's edit, during it")
            assert flood.running, "the flood was over before the other watch's edit was applied: nothing shown"
            assert versions_seen() > seen_before  # the flood kept arriving meanwhile
            assert agent.status.generation >= passes_before + 2  # and passes kept completing
            flood.stop()
        last = flood.last
        last_cidr = nth(flood.sent)  # object i carries nth(i + 1)
        final = {"192.0.2.0/24", "203.0.113.0/24", "198.51.100.0/25", last_cidr}
        await wait_until(lambda: agent.applied() == final, "the last object sent")
        content = last["data"]["config"] if kind == "configmap" else last["spec"]
        assert flooded_object() == (content, last["metadata"]["resourceVersion"])
        passes, events = agent.status.generation, flood.sent
        assert WATCH_FLOOD <= events < WATCH_FLOOD_MAX
        assert passes < events // 10, f"{passes} passes for {events} watch events: not coalesced"
        assert agent.status.errors == 0 and agent.status.last_error is None
        await anyio.sleep(0.3)  # nothing left queued: no pass after the last state
        assert agent.status.generation == passes


def _kernel_holds(ns: str, backend: str, cidrs: list[str]) -> bool:
    """The kernel keeps exactly ``cidrs`` (in chain order for iptables) and nothing else."""
    if backend == "iptables":
        return [line.split()[3] for line in netns.chain_lines(ns)[:-1]] == cidrs
    nets = sorted(ipaddress.ip_network(cidr) for cidr in cidrs)
    return netns.set_intervals(ns, 4) == tuple((int(n.network_address), int(n.broadcast_address)) for n in nets)


#: RSS the daemon may gain over the whole burst: a leak of 1.6 KiB per change would exceed it.
BURST_RSS_GROWTH_KIB = 16 * 1024


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_burst_against_the_kernel_ends_on_the_last_config_with_flat_memory(node_ns, tmp_path, backend):
    """The real daemon in a namespace: 10,000 config replaces as fast as a writer can go. The
    kernel ends holding exactly the last config's rules, nothing fails, and the daemon's memory
    does not grow with the number of changes (benchmarks/burst.py prints the figures)."""
    from masqd_proc import DaemonProcess

    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [192.0.2.0/24]\n")
    process = DaemonProcess(node_ns, config, "--http-address=", backend=backend)
    try:
        process.next_event(lambda e: e.get("event") == "rules applied")
        before = rss_kib(process.proc.pid)
        for i in range(BURST):
            write_atomically(config, NO_RESYNC + f"nonMasqueradeCIDRs: [{nth(i)}]\n")
        final = ["169.254.0.0/16", nth(BURST - 1)]
        assert netns.wait_for(lambda: _kernel_holds(node_ns, backend, final), timeout=60), \
            netns.iptables_save(node_ns) if backend == "iptables" else netns.set_intervals(node_ns, 4)
        after = rss_kib(process.proc.pid)
        process.proc.terminate()
        process.next_event(lambda e: e.get("event") == "masqd stopped")  # every event, read to the end
        assert process.proc.wait(timeout=10) == 0
        passes = [e for e in process.events if e.get("event") in ("rules updated", "in sync")]
        assert 1 <= len(passes) < BURST // 10, f"{len(passes)} passes for {BURST} changes: not coalesced"
        assert not [e for e in process.events if e.get("level") == "error"]
        assert after - before < BURST_RSS_GROWTH_KIB, f"RSS {before} KiB before, {after} KiB after"
    finally:
        process.kill()
