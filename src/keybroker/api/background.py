"""The server's background jobs, started and stopped with the application.

Per process: the anonymous refusals' aggregates (every second), Vault token renewal, and this replica's heartbeat
(``storage.cluster.HEARTBEAT``). Once at a time across the cluster, where its lease is held (``storage.cluster``):
the outbox reconciler, the collateral refresh, the purge of expired nonces. A lease lasts a little more than two
rounds of its job; its holder renews it every round, and if the holder dies another replica takes over when it
expires.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import structlog
from starlette.concurrency import run_in_threadpool

from keybroker import __version__
from keybroker.attestation.pcs import refresh_due
from keybroker.audit.aggregate import AnonymousRefusals
from keybroker.services import Services
from keybroker.storage.cluster import HEARTBEAT
from keybroker.storage.db import schema_head

log = structlog.get_logger("keybroker.api")


async def _leased(services: Services, name: str, interval: float, job: Callable[[], Awaitable[None]]) -> None:
    """Run ``job`` every ``interval`` seconds while this process holds the lease ``name``."""
    ttl = timedelta(seconds=interval * 2 + 30)
    while True:
        try:
            if await run_in_threadpool(services.leases.acquire, name, ttl):
                await job()
        except Exception as exc:  # a failed round (database, backend) must not end the loop
            log.warning(f"{name}_failed", error_type=type(exc).__name__)
        await asyncio.sleep(interval)


def _purge_nonces(services: Services) -> Callable[[], Awaitable[None]]:
    async def job() -> None:
        await run_in_threadpool(services.attestation.nonces.purge)

    return job


def _reconcile(services: Services) -> Callable[[], Awaitable[None]]:
    older = timedelta(seconds=services.settings.keys.reconcile_after_seconds)

    async def job() -> None:
        result = await run_in_threadpool(services.keys.reconcile, older)
        if result.finished or result.waiting:
            log.info("backends_reconciled", finished=result.finished, waiting=result.waiting)

    return job


def _refresh_collateral(services: Services) -> Callable[[], Awaitable[None]]:
    config = services.settings.attestation
    assert services.upstream is not None
    upstream = services.upstream

    async def job() -> None:
        before = timedelta(seconds=config.refresh_before_seconds)
        fetched = await run_in_threadpool(refresh_due, upstream, services.collateral, services.clock.now(), before)
        if fetched:
            log.info("collateral_refreshed", items=fetched)

    return job


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


async def _flush_refusals(refusals: AnonymousRefusals) -> None:
    """Write the anonymous refusals' aggregate entries once their window has closed (checked every second)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            await run_in_threadpool(refusals.flush_due)
        except Exception as exc:  # an audit outage: the counts are kept for the next round
            log.warning("audit_aggregate_failed", error_type=type(exc).__name__)


async def _heartbeat(services: Services) -> None:
    """Tell the cluster this replica is alive, with the schema revision it finds (``keybroker cluster status``);
    a schema another replica has moved away from this code's is logged (and /readyz answers 503 for it)."""
    head = schema_head()
    while True:
        try:
            revision = await run_in_threadpool(services.database.schema_revision) or "?"
            if revision != head:
                log.warning("schema_mismatch", schema_revision=revision, code_revision=head)
            await run_in_threadpool(
                services.replicas.heartbeat, services.replica_id, services.address, __version__, revision
            )
        except Exception as exc:
            log.warning("heartbeat_failed", error_type=type(exc).__name__)
        await asyncio.sleep(HEARTBEAT.total_seconds())


def start(services: Services, refusals: AnonymousRefusals, role: str) -> list[asyncio.Task[Any]]:
    jobs = [
        asyncio.create_task(_flush_refusals(refusals)),
        asyncio.create_task(_renew_vault_tokens(services)),
        asyncio.create_task(_heartbeat(services)),
        asyncio.create_task(_leased(services, "nonce-purge", 600, _purge_nonces(services))),
    ]
    if role != "attestation":
        interval = services.settings.keys.reconcile_interval_seconds
        jobs.append(asyncio.create_task(_leased(services, "reconcile", interval, _reconcile(services))))
    if services.upstream is not None:
        interval = services.settings.attestation.refresh_interval_seconds
        jobs.append(
            asyncio.create_task(_leased(services, "collateral-refresh", interval, _refresh_collateral(services)))
        )
    return jobs


async def stop(jobs: list[asyncio.Task[Any]], refusals: AnonymousRefusals) -> None:
    for job in jobs:
        job.cancel()
    for job in jobs:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await job
    try:
        await run_in_threadpool(refusals.flush_all)
    except Exception as exc:
        log.warning("audit_aggregate_failed", error_type=type(exc).__name__, lost=refusals.pending())
