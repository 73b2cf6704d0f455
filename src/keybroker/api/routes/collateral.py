"""Collateral management (import, export, status) and the PCCS-compatible read endpoints (PROTOCOL.md §5), so
that Intel's quote libraries can use keybroker as their PCCS."""

from __future__ import annotations

import base64
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from keybroker.api.deps import AuditDep, get_services, json_body, public, requires
from keybroker.attestation.collateral import ROOT_CRL_KEY, item_from_pcs, pck_crl_key, qe_key, tcb_key
from keybroker.attestation.service import b64decode
from keybroker.audit.log import AuditEvent
from keybroker.errors import NotFound
from keybroker.services import Services

router = APIRouter(tags=["collateral"])
ServicesDep = Annotated[Services, Depends(get_services)]


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Annotated[
        str, Field(pattern=r"^(tcb:(SGX|TDX):[0-9A-F]{12}|qe:(SGX|TDX)|pckcrl:(processor|platform)|rootcacrl)$")
    ]
    body: Annotated[str, Field(min_length=1, max_length=1_000_000)]
    issuer_chain: Annotated[str, Field(max_length=100_000)] = ""


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    items: Annotated[list[ItemIn], Field(min_length=1, max_length=200)]
    source: Annotated[str, Field(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")] = "import"


@router.post("/collateral/v1/items", dependencies=[requires("collateral:manage")])
def import_items(
    services: ServicesDep, body: Annotated[ImportRequest, Depends(json_body(ImportRequest))], audit: AuditDep
) -> dict[str, int]:
    """Check every item (signature and chain to a trusted root) before any is stored: all or nothing."""
    roots = services.attestation.verifier.anchors.roots()
    items = [item_from_pcs(i.key, b64decode(i.body, "body"), i.issuer_chain, roots) for i in body.items]
    added = services.collateral.put(items, body.source)
    services.audit.record(
        audit,
        AuditEvent("collateral.import", "success", None, {"items": len(items), "added": added, "source": body.source}),
    )
    return {"received": len(items), "added": added}


@router.get("/collateral/v1/items", dependencies=[requires("collateral:manage")])
def export_items(services: ServicesDep) -> list[dict[str, Any]]:
    """The newest version of every item, in the import format."""
    out = []
    for key in services.collateral.item_keys():
        item = services.collateral.newest(key)
        if item is not None:
            out.append(
                {"key": item.key, "body": base64.b64encode(item.body).decode(), "issuer_chain": item.issuer_chain}
            )
    return out


@router.get("/collateral/v1/status", dependencies=[requires("collateral:manage")])
def status(services: ServicesDep) -> list[dict[str, Any]]:
    now = services.clock.now()
    return [
        {
            "key": s.key,
            "issue_date": s.issue_date,
            "next_update": s.next_update,
            "source": s.source,
            "state": "valid"
            if s.issue_date <= now < s.next_update
            else ("expired" if now >= s.next_update else "not_yet_valid"),
        }
        for s in services.collateral.status()
    ]


# --- PCCS-compatible reads --------------------------------------------------------------------------------


def _serve(services: Services, key: str, header: str | None, media_type: str) -> Response:
    item = services.collateral.select(key, services.clock.now())
    if item is None:
        raise NotFound(f"no collateral {key} in the cache", code="collateral_not_found")
    headers = {header: quote(item.issuer_chain, safe="")} if header else {}
    return Response(item.body, media_type=media_type, headers=headers)


Fmspc = Annotated[str, Query(pattern=r"^[0-9A-Fa-f]{12}$")]


@router.get("/sgx/certification/v4/tcb", dependencies=[public()])
def sgx_tcb(services: ServicesDep, fmspc: Fmspc) -> Response:
    return _serve(services, tcb_key("SGX", fmspc), "TCB-Info-Issuer-Chain", "application/json")


@router.get("/tdx/certification/v4/tcb", dependencies=[public()])
def tdx_tcb(services: ServicesDep, fmspc: Fmspc) -> Response:
    return _serve(services, tcb_key("TDX", fmspc), "TCB-Info-Issuer-Chain", "application/json")


@router.get("/sgx/certification/v4/qe/identity", dependencies=[public()])
def sgx_qe(services: ServicesDep) -> Response:
    return _serve(services, qe_key("SGX"), "SGX-Enclave-Identity-Issuer-Chain", "application/json")


@router.get("/tdx/certification/v4/qe/identity", dependencies=[public()])
def tdx_qe(services: ServicesDep) -> Response:
    return _serve(services, qe_key("TDX"), "SGX-Enclave-Identity-Issuer-Chain", "application/json")


@router.get("/sgx/certification/v4/pckcrl", dependencies=[public()])
def pck_crl(
    services: ServicesDep,
    ca: Annotated[str, Query(pattern=r"^(processor|platform)$")],
    encoding: Annotated[str, Query(pattern=r"^(der|pem)$")] = "der",
) -> Response:
    response = _serve(services, pck_crl_key(ca), "SGX-PCK-CRL-Issuer-Chain", "application/pkix-crl")
    if encoding == "pem":
        body = base64.encodebytes(bytes(response.body)).decode()
        pem = f"-----BEGIN X509 CRL-----\n{body}-----END X509 CRL-----\n"
        return Response(pem, media_type="application/x-pem-file", headers=dict(response.headers))
    return response


@router.get("/sgx/certification/v4/rootcacrl", dependencies=[public()])
def root_ca_crl(services: ServicesDep) -> Response:
    """As Intel's PCCS serves it (and its clients expect): the DER, hex-encoded."""
    response = _serve(services, ROOT_CRL_KEY, None, "application/pkix-crl")
    return Response(bytes(response.body).hex(), media_type="text/plain")
