"""``create_app(services)``: the FastAPI application, with no globals; everything arrives through ``services``."""

from __future__ import annotations

import asyncio
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
from keybroker.api.costly import CostlyPool
from keybroker.api.deps import check_routes_declare_permissions
from keybroker.api.errors import (
    http_error_handler,
    keybroker_error_handler,
    validation_error_handler,
)
from keybroker.api.limits import ClientAddresses, RateClasses
from keybroker.api.metrics import Metrics
from keybroker.api.middleware import RequestContextMiddleware
from keybroker.api.routes import admin, attestation, cms, collateral, keys, meta, ops, policies, transfer
from keybroker.attestation.pcs import refresh_due
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


async def _purge_nonces(services: Services) -> None:
    """Forget used nonces once they have expired anyway (their single use no longer needs remembering)."""
    while True:
        await asyncio.sleep(600)
        try:
            await run_in_threadpool(services.attestation.nonces.purge)
        except Exception as exc:
            log.warning("nonce_purge_failed", error_type=type(exc).__name__)


async def _reconcile_backends(services: Services) -> None:
    """Finish key writes that a crash or an unreachable backend interrupted (KeyService's outbox)."""
    config = services.settings.keys
    while True:
        try:
            result = await run_in_threadpool(services.keys.reconcile, timedelta(seconds=config.reconcile_after_seconds))
            if result.finished or result.waiting:
                log.info("backends_reconciled", finished=result.finished, waiting=result.waiting)
        except Exception as exc:  # a failed round must not end the loop
            log.warning("backends_reconcile_failed", error_type=type(exc).__name__)
        await asyncio.sleep(config.reconcile_interval_seconds)


async def _renew_vault_tokens(services: Services) -> None:
    """Renew Vault/OpenBao tokens in time even when no request comes (a quiet instance would miss the window)."""
    if services.backends is None:
        return
    holders = (*services.backends.stores.values(), *services.backends.wrappers)
    renewers = [holder.renew_if_due for holder in holders if hasattr(holder, "renew_if_due")]
    while renewers:
        delays: list[float] = []
        for renew in renewers:
            try:
                due = await run_in_threadpool(renew)
                if due is not None:
                    delays.append(float(due))
            except Exception as exc:  # refused credentials or TLS: report, keep going
                log.warning(
                    "vault_token_renewal_failed",
                    error_type=type(exc).__name__,
                    code=getattr(exc, "instance_code", None),
                )
                delays.append(60.0)
        await asyncio.sleep(min(max(min(delays, default=60.0), 1.0), 60.0))


async def _refresh_collateral(services: Services) -> None:
    """Fetch collateral from the upstream before it expires, every ``refresh_interval_seconds``."""
    config = services.settings.attestation
    assert services.upstream is not None
    while True:
        try:
            fetched = await run_in_threadpool(
                refresh_due,
                services.upstream,
                services.collateral,
                services.clock.now(),
                timedelta(seconds=config.refresh_before_seconds),
            )
            if fetched:
                log.info("collateral_refreshed", items=fetched)
        except Exception as exc:  # a failed round must not end the loop
            log.warning("collateral_refresh_failed", error_type=type(exc).__name__)
        await asyncio.sleep(config.refresh_interval_seconds)


def api_routes() -> list[APIRoute]:
    """Every route the service has (paths include their router prefix)."""
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


async def _flush_refusals(refusals: AnonymousRefusals) -> None:
    """Write the anonymous refusals' aggregate entries once their window has closed (checked every second)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            await run_in_threadpool(refusals.flush_due)
        except Exception as exc:  # an audit outage: the counts are kept for the next round
            log.warning("audit_aggregate_failed", error_type=type(exc).__name__)


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
        flusher = asyncio.create_task(_flush_refusals(refusals))
        refresher = asyncio.create_task(_refresh_collateral(services)) if services.upstream is not None else None
        purger = asyncio.create_task(_purge_nonces(services))
        reconciler = asyncio.create_task(_reconcile_backends(services)) if role != "attestation" else None
        renewer = asyncio.create_task(_renew_vault_tokens(services))
        try:
            yield
        finally:
            flusher.cancel()
            try:
                await run_in_threadpool(refusals.flush_all)
            except Exception as exc:
                log.warning("audit_aggregate_failed", error_type=type(exc).__name__, lost=refusals.pending())
            purger.cancel()
            if reconciler is not None:
                reconciler.cancel()
            renewer.cancel()
            if refresher is not None:
                refresher.cancel()
            costly.shutdown()
            if owns_services:
                services.close()

    app = FastAPI(
        title="keybroker",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        redirect_slashes=False,  # a redirect would be built from the request's Host header
    )
    app.state.services = services
    app.state.metrics = Metrics()
    app.state.refusals = refusals
    app.state.limits = RateClasses.from_settings(settings.limits)
    check_routes_declare_permissions(api_routes())
    for router in ROLES[role]:
        app.include_router(router)

    app.add_exception_handler(KeybrokerError, keybroker_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
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
