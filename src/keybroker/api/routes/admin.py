"""Tokens, roles and the audit log: the AAS role of the guide, built in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from keybroker.api.audit_context import AuditDep
from keybroker.api.deps import get_services, json_body, requires
from keybroker.api.routes.common import reject_unknown_query
from keybroker.auth.tokens import MAX_TTL
from keybroker.errors import InvalidRequest
from keybroker.services import Services
from keybroker.storage.db import SQL_INT_MAX

router = APIRouter(tags=["administration"])
ServicesDep = Annotated[Services, Depends(get_services)]


class TokenCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=128)]
    roles: Annotated[list[Annotated[str, Field(max_length=64)]], Field(min_length=1, max_length=16)]
    context: Annotated[list[str], Field(max_length=32)] = []
    ttl_seconds: Annotated[int | None, Field(strict=True, ge=1, le=int(MAX_TTL.total_seconds()))] = None


class RolePutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    permissions: Annotated[list[str], Field(max_length=64)]


@router.post("/kbs/v1/tokens", status_code=201, dependencies=[requires("tokens:manage")])
def create_token(
    request: Request,
    services: ServicesDep,
    body: Annotated[TokenCreateRequest, Depends(json_body(TokenCreateRequest))],
    audit: AuditDep,
) -> dict[str, Any]:
    """Issue a token. Its secret is in this response only; keybroker keeps a hash."""
    ttl = timedelta(seconds=body.ttl_seconds or services.settings.auth.default_token_ttl_days * 86400)
    secret, info = services.tokens.issue(
        body.name, body.roles, body.context, ttl, audit, created_by=request.state.principal.token_id
    )
    return {**info.as_dict(), "token": secret}


@router.get("/kbs/v1/tokens", dependencies=[requires("tokens:manage")])
def list_tokens(services: ServicesDep) -> list[dict[str, Any]]:
    return [info.as_dict() for info in services.tokens.list()]


@router.delete("/kbs/v1/tokens/{token_id}", status_code=204, dependencies=[requires("tokens:manage")])
def revoke_token(token_id: str, services: ServicesDep, audit: AuditDep) -> Response:
    services.tokens.revoke(token_id, audit)
    return Response(status_code=204)


@router.get("/kbs/v1/roles", dependencies=[requires("tokens:manage")])
def list_roles(services: ServicesDep) -> list[dict[str, Any]]:
    return [role.as_dict() for role in services.roles.list()]


@router.get("/kbs/v1/roles/{name}", dependencies=[requires("tokens:manage")])
def get_role(name: str, services: ServicesDep) -> dict[str, Any]:
    return services.roles.get(name).as_dict()


@router.put("/kbs/v1/roles/{name}", dependencies=[requires("tokens:manage")])
def put_role(
    name: str,
    services: ServicesDep,
    body: Annotated[RolePutRequest, Depends(json_body(RolePutRequest))],
    audit: AuditDep,
) -> dict[str, Any]:
    return services.roles.put(name, body.permissions, audit).as_dict()


@router.delete("/kbs/v1/roles/{name}", status_code=204, dependencies=[requires("tokens:manage")])
def delete_role(name: str, services: ServicesDep, audit: AuditDep) -> Response:
    services.roles.delete(name, audit)
    return Response(status_code=204)


@router.get("/kbs/v1/audit", dependencies=[requires("audit:read")])
def list_audit(
    request: Request,
    response: Response,
    services: ServicesDep,
    after: Annotated[int, Query(ge=0, le=SQL_INT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    since: datetime | None = None,
    target: Annotated[str | None, Query(max_length=200)] = None,
) -> list[dict[str, Any]]:
    """Entries in order, from ``after`` (a seq). ``X-Audit-Head`` carries the chain head (``seq:hash``) so that a
    client can verify the whole chain itself."""
    reject_unknown_query(request, frozenset({"after", "limit", "since", "target"}))
    if since is not None:
        since = _utc(since)
    head_seq, head_hash = services.audit.head()
    response.headers["X-Audit-Head"] = f"{head_seq}:{head_hash}"
    entries = services.audit.entries(after_seq=after, limit=limit, since=since, target=target)
    if len(entries) == limit:
        response.headers["X-Next-Cursor"] = str(entries[-1]["seq"])
    return entries


def _utc(value: datetime) -> datetime:
    """``value`` in UTC; a time without a zone, or one that leaves the representable range in UTC, is a 400."""
    if value.tzinfo is None:
        raise InvalidRequest("since needs a timezone (e.g. 2026-11-27T12:00:00Z)", code="invalid_request")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise InvalidRequest("since is out of range", code="invalid_request") from None


@router.get("/kbs/v1/cluster/replicas", dependencies=[requires("cluster:read")])
def list_replicas(services: ServicesDep) -> list[dict[str, Any]]:
    """The replicas that serve this deployment: id, address, version, schema revision, last heartbeat."""
    now = services.clock.now()
    return [replica.as_dict(now) for replica in services.replicas.all()]
