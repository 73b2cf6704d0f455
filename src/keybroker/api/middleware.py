"""ASGI middleware: the client's address, rate limits, request ids, an access log line per request, and the
request body size limit.

Before anything else the client address is resolved (``X-Forwarded-For`` only from trusted proxies) and written
into the scope, so that audit entries and limits see the same address. Then the rate limits
(``keybroker.api.limits``), before the body is read; over a limit is 429 ``rate_limited`` with ``Retry-After``,
counted into the anonymous refusals' audit aggregate:

* the attested endpoints take a token from their own bucket;
* a request without an ``Authorization`` header takes one from the unauthenticated bucket;
* a request with one is let through while that bucket has tokens, and charged to it afterwards unless its token
  proved valid (a principal was established), whatever the route (a public route does not look at the header). When
  the bucket is empty its token is checked first: only a valid one passes. So a made-up header buys nothing, and a
  valid token is never limited, even from an address that others exhaust.

The body limit is enforced while reading (a lying or absent Content-Length changes nothing): a body larger than
``max_body_bytes`` gets 413 before any route sees it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keybroker.api.errors import PROBLEM_CONTENT_TYPE, problem_body
from keybroker.api.limits import DEFERRED, UNAUTHENTICATED, ClientAddresses, RateClasses, retry_after
from keybroker.api.metrics import Metrics
from keybroker.audit.aggregate import AnonymousRefusals
from keybroker.logs import log_request
from keybroker.net import client_key

_DISCONNECTED = b"\0disconnected"  # sentinel (compared by identity)
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
log = structlog.get_logger("keybroker.access")


_KEY_OPERATIONS = {
    ("POST", "/kbs/v1/keys"): "create",
    ("PUT", "/kbs/v1/keys/{key_id}"): "update",
    ("DELETE", "/kbs/v1/keys/{key_id}"): "delete",
}


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        metrics: Metrics,
        addresses: ClientAddresses,
        limits: RateClasses,
        refusals: AnonymousRefusals,
        template_of: Callable[[Scope], str],
        token_is_valid: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.addresses = addresses
        self.limits = limits
        self.refusals = refusals
        self.template_of = template_of  # the route template a request would reach (before routing)
        self.token_is_valid = token_is_valid  # for a request that carries a token when its bucket is empty

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        client, rate_class = self._classify(scope)
        state["rate_class"] = rate_class
        started = time.perf_counter()
        status_holder = {"status": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        key = client_key(client)
        try:
            wait = await self._admit(scope, rate_class, key)
            if wait:
                self._refused(scope, client, "rate_limited")
                await _rate_limited(send_with_id, request_id, wait)
                return
            body = await self._read_body(scope, receive)
            if body is _DISCONNECTED:
                return  # the client went away mid-body: nothing of a partial request may be acted on
            if body is None:
                self._refused(scope, client, "payload_too_large")  # before any token or transfer was looked at
                await _too_large(send_with_id, request_id, self.max_body_bytes)
                return
            try:
                await self.app(scope, _replay(body), send_with_id)
            except Exception as exc:
                # Handled here so that nothing (uvicorn's fallback logger included) prints a traceback whose
                # frames or messages might hold request data. The type is enough to start an investigation.
                log.error(
                    "unhandled_exception",
                    error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                    request_id=request_id,
                    path=scope["path"],
                )
                if status_holder["status"] == 0:
                    await _internal_error(send_with_id, request_id)
        finally:
            if rate_class == DEFERRED and "principal" not in state:
                self.limits.unauthenticated.take(key)  # its token did not prove valid
            self._record(scope, status_holder["status"], time.perf_counter() - started, request_id)

    async def _admit(self, scope: Scope, rate_class: str | None, key: str) -> float:
        """0.0 if the request may proceed, else the seconds its client should wait."""
        if rate_class != DEFERRED:
            assert rate_class is not None
            return self.limits.buckets(rate_class).take(key)
        buckets = self.limits.unauthenticated
        if buckets.peek(key):
            return 0.0
        header = _header(scope, b"authorization") or ""
        return 0.0 if await self.token_is_valid(header) else buckets.take(key) or 1.0 / buckets.rate

    def _refused(self, scope: Scope, client: str | None, code: str) -> None:
        """Count a refusal made before routing into the anonymous aggregate, under the route it would reach."""
        scope["state"]["template"] = self.template_of(scope)
        self.refusals.add(client, f"{scope['method']} {scope['state']['template']}", code)

    def _classify(self, scope: Scope) -> tuple[str | None, str | None]:
        """The client's address (written into the scope) and the rate class the request is charged to up front."""
        peer = scope.get("client")
        forwarded = b",".join(value for name, value in scope.get("headers", []) if name.lower() == b"x-forwarded-for")
        client = self.addresses.resolve(peer[0] if peer else None, forwarded.decode("latin-1") or None)
        if peer is not None and client != peer[0]:
            scope["client"] = (client, peer[1])
        rate_class = RateClasses.classify(scope["method"], scope["path"])
        if rate_class is None:
            rate_class = UNAUTHENTICATED if _header(scope, b"authorization") is None else DEFERRED
        return client, rate_class

    def _record(self, scope: Scope, status: int, elapsed: float, request_id: str) -> None:
        """Metrics and the access log line of a finished request."""
        # The route template, not the path: ids must not explode the metrics' label space.
        route = getattr(scope.get("route"), "path", None) or scope["state"].get("template") or "unmatched"
        method = scope["method"]
        self.metrics.request_done(method, route, status, elapsed)
        operation = _KEY_OPERATIONS.get((method, route))
        if operation:
            outcome = "success" if 200 <= status < 300 else f"http_{status}"
            self.metrics.key_operations.labels(operation, outcome).inc()
        log_request(
            {
                "method": method,
                "path": scope["path"],
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
                "request_id": request_id,
                "client": (scope.get("client") or ("-",))[0],
            }
        )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _DISCONNECTED
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _request_id(scope: Scope) -> str:
    supplied = _header(scope, b"x-request-id")
    if supplied and _SAFE_REQUEST_ID.fullmatch(supplied):
        return supplied
    return uuid.uuid4().hex


async def _too_large(send: Send, request_id: str, limit: int) -> None:
    await _problem(
        send, request_id, 413, "payload_too_large", "Payload too large", f"the request body exceeds {limit} bytes"
    )


async def _rate_limited(send: Send, request_id: str, wait: float) -> None:
    await _problem(
        send,
        request_id,
        429,
        "rate_limited",
        "Too many requests",
        "this client has sent too many requests; retry after the time in Retry-After",
        [(b"retry-after", retry_after(wait).encode())],
    )


async def _internal_error(send: Send, request_id: str) -> None:
    await _problem(send, request_id, 500, "internal_error", "Internal error", "an unexpected error occurred")


async def _problem(
    send: Send,
    request_id: str,
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    payload = json.dumps(problem_body(status, code, title, detail, request_id)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
