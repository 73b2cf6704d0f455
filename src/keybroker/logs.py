"""Logging: JSON lines (or a console format) on stderr, for keybroker's own events and for the libraries' (uvicorn)
alike. Configured once, by ``serve``.

Tracebacks are never printed: a frame's message can hold request data. Records that carry an exception keep
only its type (``error_type``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from keybroker.config import LoggingSettings


def _exception_type_only(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    exc_info = event.pop("exc_info", None)
    event.pop("exception", None)
    event.pop("stack", None)
    if exc_info:
        if exc_info is True:
            exc_info = sys.exc_info()
        if isinstance(exc_info, BaseException):
            exc_type: type[BaseException] | None = type(exc_info)
        else:
            exc_type = exc_info[0] if isinstance(exc_info, tuple) else None
        if exc_type is not None:
            event["error_type"] = f"{exc_type.__module__}.{exc_type.__qualname__}"
    return event


def _drop_record(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.pop("_record", None)
    event.pop("_from_structlog", None)
    return event


def _process_id(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["pid"] = os.getpid()  # which of several server processes (server.workers) wrote the line
    return event


def configure_logging(settings: LoggingSettings) -> None:
    level = getattr(logging, settings.level.upper())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if settings.format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())  # no escape codes in log files
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _process_id,
        _exception_type_only,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[_drop_record, _exception_type_only, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    access = logging.getLogger("uvicorn.access")  # keybroker writes its own access line (api/middleware.py)
    access.handlers, access.propagate = [], False
