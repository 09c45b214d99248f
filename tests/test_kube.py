"""The agent against the Kubernetes API: the ConfigMap watch (``--kube-configmap``) and the
``EgressNATPolicy`` watch (``--egress-nat-policies``).

Everything runs against ``tests/kubeapi.py``, an in-process server speaking the API server's
list/watch protocol over a real socket, with the real lightkube client (nothing patched). The
daemon runs in process on the dry-run backend; the end-to-end test at the bottom runs the real
``masqd`` in a network namespace with iptables and sends packets.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import anyio
import pytest
from lightkube.resources.core_v1 import ConfigMap

from kubeapi import FakeKubeAPI
from masqd_proc import DaemonProcess
from support import REF, KubeAgent, cidrs_only, configmap, configmap_reflector, policy, watch_settings

from masqd.config import AgentOptions
from masqd.kube import KubeSettings, Reflector, make_client
from masqd.testing import netns, wait_until
from masqd.testing import topology as layout

WAIT = 15  # seconds before a test gives up waiting (a failure, not a timing claim)
RFC1918 = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"}


@pytest.fixture
def settings(api, tmp_path) -> KubeSettings:
    return watch_settings(api, tmp_path, token="agent-token")


async def watching(api: FakeKubeAPI, watches: int = 2) -> None:
    """Until the agent's watches (the ConfigMap's and the policies') are open on the server: what a
    test then does to the watch streams (a bookmark, an expiry) reaches them, not the list before."""
    await wait_until(lambda: api.watch_count >= watches, f"{watches} watches open")


@pytest.fixture
def file(tmp_path) -> Path:
    return tmp_path / "ip-masq-agent"  # absent unless a test writes it


# --- the ConfigMap --------------------------------------------------------------------------------


async def test_at_start_up_the_file_applies_then_the_configmap_follows(api, settings, file):
    file.write_text(cidrs_only("10.0.0.0/8"))
    api.latency = 0.3  # the first list arrives late
    api.put(configmap(cidrs_only("192.0.2.0/24")))
    async with KubeAgent(settings, file) as agent:
        assert agent.status.applied is not None  # applied before the API answered
        await agent.until_applied({"10.0.0.0/8", "192.0.2.0/24"}, "file and ConfigMap unioned")
    assert any(auth == "Bearer agent-token" for auth in api.authorizations)


async def test_an_edit_is_applied_without_waiting_for_the_resync(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"}, "the ConfigMap alone: exactly its list")
        api.put(configmap(cidrs_only("10.0.0.0/8 198.51.100.0/24")))
        await agent.until_applied({"10.0.0.0/8", "198.51.100.0/24"})
        assert agent.agent.reconciler.origins  # where each CIDR came from
        assert set(agent.agent.reconciler.origins.values()) == {("configmap kube-system/ip-masq-agent",)}


async def test_deleting_the_configmap_means_defaults(api, settings, file):
    api.put(configmap(cidrs_only("203.0.113.0/24")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"203.0.113.0/24"})
        api.delete("configmaps", REF.name, REF.namespace)
        await agent.until_applied(RFC1918, "defaults after the deletion")
        api.put(configmap(cidrs_only("203.0.113.0/24")))  # created again
        await agent.until_applied({"203.0.113.0/24"})


async def test_other_configmaps_are_not_even_sent(api, settings, file):
    api.put(configmap(cidrs_only("203.0.113.0/24")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"203.0.113.0/24"})
        generation = agent.status.generation
        api.put(configmap(cidrs_only("192.0.2.0/24"), name="something-else"))
        api.put(configmap(cidrs_only("192.0.2.0/24"), namespace="default"))
        await anyio.sleep(0.3)
        assert agent.status.generation == generation
    watches = [r for r in api.requests if r.query.get("watch") == "true" and "configmaps" in r.path]
    assert watches and all(r.query.get("fieldSelector") == "metadata.name=ip-masq-agent" for r in watches)
    assert all(r.path == "/api/v1/namespaces/kube-system/configmaps" for r in watches)


async def test_an_invalid_configmap_keeps_the_last_good_rules(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"})
        api.put(configmap("nonMasqueradeCIDRs: [10.0.0.1/8]\n"))
        await wait_until(lambda: agent.status.last_error is not None, "the config error")
        assert "configmap kube-system/ip-masq-agent" in str(agent.status.last_error)
        assert "10.0.0.0/8" in str(agent.status.last_error)  # names the aligned network
        assert agent.applied() == {"10.0.0.0/8"}
        api.put(configmap(cidrs_only("192.0.2.0/24")))
        await agent.until_applied({"192.0.2.0/24"}, "recovered after the fix")


async def test_a_configmap_without_the_config_key_contributes_nothing(api, settings, file):
    file.write_text(cidrs_only("192.0.2.0/24"))
    api.put(configmap(None))
    async with KubeAgent(settings, file) as agent:
        await wait_until(lambda: configmap_reflector(agent) is not None and configmap_reflector(agent).synced, "list")
        await agent.until_applied({"192.0.2.0/24"}, "the file alone")


# --- failures: outage, 410, bookmarks, 5xx -------------------------------------------------------


async def test_api_outage_keeps_the_rules_and_recovery_applies_what_changed(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"})
        reflector = configmap_reflector(agent)
        api.stop()
        await wait_until(lambda: reflector.failures >= 3, "failed reconnects")
        assert agent.applied() == {"10.0.0.0/8"}  # the last good rules stay
        api.put(configmap(cidrs_only("198.51.100.0/24")))  # changed while the agent could not see it
        api.start()
        await agent.until_applied({"198.51.100.0/24"}, "the change after recovery")
        assert reflector.relists == 0  # resumed from its resourceVersion: no relist needed


async def test_410_gone_relists_and_sees_a_deletion_made_while_disconnected(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"})
        reflector = configmap_reflector(agent)
        api.stop()
        api.delete("configmaps", REF.name, REF.namespace)
        api.put(configmap(cidrs_only("192.0.2.0/24"), name="unrelated"))
        api.compact()  # the version the agent would resume from is gone
        api.start()
        await agent.until_applied(RFC1918, "defaults: the deletion seen through a relist")
        assert reflector.relists == 1


async def test_expired_watch_relists(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"})
        await watching(api)
        reflector = configmap_reflector(agent)
        api.compact()
        api.expire_watches()
        await wait_until(lambda: reflector.relists == 1, "a relist after the 410 ERROR event")
        api.put(configmap(cidrs_only("203.0.113.0/24")))
        await agent.until_applied({"203.0.113.0/24"}, "watching again after the relist")


async def test_bookmarks_keep_the_resume_point_fresh_so_no_relist_is_needed(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"})
        await watching(api)
        reflector = configmap_reflector(agent)
        for i in range(5):  # the cluster moves on; none of it matches the agent's selector
            api.put(configmap(cidrs_only("192.0.2.0/24"), name=f"other-{i}"))
        api.bookmark()
        await wait_until(lambda: reflector.resource_version == api.resource_version, "the bookmark's version")
        api.compact()  # everything before the bookmark is gone
        api.drop_watches()
        api.put(configmap(cidrs_only("198.51.100.0/24")))
        await agent.until_applied({"198.51.100.0/24"})
        assert reflector.relists == 0  # without the bookmark, resuming would have hit 410


async def test_dropped_watch_connection_resumes_without_missing_a_change(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"})
        reflector = configmap_reflector(agent)
        api.latency = 0.2  # the reconnect is slow: the edit lands before the watch is back
        api.drop_watches()
        api.put(configmap(cidrs_only("192.0.2.0/24")))
        await agent.until_applied({"192.0.2.0/24"})
        assert reflector.relists == 0


@pytest.mark.parametrize("status", [500, 503, 429, 403])
async def test_errors_on_list_are_retried(api, settings, file, status):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    api.fail_next(3, status=status, path_contains="/configmaps")
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"})
        assert configmap_reflector(agent).failures == 3


async def test_a_slow_api_does_not_delay_the_file(api, settings, file, tmp_path):
    file.write_text(cidrs_only("10.0.0.0/8"))
    api.latency = 2.0
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8"})
        file.write_text(cidrs_only("192.0.2.0/24"))
        await agent.until_applied({"192.0.2.0/24"}, "the file edit while the API is still answering")


# --- EgressNATPolicy ------------------------------------------------------------------------------


async def test_nosnat_policies_keep_the_pod_address(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    api.put(policy("on-prem", "NoSNAT", "192.0.2.0/24", "198.51.100.0/24"))
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24"})
        api.put(policy("snat-only", "SNAT", "203.0.113.0/24"))
        api.put(policy("more", "NoSNAT", "203.0.113.0/24"))
        await agent.until_applied({"10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"})
        api.delete("egressnatpolicies", "on-prem")
        await agent.until_applied({"10.0.0.0/8", "203.0.113.0/24"})


async def test_an_invalid_policy_is_skipped_and_the_others_apply(api, settings, file):
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    api.put(policy("good", "NoSNAT", "192.0.2.0/24"))
    api.put(policy("typo", "NoSNAT", "198.51.100.1/24"))
    api.put(policy("dual", "NoSNAT", "203.0.113.0/24", "2001:db8::/32"))  # this agent runs without --enable-ipv6
    async with KubeAgent(settings, file) as agent:
        await agent.until_applied({"10.0.0.0/8", "192.0.2.0/24", "203.0.113.0/24"})
        assert agent.status.last_error is None  # skipped, not a rejected state
        plugin = next(p for p in agent.agent.plugins.pm.get_plugins() if hasattr(p, "policies"))
        assert [e.source for e in plugin.policies.invalid] == ["EgressNATPolicy typo"]
        api.put(policy("typo", "NoSNAT", "198.51.100.0/24"))  # fixed
        await agent.until_applied({"10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"})


async def test_policies_with_ipv6_on_an_ipv6_agent(api, settings, file):
    api.put(policy("v6", "NoSNAT", "2001:db8::/32"))
    agent = KubeAgent(settings, file, AgentOptions(enable_ipv6=True))
    async with agent:
        await wait_until(lambda: agent.status.applied is not None and
                         "2001:db8::/32" in {str(n) for n in agent.status.applied.ipv6.nonmasq}, "the v6 CIDR")


# --- many agents ----------------------------------------------------------------------------------

AGENTS = 200


async def test_many_agents_reconnect_after_an_api_server_restart_spread_out(api, tmp_path):
    """N agents' ConfigMap watches; the API server restarts. Every agent resumes its watch (no
    relist: its resourceVersion is still valid) and the reconnects are spread by the jitter
    rather than arriving at once. The request rate is reported."""
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    settings = KubeSettings(configmap=REF, kubeconfig=str(kubeconfig), backoff_initial=0.5, backoff_max=8)
    reflectors: list[Reflector] = []
    clients = []
    async with anyio.create_task_group() as tg:
        for _ in range(AGENTS):
            client = make_client(settings)
            clients.append(client)
            reflector = Reflector(client, ConfigMap, settings, lambda objects: None, namespace=REF.namespace,
                                  fields={"metadata.name": REF.name})
            reflectors.append(reflector)
            tg.start_soon(reflector.run)
        await wait_until(lambda: api.watch_count == AGENTS, f"{AGENTS} watches", timeout=60)
        api.stop()
        stopped = time.monotonic()
        await anyio.sleep(1.0)
        api.clear_requests()
        api.start()
        started = time.monotonic()
        await wait_until(lambda: api.watch_count == AGENTS, "every watch back", timeout=60)
        recovered = time.monotonic()
        tg.cancel_scope.cancel()
    for client in clients:
        await client.close()
    arrivals = sorted(r.time for r in api.requests if r.time >= started)
    assert len(arrivals) == AGENTS  # one watch each: resumed, nothing relisted
    assert all(r.query.get("watch") == "true" for r in api.requests)
    assert sum(reflector.relists for reflector in reflectors) == 0
    buckets: dict[int, int] = {}
    for t in arrivals:
        buckets[int((t - started) * 10)] = buckets.get(int((t - started) * 10), 0) + 1
    peak = max(buckets.values())
    spread = arrivals[-1] - arrivals[0]
    print(f"{AGENTS} agents after a {started - stopped:.1f} s API outage: {len(arrivals)} requests, "  # -rP shows it
          f"peak {peak} per 100 ms, mean {len(arrivals) / max(spread, 1e-9):.0f}/s over {spread:.2f} s, "
          f"all watching again {recovered - started:.2f} s after the restart, "
          f"median reconnect {statistics.median(arrivals) - started:.2f} s")


# --- end to end: the real daemon in a namespace, a ConfigMap edit changes the kernel --------------


@pytest.mark.netns
def test_configmap_edit_changes_the_kernel_rules_and_the_packets(topology, tmp_path):
    """``masqd run --kube-configmap`` in the node namespace, the fake API server listening inside
    that namespace: editing the ConfigMap on the server switches what the destination sees."""
    with FakeKubeAPI(sock=netns.listening_socket_in(topology.node)) as server:
        server.put(configmap(cidrs_only("10.0.0.0/8 192.0.2.0/24")))
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        daemon = DaemonProcess(topology.node, tmp_path / "absent", "--kube-configmap", str(REF),
                               "--kubeconfig", str(kubeconfig))
        try:
            assert netns.wait_for(lambda: "-A IP-MASQ-AGENT -d 192.0.2.0/24" in netns.iptables_save(topology.node),
                                  timeout=WAIT), "the ConfigMap's CIDR never reached the kernel"
            assert topology.source_seen(layout.DEST_V4[0]) == layout.POD_V4  # 192.0.2.2 keeps the pod address
            server.put(configmap(cidrs_only("10.0.0.0/8")))
            daemon.next_event(lambda e: "192.0.2.0/24" in e.get("cidrs_removed", []), timeout=WAIT)
            assert "192.0.2.0/24" not in netns.iptables_save(topology.node)
            assert topology.source_seen(layout.DEST_V4[0]) == layout.NODE_V4  # masqueraded now
        finally:
            assert daemon.stop() == 0


class _SilentWatchServer:
    """Answers a list, then holds every watch open without a byte more and without ever closing
    it: a connection that died silently, as a network partition leaves it."""

    LIST = (b'{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"5"},"items":[]}')

    def __init__(self):
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.watches: list[str] = []
        self._open = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn) -> None:
        with conn.makefile("rb") as stream:
            while True:
                try:
                    request = stream.readline().decode()
                    while stream.readline() not in (b"\r\n", b""):
                        pass
                except OSError:
                    return
                if not request:
                    return
                if "watch=" in request:
                    self.watches.append(request.split()[1])
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    return  # and never a byte more
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(self.LIST)).encode() + b"\r\n\r\n" + self.LIST)

    def close(self) -> None:
        self.sock.close()
        for conn in self._open:
            conn.close()


async def test_a_watch_on_a_silently_dead_connection_is_abandoned_and_resumed(tmp_path, monkeypatch):
    import masqd.kube.reflector

    monkeypatch.setattr(masqd.kube.reflector, "WATCH_GRACE_SECONDS", 0.2)
    server = _SilentWatchServer()
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(f"apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{server.url}'}}}}]\n"
                              "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
                              "current-context: x\n")
        settings = KubeSettings(configmap=REF, kubeconfig=str(kubeconfig), watch_timeout=1)
        client = make_client(settings)
        reflector = Reflector(client, ConfigMap, settings, lambda objects: None, namespace=REF.namespace,
                              fields={"metadata.name": REF.name})
        async with anyio.create_task_group() as tg:
            tg.start_soon(reflector.run)
            await wait_until(lambda: reflector.stalls >= 2, "two abandoned watches")
            tg.cancel_scope.cancel()
        await client.close()
    finally:
        server.close()
    assert reflector.relists == 0 and len(server.watches) >= 2
    assert all("resourceVersion=5" in target for target in server.watches)  # resumed, not relisted


# --- one-shot commands read the objects once ------------------------------------------------------


def test_validate_render_and_run_once_read_the_configmap_and_the_policies(api, tmp_path, capsys):
    from masqd.cli import main

    api.put(configmap(cidrs_only("10.0.0.0/8")))
    api.put(policy("on-prem", "NoSNAT", "203.0.113.0/24"))
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    flags = ["--config", str(tmp_path / "absent"), "--kube-configmap", str(REF), "--egress-nat-policies",
             "--kubeconfig", str(kubeconfig), "--backend", "dry-run"]
    assert main(["validate", *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: configmap kube-system/ip-masq-agent: 1 non-masquerade CIDRs")
    assert "plugin masqd.default_plugins.egress: 1 non-masquerade CIDRs: 203.0.113.0/24" in out
    assert main(["render", *flags]) == 0
    rules = capsys.readouterr().out
    assert "-A IP-MASQ-AGENT -d 10.0.0.0/8" in rules and "-A IP-MASQ-AGENT -d 203.0.113.0/24" in rules
    assert main(["run", "--once", *flags]) == 0


def test_one_shot_commands_exit_4_when_the_api_cannot_be_read(api, tmp_path, capsys):
    from masqd.cli import main

    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    api.stop()
    assert main(["render", "--kube-configmap", str(REF), "--kubeconfig", str(kubeconfig), "--backend", "dry-run"]) == 4
    assert f"error: cannot read the Kubernetes API at {api.url}: " in capsys.readouterr().err  # which server


def test_a_kubeconfig_path_that_does_not_exist_is_named_as_the_problem(tmp_path, capsys):
    from masqd.cli import main

    missing = tmp_path / "nonexistent"
    assert main(["validate", "--kube-configmap", str(REF), "--kubeconfig", str(missing)]) == 2
    error = capsys.readouterr().err
    assert f"no usable Kubernetes credentials in --kubeconfig {missing}: " in error
    assert "check the path" in error and "pass --kubeconfig PATH" not in error
