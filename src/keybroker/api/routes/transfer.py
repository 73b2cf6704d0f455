"""POST /kbs/v1/keys/{id}/transfer (PROTOCOL.md §3): the nonce step, then background check or passport.

The hot path of the service: services are taken from the application state rather than through FastAPI's
dependency machinery, and the whole transfer runs in one trip to the thread pool.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from keybroker.api.deps import audit_context, json_object_of, optional_principal, public
from keybroker.crypto.transfer import Wrapped
from keybroker.errors import KeybrokerError
from keybroker.services import Services

router = APIRouter(tags=["transfer"])


@router.post("/kbs/v1/keys/{key_id}/transfer", dependencies=[public()])
async def transfer(key_id: str, request: Request) -> JSONResponse:
    """No bearer token is needed unless the key's policy names client permissions; attestation is the
    credential. An empty body (or ``{}``) without ``Attestation-Type`` asks for a nonce; everything else is a
    transfer request, audited as exactly one ``key.transfer`` entry whatever happens (PROTOCOL.md §10)."""
    services: Services = request.app.state.services
    header = request.headers.get("attestation-type")
    raw = await request.body()
    metrics = request.app.state.metrics
    if header is None and _asks_for_nonce(raw):
        nonce, types = await run_in_threadpool(services.transfer.nonce, key_id)
        return JSONResponse(nonce.as_json(), headers={"Attestation-Type": ",".join(types)})
    request.state.audited = True  # the transfer service audits every outcome; the error handler must not

    def release() -> Wrapped:
        try:
            principal = optional_principal(request)  # an invalid token is refused before the body is examined
            body = json_object_of(request, raw) or {}
        except KeybrokerError as exc:
            services.transfer.refused_before(key_id, exc, audit_context(request))
            raise
        return services.transfer.transfer(key_id, header, body, principal, audit_context(request))

    try:
        wrapped = await run_in_threadpool(release)
    except KeybrokerError as exc:
        metrics.transfer_decisions.labels(exc.instance_code).inc()
        raise
    metrics.transfer_decisions.labels("released").inc()
    return JSONResponse(wrapped.as_json())


_EMPTY_OBJECT = re.compile(rb"\{\s*\}")


def _asks_for_nonce(raw: bytes) -> bool:
    """Step 1 of the protocol: no body, or exactly ``{}``."""
    stripped = raw.strip()
    return not stripped or _EMPTY_OBJECT.fullmatch(stripped) is not None
