"""Plugins: loading them and calling their hooks, each in isolation (the hooks: :mod:`masqd.hookspecs`).

Loading (:mod:`masqd.plugins.loading`): the default plugins (:mod:`masqd.default_plugins`) are
registered first, then every entry point of the ``masqd`` group, or only those named in
``MASQD_PLUGINS`` (a comma list; set but empty loads none). ``--disable-plugin NAME`` blocks a
plugin by its name (an entry-point name, or a default plugin's such as
``masqd.default_plugins.sources``). A plugin that cannot be imported, names a hook that does not
exist, takes arguments a hook does not offer, or wraps hooks is refused at start-up with a
:class:`~masqd.errors.PluginLoadError` naming it.

Calling (:mod:`masqd.plugins.manager`): every implementation is called on its own, in pluggy's
order. Third-party ones run in a daemon thread with a deadline (:data:`HOOK_TIMEOUT_SECONDS`,
:mod:`masqd.plugins.isolation`): one that hangs is reported as such, and is not called again
(its hook is reported hung) until the stuck call returns, so a hung plugin costs one thread, never
the agent. What they return is validated (:mod:`masqd.plugins.values`) into typed values before
anything else sees it. Problems are collected per plugin and raised together as a
:class:`~masqd.errors.PluginError`, which the reconciler treats like an invalid config.
"""

from masqd.plugins.loading import DEFAULT_PLUGINS, ENTRY_POINT_GROUP, PROJECT
from masqd.plugins.manager import HOOK_TIMEOUT_SECONDS, Plugins
from masqd.plugins.values import Contribution, PluginInfo, RegisteredSource, SourceContext

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "HOOK_TIMEOUT_SECONDS", "PROJECT", "Contribution",
           "PluginInfo", "Plugins", "RegisteredSource", "SourceContext"]
