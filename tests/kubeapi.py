"""An in-process fake Kubernetes API server that speaks the real list/watch HTTP protocol.

The real client library (lightkube, or any HTTP client, in this process or in a subprocess)
talks to it over a real TCP socket; nothing in the client is patched. Standard library only:
``http.server.ThreadingHTTPServer`` (HTTP/1.1, keep-alive, one thread per connection) serving
from a background daemon thread, so code running on an asyncio event loop, plain threads and
subprocesses can all use it at once. Every public method is thread safe.

Usage::

    with FakeKubeAPI() as api:                 # started; stopped (every connection closed) at exit
        api.write_kubeconfig(tmp_path / "kubeconfig")
        api.put({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "ip-masq-agent", "namespace": "kube-system"},
                 "data": {"config": "nonMasqueradeCIDRs: [10.0.0.0/8]"}})
        client = AsyncClient(KubeConfig.from_file(tmp_path / "kubeconfig"))

Resources (served at their real paths)
--------------------------------------
=====================  ==========================================================================
ConfigMap              ``/api/v1/namespaces/{ns}/configmaps[/{name}]``; all namespaces:
                       ``/api/v1/configmaps``
Node (cluster scoped)  ``/api/v1/nodes[/{name}]``
Lease                  ``/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]``; all
                       namespaces: ``/apis/coordination.k8s.io/v1/leases``
EgressNATPolicy (CRD,  ``/apis/networking.gke.io/v1/egressnatpolicies[/{name}[/status]]``
cluster scoped)        (status subresource enabled; ``metadata.generation`` tracked)
=====================  ==========================================================================

Objects are plain JSON dicts (``apiVersion``, ``kind``, ``metadata``, ...). The server manages
``metadata.uid``, ``resourceVersion``, ``creationTimestamp`` and, for the CRD, ``generation``
(1 on create, +1 whenever anything outside ``metadata`` and ``status`` changes).

Protocol, as the real API server does it
----------------------------------------
- One global ``resourceVersion`` counter (a string of an int) bumped by every write; each write
  is appended to an in-memory event history and fanned out to the matching open watches. A write
  that changes nothing (same content) is a no-op: no new resourceVersion, no watch event.
- Errors are ``Status`` objects (``{"kind": "Status", "apiVersion": "v1", "status": "Failure",
  "reason": ..., "code": ..., "message": ..., "details": {...}}``) with ``Content-Type:
  application/json`` (exactly that: lightkube only turns a response into ``ApiError`` then).
- GET object; 404 ``NotFound``. GET ``.../{name}/status`` returns the whole object.
- LIST: ``{"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {"resourceVersion": current,
  "continue": ..., "remainingItemCount": ...}, "items": [...]}``; items carry apiVersion/kind,
  sorted by namespace then name. ``limit`` + ``continue`` give chunks that are a consistent
  snapshot at the first chunk's resourceVersion (rebuilt from the history; a token older than
  the compaction point gets 410 ``Expired``). ``fieldSelector``: ``metadata.name`` and
  ``metadata.namespace`` with ``=``, ``==``, ``!=``, comma separated (other fields: 400).
  ``labelSelector``: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``.
- WATCH (``?watch=true`` or ``watch=1``): ``200`` with ``Transfer-Encoding: chunked``, one JSON
  event per line and per chunk, written as soon as it happens: ``{"type": "ADDED" | "MODIFIED" |
  "DELETED" | "BOOKMARK" | "ERROR", "object": {...}}``.

  * ``resourceVersion`` absent or ``"0"``: a synthetic ``ADDED`` for each matching object now,
    then live changes. ``resourceVersion=N``: every change after N from the history, then live.
    N older than the compaction point: like the real server, HTTP 200 with one ``ERROR`` event
    whose object is a Status with code 410, reason ``Expired``, message ``too old resource
    version: N (M)``; then the stream ends cleanly.
  * ``fieldSelector`` / ``labelSelector`` filter events; an object that stops matching is sent
    as ``DELETED``, one that starts matching as ``ADDED`` (as the watch cache does).
  * ``timeoutSeconds``: the stream ends cleanly (terminating chunk) after that many seconds.
  * ``allowWatchBookmarks=true``: ``BOOKMARK`` events (object: only ``apiVersion``, ``kind`` and
    ``metadata.resourceVersion`` = the current global resourceVersion) every
    :attr:`FakeKubeAPI.bookmark_interval` seconds and on :meth:`FakeKubeAPI.bookmark`.
  * ``sendInitialEvents=true``: the ADDED events are followed by a BOOKMARK annotated
    ``k8s.io/initial-events-end: "true"`` (when bookmarks are allowed).
  * A watch on ``.../{name}`` (deprecated in Kubernetes) is served as a watch of the collection
    with ``fieldSelector=metadata.name={name}``.
- CREATE (POST to the collection): 201; 409 ``AlreadyExists``; ``generateName`` honoured; for
  the CRD a ``status`` in the body is dropped.
- UPDATE (PUT): 404 if absent; 409 ``Conflict`` if ``metadata.resourceVersion`` differs from
  the stored one. Without ``metadata.resourceVersion`` the built-in kinds take the update
  unconditionally and the CRD answers 422 ``Invalid`` (both as Kubernetes does). For the CRD a
  PUT to the main resource ignores ``status``; a PUT to ``/status`` changes only ``status``.
- PATCH: ``application/merge-patch+json`` and ``application/strategic-merge-patch+json`` (both
  applied as an RFC 7386 JSON merge patch), on the object or on ``/status`` (same rules as PUT;
  a ``metadata.resourceVersion`` in the patch is a precondition: 409 if it differs). Other patch
  types: 415.
- DELETE: 200 with a ``Status`` ``Success``; the watches get ``DELETED`` carrying the last state
  with the deletion's new resourceVersion. ``preconditions`` in the body are honoured. DELETE on a
  collection (deletecollection) deletes every matching object.
- ``dryRun=All`` on writes: validated and answered, nothing stored.

Control and fault injection (all thread safe; call them from any thread)
------------------------------------------------------------------------
``FakeKubeAPI(*, host="127.0.0.1", port=0, sock=None, require_token=None, bookmark_interval=60.0,
history_limit=None, latency=0.0)``
    ``sock``: an already bound and listening socket to serve on instead of binding
    ``host:port`` (e.g. one created inside another network namespace). ``require_token``: when
    set, requests without ``Authorization: Bearer <require_token>`` get 401 ``Unauthorized``.
    ``history_limit``: keep at most that many events (older ones are compacted away, as etcd
    does); ``None``: keep everything until :meth:`compact`.
``start()`` / ``stop()``, context manager
    ``stop()`` stops accepting (new connections are refused), closes every open connection
    abruptly (watches included: no terminating chunk), and joins every server thread (with
    timeouts; a thread still alive afterwards is reported with a ``RuntimeWarning``). The store,
    history, resourceVersion, request log and pending faults are kept, and ``start()`` serves
    again on the SAME port: an API server restart. Own socket: closed, and a new one bound with
    ``SO_REUSEADDR``. A given ``sock``: shut down on stop (connections refused) and bound to its
    address again on start, so it stays in its network namespace; the constructor sets
    ``SO_REUSEADDR`` on it, so hand it over before it has accepted any connection.
``url``, ``port``
    ``http://127.0.0.1:PORT`` (``port`` is chosen at the first ``start()`` and kept).
``write_kubeconfig(path, token="test-token", namespace="default")``
    Writes a kubeconfig (cluster ``server: url``, a user with that bearer token (``None``: no
    token), a context with that namespace, ``current-context``) that lightkube's
    ``KubeConfig.from_file`` and kubectl accept. Returns the path.
``put(obj)``, ``get(resource, name, namespace=None)``, ``delete(resource, name, namespace=None)``,
``objects(resource, namespace=None)``
    Direct store access, as an API write would do it (new resourceVersion, history, watch
    events; ``put`` creates or replaces unconditionally and sets ``status`` too; no change: no
    event). ``resource``: plural (``"configmaps"``), kind (``"ConfigMap"``) or
    ``"plural.group"``. ``put`` accepts a dict or a lightkube object (anything with
    ``to_dict()``); a namespaced object without namespace goes to ``"default"``. All return deep
    copies (``get``/``delete``: ``None`` when absent).
``resource_version``
    The current global resourceVersion (str).
``compact()``
    Every resourceVersion before the current one becomes too old: watches that (re)start from an
    older one get the 410 ``ERROR`` event, list continue tokens from before get 410. Open watches
    are unaffected.
``expire_watches()``
    Every open watch gets the 410 ``ERROR`` event now and its stream ends (cleanly). Does not
    compact: a client resuming from its last resourceVersion would succeed.
``bookmark()``
    Sends a BOOKMARK with the current resourceVersion to every open watch that allowed them.
``bookmark_interval``
    Seconds between periodic BOOKMARKs per watch (settable at any time; ``None``: none).
``drop_watches()``
    Abruptly closes every open watch connection (socket shutdown, no terminating chunk), as a
    dropped connection or a dying load balancer would; the client sees an incomplete chunked
    body. The server keeps running.
``fail_next(count=1, status=500, path_contains=None, retry_after=1)``
    The next ``count`` requests whose request target (path and query string) contains
    ``path_contains`` (``None``: any request) are answered with ``status`` and a Status body
    (500 ``InternalError``, 503 ``ServiceUnavailable``, 429 ``TooManyRequests`` with a
    ``Retry-After`` header and ``details.retryAfterSeconds``, 504, 401, 403, ...). Rules queue up
    and the oldest matching one is used first. ``clear_faults()`` removes pending rules.
``latency``
    Seconds to wait before answering every request (settable at any time; 0: none).
``requests``
    Snapshot list of :class:`RequestRecord` ``(time, method, path, query, status)``: ``time`` is
    ``time.monotonic()`` when the request arrived, ``query`` a dict (last value per key),
    ``status`` the HTTP status sent (200 for a watch, logged when its headers go out). Requests
    aborted before any answer are not logged. ``authorizations``: the ``Authorization`` header
    of each logged request (``None`` if absent), same order. ``clear_requests()`` empties both.
``watch_count``, ``wait_for_watches(count, timeout=5.0)``
    Open watches now; wait until exactly ``count`` are open (``TimeoutError`` otherwise). A
    watch whose client closed its connection is noticed (and no longer counted) within ~0.2 s,
    as the real server notices it, even when no event is due.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import copy
import datetime
import json
import queue
import random
import select
import socket
import string
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

__all__ = ["FakeKubeAPI", "RequestRecord", "ResourceType", "RESOURCES"]

#: Longest a blocked wait in a server thread lasts before it checks for shutdown again.
_POLL_SECONDS = 0.5
#: How often open watch sockets are polled for clients that went away.
_REAP_SECONDS = 0.2
#: How long ``stop()`` waits for the server threads to end.
_JOIN_SECONDS = 5.0


@dataclass(frozen=True)
class ResourceType:
    """One kind the server serves."""

    plural: str
    group: str
    version: str
    kind: str
    namespaced: bool
    #: PUT/PATCH on the object ignore ``status``; ``/status`` changes only ``status``.
    status_subresource: bool = False
    #: ``metadata.generation``: 1 on create, bumped when anything but metadata/status changes.
    generation: bool = False
    #: A PUT without ``metadata.resourceVersion`` is accepted (built-in kinds) or 422 (CRDs).
    unconditional_update: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """How Kubernetes names the resource in messages: ``configmaps``, ``leases.coordination.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("configmaps", "", "v1", "ConfigMap", namespaced=True),
    ResourceType("nodes", "", "v1", "Node", namespaced=False),
    ResourceType("leases", "coordination.k8s.io", "v1", "Lease", namespaced=True),
    ResourceType(
        "egressnatpolicies",
        "networking.gke.io",
        "v1",
        "EgressNATPolicy",
        namespaced=False,
        status_subresource=True,
        generation=True,
        unconditional_update=False,
    ),
)


