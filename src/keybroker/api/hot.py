"""The hot routes, served past FastAPI's router: ``GET /healthz`` and ``POST /kbs/v1/keys/{key_id}/transfer``.

Every request of a key transfer (two per transfer) and every load balancer's health probe goes through here.
FastAPI's routing (matching the path against every route) and dependency solving cost more than the work of these
routes, so this ASGI layer, inside ``RequestContextMiddleware`` (which has resolved the client, applied the rate
limits, read the body and will log the request), recognises them by their path and calls their handlers directly;
every other request goes on to FastAPI unchanged. Refusals are rendered by the same exception handlers as every
other route's (``keybroker.api.errors``). The routes stay declared in their routers, which is what the OpenAPI
document shows.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from keybroker.api.errors import keybroker_error_handler
from keybroker.api.routes import meta
from keybroker.api.routes import transfer as transfer_route
from keybroker.errors import KeybrokerError

_KEYS, _TRANSFER = "/kbs/v1/keys/", "/transfer"
_HEALTHY = json.dumps(meta.healthz(), separators=(",", ":")).encode()
_HEALTHY_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-length", str(len(_HEALTHY)).encode()), (b"content-type", b"application/json")],
}


class HotRoutes:
    def __init__(self, app: ASGIApp, transfers: bool) -> None:
        self.app = app
        self.transfers = transfers  # this deployment role serves key transfers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and path == "/healthz":
                scope["state"]["template"] = "/healthz"
                await send(_HEALTHY_START)
                await send({"type": "http.response.body", "body": _HEALTHY})
                return
            if self.transfers and method == "POST" and path.startswith(_KEYS) and path.endswith(_TRANSFER):
                key_id = path[len(_KEYS) : -len(_TRANSFER)]
                if key_id and "/" not in key_id:  # the route's {key_id}: one path segment
                    await self._transfer(scope, receive, send, key_id)
                    return
        await self.app(scope, receive, send)

    async def _transfer(self, scope: Scope, receive: Receive, send: Send, key_id: str) -> None:
        scope["state"]["template"] = transfer_route.TEMPLATE
        scope["path_params"] = {"key_id": key_id}
        request = Request(scope, receive)
        try:
            response = await transfer_route.handle(request, key_id)
        except KeybrokerError as exc:
            response = await keybroker_error_handler(request, exc)
        await response(scope, receive, send)
