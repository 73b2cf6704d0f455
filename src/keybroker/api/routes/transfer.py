"""POST /kbs/v1/keys/{id}/transfer (PROTOCOL.md §3): the nonce step, then background check or passport.

The hot path of the service: services are taken from the application state rather than through FastAPI's
dependency machinery, and the whole transfer runs in one trip to the thread pool.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from keybroker.api.audit_context import audit_context
from keybroker.api.deps import json_object_of, optional_principal, public
from keybroker.api.errors import problem
from keybroker.api.limits import retry_after
from keybroker.crypto.transfer import Wrapped
from keybroker.errors import KeybrokerError, NotFound
from keybroker.net import client_key
from keybroker.services import Services

router = APIRouter(tags=["transfer"])


@router.post("/kbs/v1/keys/{key_id}/transfer", dependencies=[public()])
async def transfer(key_id: str, request: Request) -> JSONResponse:
    """No bearer token is needed unless the key's policy names client permissions; attestation is the
    credential. An empty body (or ``{}``) without ``Attestation-Type`` asks for a nonce; everything else is a
    transfer request about the key: exactly one ``key.transfer`` audit entry whatever happens (PROTOCOL.md §10).

    Two refusals are not decisions about a key and are not audited one by one, so that an anonymous client cannot
    fill the audit log with them: a key that does not exist (counted in the anonymous aggregate), and, beyond the
    unauthenticated rate limit, requests refused before their evidence is looked at (an invalid token, a body that
    is not a transfer): those are charged to that limit, and over it answered 429 and aggregated."""
    services: Services = request.app.state.services
    header = request.headers.get("attestation-type")
    raw = await request.body()
    metrics = request.app.state.metrics
    if header is None and _asks_for_nonce(raw):
        nonce, types = await run_in_threadpool(services.transfer.nonce, key_id)
        return JSONResponse(nonce.as_json(), headers={"Attestation-Type": ",".join(types)})
    request.state.audited = True  # every outcome is audited (or aggregated) here; the error handler must not
    client = request.client.host if request.client else None
    limits = request.app.state.limits

    def release() -> Wrapped:
        try:
            looked_up = services.transfer.lookup(key_id)  # the key exists; once per request
        except NotFound as exc:
            raise _Aggregated(exc, "key_not_found") from None
        try:
            principal = optional_principal(request)  # an invalid token is refused before the body is examined
            body = json_object_of(request, raw) or {}
        except KeybrokerError as exc:
            wait = limits.unauthenticated.take(client_key(client))
            if wait:
                raise _Aggregated(exc, "rate_limited", wait) from None
            services.transfer.refused_before(key_id, exc, audit_context(request))
            raise
        return services.transfer.transfer(key_id, header, body, principal, audit_context(request), looked_up)

    try:
        wrapped = await run_in_threadpool(release)
    except _Aggregated as aggregated:
        request.app.state.refusals.add(client, "POST /kbs/v1/keys/{key_id}/transfer", aggregated.code)
        metrics.transfer_decisions.labels(aggregated.code).inc()
        if aggregated.wait:
            return problem(
                request,
                429,
                "rate_limited",
                "Too many requests",
                "this client has sent too many transfer requests that were refused before their evidence was "
                "looked at; retry after the time in Retry-After",
                headers={"Retry-After": retry_after(aggregated.wait)},
            )
        raise aggregated.error from None
    except KeybrokerError as exc:
        metrics.transfer_decisions.labels(exc.instance_code).inc()
        raise
    metrics.transfer_decisions.labels("released").inc()
    return JSONResponse(wrapped.as_json())


class _Aggregated(Exception):
    """A refusal counted in the anonymous aggregate instead of its own audit entry (``wait``: over the limit)."""

    def __init__(self, error: KeybrokerError, code: str, wait: float = 0.0) -> None:
        super().__init__(code)
        self.error, self.code, self.wait = error, code, wait


_EMPTY_OBJECT = re.compile(rb"\{\s*\}")


def _asks_for_nonce(raw: bytes) -> bool:
    """Step 1 of the protocol: no body, or exactly ``{}``."""
    stripped = raw.strip()
    return not stripped or _EMPTY_OBJECT.fullmatch(stripped) is not None
