"""POST /kbs/v1/keys/{id}/transfer (PROTOCOL.md §3): the nonce step, then background check or passport."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from keybroker.api.deps import AuditDep, get_services, json_object, optional_principal, public
from keybroker.errors import KeybrokerError
from keybroker.services import Services

router = APIRouter(tags=["transfer"])
ServicesDep = Annotated[Services, Depends(get_services)]


@router.post("/kbs/v1/keys/{key_id}/transfer", dependencies=[public()])
async def transfer(key_id: str, request: Request, services: ServicesDep, audit: AuditDep) -> JSONResponse:
    """No bearer token is needed unless the key's policy names client permissions; attestation is the
    credential. An empty body (or ``{}``) without ``Attestation-Type`` asks for a nonce."""
    header = request.headers.get("attestation-type")
    body = await json_object(request)
    metrics = request.app.state.metrics
    if not body and header is None:
        nonce, types = await run_in_threadpool(services.transfer.nonce, key_id)
        return JSONResponse(nonce.as_json(), headers={"Attestation-Type": ",".join(types)})
    try:
        try:
            principal = await run_in_threadpool(optional_principal, request)
        except KeybrokerError as exc:
            await run_in_threadpool(services.transfer.refused_before, key_id, exc, audit)
            raise
        wrapped = await run_in_threadpool(services.transfer.transfer, key_id, header, body or {}, principal, audit)
    except KeybrokerError as exc:
        metrics.transfer_decisions.labels(exc.instance_code).inc()
        raise
    metrics.transfer_decisions.labels("released").inc()
    return JSONResponse(wrapped.as_json())
