"""Logging set-up: structlog, JSON lines (orjson) when stderr is not a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys
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
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
