"""Helpers shared by the resource routes: strict query strings, pagination headers, the public base URL."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import Request, Response

from keybroker.errors import InvalidRequest
from keybroker.services import Services


def reject_unknown_query(request: Request, allowed: frozenset[str]) -> None:
    """A misspelt filter must not silently widen a listing."""
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
            code="unknown_query_parameter",
        )


def set_next_page(request: Request, response: Response, cursor: str | None) -> None:
    """Lists are JSON arrays (as in ISecL); the next page is in ``Link: rel="next"`` and ``X-Next-Cursor``."""
    if cursor is None:
        return
    params = {k: v for k, v in request.query_params.items() if k != "cursor"}
    params["cursor"] = cursor
    response.headers["X-Next-Cursor"] = cursor
    response.headers["Link"] = f'<{request.url.path}?{urlencode(params)}>; rel="next"'


def base_url(request: Request, services: Services) -> str:
    configured = services.settings.server.public_url
    return (configured or str(request.base_url)).rstrip("/")
