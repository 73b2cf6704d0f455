"""Who is asking and from where, for the audit entries a request's action writes (and for refusals at the edge)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from keybroker.audit.log import AuditContext
from keybroker.auth.tokens import Principal


def audit_context(request: Request) -> AuditContext:
    """Who is asking and from where, for the audit entries the request's action writes."""
    principal: Principal | None = getattr(request.state, "principal", None)
    return AuditContext(
        actor=principal.actor if principal else None,
        request_id=getattr(request.state, "request_id", None),
        client=request.client.host if request.client else None,
    )


AuditDep = Annotated[AuditContext, Depends(audit_context)]
