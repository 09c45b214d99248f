"""Kubernetes API sources: the ConfigMap as a config input, and the reflector-backed source the
``EgressNATPolicy`` plugin uses. They only read the API and call ``notify``; the reconciler
recomputes everything from their current copies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import structlog
from lightkube.resources.core_v1 import ConfigMap

from masqd.events import Notify
from masqd.inputs import SourceText
from masqd.kube import KubeSettings, ObjectRef, Reflector, make_client

log = structlog.get_logger("masqd.sources.kube")

#: The ConfigMap key holding the config, as in the upstream agent's volume mount.
CONFIG_KEY = "config"


class ConfigMapInput:
    """The ``config`` key of one ConfigMap, read through the API (``--kube-configmap``).

    A config source while the ConfigMap exists and has the key; absent (not created yet, deleted,
    or before the first list arrives) it contributes nothing, so with no other source the defaults
    apply: deleting the ConfigMap is the documented way back to default SNAT behaviour. While the
    API is unreachable the last text seen stays.
    """

    def __init__(self, ref: ObjectRef, settings: KubeSettings, client_factory: Callable[[], Any] | None = None):
        self.ref = ref
        self.settings = settings
        self.name = f"configmap {ref}"
        self.text: str | None = None
        self.resource_version: str | None = None  # of the object whose text is held
        self._client_factory = client_factory or (lambda: make_client(settings))
        self._missing_key_logged: str | None = None
        self.source: ReflectorSource | None = None  # the watch, once the daemon asked for it

    @property
    def reflector(self) -> Reflector | None:
        """The running watch's reflector (``None`` before the daemon started it)."""
        return None if self.source is None else self.source.reflector

    def read(self) -> list[SourceText]:
        return [] if self.text is None else [SourceText(self.name, self.text)]

    def watcher(self) -> ReflectorSource:
        self.source = ReflectorSource("configmap", ConfigMap, self.settings, self.update, namespace=self.ref.namespace,
                                      fields={"metadata.name": self.ref.name}, what=f"configmap {self.ref}",
                                      client_factory=self._client_factory)
        return self.source

    def update(self, objects: dict[str, Any]) -> str | None:
        """Take the reflector's copy; returns why to reconcile when the config text changed."""
        obj = objects.get(self.ref.name)
        text = None
        if obj is not None:
            data = obj.data or {}
            text = data.get(CONFIG_KEY)
            if text is None and self._missing_key_logged != obj.metadata.resourceVersion:
                log.warning(f"ConfigMap has no '{CONFIG_KEY}' key; it contributes nothing", configmap=str(self.ref),
                            keys=sorted(data))
                self._missing_key_logged = obj.metadata.resourceVersion
        self.resource_version = obj.metadata.resourceVersion if obj is not None else None
        if text == self.text:
            return None
        self.text = text
        return f"{self.ref}@{self.resource_version}" if obj is not None else f"{self.ref} deleted"

    def __repr__(self) -> str:
        return f"ConfigMapInput({str(self.ref)!r})"


class ReflectorSource:
    """An event source running a :class:`~masqd.kube.Reflector` over ``resource``: each new copy
    goes to ``update(objects)``, which returns why to reconcile (``notify``'s reason) or ``None``
    when nothing that matters changed. ``reflector`` is the running reflector (for inspection)."""

    def __init__(self, name: str, resource: type, settings: KubeSettings, update: Callable[[dict[str, Any]], str | None],
                 *, namespace: str | None = None, fields: dict[str, str] | None = None, what: str = "",
                 client_factory: Callable[[], Any] | None = None):
        self.name = name
        self.resource = resource
        self.settings = settings
        self.update = update
        self.namespace = namespace
        self.fields = fields
        self.what = what or name
        self.reflector: Reflector | None = None
        self._client_factory = client_factory or (lambda: make_client(settings))

    async def run(self, notify: Notify) -> None:
        client = self._client_factory()

        def changed(objects: dict[str, Any]) -> None:
            reason = self.update(objects)
            if reason is not None:
                notify(reason)

        try:
            self.reflector = Reflector(client, self.resource, self.settings, changed, namespace=self.namespace,
                                       fields=self.fields, what=self.what)
            await self.reflector.run()
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()


async def read_once(settings: KubeSettings, inputs, plugins) -> None:
    """One list of every API object the flags name, for one-shot commands (``validate``, ``render``,
    ``run --once``): the ConfigMap inputs and the ``EgressNATPolicy`` plugin get their copy as a
    watch would hand it over. Raises on any API failure (no retry: the caller reports it)."""
    from masqd.default_plugins.egress import EgressNATPolicies
    from masqd.kube import EgressNATPolicy

    client = make_client(settings)
    try:
        for config_input in inputs:
            if isinstance(config_input, ConfigMapInput):
                ref = config_input.ref
                await Reflector(client, ConfigMap, settings, config_input.update, namespace=ref.namespace,
                                fields={"metadata.name": ref.name}).list_once()
        if settings.egress_nat_policies:
            for plugin in plugins.pm.get_plugins():
                if isinstance(plugin, EgressNATPolicies):
                    await Reflector(client, EgressNATPolicy, settings, plugin.update).list_once()
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()
