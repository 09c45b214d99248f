"""The HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` (``--http-address``).

A deliberately small HTTP/1.1 server on anyio, run in the daemon's own task group: it reads one
request head per connection, answers it from a route table of cheap synchronous handlers, and
closes the connection. No web framework, no keep-alive, no request bodies: Prometheus and the
kubelet's probes need nothing more.

A client can never hold the daemon up, nor keep the probes out. Every connection is its own task
with a deadline for reading its request and one for taking the answer; a client that is idle,
slow or never reads is dropped when its deadline passes. At most :data:`MAX_CONNECTIONS` are open
at once, and at most :data:`MAX_PER_PEER` from one address, but a limit never refuses a new
connection: it makes room by closing an old one. A new connection from an address that already
holds :data:`MAX_PER_PEER` closes that address' oldest connection still waiting for its request
(its oldest connection of all when every one is being answered); a new connection beyond
:data:`MAX_CONNECTIONS` does the same to the address holding the most. So idle connections, even
from the node's own address that the kubelet probes a hostNetwork pod from, never make
``/healthz`` or ``/readyz`` fail: the probe, which sends its request at once, takes the place of
an idle one. A flood of connections from one address closes its own (the newest stay), never
those of an address holding fewer, and the total stays bounded, so it costs a bounded amount of
memory and file descriptors. A failing ``accept()`` (out of file descriptors) is logged and
retried after a pause; it never stops the daemon, and neither does an address that cannot be
bound: masquerading goes on and the bind is retried (:func:`run_endpoint`). Handlers run on the
event loop, so they must not block: they read state the reconciler keeps, they never do I/O.

:func:`parse_listen_address` (the flag) and :func:`parse_request_head` (the protocol) are pure.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from masqd.aio import Backoff
from masqd.errors import EndpointError, FlagError

log = structlog.get_logger("masqd.http")

#: The default ``--http-address``: every interface, port 9142.
DEFAULT_ADDRESS = ":9142"
#: Seconds a client has to send its request head, and to take the whole answer.
READ_TIMEOUT_SECONDS = 5.0
WRITE_TIMEOUT_SECONDS = 5.0
#: A request head longer than this is refused (431): the endpoint takes no headers that matter.
MAX_HEAD_BYTES = 8192
#: Connections open at once, and from one peer address. A new connection beyond either is still
#: served: it closes an older one (idle first) of the same address, or of the address holding most.
MAX_CONNECTIONS = 256
MAX_PER_PEER = 16
#: Seconds between attempts to bind an address that could not be bound.
BIND_RETRY_SECONDS = 10.0
#: Pause after a failed accept() (EMFILE, ENFILE, ENOBUFS), doubled up to the maximum.
ACCEPT_RETRY_SECONDS = 0.05
ACCEPT_RETRY_MAX_SECONDS = 1.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Response:
    """An answer: status code, body, content type."""

    status: int
    body: bytes = b""
    content_type: str = TEXT

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode() + (b"" if text.endswith("\n") else b"\n"))


#: A route: called for each GET or HEAD of its path; must be cheap and never block.
Handler = Callable[[], Response]


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen: ``host`` ``None`` means every interface (IPv4 and IPv6)."""

    host: str | None
    port: int

    def __str__(self) -> str:
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def parse_listen_address(text: str) -> Address | None:
    """``--http-address``: ``HOST:PORT``, ``:PORT`` (every interface), ``[IPv6]:PORT``; the empty
    string disables the endpoint (``None``). Port 0 picks a free port (logged at start)."""
    if text == "":
        return None
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise FlagError("http-address", text, "expected HOST:PORT or :PORT, e.g. ':9142' or '127.0.0.1:9142'; "
                                              "an empty value disables the endpoint")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise FlagError("http-address", text, "write an IPv6 host in brackets, e.g. '[::1]:9142'")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise FlagError("http-address", text, f"port {port_text!r} is not a number from 0 to 65535")
    if any(c.isspace() or c in "/[]" for c in host):
        raise FlagError("http-address", text, f"host {host!r} is not an address or a host name")
    return Address(host or None, int(port_text))


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string


class BadRequest(Exception):
    """A request head that cannot be answered; ``status`` says how it is refused."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def parse_request_head(head: bytes) -> Request:
    """The method and path of a request head (up to and excluding the blank line). Raises
    :class:`BadRequest` for anything that is not an HTTP/1.x request line."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(400, "malformed request line") from None
    if not version.startswith("HTTP/"):
        raise BadRequest(400, "malformed request line")
    if not version.startswith("HTTP/1."):
        raise BadRequest(505, f"{version} is not supported; use HTTP/1.1")
    if not method.isalpha() or not method.isupper():
        raise BadRequest(400, f"malformed method {method!r}")
    if not target.startswith("/"):
        raise BadRequest(400, "the target must be a path such as /metrics")
    return Request(method, target.split("?", 1)[0])


