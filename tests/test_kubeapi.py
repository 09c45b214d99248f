"""The fake API server (``tests/kubeapi.py``) behaves like the Kubernetes API server, as the real
lightkube client sees it over a real socket (raw HTTP where lightkube cannot express a case)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import httpx2
import pytest
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.generic_resource import create_global_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Node
from lightkube.types import OnErrorAction, OnErrorResult, PatchType, on_error_retry

from kubeapi import FakeKubeAPI

from masqd.testing import wait_until

EgressNATPolicy = create_global_resource("networking.gke.io", "v1", "EgressNATPolicy", "egressnatpolicies")

CM_PATH = "/api/v1/namespaces/default/configmaps"


@pytest.fixture
def kubeconfig(api, tmp_path):
    return api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
async def client(kubeconfig) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(KubeConfig.from_file(kubeconfig)) as c:
        yield c


@pytest.fixture
async def raw(api) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=api.url, timeout=5) as c:
        yield c


def cm(name: str, namespace: str = "default", labels: dict | None = None, **data: str) -> dict:
    meta: dict = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


async def take(stream, count: int, timeout: float = 5.0) -> list:
    """The first ``count`` events of a watch; the stream is closed afterwards."""
    events: list = []
    try:
        async with asyncio.timeout(timeout):
            async for event in stream:
                events.append(event)
                if len(events) == count:
                    break
    finally:
        await stream.aclose()
    return events


async def collect(stream, into: list) -> None:
    async for event in stream:
        into.append(event)


async def cancel(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_watches(api: FakeKubeAPI, count: int, timeout: float = 5.0) -> None:
    await asyncio.to_thread(api.wait_for_watches, count, timeout)


def summary(events: list) -> list[tuple[str, str]]:
    return [(etype, obj.metadata.name) for etype, obj in events]


# ------------------------------------------------------------------------------ get / list


async def test_get_missing_object_is_a_404_status(client, raw):
    with pytest.raises(ApiError) as err:
        await client.get(ConfigMap, "nope", namespace="default")
    assert err.value.status.code == 404
    assert err.value.status.reason == "NotFound"
    assert err.value.status.message == 'configmaps "nope" not found'

    resp = await raw.get(f"{CM_PATH}/nope")
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert {k: body[k] for k in ("kind", "apiVersion", "status", "reason", "code")} == {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "NotFound",
        "code": 404,
    }
    assert (await raw.get("/api/v1/namespaces/default/secrets")).status_code == 404


async def test_list_in_chunks_is_a_consistent_snapshot(api, client):
    for i in range(5):
        api.put(cm(f"cm-{i}", "a"))
    api.put(cm("other", "b"))
    api.clear_requests()

    listing = client.list(ConfigMap, namespace="a", chunk_size=2)
    names = []
    async for obj in listing:
        names.append(obj.metadata.name)
        if len(names) == 1:  # first chunk fetched: later chunks still show this moment
            api.put(cm("cm-9", "a"))
            api.delete("configmaps", "cm-4", "a")
    assert names == ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]
    assert listing.resourceVersion == "6"  # the snapshot's resourceVersion, before the two writes
    assert api.resource_version == "8"

    pages = api.requests
    assert [r.path for r in pages] == ["/api/v1/namespaces/a/configmaps"] * 3
    assert [r.query.get("limit") for r in pages] == ["2", "2", "2"]
    assert "continue" not in pages[0].query and all(r.query.get("continue") for r in pages[1:])

    after = [o.metadata.name async for o in client.list(ConfigMap, namespace="a")]
    assert after == ["cm-0", "cm-1", "cm-2", "cm-3", "cm-9"]


async def test_list_with_field_and_label_selectors(api, client, raw):
    api.put(cm("x", "a", labels={"app": "masq"}))
    api.put(cm("y", "a"))
    api.put(cm("x", "b", labels={"app": "other"}))

    by_name = [o.metadata.namespace async for o in client.list(ConfigMap, namespace="*", fields={"metadata.name": "x"})]
    assert by_name == ["a", "b"]
    by_ns = [o.metadata.name async for o in client.list(ConfigMap, namespace="*", fields={"metadata.namespace": "a"})]
    assert by_ns == ["x", "y"]
    labelled = [o.metadata.namespace async for o in client.list(ConfigMap, namespace="*", labels={"app": "masq"})]
    assert labelled == ["a"]
    in_set = [o.metadata.namespace async for o in client.list(ConfigMap, namespace="*", labels={"app": ["masq", "other"]})]
    assert in_set == ["a", "b"]

    body = (await raw.get("/api/v1/configmaps", params={"fieldSelector": "metadata.namespace==b,metadata.name=x"})).json()
    assert body["kind"] == "ConfigMapList" and body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == api.resource_version
    assert [(i["kind"], i["metadata"]["namespace"]) for i in body["items"]] == [("ConfigMap", "b")]
    bad = await raw.get("/api/v1/configmaps", params={"fieldSelector": "data.x=1"})
    assert bad.status_code == 400 and bad.json()["reason"] == "BadRequest"


# ------------------------------------------------------------------------------ writes


async def test_create_update_conflict_and_delete(api, client):
    created = await client.create(ConfigMap(metadata=ObjectMeta(name="c", namespace="default"), data={"k": "1"}))
    assert created.metadata.uid and created.metadata.creationTimestamp
    assert created.metadata.resourceVersion == api.resource_version == "1"

    with pytest.raises(ApiError) as err:
        await client.create(ConfigMap(metadata=ObjectMeta(name="c", namespace="default")))
    assert (err.value.status.code, err.value.status.reason) == (409, "AlreadyExists")

    stale = await client.get(ConfigMap, "c", namespace="default")
    fresh = await client.get(ConfigMap, "c", namespace="default")
    fresh.data = {"k": "2"}
    updated = await client.replace(fresh)
    assert updated.metadata.resourceVersion == "2" and updated.metadata.uid == created.metadata.uid

    stale.data = {"k": "3"}
    with pytest.raises(ApiError) as err:
        await client.replace(stale)
    assert (err.value.status.code, err.value.status.reason) == (409, "Conflict")
    assert api.get("configmaps", "c")["data"] == {"k": "2"}

    patched = await client.patch(ConfigMap, "c", {"data": {"extra": "x"}}, namespace="default")  # strategic
    assert patched.data == {"k": "2", "extra": "x"}
    with pytest.raises(ApiError) as err:
        await client.patch(ConfigMap, "c", [{"op": "remove", "path": "/data"}], namespace="default", patch_type=PatchType.JSON)
    assert err.value.status.code == 415

    with pytest.raises(ApiError) as err:
        await client.replace(ConfigMap(metadata=ObjectMeta(name="missing", namespace="default", resourceVersion="1")))
    assert err.value.status.code == 404

    await client.delete(ConfigMap, "c", namespace="default")
    assert api.get("configmaps", "c") is None
    with pytest.raises(ApiError) as err:
        await client.delete(ConfigMap, "c", namespace="default")
    assert err.value.status.code == 404


async def test_cluster_scoped_nodes_and_namespaced_leases(api, client):
    await client.create(Node(metadata=ObjectMeta(name="node-1", labels={"role": "edge"})))
    await client.create(Lease(metadata=ObjectMeta(name="masqd", namespace="kube-system"), spec={"holderIdentity": "node-1"}))
    assert [n.metadata.name async for n in client.list(Node, labels={"role": "edge"})] == ["node-1"]
    lease = await client.get(Lease, "masqd", namespace="kube-system")
    assert lease.spec.holderIdentity == "node-1"
    assert api.get("leases", "masqd", "kube-system")["apiVersion"] == "coordination.k8s.io/v1"
    assert "namespace" not in api.get("nodes", "node-1")["metadata"]


async def test_crd_status_subresource_and_generation(api, client):
    spec = {"action": "NoSNAT", "destinations": [{"cidr": "10.0.0.0/8"}]}
    created = await client.create(EgressNATPolicy(metadata={"name": "p"}, spec=spec, status={"ignored": True}))
    assert created.metadata.generation == 1
    assert "status" not in created  # dropped on create, like a CRD with the status subresource

    # PUT on the object ignores status: nothing changed, so not even a new resourceVersion
    same = await client.replace(EgressNATPolicy({**created, "status": {"phase": "Ready"}}))
    assert same.metadata.resourceVersion == created.metadata.resourceVersion
    assert "status" not in same

    respec = await client.patch(EgressNATPolicy, "p", {"spec": {"action": "SNAT"}}, patch_type=PatchType.MERGE)
    assert respec.metadata.generation == 2 and respec["spec"]["action"] == "SNAT"

    status = await client.patch(EgressNATPolicy.Status, "p", {"status": {"phase": "Ready"}}, patch_type=PatchType.MERGE)
    assert status["status"] == {"phase": "Ready"} and status.metadata.generation == 2

    # PUT on /status changes only status
    body = EgressNATPolicy.Status({**status, "spec": {"action": "Changed"}, "status": {"phase": "Degraded"}})
    replaced = await client.replace(body, name="p")
    assert replaced["spec"]["action"] == "SNAT" and replaced["status"] == {"phase": "Degraded"}
    assert replaced.metadata.generation == 2

    stored = api.get("egressnatpolicies", "p")
    assert stored["metadata"]["generation"] == 2 and stored["status"] == {"phase": "Degraded"}

    without_rv = EgressNATPolicy({**replaced, "metadata": {"name": "p"}})
    with pytest.raises(ApiError) as err:  # CRDs refuse unconditional updates
        await client.replace(without_rv)
    assert err.value.status.code == 422


# ------------------------------------------------------------------------------ watch


async def test_watch_from_a_list_resource_version_sees_every_change_in_order(api, client):
    api.put(cm("before"))
    listing = client.list(ConfigMap, namespace="default")
    assert [o.metadata.name async for o in listing] == ["before"]
    rv = listing.resourceVersion

    await client.create(ConfigMap(metadata=ObjectMeta(name="w", namespace="default"), data={"k": "1"}))  # before the watch
    api.put(cm("elsewhere", "other-ns"))  # not in the watched namespace

    events: list = []
    task = asyncio.create_task(collect(client.watch(ConfigMap, namespace="default", resource_version=rv), events))
    await wait_for_watches(api, 1)
    await client.patch(ConfigMap, "w", {"data": {"k": "2"}}, namespace="default", patch_type=PatchType.MERGE)
    await client.delete(ConfigMap, "w", namespace="default")
    await wait_until(lambda: len(events) == 3)
    await cancel(task)

    assert summary(events) == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]
    rvs = [int(obj.metadata.resourceVersion) for _, obj in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)
    assert events[1][1].data == {"k": "2"}
    assert str(rvs[-1]) == api.resource_version  # DELETED carries the deletion's resourceVersion


async def test_watch_without_resource_version_starts_with_current_objects(api, client):
    api.put(cm("a"))
    api.put(cm("b"))
    api.delete("configmaps", "a")
    stream = client.watch(ConfigMap, namespace="default")
    first = await anext(stream)
    await wait_for_watches(api, 1)
    api.put(cm("c"))
    rest = await take(stream, 1)
    assert summary([first, *rest]) == [("ADDED", "b"), ("ADDED", "c")]


async def test_watch_with_selector_sees_objects_entering_and_leaving_it(api, client):
    api.put(cm("seed"))  # resourceVersion "0" would mean "the current state", not "from the start"
    stream = client.watch(ConfigMap, namespace="default", labels={"app": "masq"}, resource_version=api.resource_version)
    api.put(cm("x"))
    api.put(cm("x", labels={"app": "masq"}))
    api.put(cm("x", labels={"app": "masq"}, k="v"))
    api.put(cm("x"))
    assert summary(await take(stream, 3)) == [("ADDED", "x"), ("MODIFIED", "x"), ("DELETED", "x")]


async def test_watch_from_a_compacted_resource_version_gets_410(api, client, raw):
    api.put(cm("seed"))
    old = api.resource_version
    api.put(cm("a"))
    api.compact()
    point = api.resource_version

    with pytest.raises(ApiError) as err:
        await take(client.watch(ConfigMap, namespace="default", resource_version=old), 1)
    assert (err.value.status.code, err.value.status.reason) == (410, "Expired")
    assert err.value.status.message == f"too old resource version: {old} ({api.resource_version})"

    # on the wire: 200, a single ERROR event, and a clean end of the stream
    resp = await raw.get(CM_PATH, params={"watch": "true", "resourceVersion": old})
    assert resp.status_code == 200
    lines = resp.text.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR" and event["object"]["kind"] == "Status" and event["object"]["code"] == 410

    # lightkube's retry handler then starts over without a resourceVersion: the current objects
    events = await take(client.watch(ConfigMap, namespace="default", resource_version=old, on_error=on_error_retry), 2)
    assert summary(events) == [("ADDED", "a"), ("ADDED", "seed")]
    # resuming from the compaction point itself is fine
    api.put(cm("b"))
    assert summary(await take(client.watch(ConfigMap, namespace="default", resource_version=point), 1)) == [("ADDED", "b")]


async def test_expire_watches_sends_410_to_open_watches(api, client):
    api.put(cm("a"))
    events: list = []
    task = asyncio.create_task(collect(client.watch(ConfigMap, namespace="default"), events))
    await wait_for_watches(api, 1)
    api.expire_watches()
    with pytest.raises(ApiError) as err:
        await asyncio.wait_for(task, 5)
    assert err.value.status.code == 410
    assert summary(events) == [("ADDED", "a")]
    assert api.watch_count == 0


async def test_bookmarks_on_demand_and_periodic(api, client):
    # lightkube's public watch() cannot ask for bookmarks: build the request ourselves
    generic = client._client
    request = generic.prepare_request(
        "list",
        res=ConfigMap,
        namespace="default",
        watch=True,
        params={"allowWatchBookmarks": "true", "resourceVersion": api.resource_version},
    )
    with_bookmarks: list = []
    without: list = []
    tasks = [
        asyncio.create_task(collect(generic.watch(request), with_bookmarks)),
        asyncio.create_task(collect(client.watch(ConfigMap, namespace="default", resource_version=api.resource_version), without)),
    ]
    await wait_for_watches(api, 2)
    api.put(cm("a"))
    api.put(cm("b"))
    api.bookmark()
    await wait_until(lambda: len(with_bookmarks) == 3)
    etype, obj = with_bookmarks[2]
    assert etype == "BOOKMARK" and obj.metadata.resourceVersion == api.resource_version == "2"
    assert obj.metadata.name is None  # only apiVersion, kind and metadata.resourceVersion

    api.bookmark_interval = 0.1
    await wait_until(lambda: len(with_bookmarks) >= 5)
    assert [t for t, _ in with_bookmarks[3:5]] == ["BOOKMARK", "BOOKMARK"]
    api.bookmark_interval = None
    api.put(cm("c"))
    await wait_until(lambda: len(without) == 3)
    assert [t for t, _ in without] == ["ADDED", "ADDED", "ADDED"]  # no bookmarks unless asked for
    await cancel(*tasks)


async def test_watch_timeout_ends_the_stream_cleanly_and_lightkube_resumes(api, client):
    api.put(cm("a"))
    events: list = []
    task = asyncio.create_task(collect(client.watch(ConfigMap, namespace="default", server_timeout=1), events))
    await wait_until(lambda: len(events) == 1)

    def watches():
        return [r for r in api.requests if r.query.get("watch") == "true"]

    await wait_until(lambda: len(watches()) == 2)  # the server ended the first stream after 1 s
    api.put(cm("b"))
    await wait_until(lambda: len(events) == 2)
    await cancel(task)
    assert summary(events) == [("ADDED", "a"), ("ADDED", "b")]
    first, second = watches()
    assert first.query["timeoutSeconds"] == second.query["timeoutSeconds"] == "1"
    assert "resourceVersion" not in first.query and second.query["resourceVersion"] == "1"


async def test_drop_watches_breaks_the_connection(api, client):
    api.put(cm("a"))
    errors: list = []

    def on_error(e, count):
        errors.append(e)
        return OnErrorResult(OnErrorAction.RETRY if len(errors) == 1 else OnErrorAction.STOP)

    events: list = []
    task = asyncio.create_task(collect(client.watch(ConfigMap, namespace="default", on_error=on_error), events))
    await wait_until(lambda: len(events) == 1)
    await wait_for_watches(api, 1)
    api.drop_watches()
    assert api.watch_count == 0
    await wait_until(lambda: len(errors) == 1)
    assert isinstance(errors[0], httpx2.RemoteProtocolError)  # incomplete chunked body

    await wait_for_watches(api, 1)  # lightkube reconnected, resuming after what it saw
    assert api.requests[-1].query.get("resourceVersion") == "1"
    api.put(cm("b"))
    await wait_until(lambda: len(events) == 2)
    api.drop_watches()
    await asyncio.wait_for(task, 5)  # on_error said STOP
    assert summary(events) == [("ADDED", "a"), ("ADDED", "b")]


# ------------------------------------------------------------------------------ faults


async def test_fail_next_then_success(api, client, raw):
    api.put(cm("a"))
    api.fail_next(2, status=503)
    for _ in range(2):
        with pytest.raises(ApiError) as err:
            await client.get(ConfigMap, "a", namespace="default")
        assert (err.value.status.code, err.value.status.reason) == (503, "ServiceUnavailable")
    assert (await client.get(ConfigMap, "a", namespace="default")).metadata.name == "a"

    api.fail_next(1, status=500, path_contains="/nodes")
    assert (await client.get(ConfigMap, "a", namespace="default")).metadata.name == "a"
    with pytest.raises(ApiError) as err:
        await client.get(Node, "n")
    assert err.value.status.code == 500
    with pytest.raises(ApiError) as err:
        await client.get(Node, "n")
    assert err.value.status.code == 404  # the fault was used up

    api.fail_next(1, status=429)
    resp = await raw.get(CM_PATH)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
    assert resp.json()["reason"] == "TooManyRequests"
    assert [r.status for r in api.requests] == [503, 503, 200, 200, 500, 404, 429]


async def test_failed_watch_request_reaches_on_error(api, client):
    api.fail_next(1, status=500, path_contains="watch=true")
    errors: list = []

    def on_error(e, count):
        errors.append(e)
        return OnErrorResult(OnErrorAction.RETRY)

    api.put(cm("a"))
    events = await take(client.watch(ConfigMap, namespace="default", on_error=on_error), 1)
    assert summary(events) == [("ADDED", "a")]
    assert isinstance(errors[0], httpx2.HTTPStatusError) and errors[0].response.status_code == 500


async def test_latency_delays_answers(api, client):
    api.latency = 0.3
    started = time.monotonic()
    with pytest.raises(ApiError):
        await client.get(ConfigMap, "a", namespace="default")
    assert time.monotonic() - started >= 0.3


async def test_stop_and_start_on_the_same_port_keeps_the_store(api, client):
    api.put(cm("a"))
    url, rv = api.url, api.resource_version
    errors: list = []

    def on_error(e, count):
        errors.append(e)
        return OnErrorResult(OnErrorAction.STOP)

    events: list = []
    task = asyncio.create_task(collect(client.watch(ConfigMap, namespace="default", on_error=on_error), events))
    await wait_for_watches(api, 1)

    await asyncio.to_thread(api.stop)
    await asyncio.wait_for(task, 5)
    assert isinstance(errors[0], httpx2.RemoteProtocolError)  # the watch was cut, not ended
    with pytest.raises(httpx2.ConnectError):
        await client.get(ConfigMap, "a", namespace="default")

    await asyncio.to_thread(api.start)
    assert api.url == url
    assert (await client.get(ConfigMap, "a", namespace="default")).metadata.resourceVersion == rv
    api.put(cm("b"))
    assert api.resource_version == str(int(rv) + 1)


def test_serves_on_a_given_listening_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        with FakeKubeAPI(sock=sock) as api:
            api.put(cm("a"))
            assert api.port == sock.getsockname()[1]
            assert json.load(urllib.request.urlopen(api.url + CM_PATH, timeout=5))["items"][0]["metadata"]["name"] == "a"
            api.stop()
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(api.url + CM_PATH, timeout=5)
            api.start()
            assert json.load(urllib.request.urlopen(api.url + CM_PATH, timeout=5))["items"]
    finally:
        sock.close()


async def test_token_is_sent_and_can_be_required(api, client):
    await client.create(ConfigMap(metadata=ObjectMeta(name="a", namespace="default")))
    assert api.authorizations == ["Bearer test-token"]
    api.require_token = "another-token"
    with pytest.raises(ApiError) as err:
        await client.get(ConfigMap, "a", namespace="default")
    assert err.value.status.code == 401


def test_subprocess_reads_through_the_kubeconfig(api, kubeconfig):
    api.put(cm("from-parent", data="x"))
    code = (
        "import sys\n"
        "from lightkube import Client, KubeConfig\n"
        "from lightkube.resources.core_v1 import ConfigMap\n"
        "c = Client(KubeConfig.from_file(sys.argv[1]))\n"
        "print(c.get(ConfigMap, 'from-parent', namespace='default').data['data'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(kubeconfig)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "x"


async def test_250_concurrent_watches_all_receive_one_put(api, kubeconfig):
    transport = httpx2.AsyncHTTPTransport(limits=httpx2.Limits(max_connections=300, max_keepalive_connections=300))
    async with AsyncClient(KubeConfig.from_file(kubeconfig), transport=transport) as many:
        rv = api.resource_version
        tasks = [
            asyncio.create_task(take(many.watch(ConfigMap, namespace="default", resource_version=rv), 1, timeout=20))
            for _ in range(250)
        ]
        await wait_for_watches(api, 250, timeout=15)
        api.put(cm("fan-out"))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
    assert {(events[0][0], events[0][1].metadata.name, events[0][1].metadata.resourceVersion) for events in results} == {
        ("ADDED", "fan-out", "1")
    }
    await wait_until(lambda: api.watch_count == 0)


def test_history_limit_compacts_like_etcd():
    with FakeKubeAPI(history_limit=2) as api:
        api.put(cm("a"))
        api.put(cm("b"))
        first_page = json.load(urllib.request.urlopen(f"{api.url}{CM_PATH}?limit=1", timeout=5))
        token = first_page["metadata"]["continue"]
        assert first_page["metadata"]["remainingItemCount"] == 1
        for name in ("c", "d", "e"):
            api.put(cm(name))
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{api.url}{CM_PATH}?limit=1&continue={token}", timeout=5)
        assert err.value.code == 410 and json.load(err.value)["reason"] == "Expired"

        watch = urllib.request.urlopen(f"{api.url}{CM_PATH}?watch=1&resourceVersion=2", timeout=5)
        assert json.loads(watch.readline())["object"]["code"] == 410  # events 3..5 kept, 3 is gone
        watch = urllib.request.urlopen(f"{api.url}{CM_PATH}?watch=1&resourceVersion=3&timeoutSeconds=1", timeout=5)
        assert [json.loads(line)["object"]["metadata"]["name"] for line in watch] == ["d", "e"]


def test_stop_closes_every_connection_and_joins_its_threads():
    api = FakeKubeAPI().start()
    watches = [urllib.request.urlopen(f"{api.url}{CM_PATH}?watch=true", timeout=5) for _ in range(3)]
    idle = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)  # a kept-alive connection
    idle.request("GET", CM_PATH)
    assert idle.getresponse().read()
    api.wait_for_watches(3)

    api.stop()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fake-kubeapi")]
    for watch in watches:
        with pytest.raises(http.client.IncompleteRead):  # no terminating chunk
            watch.read()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", api.port), timeout=5)
    idle.close()
