"""Loading plugins and calling their hooks, each in isolation (the hooks: :mod:`masqd.hookspecs`).

Loading: the default plugins (:mod:`masqd.default_plugins`) are registered first, then every
entry point of the ``masqd`` group, or only those named in ``MASQD_PLUGINS`` (a comma list; set
but empty loads none). ``--disable-plugin NAME`` blocks a plugin by its name (an entry-point name,
or a default plugin's such as ``masqd.sources``). A plugin that cannot be imported, names a hook
that does not exist, takes arguments a hook does not offer, or wraps hooks is refused at start-up
with a :class:`~masqd.errors.PluginLoadError` naming it.

Calling: every implementation is called on its own, in pluggy's order. Third-party ones run in a
daemon thread with a deadline (:data:`HOOK_TIMEOUT_SECONDS`): one that hangs is reported as such,
and is not called again (its hook is reported hung) until the stuck call returns, so a hung plugin
costs one thread, never the agent. What they return is validated here into typed values before
anything else sees it. Problems are collected per plugin and raised together as a
:class:`~masqd.errors.PluginError`, which the reconciler treats like an invalid config.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pluggy
import structlog

from masqd import hookspecs
from masqd.backends.base import Backend, BackendSettings
from masqd.cidrs import CIDRError, Network, parse_cidr
from masqd.config import AgentOptions, MasqConfig
from masqd.errors import FlagError, PluginError, PluginLoadError, Problem, safe_repr, shorten

log = structlog.get_logger("masqd.plugins")

PROJECT = "masqd"
ENTRY_POINT_GROUP = "masqd"
#: The modules registered as default plugins, under their module names (a module with a
#: ``make_plugin()`` function registers the object it returns instead).
DEFAULT_PLUGINS = ("masqd.default_plugins.backends", "masqd.default_plugins.sources", "masqd.default_plugins.egress")
#: A third-party hook call that takes longer than this is reported hung and abandoned.
HOOK_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One loaded plugin, as ``masqd plugins`` lists it."""

    name: str
    hooks: tuple[str, ...]
    builtin: bool
    distribution: str | None = None  # the installed package providing it (entry-point plugins)
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Contribution:
    """The CIDRs one plugin added, validated, in the order it returned them (repeats dropped)."""

    plugin: str
    cidrs: tuple[Network, ...]


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What ``register_sources`` receives besides ``register``.

    config_path: the config file masqd reads (``--config``).
    options: the agent flags.
    resync_interval: returns the current ``resyncInterval`` in seconds (it changes with the file).
    on_resync_interval_change: ``on_resync_interval_change(callback)`` makes masqd call
        ``callback()`` whenever ``resyncInterval`` changes.
    config_inputs: every config input (files, directories, the API ConfigMap; see
        :mod:`masqd.inputs`); the built-in sources plugin registers each one's watcher.
    kube: the Kubernetes flags (:class:`masqd.kube.KubeSettings`), or ``None`` when masqd does not
        talk to the API.
    drift_check_interval: ``--drift-check-interval`` in seconds; 0: no drift sources.
    kernel_monitor: the backend's ``monitor(notify)``, following the kernel's changes to its
        rules, or ``None`` when it has none (see :mod:`masqd.sources.drift`).
    check_drift: reads the rules back and says why they differ from those last applied
        (:meth:`masqd.reconcile.Reconciler.check_drift`), or ``None``.
    """

    config_path: str
    options: AgentOptions
    resync_interval: Callable[[], float]
    on_resync_interval_change: Callable[[Callable[[], None]], None]
    config_inputs: tuple = ()
    kube: Any = None
    drift_check_interval: float = 0.0
    kernel_monitor: Callable[..., Any] | None = None
    check_drift: Callable[[], Any] | None = None


@dataclass(frozen=True, slots=True)
class RegisteredSource:
    plugin: str
    name: str
    source: Any  # an object with ``async def run(notify)``


class _HookFailed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _failure(exc: BaseException) -> str:
    """How a failed hook call is reported: the reason masqd gave (hung, ...), or what it raised."""
    return exc.reason if isinstance(exc, _HookFailed) else f"raised {safe_repr(exc)}"


class Plugins:
    """A loaded plugin manager and the isolated calls masqd makes into it."""

    def __init__(self, pm: pluggy.PluginManager, *, builtin: Iterable[str] = (),
                 hook_timeout: float = HOOK_TIMEOUT_SECONDS):
        self.pm = pm
        self.builtin = frozenset(builtin)
        self.hook_timeout = hook_timeout
        self._stuck: dict[tuple[str, str], float] = {}  # (plugin, hook) -> when the hung call started
        #: (plugin, hook) -> calls that raised, hung or returned something unusable (for metrics)
        self.failures: collections.Counter[tuple[str, str]] = collections.Counter()
        self._backends: dict[str, tuple[str, Callable[[BackendSettings], Backend]]] | None = None

    # --- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, *, disabled: Sequence[str] = (), environ: Mapping[str, str] | None = None,
             extra: Sequence[tuple[str, object]] = (), entry_points: bool = True,
             hook_timeout: float = HOOK_TIMEOUT_SECONDS) -> Plugins:
        """The default plugins, then entry-point plugins (filtered by ``MASQD_PLUGINS``), then
        ``extra`` ``(name, plugin)`` pairs; ``disabled`` names are blocked. Raises
        :class:`PluginLoadError` naming the plugin that cannot be used."""
        environ = os.environ if environ is None else environ
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        for name in disabled:
            pm.set_blocked(name)
        builtin = []
        for module_name in DEFAULT_PLUGINS:
            if not pm.is_blocked(module_name):
                module = importlib.import_module(module_name)
                # A module with make_plugin() holds state: a fresh plugin object per manager.
                factory = getattr(module, "make_plugin", None)
                _register(pm, factory() if factory else module, module_name)
                builtin.append(module_name)
        if entry_points:
            _load_entry_points(pm, environ.get("MASQD_PLUGINS"))
        for name, plugin in extra:
            if not pm.is_blocked(name):
                _register(pm, plugin, name)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(pm.get_name(exc.plugin) or "?", _validation_reason(exc)) from None
        for hook_name in _hook_names():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.hookwrapper or impl.wrapper:
                    raise PluginLoadError(impl.plugin_name, f"{hook_name} is a hook wrapper; masqd calls every "
                                          "implementation on its own, so wrappers are not supported")
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
        made: list[Backend] = []
        try:
            if plugin in self.builtin:
                made.append(factory(settings))
            else:
                self._isolated_at_start_up(plugin, "register_backends", lambda: made.append(factory(settings)))
        except Exception as exc:
            raise PluginLoadError(plugin, f"backend {name!r} could not be created: {_failure(exc)}") from None
        backend = made[0]
        missing = [attr for attr in ("name", "probe", "render", "sync", "cleanup") if not hasattr(backend, attr)]
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
        """Every event source the plugins register, for the daemon to run."""
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
        for impl in _in_call_order(getattr(self.pm.hook, hook_name)):
            calls: list[tuple] = []
            args = {"register": lambda *a, _calls=calls: _calls.append(a), **kwargs}
            call = partial(impl.function, **{name: args[name] for name in impl.argnames})
            try:
                if impl.plugin_name in self.builtin:
                    call()
                else:
                    self._isolated_at_start_up(impl.plugin_name, hook_name, call)
            except Exception as exc:
                self.failures[impl.plugin_name, hook_name] += 1
                log.error("plugin failed to register; continuing without what it offers", plugin=impl.plugin_name,
                          hook=hook_name, error=_failure(exc))
                continue
            out.append((impl.plugin_name, list(calls)))
        return out

    def _isolated_at_start_up(self, plugin: str, hook_name: str, call: Callable[[], Any]) -> None:
        """A start-up hook (no event loop yet) in a daemon thread with the same deadline."""
        outcome: dict[str, BaseException] = {}

        def work() -> None:
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - the plugin's failure, reported by name
                outcome["error"] = exc

        thread = threading.Thread(target=work, name=f"masqd plugin {plugin}.{hook_name}", daemon=True)
        thread.start()
        thread.join(self.hook_timeout)
        if thread.is_alive():
            raise _HookFailed(f"did not return within {self.hook_timeout:g} s (hung); what it registered is ignored")
        if "error" in outcome:
            raise _HookFailed(_failure(outcome["error"]))

    # --- reconcile-time hooks --------------------------------------------------------------------------

    async def contributions(self, config: MasqConfig, options: AgentOptions) -> tuple[Contribution, ...]:
        """Every plugin's ``nonmasq_cidrs``, validated. Raises :class:`PluginError` with every
        problem when any plugin raised, hung or returned something that is not a usable CIDR."""
        problems: list[Problem] = []
        out: list[Contribution] = []
        results = await self._call_each("nonmasq_cidrs", problems, config=config, options=options)
        for plugin, items in results:
            key = f"{plugin}.nonmasq_cidrs"
            if not isinstance(items, list):
                self.failures[plugin, "nonmasq_cidrs"] += 1
                problems.append(Problem(key, shorten(items), "expected an iterable of CIDR strings or ipaddress networks"))
                continue
            found = len(problems)
            cidrs: dict[Network, None] = {}
            for index, item in enumerate(items):
                try:
                    net = _contributed_network(item)
                except CIDRError as exc:
                    problems.append(Problem(f"{key}[{index}]", shorten(item), exc.reason))
                    continue
                if net.version == 6 and not options.enable_ipv6:
                    problems.append(Problem(f"{key}[{index}]", str(net),
                                            "IPv6 CIDR given but IPv6 is not enabled; start masqd with --enable-ipv6"))
                    continue
                cidrs[net] = None
            if len(problems) > found:
                self.failures[plugin, "nonmasq_cidrs"] += 1
            out.append(Contribution(plugin, tuple(cidrs)))
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
        cidrs_of = {contribution.plugin: contribution.cidrs for contribution in contributions if contribution.cidrs}
        for impl in _in_call_order(self.pm.hook.describe_cidrs):
            cidrs = cidrs_of.get(impl.plugin_name)
            if cidrs is None:
                continue
            key = f"{impl.plugin_name}.describe_cidrs"
            hook = partial(impl.function, **({"cidrs": cidrs} if "cidrs" in impl.argnames else {}))
            call = lambda hook=hook: _materialize_mapping(hook())  # noqa: E731 - read inside the isolated call
            try:
                if impl.plugin_name in self.builtin:
                    result = call()
                else:
                    result = await self._isolated(impl.plugin_name, "describe_cidrs", call)
            except Exception as exc:
                problems.append(Problem(key, None, _failure(exc)))
                continue
            if result is None:
                continue
            if not isinstance(result, Mapping):
                problems.append(Problem(key, shorten(result), "expected a mapping of CIDR -> description(s)"))
                continue
            described = {}
            for cidr, value in result.items():
                origins = _described(impl.plugin_name, cidr, value, key, problems)
                if origins and origins[0] in cidrs:
                    described[origins[0]] = origins[1]
            out[impl.plugin_name] = described
        return out, problems

    def implements(self, hook_name: str) -> bool:
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    async def _call_each(self, hook_name: str, problems: list[Problem], **kwargs) -> list[tuple[str, Any]]:
        """``[(plugin, result)]`` of every implementation that returned; the others' problems are
        appended to ``problems``. ``None`` results are skipped; iterables are read into lists
        inside the call (a generator that hangs or raises is the plugin's failure, not masqd's)."""
        results = []
        for impl in _in_call_order(getattr(self.pm.hook, hook_name)):
            args = {name: kwargs[name] for name in impl.argnames}
            try:
                if impl.plugin_name in self.builtin:
                    result = _materialize(impl.function(**args))
                else:
                    result = await self._isolated(impl.plugin_name, hook_name, lambda: _materialize(impl.function(**args)))
            except Exception as exc:
                self.failures[impl.plugin_name, hook_name] += 1
                problems.append(Problem(f"{impl.plugin_name}.{hook_name}", None, _failure(exc)))
                continue
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    async def _isolated(self, plugin: str, hook_name: str, call: Callable[[], Any]) -> Any:
        """Run ``call`` in a daemon thread; give up on it after the deadline (the thread is left
        to finish on its own, and the hook is reported hung until it does)."""
        key = (plugin, hook_name)
        if key in self._stuck:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._stuck[key]))
            # the start time, not the seconds since: the same message each time, logged once
            raise _HookFailed(f"still hung in the call started at {since}; not called again until it returns")
        outcome: dict[str, Any] = {}
        done = anyio.Event()
        token = anyio.lowlevel.current_token()
        self._stuck[key] = time.time()  # until the thread says otherwise

        def work() -> None:
            try:
                outcome["value"] = call()
            except BaseException as exc:  # noqa: BLE001 - even SystemExit is the plugin's failure
                outcome["error"] = exc
            finally:
                self._stuck.pop(key, None)
                try:
                    anyio.from_thread.run_sync(done.set, token=token)
                except RuntimeError:
                    pass  # the event loop is gone: nobody is waiting any more

        try:
            threading.Thread(target=work, name=f"masqd plugin {plugin}.{hook_name}", daemon=True).start()
        except BaseException:
            self._stuck.pop(key, None)  # never started: not hung
            raise
        with anyio.move_on_after(self.hook_timeout):
            await done.wait()
        if "value" in outcome or "error" in outcome:
            self._stuck.pop(key, None)  # returned, maybe just after the deadline: not hung
        if "value" in outcome:
            return outcome["value"]
        if "error" in outcome:
            raise _HookFailed(_failure(outcome["error"]))
        raise _HookFailed(f"did not return within {self.hook_timeout:g} s (hung); its result is ignored")


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(name, _validation_reason(exc)) from None
    except ValueError as exc:  # already registered under another name, or the name is taken
        raise PluginLoadError(name, str(exc)) from None


def _load_entry_points(pm: pluggy.PluginManager, allowed: str | None) -> None:
    available = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if allowed is None:
        names = sorted(available)
    else:
        names = [n.strip() for n in allowed.split(",") if n.strip()]
        for name in names:
            if name not in available:
                raise PluginLoadError(name, "named in MASQD_PLUGINS but no installed package has a 'masqd' entry point "
                                      f"of that name; installed: {', '.join(sorted(available)) or 'none'}")
    for name in names:
        if pm.is_blocked(name) or pm.has_plugin(name):
            continue
        try:
            # pluggy records the distribution, so `masqd plugins` can show the version
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(name, _validation_reason(exc)) from None
        except Exception as exc:
            raise PluginLoadError(name, f"cannot be loaded: {exc!r}") from None


def _validation_reason(exc: pluggy.PluginValidationError) -> str:
    """pluggy's message on one line, saying what would be valid."""
    text = str(exc)
    if "unknown hook" in text:
        names = ", ".join(_hook_names())
        return f"{text.split(' in plugin ')[0]}; masqd's hooks are: {names}"
    if match := re.search(r"for hook '(\w+)'.*Argument\(s\) (\{.*?\})", text, re.S):
        hook, arguments = match.groups()
        offered = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
        return f"{hook}: argument(s) {arguments} are not offered by the hook; it offers: {offered}"
    return " ".join(text.split())