def format_response(response: Response, *, head_only: bool = False, extra: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a complete HTTP/1.1 answer that closes the connection."""
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        **(extra or {}),
    }
    head = f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else response.body)


@dataclass(eq=False, slots=True)
class _Connection:
    """One open connection, as the limits see it."""

    peer: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    waiting: bool = True  # its request head has not arrived yet


class HttpServer:
    """Answers GET and HEAD on ``routes`` (path -> handler); everything else is 404 or 405."""

    def __init__(self, routes: Mapping[str, Handler], *, read_timeout: float = READ_TIMEOUT_SECONDS,
                 write_timeout: float = WRITE_TIMEOUT_SECONDS, max_connections: int = MAX_CONNECTIONS,
                 max_per_peer: int = MAX_PER_PEER):
        if max_connections < 1 or max_per_peer < 1:
            raise ValueError("max_connections and max_per_peer must be at least 1")
        self.routes = dict(routes)
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.active = 0  # connections open now
        self.dropped = 0  # connections closed at a deadline: idle, slow, or not reading their answer
        self.evicted = 0  # connections closed to make room for a newer one
        self.accept_errors = 0  # failed accept() calls
        self._peers: dict[str, dict[_Connection, None]] = {}  # per address, its connections oldest first

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        """Serve connections from ``listener`` (one or several sockets) until cancelled, each in
        a task of its own."""
        async with listener, anyio.create_task_group() as tg:
            for one in getattr(listener, "listeners", [listener]):
                tg.start_soon(self._accept_loop, one, tg)

    async def _accept_loop(self, listener: anyio.abc.Listener, tg: anyio.abc.TaskGroup) -> None:
        backoff = Backoff(ACCEPT_RETRY_SECONDS, ACCEPT_RETRY_MAX_SECONDS)
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError as exc:  # out of descriptors or buffers: pause instead of spinning or dying
                self.accept_errors += 1
                delay = backoff.next_delay()
                if self.accept_errors == 1 or self.accept_errors % 100 == 0:
                    log.warning("HTTP endpoint cannot accept connections; pausing", error=str(exc),
                                failures=self.accept_errors, retry_in_s=round(delay, 3))
                await anyio.sleep(delay)
                continue
            backoff.reset()
            tg.start_soon(self.handle, stream)

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """One connection: read a request head, answer it, close. Never refused: when a limit is
        reached an older connection is closed instead (:meth:`_admit`)."""
        async with stream:
            connection = self._admit(_peer(stream))
            try:
                with connection.scope:  # cancelled when a newer connection takes its place
                    answer = await self._answer(stream)
                    connection.waiting = False
                    if answer is not None:
                        await self._send(stream, answer)
            finally:
                self._forget(connection)

    def _admit(self, peer: str) -> _Connection:
        """Count a new connection from ``peer``, first closing one to stay within the limits: the
        peer's own oldest when it holds :attr:`max_per_peer`, else, with :attr:`max_connections`
        open, the oldest of the peer holding the most (never of a peer holding fewer)."""
        own = self._peers.get(peer, {})
        if len(own) >= self.max_per_peer:
            self._evict(own)
        elif self.active >= self.max_connections:
            self._evict(max(self._peers.values(), key=len))
        connection = _Connection(peer)
        self._peers.setdefault(peer, {})[connection] = None
        self.active += 1
        return connection

    def _evict(self, connections: dict[_Connection, None]) -> None:
        """Close the oldest of ``connections`` still waiting for its request, or the oldest of all
        when every one is being answered."""
        victim = next((c for c in connections if c.waiting), None) or next(iter(connections))
        victim.scope.cancel()
        self._forget(victim)
        self.evicted += 1

    def _forget(self, connection: _Connection) -> None:
        own = self._peers.get(connection.peer)
        if own is None or connection not in own:
            return  # already evicted
        del own[connection]
        self.active -= 1
        if not own:
            del self._peers[connection.peer]

    async def _answer(self, stream: anyio.abc.ByteStream) -> bytes | None:
        try:
            with anyio.fail_after(self.read_timeout):
                head = await _read_head(stream)
        except TimeoutError:
            self.dropped += 1
            return None  # idle or trickling: dropped without a word, as a half-sent request deserves
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return None
        except BadRequest as exc:
            return format_response(Response.text(exc.status, str(exc)))
        try:
            request = parse_request_head(head)
        except BadRequest as exc:
            return format_response(Response.text(exc.status, str(exc)))
        if request.method not in ("GET", "HEAD"):
            return format_response(Response.text(405, f"{request.method} is not allowed; use GET"),
                                   extra={"Allow": "GET, HEAD"})
        handler = self.routes.get(request.path)
        if handler is None:
            known = ", ".join(sorted(self.routes))
            return format_response(Response.text(404, f"no such path {request.path!r}; try {known}"),
                                   head_only=request.method == "HEAD")
        try:
            response = handler()
        except Exception as exc:  # a bug in a handler answers 500; it never stops the daemon
            log.exception("HTTP handler failed", path=request.path)
            response = Response.text(500, f"internal error: {exc!r}")
        return format_response(response, head_only=request.method == "HEAD")

    async def _send(self, stream: anyio.abc.ByteStream, data: bytes) -> None:
        try:
            with anyio.fail_after(self.write_timeout):
                await stream.send(data)
        except TimeoutError:
            self.dropped += 1  # the client does not read: its answer is dropped
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


def _peer(stream: anyio.abc.ByteStream) -> str:
    """The client's address (without the port), or ``""`` when the stream has none."""
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return ""
    return address[0] if isinstance(address, tuple) else str(address)


async def _read_head(stream: anyio.abc.ByteStream) -> bytes:
    """Bytes up to the blank line ending a request head. Raises :class:`BadRequest` (431) when it
    is longer than :data:`MAX_HEAD_BYTES`, :class:`anyio.EndOfStream` when the client hung up."""
    data = b""
    while True:
        ends = [index for index in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if index >= 0]
        if min(ends, default=len(data)) > MAX_HEAD_BYTES:
            raise BadRequest(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
        if ends:
            return data[:min(ends)]
        data += await stream.receive(4096)


async def run_endpoint(address: Address, server: HttpServer,
                       on_ready: Callable[[list[str]], None] | None = None) -> None:
    """Bind ``address`` and serve it with ``server`` until cancelled. An address that cannot be
    bound (the port taken by another process) is logged and tried again every
    :data:`BIND_RETRY_SECONDS`: the endpoint is worth less than the masquerading, which goes on
    meanwhile. ``on_ready`` is called with the addresses bound."""
    logged = ""
    while True:
        try:
            listener = await open_listener(address)
        except EndpointError as exc:
            if str(exc) != logged:
                log.error("HTTP endpoint cannot listen; masquerading goes on without it, binding is retried",
                          error=str(exc), retry_in_s=BIND_RETRY_SECONDS)
                logged = str(exc)
            await anyio.sleep(BIND_RETRY_SECONDS)
            continue
        bound = bound_addresses(listener)
        log.info("HTTP endpoint listening", addresses=bound, paths=sorted(path for path in server.routes if path != "/"))
        if on_ready is not None:
            on_ready(bound)
        await server.serve(listener)


async def open_listener(address: Address) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Bind ``address``. Raises :class:`~masqd.errors.EndpointError` when it cannot be bound (port
    in use, address not on this host)."""
    try:
        return await anyio.create_tcp_listener(local_host=address.host, local_port=address.port)
    except (OSError, socket.gaierror) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise EndpointError(str(address), reason) from None


def bound_addresses(listener: anyio.abc.Listener) -> list[str]:
    """``host:port`` of every socket ``listener`` holds (to log the port picked for port 0)."""
    listeners = getattr(listener, "listeners", [listener])
    found = []
    for one in listeners:
        host, port = one.extra(anyio.abc.SocketAttribute.local_address)[:2]
        found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return found


def agent_routes(status: Any, metrics: Any) -> dict[str, Handler]:
    """The agent's endpoints: ``/metrics`` (``metrics``: a :class:`masqd.metrics.Metrics`),
    ``/healthz`` and ``/readyz`` (the agent status' :meth:`~masqd.status.AgentStatus.health` and
    :meth:`~masqd.status.AgentStatus.readiness`: 200 or 503, the reason in the body)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    def answer(check: Callable[[], tuple[bool, str]]) -> Handler:
        def handler() -> Response:
            ok, text = check()
            return Response.text(200 if ok else 503, text)

        return handler

    def index() -> Response:
        return Response.text(200, "masqd: /metrics /healthz /readyz")

    return {
        "/": index,
        "/metrics": lambda: Response(200, metrics.render(), CONTENT_TYPE_LATEST),
        "/healthz": answer(status.health),
        "/readyz": answer(status.readiness),
    }
