"""The loaded plugins and every call masqd makes into them, each implementation on its own.

Built-in implementations (the default plugins) are called directly; third-party ones through
:class:`~masqd.plugins.isolation.ThreadIsolation`, under a deadline. What they return is
validated (:mod:`masqd.plugins.values`). Problems are collected per plugin and raised together
as a :class:`~masqd.errors.PluginError`, which the reconciler treats like an invalid config.
"""

from __future__ import annotations

import collections
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import pluggy
import structlog

from masqd.backends.base import Backend, BackendSettings
from masqd.cidrs import CIDRError, Network
from masqd.config import AgentOptions, MasqConfig
from masqd.errors import FlagError, PluginError, PluginLoadError, Problem, safe_repr, shorten
from masqd.plugins.isolation import ThreadIsolation, failure
from masqd.plugins.loading import in_call_order, load_manager, origin_kind
from masqd.plugins.values import (Contribution, PluginInfo, RegisteredSource, SourceContext, contributed_network,
                                  described, materialize, materialize_mapping)

log = structlog.get_logger("masqd.plugins")

#: A third-party hook call that takes longer than this is reported hung and abandoned.
HOOK_TIMEOUT_SECONDS = 5.0
#: The attributes an object must have to be used as a backend.
_BACKEND_ATTRIBUTES = ("name", "probe", "render", "sync", "cleanup")


