"""Logging set-up: structlog, JSON lines (orjson) when stderr is not a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Literal

import orjson
import structlog

LogFormat = Literal["auto", "json", "console"]


def verbosity_to_level(v: int) -> int:
    """Map klog's ``--v=N`` onto a level: upstream manifests pass ``--v=2`` for normal operation,
    so only ``--v=4`` and above (klog's debug range) turn on debug logs."""
    return logging.DEBUG if v >= 4 else logging.INFO


def configure_logging(level: int = logging.INFO, fmt: LogFormat = "auto") -> None:
    """Send structlog output to stderr, one event per line."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if use_json:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )


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
