"""Logging set-up: structlog, JSON lines (orjson) when stderr is not a terminal, console otherwise.

The console format is for people: lists read ``a,b,c``, a multi-line value (the rules the dry-run
backend would apply) is an indented block under its event, and when the same event logs that
value again only the lines that changed are shown. JSON lines carry every value as it is.
"""

from __future__ import annotations

import difflib
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import orjson
import structlog

LogFormat = Literal["auto", "json", "console"]


def verbosity_to_level(v: int) -> int:
    """Map klog's ``--v=N`` onto a level: upstream manifests pass ``--v=2`` for normal operation,
    so only ``--v=4`` and above (klog's debug range) turn on debug logs."""
    return logging.DEBUG if v >= 4 else logging.INFO


def configure_logging(level: int = logging.INFO, fmt: LogFormat = "auto") -> None:
    """Send structlog output to stderr, one event per line."""
    global _level
    _level = level
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _quieten,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if use_json:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
    else:
        processors.append(ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )


_level = logging.INFO
_quiet: ContextVar[bool] = ContextVar("masqd_quiet_logs", default=False)


@contextmanager
def quiet() -> Iterator[None]:
    """Within this block (this task and what it starts), events below error are logged at debug:
    for a command whose output is its result (``masqd render``), whose stderr stays empty unless
    something went wrong."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def _quieten(_logger: object, _name: str, event_dict: dict) -> dict:
    if _quiet.get() and event_dict.get("level") in ("info", "warning"):
        if _level > logging.DEBUG:
            raise structlog.DropEvent
        event_dict["level"] = "debug"
    return event_dict


#: Keys the console renderer lays out itself.
_OWN_KEYS = frozenset({"event", "level", "timestamp", "exception", "stack", "exc_info"})
#: Multi-line values shown, after their first time for an event, as the lines that changed.
_DIFFED_KEYS = frozenset({"rules"})


class ConsoleRenderer:
    """structlog's console renderer, for people: a list/tuple/set value reads ``a,b,c`` (``none``
    when empty), a multi-line string value is an indented block under the event line, and the
    next time the same event logs ``rules``, the block shows only the lines removed (``-``) and
    added (``+``) since."""

    def __init__(self, colors: bool = False) -> None:
        self.colors = colors
        self._inner = structlog.dev.ConsoleRenderer(colors=colors)
        self._last: dict[tuple[str, str], str] = {}

    def __call__(self, logger: Any, name: str, event_dict: dict) -> str:
        blocks: list[str] = []
        for key in sorted(event_dict):
            value = event_dict[key]
            if key in _OWN_KEYS:
                continue
            if isinstance(value, (list, tuple, set, frozenset)):
                items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
                event_dict[key] = ",".join(str(item) for item in items) or "none"
            elif isinstance(value, str) and "\n" in value.rstrip("\n"):
                del event_dict[key]
                blocks.extend(self._block(str(event_dict.get("event")), key, value))
        line = self._inner(logger, name, event_dict)
        return "\n".join([line, *blocks]) if blocks else line

    def _block(self, event: str, key: str, text: str) -> list[str]:
        previous = self._last.get((event, key))
        if key in _DIFFED_KEYS:
            self._last[(event, key)] = text
        if previous is None:
            return [f"    {key}:", *(f"      {line}" for line in text.rstrip("\n").splitlines())]
        if previous == text:
            return [f"    {key}: unchanged"]
        diff = list(difflib.unified_diff(previous.splitlines(), text.splitlines(), n=0, lineterm=""))[2:]
        changed = [line for line in diff if not line.startswith("@@")]
        return [f"    {key} (changed lines):", *(f"      {self._paint(f'{line[0]} {line[1:]}')}" for line in changed)]

    def _paint(self, line: str) -> str:
        if not self.colors:
            return line
        return f"\x1b[{'31' if line.startswith('-') else '32'}m{line}\x1b[0m"


class _StderrLogger:
    """Writes each rendered event as one line to ``sys.stderr`` as it is *now* (not the stream
    there was at start-up), whole lines only, from any thread."""

    _lock = threading.Lock()

    def __init__(self, *_args: object) -> None:
        pass

    def msg(self, message: str | bytes) -> None:
        stream = sys.stderr
        with self._lock:
            if isinstance(message, bytes) and hasattr(stream, "buffer"):
                stream.flush()
                stream.buffer.write(message + b"\n")
                stream.buffer.flush()
            else:
                text = message.decode() if isinstance(message, bytes) else message
                stream.write(text + "\n")
                stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg
