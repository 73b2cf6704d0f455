"""Operations: readiness (database and every backend), the backends' report for operators, Prometheus metrics."""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keybroker.api.deps import get_services, public, requires
from keybroker.backends.checks import check_backends
from keybroker.errors import KeybrokerError
from keybroker.services import Services
from keybroker.storage.db import schema_head

router = APIRouter(tags=["operations"])
ServicesDep = Annotated[Services, Depends(get_services)]


# /readyz is public and each check is a real round trip to a KMS or an HSM: answers are reused for this long, so
# that polling it (or anyone hammering it) costs the backends at most one round of checks per interval.
READY_CACHE_SECONDS = 2.0
_ready_lock = threading.Lock()


@router.get("/readyz", dependencies=[public()])
def readyz(request: Request, services: ServicesDep) -> JSONResponse:
    with _ready_lock:
        cached: tuple[float, int, dict[str, object]] | None = getattr(request.app.state, "ready_cache", None)
        if cached is not None and time.monotonic() - cached[0] < READY_CACHE_SECONDS:
            return JSONResponse(cached[2], status_code=cached[1])
        status, body = _readiness(services)
        request.app.state.ready_cache = (time.monotonic(), status, body)
    return JSONResponse(body, status_code=status)


def _readiness(services: Services) -> tuple[int, dict[str, object]]:
    checks: dict[str, str] = {}
    try:
        services.database.ping()
        checks["database"] = "ok"
        # Another replica of a later version may have upgraded the shared schema: this one's code no longer
        # matches it, and the load balancer should stop sending it requests until it is upgraded too.
        checks["schema"] = "ok" if services.database.schema_revision() == schema_head() else "schema_mismatch"
    except KeybrokerError as exc:
        checks["database"] = exc.instance_code
    for name, store in services.keys.backends.items():
        try:
            store.check()
            checks[f"backend:{name}"] = "ok"
        except KeybrokerError as exc:
            checks[f"backend:{name}"] = exc.instance_code
    ready = all(value == "ok" for value in checks.values())
    return (200 if ready else 503), {"status": "ready" if ready else "unavailable", "checks": checks}


@router.get("/kbs/v1/backends", dependencies=[requires("backends:read")])
def backends_report(services: ServicesDep) -> dict[str, Any]:
    """Check every configured backend (and the KEK holder of each embedded one) now, from this replica: each answer
    says ok, or the error's code and its sentence. 200 even when a backend fails: the report is the answer
    (``/readyz`` is the load balancer's view)."""
    report = check_backends(services.keys.backends, services.settings)
    return {
        "replica": services.replica_id,
        "checked_at": services.clock.now(),
        "ok": all(entry["ok"] for entry in report),
        "backends": report,
    }


@router.get("/metrics", dependencies=[public()])
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
