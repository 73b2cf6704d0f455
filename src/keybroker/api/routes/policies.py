"""/kbs/v1/key-transfer-policies: CRUD with strict validation; immutable and in-use policies are protected."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from keybroker.api.audit_context import AuditDep
from keybroker.api.deps import get_services, json_body, requires
from keybroker.api.routes.common import reject_unknown_query, set_next_page
from keybroker.api.schemas import policy_out
from keybroker.policy.model import TransferPolicyDocument
from keybroker.services import Services
from keybroker.storage.pagination import Page

router = APIRouter(prefix="/kbs/v1/key-transfer-policies", tags=["key transfer policies"])
ServicesDep = Annotated[Services, Depends(get_services)]
PolicyBody = Annotated[TransferPolicyDocument, Depends(json_body(TransferPolicyDocument))]


@router.post("", status_code=201, dependencies=[requires("key_transfer_policies:create")])
def create_policy(services: ServicesDep, body: PolicyBody, audit: AuditDep) -> dict[str, Any]:
    return policy_out(services.policies.create(body, audit))


@router.get("", dependencies=[requires("key_transfer_policies:search")])
def list_policies(
    request: Request,
    response: Response,
    services: ServicesDep,
    limit: Annotated[int | None, Query(ge=-1, le=1_000_000)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> list[dict[str, Any]]:
    reject_unknown_query(request, frozenset({"limit", "cursor"}))
    records, next_cursor = services.policies.list(Page.parse(limit, cursor))
    set_next_page(request, response, next_cursor)
    return [policy_out(record) for record in records]


@router.get("/{policy_id}", dependencies=[requires("key_transfer_policies:retrieve")])
def get_policy(policy_id: str, services: ServicesDep) -> dict[str, Any]:
    return policy_out(services.policies.get(policy_id))


@router.put("/{policy_id}", dependencies=[requires("key_transfer_policies:update")])
def replace_policy(policy_id: str, services: ServicesDep, body: PolicyBody, audit: AuditDep) -> dict[str, Any]:
    return policy_out(services.policies.replace(policy_id, body, audit))


@router.delete("/{policy_id}", status_code=204, dependencies=[requires("key_transfer_policies:delete")])
def delete_policy(policy_id: str, services: ServicesDep, audit: AuditDep) -> Response:
    services.policies.delete(policy_id, audit)
    return Response(status_code=204)