class RequestRecord(NamedTuple):
    """One answered request."""

    time: float  #: ``time.monotonic()`` when it arrived
    method: str
    path: str
    query: dict[str, str]
    status: int


# --------------------------------------------------------------------------------------------
# helpers


class _ApiFailure(Exception):
    """Answered as a Status object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers: dict[str, str] = {}


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event_chunk(etype: str, obj: dict) -> bytes:
    return _chunk(_dumps({"type": etype, "object": obj}) + b"\n")


_LAST_CHUNK = b"0\r\n\r\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ordered(obj: dict) -> dict:
    """apiVersion, kind, metadata first (as the API server writes them), then the rest."""
    head = {k: obj[k] for k in ("apiVersion", "kind", "metadata") if k in obj}
    head.update((k, v) for k, v in obj.items() if k not in head)
    return head


def _content(obj: dict) -> dict:
    """Everything but metadata and status (what bumps a CRD's generation)."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``target`` is not modified)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


# --------------------------------------------------------------------------------------------
# selectors

_Pred = Callable[[dict], bool]


def _parse_field_selector(text: str | None) -> list[_Pred]:
    preds: list[_Pred] = []
    for term in (text or "").split(","):
        term = term.strip()
        if not term:
            continue
        for op in ("!=", "==", "="):
            if op in term:
                key, value = (s.strip() for s in term.split(op, 1))
                break
        else:
            raise _ApiFailure(400, "BadRequest", f'invalid selector: "{text}"; can\'t understand "{term}"')
        if key not in ("metadata.name", "metadata.namespace"):
            raise _ApiFailure(400, "BadRequest", f'"{key}" is not a known field selector: only "metadata.name", "metadata.namespace"')
        attr = key.split(".", 1)[1]

        def pred(obj: dict, attr=attr, value=value, negate=(op == "!=")) -> bool:
            return ((obj.get("metadata") or {}).get(attr, "") == value) != negate

        preds.append(pred)
    return preds


def _split_selector(text: str) -> list[str]:
    terms, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [t.strip() for t in terms if t.strip()]


def _parse_label_selector(text: str | None) -> list[_Pred]:
    preds: list[_Pred] = []
    for term in _split_selector(text or ""):
        words = term.split(None, 2)
        if len(words) >= 2 and words[1] in ("in", "notin"):
            rest = term.split(None, 1)[1][len(words[1]):].strip()
            if not (rest.startswith("(") and rest.endswith(")")):
                raise _ApiFailure(400, "BadRequest", f"unable to parse requirement: {term!r}")
            values = {v.strip() for v in rest[1:-1].split(",") if v.strip()}
            key, negate = words[0], words[1] == "notin"

            def pred(obj, key=key, values=values, negate=negate):
                labels = (obj.get("metadata") or {}).get("labels") or {}
                return (labels.get(key) in values) != negate if key in labels else negate

        elif "=" in term:
            op = "!=" if "!=" in term else ("==" if "==" in term else "=")
            key, value = (s.strip() for s in term.split(op, 1))
            negate = op == "!="

            def pred(obj, key=key, value=value, negate=negate):
                labels = (obj.get("metadata") or {}).get("labels") or {}
                return (labels.get(key) == value) != negate

        elif term.startswith("!"):
            key = term[1:].strip()

            def pred(obj, key=key):
                return key not in ((obj.get("metadata") or {}).get("labels") or {})

        elif " " not in term:

            def pred(obj, key=term):
                return key in ((obj.get("metadata") or {}).get("labels") or {})

        else:
            raise _ApiFailure(400, "BadRequest", f"unable to parse requirement: {term!r}")
        preds.append(pred)
    return preds


# --------------------------------------------------------------------------------------------
# store internals


@dataclass(eq=False)
class _Event:
    """One write. ``obj``: the state after it (for DELETED: the last state, with the deletion's
    resourceVersion); ``prev``: the state before (None for ADDED). Stored dicts are never mutated."""

    rv: int
    type: str
    rtype: ResourceType
    key: tuple[str, str]
    obj: dict
    prev: dict | None
    _chunks: dict[str, bytes] = field(default_factory=dict)

    def chunk(self, etype: str) -> bytes:
        data = self._chunks.get(etype)
        if data is None:
            data = self._chunks[etype] = _event_chunk(etype, self.obj)
        return data


# sentinels on a watch's queue
_END = "end"  # terminating chunk, stream ends cleanly
_ABORT = "abort"  # connection closed without terminating chunk


@dataclass(eq=False)
class _Watch:
    rtype: ResourceType
    namespace: str | None
    preds: list[_Pred]
    bookmarks: bool
    conn: socket.socket
    run: _Run
    last_rv: int = 0
    peer_talks: bool = False  # the client sent data on it: hang-up detection skips it
    queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and (obj.get("metadata") or {}).get("namespace") != self.namespace:
            return False
        return all(p(obj) for p in self.preds)

    def chunk_for(self, ev: _Event) -> bytes | None:
        """The event as this watch sees it (selector transitions become ADDED/DELETED)."""
        if ev.rtype is not self.rtype:
            return None
        if ev.type == "DELETED":
            return ev.chunk("DELETED") if self.matches(ev.prev) else None
        now, before = self.matches(ev.obj), self.matches(ev.prev)
        if now and before:
            return ev.chunk("MODIFIED")
        if now:
            return ev.chunk("ADDED")
        if before:
            return ev.chunk("DELETED")
        return None

    def deliver(self, ev: _Event) -> None:
        data = self.chunk_for(ev)
        if data is not None:
            self.queue.put(data)
            self.last_rv = ev.rv


@dataclass(eq=False)
class _Run:
    """One start()..stop() of the server: listener, serving thread, connections."""

    server: _HTTPServer
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: set = field(default_factory=set)
    threads: set = field(default_factory=set)
    serve_thread: threading.Thread | None = None
    reaper_thread: threading.Thread | None = None


# --------------------------------------------------------------------------------------------
# HTTP plumbing


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() joins the threads itself, with timeouts
    request_queue_size = 1024  # listen backlog: hundreds of watches connect at once
    allow_reuse_address = True

    api: FakeKubeAPI
    run: _Run

    def process_request(self, request, client_address):
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"fake-kubeapi-conn-{client_address[1]}",
            daemon=True,
        )
        with self.run.lock:
            self.run.connections.add(request)
            self.run.threads.add(thread)
        thread.start()

    def _serve_connection(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.run.lock:
                self.run.connections.discard(request)
                self.run.threads.discard(threading.current_thread())

    def handle_error(self, request, client_address):
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or self.run.stopping.is_set():
            return  # the peer went away, or we are closing its connection
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver"
    sys_version = ""
    server: _HTTPServer

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _dispatch(self):
        self.server.api._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


@dataclass
class _Request:
    handler: _Handler
    method: str
    target: str
    path: str
    query: dict[str, str]
    arrived: float
    authorization: str | None
    body: bytes
    content_type: str


# --------------------------------------------------------------------------------------------
# the server


class FakeKubeAPI:
    """The fake API server (see the module docstring for the protocol and every control)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
        require_token: str | None = None,
        bookmark_interval: float | None = 60.0,
        history_limit: int | None = None,
        latency: float = 0.0,
    ):
        self._host = host
        self._port = port
        self._given_sock = sock
        self._given_addr = sock.getsockname() if sock is not None else None
        self._given_sock_down = False
        if sock is not None:  # before any accept, so that stop()/start() can bind it again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.require_token = require_token
        self.bookmark_interval = bookmark_interval
        self.history_limit = history_limit
        self.latency = latency

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._types = {rt.plural: rt for rt in RESOURCES}
        self._objects: dict[str, dict[tuple[str, str], dict]] = {rt.plural: {} for rt in RESOURCES}
        self._rv = 0
        self._compacted_rv = 0  # watching from an RV below this is "too old"
        self._history: list[_Event] = []
        self._watches: set[_Watch] = set()
        self._faults: list[list] = []  # [remaining, status, path_contains, retry_after]
        self._requests: list[RequestRecord] = []
        self._authorizations: list[str | None] = []
        self._run: _Run | None = None
        self._start_stop = threading.Lock()

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> FakeKubeAPI:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> FakeKubeAPI:
        """Serve (again, on the same port) from a background daemon thread."""
        with self._start_stop:
            if self._run is not None:
                return self
            listener = self._listen()
            server = _HTTPServer(("127.0.0.1", 0), _Handler, bind_and_activate=False)
            server.socket.close()
            server.socket = listener
            addr = listener.getsockname()
            server.server_address = addr
            server.server_name, server.server_port = str(addr[0]), addr[1]
            run = _Run(server=server)
            server.api, server.run = self, run
            run.serve_thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kubeapi-serve", daemon=True
            )
            run.reaper_thread = threading.Thread(target=self._reap, args=(run,), name="fake-kubeapi-reaper", daemon=True)
            with self._lock:
                self._run = run
            run.serve_thread.start()
            run.reaper_thread.start()
            return self

    def _listen(self) -> socket.socket:
        if self._given_sock is not None:
            sock = self._given_sock
            if self._given_sock_down:  # shut down by stop(): bind it to its address again
                try:
                    sock.bind(self._given_addr)
                except OSError as e:
                    raise OSError(
                        e.errno,
                        f"cannot serve again on the given socket {self._given_addr}: {e.strerror} (was SO_REUSEADDR "
                        "unset when it accepted connections before FakeKubeAPI got it?)",
                    ) from e
                sock.listen(1024)
                self._given_sock_down = False
            self._port = self._given_addr[1]
            return sock
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        return sock

    def stop(self) -> None:
        """Refuse new connections, close every open one (watches abruptly), join the threads."""
        with self._start_stop:
            with self._lock:
                run, self._run = self._run, None
            if run is None:
                return
            run.stopping.set()
            run.server.shutdown()  # the accept loop ends (polls every 50 ms)
            listener = run.server.socket
            if self._given_sock is not None:
                try:  # refuse connections but keep the socket (and its network namespace)
                    listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._given_sock_down = True
            else:
                listener.close()
            with self._cond:
                for watch in [w for w in self._watches if w.run is run]:
                    self._watches.discard(watch)
                    watch.queue.put(_ABORT)
                self._cond.notify_all()
            with run.lock:
                connections = list(run.connections)
            for conn in connections:
                _shutdown(conn)
            deadline = time.monotonic() + _JOIN_SECONDS
            for thread in (run.serve_thread, run.reaper_thread):
                if thread is not None:
                    thread.join(max(0.0, deadline - time.monotonic()))
            while True:
                with run.lock:
                    threads = list(run.threads)
                if not threads or time.monotonic() >= deadline:
                    break
                threads[0].join(max(0.0, min(0.2, deadline - time.monotonic())))
            if threads:
                warnings.warn(f"FakeKubeAPI.stop(): {len(threads)} connection threads still running", RuntimeWarning)

    close = stop

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = self._given_addr[0] if self._given_addr is not None else self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    def write_kubeconfig(self, path: str | Path, token: str | None = "test-token", namespace: str = "default") -> Path:
        """A kubeconfig pointing at this server (see the module docstring)."""
        path = Path(path)
        user = f"\n    token: {json.dumps(token)}" if token is not None else " {}"
        path.write_text(
            "apiVersion: v1\n"
            "kind: Config\n"
            "clusters:\n"
            "- name: fake\n"
            "  cluster:\n"
            f"    server: {json.dumps(self.url)}\n"
            "users:\n"
            "- name: fake-user\n"
            f"  user:{user}\n"
            "contexts:\n"
            "- name: fake\n"
            "  context:\n"
            "    cluster: fake\n"
            "    user: fake-user\n"
            f"    namespace: {json.dumps(namespace)}\n"
            "current-context: fake\n"
        )
        return path

    # ---------------------------------------------------------------- control: store

    def _resource(self, resource: str | ResourceType) -> ResourceType:
        if isinstance(resource, ResourceType):
            return resource
        wanted = resource.lower()
        for rt in RESOURCES:
            if wanted in (rt.plural, rt.kind.lower(), rt.qualified):
                return rt
        raise KeyError(f"unknown resource {resource!r}: one of {', '.join(rt.plural for rt in RESOURCES)}")

    def _type_of(self, obj: dict) -> ResourceType:
        for rt in RESOURCES:
            if rt.api_version == obj.get("apiVersion") and rt.kind == obj.get("kind"):
                return rt
        raise KeyError(f"unknown apiVersion/kind {obj.get('apiVersion')!r}/{obj.get('kind')!r}")

    @property
    def resource_version(self) -> str:
        with self._lock:
            return str(self._rv)

    def put(self, obj: Any) -> dict:
        """Create or replace ``obj`` (status included), unconditionally, as an API write."""
        if hasattr(obj, "to_dict"):
            obj = obj.to_dict()
        obj = json.loads(json.dumps(obj))
        rtype = self._type_of(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("put(): metadata.name is required")
        if rtype.namespaced:
            meta["namespace"] = meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        with self._lock:
            key = (meta.get("namespace", ""), meta["name"])
            stored = self._objects[rtype.plural].get(key)
            if stored is None:
                return copy.deepcopy(self._create(rtype, obj, keep_status=True))
            return copy.deepcopy(self._update(rtype, stored, obj))

    def get(self, resource: str, name: str, namespace: str | None = None) -> dict | None:
        rtype = self._resource(resource)
        with self._lock:
            obj = self._objects[rtype.plural].get(self._key(rtype, name, namespace))
            return copy.deepcopy(obj)

    def delete(self, resource: str, name: str, namespace: str | None = None) -> dict | None:
        rtype = self._resource(resource)
        with self._lock:
            key = self._key(rtype, name, namespace)
            if key not in self._objects[rtype.plural]:
                return None
            return copy.deepcopy(self._delete(rtype, key))

    def objects(self, resource: str, namespace: str | None = None) -> list[dict]:
        rtype = self._resource(resource)
        with self._lock:
            items = sorted(self._objects[rtype.plural].items())
            return [copy.deepcopy(o) for k, o in items if namespace is None or k[0] == namespace]

    @staticmethod
    def _key(rtype: ResourceType, name: str, namespace: str | None) -> tuple[str, str]:
        return ((namespace or "default") if rtype.namespaced else "", name)

    # ---------------------------------------------------------------- control: faults

    def compact(self) -> None:
        with self._lock:
            self._compacted_rv = self._rv
            self._history.clear()

    def expire_watches(self) -> None:
        with self._cond:
            for watch in list(self._watches):
                self._watches.discard(watch)
                watch.queue.put(self._expired_chunk(watch.last_rv, self._rv))
                watch.queue.put(_END)
            self._cond.notify_all()

    def bookmark(self) -> None:
        with self._lock:
            for watch in self._watches:
                if watch.bookmarks:
                    watch.queue.put(self._bookmark_chunk(watch.rtype))

    def drop_watches(self) -> None:
        with self._cond:
            dropped = list(self._watches)
            self._watches.clear()
            for watch in dropped:
                watch.queue.put(_ABORT)
            self._cond.notify_all()
        for watch in dropped:
            _shutdown(watch.conn)

    def fail_next(self, count: int = 1, status: int = 500, path_contains: str | None = None, retry_after: int = 1) -> None:
        with self._lock:
            self._faults.append([count, status, path_contains, retry_after])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # ---------------------------------------------------------------- control: observation

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    @property
    def authorizations(self) -> list[str | None]:
        with self._lock:
            return list(self._authorizations)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._authorizations.clear()

    @property
    def watch_count(self) -> int:
        with self._lock:
            return len(self._watches)

    def wait_for_watches(self, count: int, timeout: float = 5.0) -> None:
        """Block until exactly ``count`` watches are open; ``TimeoutError`` after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._watches) == count, timeout):
                raise TimeoutError(f"{len(self._watches)} watches open, waited {timeout}s for {count}")

    # ---------------------------------------------------------------- writes (hold self._lock)

    def _commit(self, rtype: ResourceType, key: tuple[str, str], etype: str, new: dict | None) -> dict:
        self._rv += 1
        rv = self._rv
        table = self._objects[rtype.plural]
        prev = table.get(key)
        if new is None:  # DELETED: the last state, with the deletion's resourceVersion
            assert prev is not None
            obj = {**prev, "metadata": {**prev["metadata"], "resourceVersion": str(rv)}}
            del table[key]
        else:
            new["metadata"]["resourceVersion"] = str(rv)
            obj = table[key] = _ordered(new)
        event = _Event(rv, etype, rtype, key, obj, prev)
        self._history.append(event)
        limit = self.history_limit
        if limit is not None and len(self._history) > limit:
            drop = len(self._history) - limit
            self._compacted_rv = self._history[drop - 1].rv
            del self._history[:drop]
        for watch in self._watches:
            if watch.rtype is rtype:
                watch.deliver(event)
        return obj

    def _create(self, rtype: ResourceType, obj: dict, *, keep_status: bool, dry_run: bool = False) -> dict:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if key in self._objects[rtype.plural]:
            raise _ApiFailure(
                409,
                "AlreadyExists",
                f'{rtype.qualified} "{meta["name"]}" already exists',
                {"name": meta["name"], "group": rtype.group, "kind": rtype.plural},
            )
        if rtype.status_subresource and not keep_status:
            obj.pop("status", None)
        for server_managed in ("uid", "resourceVersion", "creationTimestamp", "generation", "deletionTimestamp"):
            meta.pop(server_managed, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if rtype.generation:
            meta["generation"] = 1
        if dry_run:
            meta["resourceVersion"] = ""
            return _ordered(obj)
        return self._commit(rtype, key, "ADDED", obj)

    def _update(self, rtype: ResourceType, stored: dict, new: dict, *, dry_run: bool = False) -> dict:
        """Replace ``stored`` by ``new`` (already shaped for the subresource rules), keeping the
        server-managed metadata; no change: no write."""
        meta = new.setdefault("metadata", {})
        old_meta = stored["metadata"]
        meta["name"] = old_meta["name"]
        if rtype.namespaced:
            meta["namespace"] = old_meta["namespace"]
        else:
            meta.pop("namespace", None)
        for kept in ("uid", "creationTimestamp"):
            meta[kept] = old_meta[kept]
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if rtype.generation:
            generation = old_meta.get("generation", 1)
            meta["generation"] = generation + (_content(new) != _content(stored))
        else:
            meta.pop("generation", None)
        new = _ordered(new)
        if new == stored or dry_run:
            return new if dry_run else stored
        return self._commit(rtype, (old_meta.get("namespace", ""), old_meta["name"]), "MODIFIED", new)

    def _delete(self, rtype: ResourceType, key: tuple[str, str]) -> dict:
        return self._commit(rtype, key, "DELETED", None)

    def _expired_chunk(self, rv: int | str, current: int) -> bytes:
        status = _status(410, "Expired", f"too old resource version: {rv} ({current})")
        return _event_chunk("ERROR", status)

    def _bookmark_chunk(self, rtype: ResourceType, annotations: dict | None = None) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if annotations:
            meta["annotations"] = annotations
        return _event_chunk("BOOKMARK", {"apiVersion": rtype.api_version, "kind": rtype.kind, "metadata": meta})

    def _snapshot(self, rtype: ResourceType, rv: int) -> dict[tuple[str, str], dict]:
        """The objects of ``rtype`` as they were at ``rv`` (rebuilt by undoing the history)."""
        state = dict(self._objects[rtype.plural])
        start = bisect.bisect_right(self._history, rv, key=lambda e: e.rv)
        for ev in reversed(self._history[start:]):
            if ev.rtype is not rtype:
                continue
            if ev.prev is None:
                state.pop(ev.key, None)
            else:
                state[ev.key] = ev.prev
        return state

    # ---------------------------------------------------------------- request handling

    def _handle(self, h: _Handler) -> None:
        arrived = time.monotonic()
        run = h.server.run
        split = urlsplit(h.path)
        try:
            body = _read_body(h)
        except (OSError, ValueError):
            h.close_connection = True
            return
        req = _Request(
            handler=h,
            method=h.command,
            target=h.path,
            path=split.path,
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            arrived=arrived,
            authorization=h.headers.get("Authorization"),
            body=body,
            content_type=(h.headers.get("Content-Type") or "").split(";")[0].strip().lower(),
        )
        latency = self.latency
        if latency and latency > 0 and run.stopping.wait(latency):
            h.close_connection = True
            return
        if run.stopping.is_set():
            h.close_connection = True
            return
        try:
            self._check_faults(req)
            if self.require_token is not None and req.authorization != f"Bearer {self.require_token}":
                raise _ApiFailure(401, "Unauthorized", "Unauthorized")
            result = self._route(req)
        except _ApiFailure as e:
            self._respond(req, e.code, _status(e.code, e.reason, e.message, e.details), e.headers)
            return
        except Exception as e:  # a bug here must be visible, not a hung client
            import traceback

            traceback.print_exc()
            self._respond(req, 500, _status(500, "InternalError", f"fake API server error: {e!r}"))
            return
        if result is not None:
            code, obj = result
            self._respond(req, code, obj)

    def _check_faults(self, req: _Request) -> None:
        with self._lock:
            for fault in self._faults:
                remaining, status, contains, retry_after = fault
                if contains is None or contains in req.target:
                    fault[0] -= 1
                    if fault[0] <= 0:
                        self._faults.remove(fault)
                    break
            else:
                return
        reason = _REASONS.get(status, "")
        details = {"retryAfterSeconds": retry_after} if status == 429 else None
        failure = _ApiFailure(status, reason, f"injected failure: {status} {reason}", details)
        if status == 429:
            failure.headers["Retry-After"] = str(retry_after)
        raise failure

    def _log(self, req: _Request, status: int) -> None:
        with self._lock:
            self._requests.append(RequestRecord(req.arrived, req.method, req.path, req.query, status))
            self._authorizations.append(req.authorization)

    def _respond(self, req: _Request, code: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = _dumps(obj)
        h = req.handler
        self._log(req, code)
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Cache-Control", "no-cache, private")
            for name, value in (headers or {}).items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            h.close_connection = True

    def _parse_path(self, path: str) -> tuple[ResourceType, str | None, str | None, str | None]:
        """(resource type, namespace, name, subresource); 404 for anything not served."""
        parts = [p for p in path.split("/") if p]
        not_found = _ApiFailure(404, "NotFound", "the server could not find the requested resource")
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise not_found
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise not_found
        rtype = self._types.get(rest[0])
        if rtype is None or rtype.group != group or rtype.version != version:
            raise not_found
        if namespace is not None and not rtype.namespaced:
            raise not_found
        name = rest[1] if len(rest) >= 2 else None
        sub = rest[2] if len(rest) == 3 else None
        if sub is not None and (sub != "status" or not rtype.status_subresource):
            raise not_found
        if name is not None and rtype.namespaced and namespace is None:
            raise not_found
        return rtype, namespace, name, sub

    def _route(self, req: _Request) -> tuple[int, dict] | None:
        rtype, namespace, name, sub = self._parse_path(req.path)
        method = req.method
        if method == "GET" and _truthy(req.query.get("watch")):
            if sub is not None:
                raise _ApiFailure(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            self._watch(req, rtype, namespace, name)
            return None
        if name is None:
            if method == "GET":
                return 200, self._list(req, rtype, namespace)
            if method == "POST" and (namespace is not None or not rtype.namespaced):
                return self._post(req, rtype, namespace)
            if method == "DELETE":
                return 200, self._delete_collection(req, rtype, namespace)
        else:
            if method == "GET":
                return 200, self._get(rtype, namespace, name)
            if method == "PUT":
                return 200, self._put(req, rtype, namespace, name, sub)
            if method == "PATCH":
                return 200, self._patch(req, rtype, namespace, name, sub)
            if method == "DELETE" and sub is None:
                return 200, self._delete_request(req, rtype, namespace, name)
        raise _ApiFailure(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _not_found(self, rtype: ResourceType, name: str) -> _ApiFailure:
        return _ApiFailure(
            404, "NotFound", f'{rtype.qualified} "{name}" not found', {"name": name, "group": rtype.group, "kind": rtype.plural}
        )

    def _stored(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self._objects[rtype.plural].get((namespace or "", name))
        if obj is None:
            raise self._not_found(rtype, name)
        return obj

    def _get(self, rtype, namespace, name) -> dict:
        with self._lock:
            return self._stored(rtype, namespace, name)

    def _json_body(self, req: _Request) -> Any:
        try:
            return json.loads(req.body or b"null")
        except ValueError as e:
            raise _ApiFailure(400, "BadRequest", f"the request body is not valid JSON: {e}") from None

    def _body_object(self, req: _Request, rtype: ResourceType, namespace: str | None) -> dict:
        obj = self._json_body(req)
        if not isinstance(obj, dict):
            raise _ApiFailure(400, "BadRequest", "the request body must be a JSON object")
        obj.setdefault("apiVersion", rtype.api_version)
        obj.setdefault("kind", rtype.kind)
        if obj["apiVersion"] != rtype.api_version or obj["kind"] != rtype.kind:
            raise _ApiFailure(
                400,
                "BadRequest",
                f"the API version in the data ({obj['apiVersion']}) or kind ({obj['kind']}) does not match "
                f"the expected {rtype.api_version} {rtype.kind}",
            )
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if rtype.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise _ApiFailure(
                    400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        return obj

    def _post(self, req, rtype, namespace) -> tuple[int, dict]:
        obj = self._body_object(req, rtype, namespace)
        meta = obj["metadata"]
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            else:
                raise _ApiFailure(422, "Invalid", f"{rtype.kind}.{rtype.api_version} is invalid: metadata.name: Required value: name or generateName is required")
        with self._lock:
            return 201, self._create(rtype, obj, keep_status=False, dry_run=req.query.get("dryRun") == "All")

    def _shape_update(self, rtype: ResourceType, stored: dict, incoming: dict, sub: str | None) -> dict:
        """Apply the status subresource rules to an incoming full object."""
        if not rtype.status_subresource:
            return incoming
        if sub == "status":
            new = copy.deepcopy(stored)
            if "status" in incoming:
                new["status"] = incoming["status"]
            else:
                new.pop("status", None)
            return new
        if "status" in stored:
            incoming["status"] = copy.deepcopy(stored["status"])
        else:
            incoming.pop("status", None)
        return incoming

    def _conflict(self, rtype: ResourceType, name: str) -> _ApiFailure:
        return _ApiFailure(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {rtype.qualified} "{name}": the object has been modified; '
            "please apply your changes to the latest version and try again",
            {"name": name, "group": rtype.group, "kind": rtype.plural},
        )

    def _put(self, req, rtype, namespace, name, sub) -> dict:
        obj = self._body_object(req, rtype, namespace)
        meta = obj["metadata"]
        if meta.get("name") not in (None, name):
            raise _ApiFailure(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
        with self._lock:
            stored = self._stored(rtype, namespace, name)
            rv = meta.get("resourceVersion")
            if not rv:
                if not rtype.unconditional_update:
                    raise _ApiFailure(
                        422,
                        "Invalid",
                        f'{rtype.kind}.{rtype.api_version} "{name}" is invalid: metadata.resourceVersion: '
                        "Invalid value: 0x0: must be specified for an update",
                    )
            elif rv != stored["metadata"]["resourceVersion"]:
                raise self._conflict(rtype, name)
            new = self._shape_update(rtype, stored, obj, sub)
            return self._update(rtype, stored, new, dry_run=req.query.get("dryRun") == "All")

    def _patch(self, req, rtype, namespace, name, sub) -> dict:
        if req.content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise _ApiFailure(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format ({req.content_type}); this fake server accepts "
                "application/merge-patch+json, application/strategic-merge-patch+json",
            )
        patch = self._json_body(req)
        if not isinstance(patch, dict):
            raise _ApiFailure(400, "BadRequest", "a merge patch must be a JSON object")
        with self._lock:
            stored = self._stored(rtype, namespace, name)
            patched = _merge_patch(copy.deepcopy(stored), patch)
            if not isinstance(patched.get("metadata"), dict):
                patched["metadata"] = {}
            rv = patched["metadata"].get("resourceVersion")
            if rv and rv != stored["metadata"]["resourceVersion"]:
                raise self._conflict(rtype, name)
            patched["apiVersion"], patched["kind"] = rtype.api_version, rtype.kind
            new = self._shape_update(rtype, stored, patched, sub)
            return self._update(rtype, stored, new, dry_run=req.query.get("dryRun") == "All")

    def _delete_request(self, req, rtype, namespace, name) -> dict:
        options = self._json_body(req) if req.body else None
        with self._lock:
            stored = self._stored(rtype, namespace, name)
            pre = (options or {}).get("preconditions") or {}
            if pre.get("resourceVersion") not in (None, stored["metadata"]["resourceVersion"]) or pre.get("uid") not in (
                None,
                stored["metadata"]["uid"],
            ):
                raise _ApiFailure(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {rtype.qualified} "{name}": precondition failed',
                    {"name": name, "group": rtype.group, "kind": rtype.plural},
                )
            if req.query.get("dryRun") != "All":
                self._delete(rtype, (namespace or "", name))
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": rtype.group, "kind": rtype.plural, "uid": stored["metadata"]["uid"]},
        }

    def _matcher(self, req: _Request, namespace: str | None, name: str | None = None) -> Callable[[dict], bool]:
        preds = _parse_field_selector(req.query.get("fieldSelector")) + _parse_label_selector(req.query.get("labelSelector"))
        if name is not None:
            preds += _parse_field_selector(f"metadata.name={name}")

        def matches(obj: dict) -> bool:
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            return all(p(obj) for p in preds)

        return matches

    def _delete_collection(self, req, rtype, namespace) -> dict:
        matches = self._matcher(req, namespace)
        with self._lock:
            doomed = [k for k, o in sorted(self._objects[rtype.plural].items()) if matches(o)]
            items = [self._delete(rtype, k) for k in doomed] if req.query.get("dryRun") != "All" else []
            return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version, "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _list(self, req, rtype, namespace) -> dict:
        matches = self._matcher(req, namespace)
        try:
            limit = int(req.query.get("limit") or 0)
        except ValueError:
            raise _ApiFailure(400, "BadRequest", f"limit: invalid value {req.query['limit']!r}: must be an integer") from None
        token = req.query.get("continue")
        with self._lock:
            if token:
                try:
                    decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                    snapshot_rv, start = int(decoded["rv"]), tuple(decoded["start"])
                except (ValueError, KeyError, TypeError, binascii.Error):
                    raise _ApiFailure(400, "BadRequest", "continue key is not valid") from None
                if snapshot_rv < self._compacted_rv:
                    raise _ApiFailure(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter.",
                    )
                state = self._snapshot(rtype, snapshot_rv)
            else:
                snapshot_rv, start = self._rv, None
                state = self._objects[rtype.plural]
            keys = sorted(k for k, o in state.items() if (start is None or k > start) and matches(o))
            page = keys[:limit] if limit > 0 else keys
            meta: dict[str, Any] = {"resourceVersion": str(snapshot_rv)}
            if len(page) < len(keys):
                token = {"rv": snapshot_rv, "start": list(page[-1])}
                meta["continue"] = base64.urlsafe_b64encode(_dumps(token)).decode()
                meta["remainingItemCount"] = len(keys) - len(page)
            items = [state[k] for k in page]
            return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version, "metadata": meta, "items": items}

    # ---------------------------------------------------------------- watch

    def _reap(self, run: _Run) -> None:
        """End the watches whose client went away (as the API server notices a closed connection):
        a watch thread only touches its socket when it has something to write. One thread polls
        every open watch socket for hang-up."""
        hangup = select.POLLHUP | select.POLLERR | select.POLLNVAL
        rdhup = getattr(select, "POLLRDHUP", 0)
        while not run.stopping.is_set():
            with self._lock:
                watches = {w.conn.fileno(): w for w in self._watches if w.run is run and not w.peer_talks}
            watches.pop(-1, None)
            if not watches:
                run.stopping.wait(_REAP_SECONDS)
                continue
            poller = select.poll()
            for fd in watches:
                poller.register(fd, (rdhup or select.POLLIN) | hangup)
            gone = []
            for fd, mask in poller.poll(_REAP_SECONDS * 1000):
                watch = watches[fd]
                if mask & (hangup | rdhup):
                    gone.append(watch)
                    continue
                try:  # POLLIN without POLLRDHUP support: EOF or data?
                    eof = watch.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    eof = False
                except OSError:
                    eof = True
                if eof:
                    gone.append(watch)
                else:
                    watch.peer_talks = True  # pipelined data: stop polling it (it would always be readable)
            if gone:
                with self._cond:
                    for watch in gone:
                        if watch in self._watches:
                            self._watches.discard(watch)
                            watch.queue.put(_ABORT)
                    self._cond.notify_all()
            elif watches:
                run.stopping.wait(_REAP_SECONDS)  # poll() returned at once only if something happened


    def _watch(self, req: _Request, rtype: ResourceType, namespace: str | None, name: str | None) -> None:
        h = req.handler
        run = h.server.run
        q = req.query
        matches = self._matcher(req, namespace, name)
        try:
            timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        except ValueError:
            raise _ApiFailure(400, "BadRequest", f"timeoutSeconds: invalid value {q['timeoutSeconds']!r}") from None
        rv_param = q.get("resourceVersion") or "0"
        try:
            since = int(rv_param)
        except ValueError:
            raise _ApiFailure(400, "BadRequest", f"resourceVersion: invalid value {rv_param!r}") from None
        watch = _Watch(rtype, None, [matches], _truthy(q.get("allowWatchBookmarks")), h.connection, run)
        with self._cond:
            if run.stopping.is_set():
                h.close_connection = True
                return
            if since == 0 or _truthy(q.get("sendInitialEvents")):
                for key, obj in sorted(self._objects[rtype.plural].items()):
                    if matches(obj):
                        watch.queue.put(_event_chunk("ADDED", obj))
                watch.last_rv = self._rv
                if _truthy(q.get("sendInitialEvents")) and watch.bookmarks:
                    watch.queue.put(self._bookmark_chunk(rtype, {"k8s.io/initial-events-end": "true"}))
                self._watches.add(watch)
            elif since < self._compacted_rv:
                watch.queue.put(self._expired_chunk(since, self._compacted_rv))
                watch.queue.put(_END)
            else:
                watch.last_rv = since
                start = bisect.bisect_right(self._history, since, key=lambda e: e.rv)
                for ev in self._history[start:]:
                    watch.deliver(ev)
                self._watches.add(watch)
            self._cond.notify_all()
        try:
            self._log(req, 200)
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.send_header("Cache-Control", "no-cache, private")
            h.end_headers()
            self._stream(h, watch, timeout)
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(watch)
                self._cond.notify_all()

    def _stream(self, h: _Handler, watch: _Watch, timeout: float | None) -> None:
        run = watch.run
        started = time.monotonic()
        deadline = started + timeout if timeout is not None else None
        next_bookmark = None
        while True:
            now = time.monotonic()
            interval = self.bookmark_interval if watch.bookmarks else None
            if interval is None:
                next_bookmark = None
            elif next_bookmark is None:
                next_bookmark = now + interval
            elif now >= next_bookmark:
                with self._lock:
                    if watch in self._watches:
                        watch.queue.put(self._bookmark_chunk(watch.rtype))
                next_bookmark = now + interval
            wait = _POLL_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - now)
            if next_bookmark is not None:
                wait = min(wait, next_bookmark - now)
            if deadline is not None and now >= deadline:
                with self._cond:  # no event may slip in after the terminating chunk
                    self._watches.discard(watch)
                    self._cond.notify_all()
                pending = _drain(watch.queue)
                self._write_items(h, watch, [*pending, _END])
                return
            try:
                item = watch.queue.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if run.stopping.is_set():
                    _abort(h)
                    return
                continue
            if not self._write_items(h, watch, [item, *_drain(watch.queue)]):
                return

    def _write_items(self, h: _Handler, watch: _Watch, items: list) -> bool:
        """Write data chunks; False once the stream is over (ended or aborted)."""
        data = bytearray()
        for item in items:
            if isinstance(item, bytes):
                data += item
                continue
            if item == _END:
                with self._cond:
                    self._watches.discard(watch)
                    self._cond.notify_all()
                data += _LAST_CHUNK
                h.wfile.write(bytes(data))
                return False
            if data:  # _ABORT: what was already queued before it may still go out
                _try_write(h, bytes(data))
            _abort(h)
            return False
        if data:
            h.wfile.write(bytes(data))
        return True


def _drain(q: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _try_write(h: _Handler, data: bytes) -> None:
    try:
        h.wfile.write(data)
    except OSError:
        pass


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _abort(h: _Handler) -> None:
    """Close the connection without a terminating chunk."""
    h.close_connection = True
    _shutdown(h.connection)


def _read_body(h: _Handler) -> bytes:
    if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
        body = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(body)
            body += h.rfile.read(size)
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length > 0 else b""
