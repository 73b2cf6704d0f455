"""/kbs/v1/keys: create (generate, import, register), list, get, re-assign policy, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keybroker.api.audit_context import AuditDep
from keybroker.api.costly import costly_pool
from keybroker.api.deps import get_services, json_body, requires
from keybroker.api.routes.common import base_url, reject_unknown_query, set_next_page
from keybroker.api.schemas import KeyCreateRequest, KeyOut, KeyUpdateRequest
from keybroker.ids import PolicyId
from keybroker.keys.certificates import KeyCertificates
from keybroker.keys.models import Algorithm
from keybroker.keys.service import KeyFilter, parse_algorithm, parse_curve
from keybroker.services import Services
from keybroker.storage.pagination import Page

router = APIRouter(prefix="/kbs/v1/keys", tags=["keys"])
ServicesDep = Annotated[Services, Depends(get_services)]
_LIST_PARAMS = frozenset({"algorithm", "keyLength", "curveType", "transferPolicyId", "limit", "cursor"})


@router.post("", status_code=201, dependencies=[requires("keys:create")])
async def create_key(
    request: Request,
    services: ServicesDep,
    body: Annotated[KeyCreateRequest, Depends(json_body(KeyCreateRequest))],
    audit: AuditDep,
) -> KeyOut:
    new = body.to_new_key()
    await run_in_threadpool(services.keys.check_new, new)
    if new.kmip_key_id is not None:
        # Registering checks the existing object's key like an import (RSA: api/costly.py's bounded pool).
        registered = await costly_pool(request).run(services.keys.register, new, audit)
        return KeyOut.of(registered, base_url(services))
    # A backend that generates keys of this spec itself (KMIP: Create / CreateKeyPair) creates it there; the
    # server does the work (RSA-4096: up to a second or two), so this thread only waits for it.
    generated = await run_in_threadpool(services.keys.generate_in_backend, new, audit)
    if generated is not None:
        return KeyOut.of(generated, base_url(services))
    if new.spec.algorithm is Algorithm.RSA or new.key_string is not None:
        # RSA generation takes up to seconds (7680 bits), and checking an imported key (any key_string may be an
        # RSA key, whatever algorithm it claims) up to a second: the bounded pool keeps them from taking the cores
        # that serve every other request (api/costly.py).
        material = await costly_pool(request).run(services.keys.make_material, new)
    else:
        material = await run_in_threadpool(services.keys.make_material, new)
    record = await run_in_threadpool(services.keys.store, new, material, audit)
    return KeyOut.of(record, base_url(services))


@router.get("", dependencies=[requires("keys:search")])
def list_keys(
    request: Request,
    response: Response,
    services: ServicesDep,
    algorithm: str | None = None,
    key_length: Annotated[int | None, Query(alias="keyLength", ge=1, le=65536)] = None,
    curve_type: Annotated[str | None, Query(alias="curveType")] = None,
    transfer_policy_id: Annotated[str | None, Query(alias="transferPolicyId", max_length=64)] = None,
    limit: Annotated[int | None, Query(ge=-1, le=1_000_000)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> list[KeyOut]:
    reject_unknown_query(request, _LIST_PARAMS)
    key_filter = KeyFilter(
        algorithm=parse_algorithm(algorithm) if algorithm else None,
        key_length=key_length,
        curve=parse_curve(curve_type) if curve_type else None,
        transfer_policy_id=transfer_policy_id,
    )
    records, next_cursor = services.keys.list(key_filter, Page.parse(limit, cursor))
    set_next_page(request, response, next_cursor)
    base = base_url(services)
    return [KeyOut.of(record, base) for record in records]


@router.get("/{key_id}", dependencies=[requires("keys:retrieve")])
def get_key(key_id: str, request: Request, services: ServicesDep) -> KeyOut:
    return KeyOut.of(services.keys.get(key_id), base_url(services))


@router.put("/{key_id}", dependencies=[requires("keys:update")])
def update_key(
    key_id: str,
    request: Request,
    services: ServicesDep,
    body: Annotated[KeyUpdateRequest, Depends(json_body(KeyUpdateRequest))],
    audit: AuditDep,
) -> KeyOut:
    record = services.keys.set_policy(key_id, PolicyId(body.transfer_policy_id), audit)
    return KeyOut.of(record, base_url(services))


class CertifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: Annotated[str, Field(min_length=3, max_length=1024)]
    san: Annotated[list[Annotated[str, Field(min_length=1, max_length=300)]], Field(max_length=100)] = []
    days: Annotated[int, Field(strict=True, ge=1, le=825)] = 365


def _certificates(services: Services) -> KeyCertificates:
    assert services.workload_ca is not None
    return KeyCertificates(services.database, services.keys, services.workload_ca, services.audit, services.clock)


@router.post("/{key_id}/certificate", status_code=201, dependencies=[requires("keys:certify")])
def certify_key(
    key_id: str,
    services: ServicesDep,
    body: Annotated[CertifyRequest, Depends(json_body(CertifyRequest))],
    audit: AuditDep,
) -> dict[str, object]:
    """Issue an X.509 certificate for an RSA/EC key, signed by the service CA (PROTOCOL.md §1)."""
    return _certificates(services).issue(key_id, body.subject, body.san, body.days, audit).describe()


@router.get("/{key_id}/certificate", dependencies=[requires("keys:certify")])
def key_certificate(key_id: str, services: ServicesDep) -> dict[str, object]:
    """The newest certificate issued for the key."""
    return _certificates(services).latest(key_id).describe()


@router.delete("/{key_id}", status_code=204, dependencies=[requires("keys:delete")])
def delete_key(key_id: str, services: ServicesDep, audit: AuditDep) -> Response:
    services.keys.delete(key_id, audit)
    return Response(status_code=204)
