"""Serving the application: uvicorn, in one process or several, with keybroker's connection guards.

* **The same settings in every process.** The ``Settings`` loaded once by ``keybroker serve`` travel to each
  worker inside the (pickled) uvicorn configuration, so every setting takes effect the same with 1 or N workers;
  a worker reads no file and no environment to find them again.
* **Slow clients.** A connection whose TLS handshake, or whose request line and headers, take longer than
  ``server.header_timeout_seconds`` is closed (uvicorn itself only bounds the idle time between requests), and no
  address may hold more than ``limits.max_connections_per_address`` open connections in a process.
* **Client addresses.** uvicorn's own ``X-Forwarded-For`` handling is off (it believes any loopback peer); the
  API resolves addresses itself, believing only ``limits.trusted_proxies`` (``keybroker.api.limits``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from keybroker.config import Settings

log = structlog.get_logger("keybroker.server")

# Open connections per client address in this process (the event loop's thread is the only one touching it).
_open_connections: dict[str, int] = {}


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for the request head and a per-address connection bound."""

    config: KeybrokerConfig

    def __init__(self, config: KeybrokerConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._counted: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's signature
        super().connection_made(transport)
        address = self.client[0] if self.client else None
        if address is not None:
            open_now = _open_connections.get(address, 0)
            if open_now >= self.config.max_connections_per_address:
                log.warning("connection_refused", reason="too_many_connections", client=address, open=open_now)
                transport.abort()
                return
            _open_connections[address] = open_now + 1
            self._counted = address
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        if self._counted is not None:
            left = _open_connections.get(self._counted, 1) - 1
            if left > 0:
                _open_connections[self._counted] = left
            else:
                _open_connections.pop(self._counted, None)
            self._counted = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_deadline()  # the next request on a kept-alive connection gets its own deadline

    def on_headers_complete(self) -> None:
        self._disarm_head_deadline()
        super().on_headers_complete()

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.config.header_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        log.info("connection_closed", reason="header_timeout", client=self.client[0] if self.client else None)
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
        self.transport.close()


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _handshake_bounded(base: type[asyncio.AbstractEventLoop], timeout: float) -> LoopFactory:
    """An event loop class whose TLS servers give up on a handshake, or on a closing handshake, after ``timeout``
    (asyncio's defaults: 60 and 30 s)."""

    class Loop(base):  # type: ignore[valid-type,misc]  # a class made from a runtime base
        async def create_server(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", timeout)
                # A closed TLS connection waits for the peer's close_notify (asyncio: 30 s); a slow client must not
                # hold it that long.
                kwargs.setdefault("ssl_shutdown_timeout", timeout)
            return await super().create_server(*args, **kwargs)

    return Loop


class KeybrokerConfig(uvicorn.Config):
    """uvicorn's configuration plus the guards' settings; pickled whole into each worker process."""

    def __init__(self, app: Any, settings: Settings, **options: Any) -> None:
        self.header_timeout = settings.server.header_timeout_seconds
        self.max_connections_per_address = settings.limits.max_connections_per_address
        super().__init__(
            app,
            host=settings.server.host,
            port=settings.server.port,
            http=GuardedHttpProtocol,
            proxy_headers=False,
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=True,
            timeout_graceful_shutdown=10,
            **options,
        )

    def get_loop_factory(self) -> LoopFactory | None:
        try:
            import uvloop

            base: type[asyncio.AbstractEventLoop] = uvloop.Loop
        except ImportError:  # not on Linux: the standard loop
            base = asyncio.SelectorEventLoop
        return _handshake_bounded(base, self.header_timeout)


def worker_app(settings: Settings) -> Any:
    """The application of one of several server processes: it builds its own services (database connections and
    backend sessions cannot be shared across processes) from the settings the parent loaded."""
    from keybroker.api.app import create_app
    from keybroker.logs import configure_logging
    from keybroker.services import build_services

    configure_logging(settings.logging)
    return create_app(build_services(settings), settings.server.role, owns_services=True)


def run(settings: Settings, app: Any, tls: dict[str, Any]) -> None:
    """Serve ``app`` in this process, or (``server.workers`` > 1) ``settings.server.workers`` processes that each
    build their own application with ``worker_app``; ``app`` is then not used."""
    if settings.server.workers > 1:
        config = KeybrokerConfig(
            functools.partial(worker_app, settings), settings, factory=True, workers=settings.server.workers, **tls
        )
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    uvicorn.Server(KeybrokerConfig(app, settings, **tls)).run()
