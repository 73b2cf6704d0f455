"""Logging: JSON lines (or a console format) on stderr, for keybroker's own events and for the libraries' (uvicorn)
alike. Configured once, by ``serve``.

Tracebacks are never printed: a frame's message can hold request data. Records that carry an exception keep
only its type (``error_type``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

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


_access_log = structlog.get_logger("keybroker.access")


class _Access:
    fast: Callable[[dict[str, Any]], None] | None = None  # JSON at info or below (set by configure_logging)


_ACCESS = _Access()


def log_request(fields: dict[str, Any]) -> None:
    """The access line of a finished request (``event`` "request"). In JSON it is written directly, the same line
    structlog would render (fields, event, level, timestamp, pid), without the processor chain: this runs for every
    request, twice per key transfer."""
    fast = _ACCESS.fast
    if fast is not None:
        fast(fields)
    else:
        _access_log.info("request", **fields)


def _json_access_writer(stream: TextIO) -> Callable[[dict[str, Any]], None]:
    pid = os.getpid()

    def write(fields: dict[str, Any]) -> None:
        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        line = {**fields, "event": "request", "level": "info", "timestamp": stamp, "pid": pid}
        stream.write(json.dumps(line, default=repr) + "\n")  # one write: a whole line, never interleaved

    return write


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
    fast = settings.format == "json" and level <= logging.INFO
    _ACCESS.fast = _json_access_writer(sys.stderr) if fast else None
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
