"""Operations: readiness (database and every backend) and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keybroker.api.deps import get_services, public
from keybroker.errors import KeybrokerError
from keybroker.services import Services

router = APIRouter(tags=["operations"])
ServicesDep = Annotated[Services, Depends(get_services)]


@router.get("/readyz", dependencies=[public()])
def readyz(services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        services.database.ping()
        checks["database"] = "ok"
    except KeybrokerError as exc:
        checks["database"] = exc.instance_code
    for name, store in services.keys.backends.items():
        try:
            store.check()
            checks[f"backend:{name}"] = "ok"
        except KeybrokerError as exc:
            checks[f"backend:{name}"] = exc.instance_code
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", dependencies=[public()])
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
