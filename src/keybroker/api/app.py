"""``create_app(services)``: the FastAPI application, with no globals; everything arrives through ``services``."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import structlog
from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from keybroker import __version__
from keybroker.api import background
from keybroker.api.costly import CostlyPool
from keybroker.api.deps import check_routes_declare_permissions
from keybroker.api.errors import (
    http_error_handler,
    keybroker_error_handler,
    validation_error_handler,
)
from keybroker.api.hot import HotRoutes
from keybroker.api.limits import ClientAddresses, RateClasses
from keybroker.api.metrics import Metrics
from keybroker.api.middleware import RequestContextMiddleware
from keybroker.api.openapi import DocumentedAPI
from keybroker.api.routes import admin, attestation, cms, collateral, keys, meta, ops, policies, transfer
from keybroker.api.routes.transfer import TransferPool
from keybroker.audit.aggregate import AnonymousRefusals
from keybroker.errors import KeybrokerError, Unauthenticated
from keybroker.services import Services

log = structlog.get_logger("keybroker.api")
# Which routers each deployment role serves: everything in one process by default, or the attestation service
# alone (``keybroker serve --role attestation``) with a KBS elsewhere pointed at it.
ROLES: dict[str, tuple[APIRouter, ...]] = {
    "all": (
        meta.router,
        ops.router,
        transfer.router,
        keys.router,
        policies.router,
        admin.router,
        cms.router,
        attestation.router,
        collateral.router,
    ),
    "kbs": (meta.router, ops.router, transfer.router, keys.router, policies.router, admin.router, cms.router),
    "attestation": (meta.router, ops.router, admin.router, cms.router, attestation.router, collateral.router),
}
ROUTERS = ROLES["all"]


def api_routes() -> list[APIRoute]:
    """Every route the service has (paths include their router prefix)."""
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


def _template_finder(app: FastAPI) -> Callable[[Scope], str]:
    """The route template a request's scope would reach (for requests refused before routing)."""

    def template_of(scope: Scope) -> str:
        for route in app.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"

    return template_of


async def _token_is_valid(services: Services, header: str) -> bool:
    """Whether an ``Authorization`` header carries a valid token (asked only when its client's bucket is empty).
    An outage of the token store counts as valid: the route then answers 503, not a misleading 429."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    try:
        await run_in_threadpool(services.tokens.authenticate, token.strip())
    except Unauthenticated:
        return False
    except KeybrokerError:
        return True
    return True


def create_app(services: Services, role: str = "all", owns_services: bool = False) -> FastAPI:
    settings = services.settings
    refusals = AnonymousRefusals(
        services.audit, services.clock, timedelta(seconds=settings.limits.audit_window_seconds)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        costly = CostlyPool(settings.server.keygen_workers, settings.server.costly_queue)
        app.state.costly = costly
        app.state.transfer_pool = TransferPool(settings.server.transfer_threads)
        jobs = background.start(services, refusals, role)
        try:
            yield
        finally:
            await background.stop(jobs, refusals)
            costly.shutdown()
            app.state.transfer_pool.shutdown()
            if owns_services:
                services.close()

    # /openapi.json is served (docs/openapi.json is the same document); no /docs or /redoc: their pages load
    # Swagger UI / ReDoc from a CDN, which an air-gapped site cannot reach (docs/api.md says more).
    app = DocumentedAPI(
        title="keybroker",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # a redirect would be built from the request's Host header
        # FastAPI's OpenTelemetry hooks ask the environment for a provider on every request; keybroker exports
        # Prometheus metrics (/metrics) and logs of its own.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.services = services
    app.state.metrics = Metrics()
    app.state.refusals = refusals
    app.state.limits = RateClasses.from_settings(settings.limits)
    check_routes_declare_permissions(api_routes())
    for router in ROLES[role]:
        app.include_router(router)
    app.documented_routes = [route for router in ROLES[role] for route in router.routes if isinstance(route, APIRoute)]

    app.add_exception_handler(KeybrokerError, keybroker_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_middleware(HotRoutes, transfers=transfer.router in ROLES[role])  # inside RequestContextMiddleware
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.server.max_body_bytes,
        metrics=app.state.metrics,
        addresses=ClientAddresses(settings.limits.trusted_proxies),
        limits=app.state.limits,
        refusals=refusals,
        template_of=_template_finder(app),
        token_is_valid=functools.partial(_token_is_valid, services),
    )
    return app
