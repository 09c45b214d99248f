"""The built-in event sources: the config file watch and the resync timer."""

from __future__ import annotations

from masqd.hookspecs import hookimpl
from masqd.sources.files import ConfigFileSource
from masqd.sources.timer import TimerSource


@hookimpl
def register_sources(register, context):
    register(ConfigFileSource(context.config_path))
    timer = TimerSource(context.resync_interval)
    context.on_resync_interval_change(timer.reschedule)
    register(timer)
