"""Unauthenticated service endpoints: version and liveness."""

from __future__ import annotations

from fastapi import APIRouter

from keybroker import __version__
from keybroker.api.deps import public
from keybroker.api.schemas import VersionOut

router = APIRouter()


@router.get("/version", dependencies=[public()])
def version() -> VersionOut:
    return VersionOut(name="keybroker", version=__version__, api="kbs/v1")


@router.get("/healthz", dependencies=[public()])
def healthz() -> dict[str, str]:
    """Liveness: the process serves requests. (Readiness of the database and backends is /readyz.)"""
    return {"status": "ok"}
