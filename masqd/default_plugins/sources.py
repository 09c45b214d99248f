"""The built-in event sources: a watch on every config input (files, directories, the API
ConfigMap) and the resync timer. (The drift sources belong to the agent itself, which knows
its backend: see :mod:`masqd.sources.drift`.)"""

from __future__ import annotations

from masqd.hookspecs import hookimpl
from masqd.sources.files import ConfigFileSource
from masqd.sources.timer import TimerSource


@hookimpl
def register_sources(register, context):
    if not context.config_inputs:  # a context built by hand with a path alone
        register(ConfigFileSource(context.config_path))
    for config_input in context.config_inputs:
        watcher = config_input.watcher()
        if watcher is not None:
            register(watcher)
    timer = TimerSource(context.resync_interval)
    context.on_resync_interval_change(timer.reschedule)
    register(timer)
