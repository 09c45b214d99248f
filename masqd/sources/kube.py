"""Kubernetes API sources: the ConfigMap as a config input, and the reflector-backed source the
``EgressNATPolicy`` plugin uses. They only read the API and call ``notify``; the reconciler
recomputes everything from their current copies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import structlog
from lightkube.resources.core_v1 import ConfigMap

from masqd.errors import ConfigError, Problem, shorten
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

    def __init__(self, ref: ObjectRef, settings: KubeSettings):
        self.ref = ref
        self.settings = settings
        self.name = f"configmap {ref}"
        self.text: object = None  # the ``config`` value: a str, or anything else a server sent (read() refuses it)
        self.resource_version: str | None = None  # of the object whose text is held
        self._missing_key_logged: str | None = None
        self.source: ReflectorSource | None = None  # the watch, once the daemon asked for it

    @property
    def reflector(self) -> Reflector | None:
        """The running watch's reflector (``None`` before the daemon started it)."""
        return None if self.source is None else self.source.reflector

    def read(self) -> list[SourceText]:
        if self.text is None:
            return []
        if not isinstance(self.text, str):  # the API types it as a string; refuse anything else by name
            raise ConfigError(self.name, [Problem(f"data.{CONFIG_KEY}", shorten(self.text),
                                                  "expected a string holding the config (YAML or JSON)")])
        return [SourceText(self.name, self.text)]

    def make_source(self) -> ReflectorSource:
        """A source reading this one ConfigMap (``fieldSelector=metadata.name=NAME``) into :meth:`update`."""
        return ReflectorSource("configmap", ConfigMap, self.settings, self.update, namespace=self.ref.namespace,
                               fields={"metadata.name": self.ref.name}, what=f"configmap {self.ref}")

    def watcher(self) -> ReflectorSource:
        self.source = self.make_source()
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

    async def list_once(self, client: Any) -> None:
        """One list handed to ``update``, as the watch's first list would be; raises on failure."""
        await self._reflector(client, self.update).list_once()


async def read_once(settings: KubeSettings, inputs, plugins) -> None:
    """One list of every API object the flags name, for one-shot commands (``validate``, ``render``,
    ``run --once``): the ConfigMap inputs and the ``EgressNATPolicy`` plugin get their copy as a
    watch would hand it over. Raises on any API failure (no retry: the caller reports it)."""
    from masqd.default_plugins.egress import EgressNATPolicies

    sources = [config_input.make_source() for config_input in inputs if isinstance(config_input, ConfigMapInput)]
    if settings.egress_nat_policies:
        sources += [plugin.make_source(settings) for plugin in plugins.pm.get_plugins()
                    if isinstance(plugin, EgressNATPolicies)]
    client = make_client(settings)
    try:
        for source in sources:
            await source.list_once(client)
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()
