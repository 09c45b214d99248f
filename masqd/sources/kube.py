"""Kubernetes API event sources: a watch on one kind of object, through a :class:`~masqd.kube.Reflector`.

The ConfigMap input (:class:`masqd.inputs.ConfigMapInput`) and the ``EgressNATPolicy`` plugin
each hand their ``update`` to a :class:`ReflectorSource`; it keeps their copy current and asks for
a reconcile when it changed in a way that matters. They only read the API and call ``notify``;
the reconciler recomputes everything from their current copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from masqd.errors import MasqdError, SourceReadError
from masqd.events import Notify
from masqd.kube.client import api_server, describe_failure, load_kube_config, make_client
from masqd.kube.reflector import Reflector
from masqd.kube.settings import KubeSettings


class ReflectorSource:
    """An event source running a :class:`~masqd.kube.Reflector` over ``resource``: each new copy
    goes to ``update(objects)``, which returns why to reconcile (``notify``'s reason) or ``None``
    when nothing that matters changed. ``reflector`` is the running reflector (for the metrics).
    One-shot commands call :meth:`read_once` instead of :meth:`run`."""

    def __init__(self, name: str, resource: type, settings: KubeSettings, update: Callable[[dict[str, Any]], str | None],
                 *, namespace: str | None = None, fields: dict[str, str] | None = None, what: str = ""):
        self.name = name
        self.resource = resource
        self.settings = settings
        self.update = update
        self.namespace = namespace
        self.fields = fields
        self.what = what or name
        self.reflector: Reflector | None = None

    def _reflector(self, client: Any, on_change: Callable[[dict[str, Any]], Any]) -> Reflector:
        return Reflector(client, self.resource, self.settings, on_change, namespace=self.namespace,
                         fields=self.fields, what=self.what)

    async def run(self, notify: Notify) -> None:
        client = make_client(self.settings)

        def changed(objects: dict[str, Any]) -> None:
            reason = self.update(objects)
            if reason is not None:
                notify(reason)

        try:
            self.reflector = self._reflector(client, changed)
            await self.reflector.run()
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()

    async def read_once(self) -> None:
        """One list handed to ``update``, as the watch's first list would be. Raises (no retry:
        the one-shot command reports it) :class:`~masqd.errors.CredentialsError` without
        credentials, :class:`~masqd.errors.SourceReadError` when the API does not answer."""
        config = load_kube_config(self.settings.kubeconfig)
        client = make_client(self.settings, config)
        try:
            await self._reflector(client, self.update).list_once()
        except MasqdError:
            raise
        except Exception as exc:  # the API cannot answer: a one-shot command cannot go on without it
            raise SourceReadError(f"the Kubernetes API at {api_server(config)}", str(exc) or describe_failure(exc)) from None
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()
