"""Collateral management (import, export, status) and the PCCS-compatible read endpoints (PROTOCOL.md §5), so
that Intel's quote libraries can use keybroker as their PCCS."""

from __future__ import annotations

import base64
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keybroker.api.audit_context import AuditDep
from keybroker.api.costly import costly_pool
from keybroker.api.deps import get_services, json_body, public, requires
from keybroker.attestation.collateral import (
    ROOT_CRL_KEY,
    CollateralItem,
    item_from_pcs,
    pck_crl_key,
    qe_key,
    tcb_key,
)
from keybroker.attestation.service import b64decode
from keybroker.audit.log import AuditContext, AuditEvent
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
async def import_items(
    request: Request,
    services: ServicesDep,
    body: Annotated[ImportRequest, Depends(json_body(ImportRequest))],
    audit: AuditDep,
) -> dict[str, int]:
    """Check every item (signature and chain to a trusted root) before any is stored: all or nothing. The checks
    of up to 200 items run in the bounded pool for costly requests (api/costly.py)."""
    roots = services.attestation.verifier.anchors.roots()

    def check() -> list[CollateralItem]:
        return [item_from_pcs(i.key, b64decode(i.body, "body"), i.issuer_chain, roots) for i in body.items]

    items = await costly_pool(request).run(check)
    added = await run_in_threadpool(services.collateral.put, items, body.source)
    await run_in_threadpool(_audit_import, services, audit, len(items), added, body.source)
    return {"received": len(items), "added": added}


def _audit_import(services: Services, audit: AuditContext, items: int, added: int, source: str) -> None:
    services.audit.record(
        audit, AuditEvent("collateral.import", "success", None, {"items": items, "added": added, "source": source})
    )


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
# Paths, headers and bodies as Intel PCS v4 sends them (PROTOCOL.md §5): issuer chains URL-encoded with every
# reserved character escaped; TCB info and QE identity byte for byte; the PCK CRL as DER or (PCS's default) PEM
# with 64-character lines; the root CA CRL, which only Intel's PCCS serves, as PCCS does: the DER in hex.


def _item(services: Services, key: str) -> CollateralItem:
    item = services.collateral.select(key, services.clock.now())
    if item is None:
        raise NotFound(f"no collateral {key} in the cache", code="collateral_not_found")
    return item


def _serve(services: Services, key: str, header: str, media_type: str) -> Response:
    item = _item(services, key)
    return Response(item.body, media_type=media_type, headers={header: quote(item.issuer_chain, safe="")})


Fmspc = Annotated[str, Query(pattern=r"^[0-9A-Fa-f]{12}$")]
# Intel PCS's choice between the early and the standard TCB recovery collateral; the cache holds what it was given.
Update = Annotated[str, Query(pattern=r"^(early|standard)$")]


@router.get("/sgx/certification/v4/tcb", dependencies=[public()])
def sgx_tcb(services: ServicesDep, fmspc: Fmspc, update: Update = "standard") -> Response:
    return _serve(services, tcb_key("SGX", fmspc), "TCB-Info-Issuer-Chain", "application/json")


@router.get("/tdx/certification/v4/tcb", dependencies=[public()])
def tdx_tcb(services: ServicesDep, fmspc: Fmspc, update: Update = "standard") -> Response:
    return _serve(services, tcb_key("TDX", fmspc), "TCB-Info-Issuer-Chain", "application/json")


@router.get("/sgx/certification/v4/qe/identity", dependencies=[public()])
def sgx_qe(services: ServicesDep, update: Update = "standard") -> Response:
    return _serve(services, qe_key("SGX"), "SGX-Enclave-Identity-Issuer-Chain", "application/json")


@router.get("/tdx/certification/v4/qe/identity", dependencies=[public()])
def tdx_qe(services: ServicesDep, update: Update = "standard") -> Response:
    return _serve(services, qe_key("TDX"), "SGX-Enclave-Identity-Issuer-Chain", "application/json")


@router.get("/sgx/certification/v4/pckcrl", dependencies=[public()])
def pck_crl(
    services: ServicesDep,
    ca: Annotated[str, Query(pattern=r"^(processor|platform)$")],
    encoding: Annotated[str, Query(pattern=r"^(der|pem)$")] = "pem",
) -> Response:
    """``encoding=der``: the CRL as stored; otherwise PEM, Intel PCS v4's default (Intel's PCCS sends hex there,
    which every Intel client also reads as PEM's alternative; dcap-qvl always asks for DER)."""
    if encoding == "der":
        return _serve(services, pck_crl_key(ca), "SGX-PCK-CRL-Issuer-Chain", "application/pkix-crl")
    item = _item(services, pck_crl_key(ca))
    return Response(
        pem_crl(item.body),
        media_type="application/x-pem-file",
        headers={"SGX-PCK-CRL-Issuer-Chain": quote(item.issuer_chain, safe="")},
    )


def pem_crl(der: bytes) -> bytes:
    """RFC 7468 PEM with 64-character lines, as Intel PCS frames its CRLs."""
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return ("-----BEGIN X509 CRL-----\n" + "\n".join(lines) + "\n-----END X509 CRL-----\n").encode("ascii")


@router.get("/sgx/certification/v4/rootcacrl", dependencies=[public()])
def root_ca_crl(services: ServicesDep) -> Response:
    """As Intel's PCCS serves it (and its clients, dcap-qvl included, expect): the DER, hex-encoded, labelled
    application/pkix-crl."""
    return Response(_item(services, ROOT_CRL_KEY).body.hex(), media_type="application/pkix-crl")
