"""The attestation service (PROTOCOL.md §4): nonces, attest, the token keys, appraisal policies."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keybroker.api.audit_context import AuditDep
from keybroker.api.costly import costly_pool
from keybroker.api.deps import get_services, json_body, public, requires
from keybroker.attestation.nonce import parse_nonce
from keybroker.attestation.service import b64decode
from keybroker.policy.model import Uuid
from keybroker.services import Services

router = APIRouter(tags=["attestation"])
ServicesDep = Annotated[Services, Depends(get_services)]
_B64 = Annotated[str, Field(min_length=1, max_length=100_000, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]


class AttestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    quote: _B64
    verifier_nonce: dict[str, Any] | None = None
    runtime_data: Annotated[str, Field(max_length=100_000, pattern=r"^[A-Za-z0-9+/]*={0,2}$")] = ""
    policy_ids: Annotated[list[Uuid], Field(max_length=32)] = []
    event_log: _B64 | None = None


class PolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")]
    policy: Annotated[str, Field(min_length=1, max_length=65_536)]


@router.get("/appraisal/v1/nonce", dependencies=[public()])
def nonce(services: ServicesDep) -> dict[str, str]:
    return services.attestation.nonces.issue().as_json()


@router.post("/appraisal/v1/attest", dependencies=[public()])
async def attest(
    services: ServicesDep, body: Annotated[AttestRequest, Depends(json_body(AttestRequest))]
) -> dict[str, str]:
    """Verify a quote bound to a nonce and runtime data; returns a signed attestation token."""
    quote = b64decode(body.quote, "quote")
    runtime_data = b64decode(body.runtime_data, "runtime_data") if body.runtime_data else b""
    verifier_nonce = parse_nonce(body.verifier_nonce) if body.verifier_nonce is not None else None
    token = await run_in_threadpool(
        services.attestation.attest, quote, verifier_nonce, runtime_data, list(body.policy_ids)
    )
    return {"token": token}


@router.get("/certs", dependencies=[public()])
def certs(services: ServicesDep) -> dict[str, Any]:
    """JWKS of the token signing keys; retired keys stay until their tokens have expired."""
    return services.attestation.tokens.jwks()


@router.post("/appraisal/v1/keys/rotate", dependencies=[requires("tokens:manage")])
def rotate(services: ServicesDep, audit: AuditDep) -> dict[str, str]:
    return {"kid": services.attestation.tokens.rotate(audit)}


@router.post("/appraisal/v1/policies", status_code=201, dependencies=[requires("appraisal_policies:create")])
async def create_policy(
    request: Request,
    services: ServicesDep,
    body: Annotated[PolicyRequest, Depends(json_body(PolicyRequest))],
    audit: AuditDep,
) -> dict[str, Any]:
    """The Rego text is compiled here (up to 64 KiB of it): in the bounded pool for costly requests."""
    created = await costly_pool(request).run(services.attestation.policies.create, body.name, body.policy, audit)
    return created.as_dict()


@router.get("/appraisal/v1/policies", dependencies=[requires("appraisal_policies:search")])
def list_policies(services: ServicesDep) -> list[dict[str, Any]]:
    return [policy.as_dict() for policy in services.attestation.policies.all()]


@router.get("/appraisal/v1/policies/{policy_id}", dependencies=[requires("appraisal_policies:retrieve")])
def get_policy(policy_id: str, services: ServicesDep) -> dict[str, Any]:
    return services.attestation.policies.get(policy_id).as_dict()


@router.put("/appraisal/v1/policies/{policy_id}", dependencies=[requires("appraisal_policies:update")])
async def replace_policy(
    policy_id: str,
    request: Request,
    services: ServicesDep,
    body: Annotated[PolicyRequest, Depends(json_body(PolicyRequest))],
    audit: AuditDep,
) -> dict[str, Any]:
    policies = services.attestation.policies
    replaced = await costly_pool(request).run(policies.replace, policy_id, body.name, body.policy, audit)
    return replaced.as_dict()


@router.delete(
    "/appraisal/v1/policies/{policy_id}", status_code=204, dependencies=[requires("appraisal_policies:delete")]
)
def delete_policy(policy_id: str, services: ServicesDep, audit: AuditDep) -> Response:
    services.attestation.policies.delete(policy_id, audit)
    return Response(status_code=204)
