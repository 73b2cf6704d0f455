"""Helpers shared by the resource routes: strict query strings, pagination headers, the public base URL."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import Request, Response

from keybroker.errors import InvalidRequest
from keybroker.services import Services


def reject_unknown_query(request: Request, allowed: frozenset[str]) -> None:
    """A misspelt, repeated or empty filter must not silently widen a listing."""
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = sorted(set(names) - allowed)
    if unknown:
        shown = ", ".join(name[:40] for name in unknown[:5])
        raise InvalidRequest(
            f"unknown query parameter(s): {shown}; allowed: {', '.join(sorted(allowed))}",
            code="unknown_query_parameter",
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidRequest(
            f"query parameter(s) given more than once: {', '.join(repeated)}", code="duplicate_query_parameter"
        )
    empty = sorted(name for name, value in request.query_params.multi_items() if value == "")
    if empty:
        raise InvalidRequest(f"query parameter(s) without a value: {', '.join(empty)}", code="invalid_request")


def set_next_page(request: Request, response: Response, cursor: str | None) -> None:
    """Lists are JSON arrays (as in ISecL); the next page is in ``Link: rel="next"`` and ``X-Next-Cursor``."""
    if cursor is None:
        return
    params = {k: v for k, v in request.query_params.items() if k != "cursor"}
    params["cursor"] = cursor
    response.headers["X-Next-Cursor"] = cursor
    response.headers["Link"] = f'<{request.url.path}?{urlencode(params)}>; rel="next"'


def base_url(services: Services) -> str:
    """The service's base URL for links: configured, never taken from the request's Host header."""
    server = services.settings.server
    if server.public_url:
        return server.public_url.rstrip("/")
    scheme = "https" if services.settings.tls.enabled else "http"
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"{scheme}://{host}:{server.port}"
