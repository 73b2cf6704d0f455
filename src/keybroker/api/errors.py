"""THE table from domain errors to HTTP, and the RFC 9457 problem+json responses built from it.

Every subclass of ``KeybrokerError`` resolves to a row through its class hierarchy (a test asserts it). Unknown
exceptions become a 500 whose body says only the request id; details go to the log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from keybroker import errors
from keybroker.api.audit_context import audit_context
from keybroker.audit.log import AuditEvent

log = structlog.get_logger("keybroker.api")

PROBLEM_TYPE_BASE = "urn:keybroker:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"

STATUS_BY_ERROR: Mapping[type[errors.KeybrokerError], int] = {
    errors.InvalidRequest: 400,
    errors.InvalidKeyMaterial: 400,
    errors.CollateralInvalid: 400,
    errors.UnknownReference: 400,
    errors.BackendUnsupported: 400,
    errors.UnsupportedMediaType: 415,
    errors.Unauthenticated: 401,
    errors.AttestationFailed: 401,
    errors.Forbidden: 403,
    errors.PolicyDenied: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.BackendUnavailable: 503,
    errors.CollateralUnavailable: 503,
    errors.ServerBusy: 503,
    errors.StoredKeyCorrupt: 500,
    errors.ConfigurationError: 500,
    errors.CopyFailed: 500,  # the CLI's, never raised by a request
}


def status_for(exc: errors.KeybrokerError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def problem_body(status: int, code: str, title: str, detail: str, request_id: str | None) -> dict[str, Any]:
    """The RFC 9457 body every refusal carries."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if request_id:
        body["request_id"] = request_id
    return body


def problem(
    request: Request | None,
    status: int,
    code: str,
    title: str,
    detail: str,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    body = problem_body(status, code, title, detail, request_id)
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=dict(headers or {}))


def describe_validation_errors(raw: Sequence[Any]) -> list[dict[str, str]]:
    """Pydantic/FastAPI errors without the offending input (it may be a key)."""
    described = []
    for error in raw:
        location = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
        described.append(
            {"loc": ".".join(location), "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}
        )
    return described


async def keybroker_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.KeybrokerError)
    status = status_for(exc)
    code = exc.instance_code
    if getattr(request.state, "audited", False):
        pass  # the route audited this request itself (a transfer: exactly one key.transfer entry)
    elif status == 401 and getattr(request.state, "principal", None) is None:
        # No valid token: counted into the address's aggregate (the middleware charges its rate limit).
        request.app.state.refusals.add(request.client.host if request.client else None, _route(request), code)
    else:
        await run_in_threadpool(_audit_refusal, request, status, code)
    headers = {"WWW-Authenticate": 'Bearer realm="keybroker"'} if status == 401 else None
    if isinstance(exc, errors.ServerBusy):
        headers = {"Retry-After": "1"}
    return problem(request, status, code, exc.title, exc.detail, exc.extra, headers)


def _route(request: Request) -> str:
    """``METHOD /route/{template}``: never the raw path (it would let a client grow the aggregate without bound)."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', None) or 'unmatched'}"


def _audit_refusal(request: Request, status: int, code: str) -> None:
    """Every authorisation refusal of a known caller is audited, and so is every failed change by one (reads that
    fail are not: they change nothing and would drown the log). Refusals of callers without a valid token are
    audited in aggregate (``keybroker.audit.aggregate``)."""
    denied = status in (401, 403)
    failed_change = getattr(request.state, "principal", None) is not None and request.method not in ("GET", "HEAD")
    if not (denied or failed_change):
        return
    route = request.scope.get("route")
    path = getattr(route, "path", None) or request.url.path
    event = AuditEvent(
        action="auth.refused" if denied else "request.failed",
        outcome="denied" if denied else "failure",
        target=f"{request.method} {path}",
        details={"status": status, "code": code, "path": request.url.path[:256]},
    )
    try:
        request.app.state.services.audit.record(audit_context(request), event)
    except Exception as audit_error:  # the refusal stands either way; the lost entry must be loud
        log.error("audit_write_failed", error_type=type(audit_error).__name__, code=code, status=status)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    found = describe_validation_errors(exc.errors())
    return problem(
        request,
        400,
        "invalid_request",
        "Invalid request",
        "the request does not match the schema",
        {"errors": found},
    )


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    headers = dict(exc.headers or {})
    allowed = _allowed_methods(request) if exc.status_code == 405 else []
    if allowed:
        headers["Allow"] = ", ".join(allowed)
    return problem(request, exc.status_code, code, code.replace("_", " ").capitalize(), detail, headers=headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (RFC 9110 §15.5.6): Starlette's own ``Allow`` names only those
    of the first route whose path matched (``GET /kbs/v1/keys`` and ``POST /kbs/v1/keys`` are two routes)."""
    found = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            found.append(method)
    return found