def _hook_names() -> tuple[str, ...]:
    return tuple(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "masqd_spec"))


def _in_call_order(hook: pluggy.HookCaller) -> list:
    return list(reversed(hook.get_hookimpls()))  # pluggy calls the list back to front


def _materialize(result: Any) -> Any:
    if result is None or isinstance(result, (str, bytes, Mapping)):
        return result
    if isinstance(result, Iterable):
        return list(result)
    return result


def _materialize_mapping(result: Any) -> Any:
    """A returned mapping read into a dict of lists, inside the call (see :func:`_materialize`)."""
    if not isinstance(result, Mapping):
        return result
    return {key: _materialize(value) if not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable)
            else value for key, value in result.items()}


def _described(plugin: str, cidr: Any, value: Any, key: str, problems: list[Problem]) -> tuple[Network, tuple] | None:
    """One ``describe_cidrs`` entry as ``(network, origins)``; unusable parts become problems."""
    from masqd.provenance import Origin

    try:
        net = _contributed_network(cidr)
    except CIDRError as exc:
        problems.append(Problem(f"{key}[{safe_repr(cidr)[:60]}]", None, exc.reason))
        return None
    origins = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, str) and item.strip() and item.isprintable():
            origins.append(Origin("plugin", plugin, detail=item.strip()[:200]))
        elif isinstance(item, Origin) and item.kind == "policy" and isinstance(item.name, str) and item.name.isprintable():
            origins.append(Origin("policy", item.name))
        else:
            problems.append(Problem(f"{key}[{net}]", shorten(item), "expected a one-line text or an Origin of kind 'policy'"))
    return (net, tuple(origins)) if origins else None


def _contributed_network(item: Any) -> Network:
    if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return item
    return parse_cidr(item)
