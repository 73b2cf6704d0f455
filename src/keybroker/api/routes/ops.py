"""Operations: readiness (database and every backend), the backends' report for operators, Prometheus metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keybroker.api.deps import get_services, public, requires
from keybroker.api.single_flight import SingleFlight
from keybroker.backends.checks import check_backends, check_store
from keybroker.errors import KeybrokerError
from keybroker.services import Services
from keybroker.storage.db import schema_head

router = APIRouter(tags=["operations"])
ServicesDep = Annotated[Services, Depends(get_services)]


# /readyz is public and each check is a real round trip to a KMS or an HSM: answers are reused for this long, so
# that polling it (or anyone hammering it) costs the backends at most one round of checks per interval. The checks
# run one round at a time in a small executor of their own (single_flight): callers wait on the event loop, never
# on a thread of the request pool, and a slow KMS cannot stall the API.
READY_CACHE_SECONDS = 2.0
# A load balancer wants an answer: after this long, the checks not finished are "check_timeout" (503).
READY_TIMEOUT_SECONDS = 5.0
REPORT_CACHE_SECONDS = 2.0
_flights_lock = threading.Lock()


class _Readiness:
    """One round of readiness checks; ``checks`` fills as they finish (read at the deadline)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.checks: dict[str, str] = {}

    def __call__(self) -> tuple[int, dict[str, object]]:
        checks: dict[str, str] = {}
        self.checks = checks  # (a new round: the dict of the one before stays with its answer)
        return _readiness(self.services, checks)

    def late(self) -> tuple[int, dict[str, object]]:
        names = ["database", *(f"backend:{name}" for name in self.services.keys.backends)]
        checks = {name: self.checks.get(name, "check_timeout") for name in names}
        if "schema" in self.checks:
            checks["schema"] = self.checks["schema"]
        return 503, {"status": "unavailable", "checks": checks}


def _flight(request: Request, name: str, make: Callable[[], SingleFlight[Any]]) -> SingleFlight[Any]:
    """The app's SingleFlight ``name``, made on first use."""
    with _flights_lock:
        flight: SingleFlight[Any] | None = getattr(request.app.state, name, None)
        if flight is None:
            flight = make()
            setattr(request.app.state, name, flight)
        return flight


@router.get("/readyz", dependencies=[public()])
async def readyz(request: Request, services: ServicesDep) -> JSONResponse:
    readiness = _flight(request, "readiness_checks", lambda: _ReadinessFlight(_Readiness(services)))
    assert isinstance(readiness, _ReadinessFlight)  # (made just above: for mypy)
    try:
        status, body = await readiness.get(READY_TIMEOUT_SECONDS)
    except TimeoutError:
        status, body = readiness.round.late()
    return JSONResponse(body, status_code=status)


class _ReadinessFlight(SingleFlight[tuple[int, dict[str, object]]]):
    def __init__(self, round_: _Readiness) -> None:
        super().__init__(round_, lambda: READY_CACHE_SECONDS)
        self.round = round_


def _readiness(services: Services, checks: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    checks = {} if checks is None else checks
    try:
        services.database.ping()
        checks["database"] = "ok"
        # Another replica of a later version may have upgraded the shared schema: this one's code no longer
        # matches it, and the load balancer should stop sending it requests until it is upgraded too.
        checks["schema"] = "ok" if services.database.schema_revision() == schema_head() else "schema_mismatch"
    except KeybrokerError as exc:
        checks["database"] = exc.instance_code
    for name, store in services.keys.backends.items():
        failure, _ = check_store(store)  # (the same check and error handling as GET /kbs/v1/backends)
        checks[f"backend:{name}"] = "ok" if failure is None else failure[0]
    ready = all(value == "ok" for value in checks.values())
    return (200 if ready else 503), {"status": "ready" if ready else "unavailable", "checks": dict(checks)}


@router.get("/kbs/v1/backends", dependencies=[requires("backends:read")])
async def backends_report(request: Request, services: ServicesDep) -> dict[str, Any]:
    """Check every configured backend (and the KEK holder of each embedded one), from this replica: each answer
    says ok, or the error's code and its sentence. 200 even when a backend fails: the report is the answer
    (``/readyz`` is the load balancer's view). One round of checks runs at a time and its report is reused for
    2 seconds (``checked_at`` says when it was made): any number of callers cost the backends one round."""
    flight = _flight(
        request, "backend_reports", lambda: SingleFlight(lambda: _report(services), lambda: REPORT_CACHE_SECONDS)
    )
    report: dict[str, Any] = await flight.get()
    return report


def _report(services: Services) -> dict[str, Any]:
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
