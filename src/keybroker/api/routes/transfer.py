"""POST /kbs/v1/keys/{id}/transfer (PROTOCOL.md §3): the nonce step, then background check or passport.

The hot path of the service. ``keybroker.api.hot`` calls ``handle`` directly, past FastAPI's routing and
dependency solving; the route below is what the OpenAPI document shows (and what serves the request if the hot
dispatcher is not in front). The nonce step runs on the event loop when it needs no I/O (an HMAC, and the key's
policy from memory); a transfer makes exactly one trip to the transfer pool (``TransferPool``) for everything that
blocks: the key lookup, verification, the policy, the backend read and the one database write.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from keybroker.api.audit_context import audit_context
from keybroker.api.deps import json_object_of, optional_principal, public
from keybroker.api.errors import problem
from keybroker.api.limits import retry_after
from keybroker.errors import KeybrokerError, NotFound, ServerBusy
from keybroker.net import client_key
from keybroker.services import Services
from keybroker.transfer.requests import mode_of, parse_transfer
from keybroker.transfer.service import TransferOutcome

router = APIRouter(tags=["transfer"])
T = TypeVar("T")
TEMPLATE = "/kbs/v1/keys/{key_id}/transfer"


class TransferPool:
    """The threads transfers block on (``server.transfer_threads``): a plain executor, without the per-call
    cancellation scopes and capacity limiter of Starlette's ``run_in_threadpool``. A transfer is mostly CPU under
    one interpreter lock, so a few threads do as much as many, and more of them only contend for it (2 threads
    instead of 40 cut the server CPU per transfer by a fifth: bench/README.md). A transfer that could not start
    within ``START_DEADLINE`` seconds (every thread held by a database or backend that does not answer) is not
    started at all: 503 ``server_busy`` with Retry-After, so that waiting in line adds at most that much to the
    outage bound of each request."""

    START_DEADLINE = 2.0

    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="keybroker-transfer")

    async def run(self, call: Callable[[], T]) -> T:
        future = self._executor.submit(call)
        waiting = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), self.START_DEADLINE)
        except TimeoutError:
            if future.cancel():  # still in line: it never ran
                raise ServerBusy(
                    "every transfer thread is waiting on the database or a backend; retry after Retry-After"
                ) from None
            return await waiting  # it has started: it finishes (and is audited) as it would have

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@router.post(TEMPLATE, dependencies=[public()])
async def transfer(key_id: str, request: Request) -> Response:
    """No bearer token is needed unless the key's policy names client permissions; attestation is the
    credential. An empty body (or ``{}``) without ``Attestation-Type`` asks for a nonce; everything else is a
    transfer request about the key: exactly one ``key.transfer`` audit entry whatever happens (PROTOCOL.md §10).

    Two refusals are not decisions about a key and are not audited one by one, so that an anonymous client cannot
    fill the audit log with them: a key that does not exist (counted in the anonymous aggregate), and, beyond the
    unauthenticated rate limit, requests refused before their evidence is looked at (an invalid token, a body that
    is not a transfer): those are charged to that limit, and over it answered 429 and aggregated."""
    return await handle(request, key_id)


async def handle(request: Request, key_id: str) -> Response:
    """The transfer endpoint, for the route above and for ``keybroker.api.hot``."""
    state = request.app.state
    services: Services = state.services
    header = request.headers.get("attestation-type")
    raw = await request.body()
    if header is None and _asks_for_nonce(raw):
        answer = services.transfer.nonce_from_memory(key_id)
        if answer is None:  # the policy not known recently, or a remote verifier: blocking work
            answer = await state.transfer_pool.run(lambda: services.transfer.nonce(key_id))
        nonce, types = answer
        return JSONResponse(nonce.as_json(), headers={"Attestation-Type": ",".join(types)})
    request.state.audited = True  # every outcome is audited (or aggregated) here; the error handler must not
    client = request.client.host if request.client else None
    limits = state.limits

    def release() -> TransferOutcome:
        try:
            looked_up = services.transfer.lookup(key_id)  # the key exists; once per request
        except NotFound as exc:
            raise _Aggregated(exc, "key_not_found") from None
        try:
            principal = optional_principal(request)  # an invalid token is refused before the body is examined
            body = json_object_of(request, raw) or {}
        except KeybrokerError as exc:
            wait = limits.unauthenticated.take(client_key(client))
            if wait:
                raise _Aggregated(exc, "rate_limited", wait) from None
            services.transfer.refused_before(key_id, exc, audit_context(request))
            raise
        try:
            parsed = parse_transfer(header, body)
        except KeybrokerError as exc:
            return services.transfer.refused(looked_up, mode_of(body), exc, audit_context(request))
        return services.transfer.transfer(looked_up, parsed, principal, audit_context(request))

    decisions = state.metrics.transfer_decisions
    try:
        outcome = await state.transfer_pool.run(release)
    except ServerBusy:  # never started: nothing was looked at (counted like the other refusals of that kind)
        state.refusals.add(client, f"POST {TEMPLATE}", "server_busy")
        decisions.labels("server_busy").inc()
        raise
    except _Aggregated as aggregated:
        state.refusals.add(client, f"POST {TEMPLATE}", aggregated.code)
        decisions.labels(aggregated.code).inc()
        if aggregated.wait:
            return problem(
                request,
                429,
                "rate_limited",
                "Too many requests",
                "this client has sent too many transfer requests that were refused before their evidence was "
                "looked at; retry after the time in Retry-After",
                headers={"Retry-After": retry_after(aggregated.wait)},
            )
        raise aggregated.error from None
    except KeybrokerError as exc:
        decisions.labels(exc.instance_code).inc()
        raise
    decisions.labels(outcome.decision).inc()
    if outcome.refusal is not None:
        raise outcome.refusal
    assert outcome.wrapped is not None
    return JSONResponse(outcome.wrapped.as_json())


class _Aggregated(Exception):
    """A refusal counted in the anonymous aggregate instead of its own audit entry (``wait``: over the limit)."""

    def __init__(self, error: KeybrokerError, code: str, wait: float = 0.0) -> None:
        super().__init__(code)
        self.error, self.code, self.wait = error, code, wait


_EMPTY_OBJECT = re.compile(rb"\{\s*\}")


def _asks_for_nonce(raw: bytes) -> bool:
    """Step 1 of the protocol: no body, or exactly ``{}``."""
    stripped = raw.strip()
    return not stripped or _EMPTY_OBJECT.fullmatch(stripped) is not None
