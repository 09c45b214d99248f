"""Building the plugin manager: the default plugins, entry-point plugins, and checks at start-up.

The default plugins (:data:`DEFAULT_PLUGINS`) are registered first, under their module names,
then every entry point of the ``masqd`` group, or only those named in ``MASQD_PLUGINS`` (a comma
list; set but empty loads none), then any plugin objects handed over directly (tests, the
:mod:`masqd.testing` fixtures). A blocked name (``--disable-plugin``) is not registered. A plugin
that cannot be imported, names a hook that does not exist, takes arguments a hook does not offer,
wraps hooks, or declares an origin kind masqd does not know is refused with a
:class:`~masqd.errors.PluginLoadError` naming it.

This is the only module that imports :mod:`masqd.default_plugins`: the rest of masqd knows the
built-in plugins only through the hooks, as it knows any other.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from importlib import metadata

import pluggy

from masqd import hookspecs
from masqd.errors import PluginLoadError
from masqd.provenance import CONTRIBUTION_KINDS

PROJECT = "masqd"
ENTRY_POINT_GROUP = "masqd"
#: The modules registered as default plugins, under their module names (a module with a
#: ``make_plugin()`` function registers the object it returns instead).
DEFAULT_PLUGINS = ("masqd.default_plugins.backends", "masqd.default_plugins.sources", "masqd.default_plugins.egress")


def load_manager(*, disabled: Sequence[str], allowed: str | None, extra: Sequence[tuple[str, object]],
                 entry_points: bool) -> tuple[pluggy.PluginManager, list[str]]:
    """A checked plugin manager and the names of the default plugins registered in it.
    ``allowed``: ``MASQD_PLUGINS`` (``None``: every entry point)."""
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
        _load_entry_points(pm, allowed)
    for name, plugin in extra:
        if not pm.is_blocked(name):
            _register(pm, plugin, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(pm.get_name(exc.plugin) or "?", _validation_reason(exc)) from None
    for hook_name in hook_names():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                raise PluginLoadError(impl.plugin_name, f"{hook_name} is a hook wrapper; masqd calls every "
                                      "implementation on its own, so wrappers are not supported")
    for name, plugin in pm.list_name_plugin():
        origin_kind(name, plugin)
    return pm, builtin


def origin_kind(name: str, plugin: object) -> str:
    """What the CIDRs ``plugin`` contributes are (its ``masqd_origin_kind``, default ``plugin``);
    raises :class:`PluginLoadError` for a kind masqd does not know."""
    kind = getattr(plugin, "masqd_origin_kind", "plugin") if plugin is not None else "plugin"
    if kind not in CONTRIBUTION_KINDS:
        raise PluginLoadError(name, f"masqd_origin_kind is {kind!r}; expected one of {', '.join(CONTRIBUTION_KINDS)}")
    return kind


def hook_names() -> tuple[str, ...]:
    return tuple(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "masqd_spec"))


def in_call_order(hook: pluggy.HookCaller) -> list:
    """The implementations of ``hook`` in the order pluggy calls them (it walks the list back to
    front: last registered first, ``tryfirst`` / ``trylast`` respected)."""
    return list(reversed(hook.get_hookimpls()))


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
        names = ", ".join(hook_names())
        return f"{text.split(' in plugin ')[0]}; masqd's hooks are: {names}"
    if match := re.search(r"for hook '(\w+)'.*Argument\(s\) (\{.*?\})", text, re.S):
        hook, arguments = match.groups()
        offered = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
        return f"{hook}: argument(s) {arguments} are not offered by the hook; it offers: {offered}"
    return " ".join(text.split())
