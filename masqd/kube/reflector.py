"""The reflector: a local copy of the API's objects of one kind, kept current.

:class:`Reflector` is what client-go calls a reflector: it lists the objects of one kind (with a
field selector), then watches from the list's ``resourceVersion``, and keeps ``objects`` current:

- a watch that ends (server timeout, dropped connection, API server restart) resumes from the last
  ``resourceVersion`` seen, bookmarks included, so nothing is missed and nothing is relisted;
- ``410 Gone`` (the version was compacted away) relists, replacing the whole copy, so a deletion
  made while disconnected is not missed either;
- any other failure (connection refused, 5xx, 429, timeouts) is retried after an exponential back-off
  with jitter (each delay drawn from the upper half of the current step), so thousands of nodes
  reconnecting after an API server restart spread their requests instead of arriving at once; an
  object that cannot be decoded (wrong types, nested too deeply) is such a failure, and the retry
  relists, so the watch recovers once the object is fixed or deleted;
- each watch asks the server to end it after a random 1-2x ``watch_timeout`` seconds, so reconnects
  spread out in steady state too; a watch still open 30 s after that is abandoned and resumed, so a
  connection that died silently (a watch has no read timeout) cannot leave the copy stale forever.

While the API is unreachable the copy is kept as it was: the last good state stays applied.
Only :mod:`masqd.sources.kube` and the controller use this module; the reconciler never does.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import structlog
from lightkube import AsyncClient
from lightkube.types import on_error_raise

from masqd.aio import Backoff
from masqd.kube.client import describe_failure, status_code
from masqd.kube.settings import KubeSettings

log = structlog.get_logger("masqd.kube")


#: A watch still open this long after the timeout the server was asked to end it at is abandoned
#: (and resumed from the last version seen): the connection died without the client noticing.
WATCH_GRACE_SECONDS = 30.0

#: Failures a reflector retries: transport errors, HTTP errors, a body it cannot decode (a
#: RecursionError is an object nested deeper than the decoder goes: a schema-less object can be).
RETRIED = (httpx2.HTTPError, OSError, ValueError, RecursionError, anyio.BrokenResourceError, anyio.EndOfStream)


def object_name(obj: Any) -> str:
    return obj.metadata.name


class Reflector:
    """Keeps ``objects`` (name -> object) equal to the API's objects of ``resource`` that match
    ``fields``; calls ``on_change(objects)`` after the first list and after every change.
    See the module docstring for how it resumes, relists and backs off. ``synced`` is true once
    a list has arrived; ``relists`` and ``failures`` count what it went through."""

    def __init__(
        self,
        client: AsyncClient,
        resource: type,
        settings: KubeSettings,
        on_change: Callable[[dict[str, Any]], None],
        *,
        namespace: str | None = None,
        fields: dict[str, str] | None = None,
        what: str = "",
        rng: random.Random | None = None,
    ):
        self.client = client
        self.resource = resource
        self.settings = settings
        self.on_change = on_change
        self.namespace = namespace
        self.fields = fields
        self.what = what or resource.__name__
        self.objects: dict[str, Any] = {}
        self.resource_version: str | None = None
        self.synced = False
        self.relists = 0
        self.failures = 0
        self._rng = rng or random.Random()
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max, rng=self._rng)
        self._watch_timeout = max(1, int(settings.watch_timeout * (1 + self._rng.random())))
        self._outage_logged = False
        self.stalls = 0  # watches abandoned because the server's timeout never came

    async def run(self) -> None:
        """List and watch until cancelled; never raises an API failure."""
        while True:
            try:
                if self.resource_version is None:
                    await self.list_once()
                # A connection that died silently (no FIN, no RST: a partition, a dead load
                # balancer) would leave the watch waiting forever, since a watch has no read
                # timeout. The server ends every watch after _watch_timeout; past that plus a
                # grace period the stream is abandoned and the watch resumed from the last version.
                with anyio.move_on_after(self._watch_timeout + WATCH_GRACE_SECONDS) as deadline:
                    await self._watch()
                if deadline.cancelled_caught:
                    self.stalls += 1
                    log.debug("watch outlived the server's timeout; resuming it", what=self.what)
            except RETRIED as exc:
                if status_code(exc) == 410:
                    log.info("resource version expired; relisting", what=self.what, resource_version=self.resource_version)
                    self.resource_version = None
                    await anyio.sleep(self._rng.uniform(0, self.settings.backoff_initial))
                    continue
                if status_code(exc) is None and isinstance(exc, (ValueError, RecursionError)):
                    # An object that cannot be decoded: resuming would read it again, forever; a
                    # relist (after the back-off) sees it once it is fixed or deleted.
                    self.resource_version = None
                self.failures += 1
                delay = self._backoff.next_delay()
                self._log_failure(exc, delay)
                await anyio.sleep(delay)

    async def list_once(self) -> None:
        """List the objects once (replacing the copy) and call ``on_change``; raises on failure."""
        listing = self.client.list(self.resource, namespace=self.namespace, fields=self.fields, chunk_size=500)
        objects = {object_name(obj): obj async for obj in listing}
        self.resource_version = listing.resourceVersion
        if self.synced:
            self.relists += 1
        self.objects = objects
        self.synced = True
        self._recovered()
        self.on_change(self.objects)

    async def _watch(self) -> None:
        # lightkube's watch() does not pass allowWatchBookmarks; its request builder does. Its own
        # loop re-opens a watch the server ended cleanly, from the last version it decoded.
        inner = self.client._client
        params = {
            "timeoutSeconds": self._watch_timeout,
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "fieldSelector": ",".join(f"{k}={v}" for k, v in (self.fields or {}).items()) or None,
        }
        request = inner.prepare_request("list", res=self.resource, namespace=self.namespace, watch=True,
                                        params={k: v for k, v in params.items() if v is not None})
        async for kind, obj in inner.watch(request, on_error=on_error_raise):
            self._recovered()
            version = obj.metadata.resourceVersion if obj.metadata is not None else None
            if kind == "BOOKMARK":
                self.resource_version = version or self.resource_version
                continue
            name = object_name(obj)
            if kind == "DELETED":
                self.objects.pop(name, None)
            else:
                self.objects[name] = obj
            self.resource_version = version or self.resource_version
            self.on_change(self.objects)

    def _recovered(self) -> None:
        if self._outage_logged:
            log.info("Kubernetes API reachable again", what=self.what, failures=self.failures)
            self._outage_logged = False
        self._backoff.reset()

    def _log_failure(self, exc: BaseException, delay: float) -> None:
        fields = {"what": self.what, "error": describe_failure(exc), "retry_in_s": round(delay, 2)}
        if self._outage_logged:
            log.debug("Kubernetes API still failing", **fields)
        else:
            log.warning("Kubernetes API request failed; keeping the last state and retrying", **fields)
            self._outage_logged = True