class Plugins:
    """A loaded plugin manager and the isolated calls masqd makes into it."""

    def __init__(self, pm: pluggy.PluginManager, *, builtin: Sequence[str] = (),
                 hook_timeout: float = HOOK_TIMEOUT_SECONDS):
        self.pm = pm
        self.builtin = frozenset(builtin)
        self.isolation = ThreadIsolation(hook_timeout)
        #: (plugin, hook) -> calls that raised, hung or returned something unusable (for metrics)
        self.failures: collections.Counter[tuple[str, str]] = collections.Counter()
        self._backends: dict[str, tuple[str, Callable[[BackendSettings], Backend]]] | None = None

    @property
    def hook_timeout(self) -> float:
        return self.isolation.timeout

    @classmethod
    def load(cls, *, disabled: Sequence[str] = (), environ: Mapping[str, str] | None = None,
             extra: Sequence[tuple[str, object]] = (), entry_points: bool = True,
             hook_timeout: float = HOOK_TIMEOUT_SECONDS) -> Plugins:
        """The default plugins, then entry-point plugins (filtered by ``MASQD_PLUGINS``), then
        ``extra`` ``(name, plugin)`` pairs; ``disabled`` names are blocked. Raises
        :class:`PluginLoadError` naming the plugin that cannot be used."""
        environ = os.environ if environ is None else environ
        pm, builtin = load_manager(disabled=disabled, allowed=environ.get("MASQD_PLUGINS"), extra=extra,
                                   entry_points=entry_points)
        return cls(pm, builtin=builtin, hook_timeout=hook_timeout)

    def describe(self) -> list[PluginInfo]:
        """Every loaded plugin with the hooks it implements, default plugins first."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()))
            dist = dists.get(id(plugin))
            infos.append(PluginInfo(name, hooks, name in self.builtin,
                                    dist.project_name if dist else None, dist.version if dist else None))
        return sorted(infos, key=lambda info: (not info.builtin, info.name))

    def implements(self, hook_name: str) -> bool:
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    # --- backends and sources (start-up) -------------------------------------------------------------

    def backend_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._backend_factories()))

    def check_backend(self, name: str) -> None:
        """Raise :class:`FlagError` (listing the valid names) unless a backend ``name`` is offered."""
        if name not in self._backend_factories():
            raise FlagError("backend", name, f"unknown backend; available: {', '.join(self.backend_names()) or 'none'}")

    def make_backend(self, name: str, settings: BackendSettings) -> Backend:
        """A new backend by ``--backend`` name. Raises :class:`FlagError` for an unknown name and
        :class:`PluginLoadError` when the plugin's factory fails or returns no backend."""
        self.check_backend(name)
        plugin, factory = self._backend_factories()[name]
        try:
            backend = self._call(plugin, "register_backends", partial(factory, settings))
        except Exception as exc:
            raise PluginLoadError(plugin, f"backend {name!r} could not be created: {failure(exc)}") from None
        missing = [attr for attr in _BACKEND_ATTRIBUTES if not hasattr(backend, attr)]
        if missing:
            raise PluginLoadError(plugin, f"backend {name!r} is not a backend: it has no {', '.join(missing)}")
        return backend

    def _backend_factories(self) -> dict[str, tuple[str, Callable[[BackendSettings], Backend]]]:
        if self._backends is None:
            found: dict[str, tuple[str, Callable[[BackendSettings], Backend]]] = {}
            # default plugins first: a plugin cannot take over "iptables" by registering it too
            calls_by_plugin = sorted(self._startup_calls("register_backends"), key=lambda pc: pc[0] not in self.builtin)
            for plugin, calls in calls_by_plugin:
                for args in calls:
                    if len(args) != 2 or not isinstance(args[0], str) or not args[0] or not callable(args[1]):
                        log.error("plugin registered something that is not a backend; ignored", plugin=plugin,
                                  registered=safe_repr(args)[:200], expected="register(name, factory)")
                    elif args[0] in found:
                        log.error("backend name already taken; ignored", plugin=plugin, backend=args[0],
                                  registered_by=found[args[0]][0])
                    else:
                        found[args[0]] = (plugin, args[1])
            self._backends = found
        return self._backends

    def sources(self, context: SourceContext) -> list[RegisteredSource]:
        """Every event source the plugins register (``register_sources``)."""
        found: list[RegisteredSource] = []
        for plugin, calls in self._startup_calls("register_sources", context=context):
            for args in calls:
                source = args[0] if len(args) == 1 else None
                if not inspect.iscoroutinefunction(getattr(source, "run", None)):
                    log.error("plugin registered something that is not an event source; ignored", plugin=plugin,
                              registered=safe_repr(args)[:200], expected="register(obj) with async def run(notify)")
                    continue
                try:
                    name = str(getattr(source, "name", "") or plugin)
                except Exception:
                    name = plugin
                found.append(RegisteredSource(plugin, name, source))
        return found

    def _startup_calls(self, hook_name: str, **kwargs) -> list[tuple[str, list[tuple]]]:
        """Call a registration hook of every plugin on its own: ``[(plugin, [register args])]``.
        A plugin that raises is logged with its name and contributes nothing (the others do)."""
        out = []
        for impl in in_call_order(getattr(self.pm.hook, hook_name)):
            calls: list[tuple] = []
            args = {"register": lambda *a, _calls=calls: _calls.append(a), **kwargs}
            try:
                self._call(impl.plugin_name, hook_name, partial(impl.function, **{n: args[n] for n in impl.argnames}))
            except Exception as exc:
                self.failures[impl.plugin_name, hook_name] += 1
                log.error("plugin failed to register; continuing without what it offers", plugin=impl.plugin_name,
                          hook=hook_name, error=failure(exc))
                continue
            out.append((impl.plugin_name, list(calls)))
        return out

    def _call(self, plugin: str, hook_name: str, call: Callable[[], Any]) -> Any:
        """A start-up call: built-in plugins directly, others isolated."""
        if plugin in self.builtin:
            return call()
        return self.isolation.call(plugin, hook_name, call)

    # --- reconcile-time hooks --------------------------------------------------------------------------

    async def contributions(self, config: MasqConfig, options: AgentOptions, *,
                            masquerade: bool = False) -> tuple[Contribution, ...]:
        """Every plugin's ``nonmasq_cidrs`` (``masquerade``: ``masquerade_cidrs``), validated.
        Raises :class:`PluginError` with every problem when any plugin raised, hung or returned
        something that is not a usable CIDR."""
        hook = "masquerade_cidrs" if masquerade else "nonmasq_cidrs"
        problems: list[Problem] = []
        out: list[Contribution] = []
        results = await self._call_each(hook, problems, config=config, options=options)
        for plugin, items in results:
            key = f"{plugin}.{hook}"
            if not isinstance(items, list):
                self.failures[plugin, hook] += 1
                problems.append(Problem(key, shorten(items), "expected an iterable of CIDR strings or ipaddress networks"))
                continue
            found = len(problems)
            cidrs: dict[Network, None] = {}
            for index, item in enumerate(items):
                try:
                    net = contributed_network(item)
                except CIDRError as exc:
                    problems.append(Problem(f"{key}[{index}]", shorten(item), exc.reason))
                    continue
                if net.version == 6 and not options.enable_ipv6:
                    problems.append(Problem(f"{key}[{index}]", str(net),
                                            "IPv6 CIDR given but IPv6 is not enabled; start masqd with --enable-ipv6"))
                    continue
                cidrs[net] = None
            if len(problems) > found:
                self.failures[plugin, hook] += 1
            out.append(Contribution(plugin, tuple(cidrs), origin_kind(plugin, self.pm.get_plugin(plugin)), masquerade))
        if problems:
            raise PluginError(problems)
        return tuple(out)

    async def validate(self, config: MasqConfig, cidrs: tuple[Network, ...], options: AgentOptions) -> None:
        """Every plugin's ``validate_config``. Raises :class:`PluginError` with every veto."""
        problems: list[Problem] = []
        for plugin, result in await self._call_each("validate_config", problems, config=config, cidrs=cidrs,
                                                     options=options):
            key = f"{plugin}.validate_config"
            if not isinstance(result, list) or not all(isinstance(p, str) for p in result):
                self.failures[plugin, "validate_config"] += 1
                problems.append(Problem(key, shorten(result), "expected a list of problem strings"))
                continue
            problems.extend(Problem(key, None, text) for text in result)
        if problems:
            raise PluginError(problems)

    async def audit(self, event) -> None:
        """Every plugin's ``audit``; failures are logged with the plugin's name, never raised."""
        problems: list[Problem] = []
        await self._call_each("audit", problems, event=event)
        for problem in problems:
            log.error("audit hook failed", plugin=problem.key.rsplit(".", 1)[0], error=problem.reason)

    async def describe_cidrs(self, contributions: Sequence[Contribution]) -> tuple[dict[str, dict[Network, tuple]], list[Problem]]:
        """Every contributing plugin's ``describe_cidrs`` (for ``masqd explain``), each called with
        its own CIDRs: plugin name -> CIDR -> :class:`~masqd.provenance.Origin` values, and the
        problems of plugins whose descriptions could not be used (raised, hung, unusable). Those
        only lose their detail, so the problems are returned, never raised."""
        problems: list[Problem] = []
        out: dict[str, dict[Network, tuple]] = {}
        cidrs_of: dict[str, tuple[Network, ...]] = {}  # a plugin's kept and masquerade entries together
        for contribution in contributions:
            if contribution.cidrs:
                cidrs_of[contribution.plugin] = tuple(dict.fromkeys(cidrs_of.get(contribution.plugin, ()) + contribution.cidrs))
        for impl in in_call_order(self.pm.hook.describe_cidrs):
            cidrs = cidrs_of.get(impl.plugin_name)
            if cidrs is None:
                continue
            key = f"{impl.plugin_name}.describe_cidrs"
            hook = partial(impl.function, **({"cidrs": cidrs} if "cidrs" in impl.argnames else {}))
            try:
                result = await self._acall(impl.plugin_name, "describe_cidrs", lambda hook=hook: materialize_mapping(hook()))
            except Exception as exc:
                problems.append(Problem(key, None, failure(exc)))
                continue
            if result is None:
                continue
            if not isinstance(result, Mapping):
                problems.append(Problem(key, shorten(result), "expected a mapping of CIDR -> description(s)"))
                continue
            found = {}
            for cidr, value in result.items():
                origins = described(impl.plugin_name, cidr, value, key, problems)
                if origins and origins[0] in cidrs:
                    found[origins[0]] = origins[1]
            out[impl.plugin_name] = found
        return out, problems

    async def _call_each(self, hook_name: str, problems: list[Problem], **kwargs) -> list[tuple[str, Any]]:
        """``[(plugin, result)]`` of every implementation that returned; the others' problems are
        appended to ``problems``. ``None`` results are skipped; iterables are read into lists
        inside the call (a generator that hangs or raises is the plugin's failure, not masqd's)."""
        results = []
        for impl in in_call_order(getattr(self.pm.hook, hook_name)):
            args = {name: kwargs[name] for name in impl.argnames}
            try:
                result = await self._acall(impl.plugin_name, hook_name, lambda: materialize(impl.function(**args)))
            except Exception as exc:
                self.failures[impl.plugin_name, hook_name] += 1
                problems.append(Problem(f"{impl.plugin_name}.{hook_name}", None, failure(exc)))
                continue
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    async def _acall(self, plugin: str, hook_name: str, call: Callable[[], Any]) -> Any:
        """A reconcile-time call: built-in plugins directly, others isolated."""
        if plugin in self.builtin:
            return call()
        return await self.isolation.acall(plugin, hook_name, call)

