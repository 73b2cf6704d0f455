"""The service CA (the guide's CMS role): its certificate for anyone, CSR signing for holders of
``certificates:issue``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from keybroker.api.audit_context import AuditDep
from keybroker.api.deps import get_services, json_body, public, requires
from keybroker.audit.log import AuditEvent
from keybroker.ca import fingerprint
from keybroker.services import Services

router = APIRouter(prefix="/cms/v1", tags=["certificates"])
ServicesDep = Annotated[Services, Depends(get_services)]


class CsrRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    csr: Annotated[str, Field(min_length=1, max_length=65536)]
    days: Annotated[int, Field(strict=True, ge=1, le=825)] = 365


@router.get("/ca-certificates", dependencies=[public()])
def ca_certificates(services: ServicesDep) -> Response:
    """The CA certificate (PEM). Fetch it over any channel, then check its SHA-384 against the pin."""
    return Response(services.ca.certificate_pem(), media_type="application/x-pem-file")


@router.post("/certificates", status_code=201, dependencies=[requires("certificates:issue")])
def sign_certificate(
    services: ServicesDep,
    body: Annotated[CsrRequest, Depends(json_body(CsrRequest))],
    audit: AuditDep,
) -> dict[str, Any]:
    chain = services.ca.sign_csr(body.csr, services.clock.now(), body.days)
    services.audit.record(
        audit, AuditEvent("certificate.issue", "success", None, {"sha384": fingerprint(chain), "days": body.days})
    )
    return {"certificate": chain.decode()}
