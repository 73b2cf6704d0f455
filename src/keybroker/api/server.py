"""Serving the application: uvicorn, in one process or several, with keybroker's connection guards.

* **The same settings in every process.** The ``Settings`` loaded once by ``keybroker serve`` travel to each
  worker inside the (pickled) uvicorn configuration, so every setting takes effect the same with 1 or N workers;
  a worker reads no file and no environment to find them again. With several workers, SIGHUP reloads the settings
  (file and environment, as at start) and replaces the workers one by one; an invalid configuration is refused
  and the running workers are kept. (``listen`` and ``workers`` themselves need a restart.)
* **Slow and greedy clients** are bounded by ``keybroker.api.connections``: the event loop's TLS servers are
  replaced by its ``Gate``, which counts each connection before the handshake and does the handshake itself.
* **Client addresses.** uvicorn's own ``X-Forwarded-For`` handling is off (it believes any loopback peer); the
  API resolves addresses itself, believing only ``limits.trusted_proxies`` (``keybroker.api.limits``).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from typing import Any

import structlog
import uvicorn
from uvicorn.supervisors import Multiprocess

from keybroker.api.connections import Gate, GuardedHttpProtocol
from keybroker.api.limits import ClientAddresses
from keybroker.config import Settings
from keybroker.errors import ConfigurationError

log = structlog.get_logger("keybroker.server")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _gated(base: type[asyncio.AbstractEventLoop], config: KeybrokerConfig) -> LoopFactory:
    """An event loop class whose servers put a ``Gate`` in front of every accepted connection (and leave the TLS
    handshake to it)."""

    class Loop(base):  # type: ignore[valid-type,misc]  # a class made from a runtime base
        async def create_server(
            self, protocol_factory: Callable[[], asyncio.Protocol], *args: Any, **kwargs: Any
        ) -> Any:
            context: ssl.SSLContext | None = kwargs.pop("ssl", None)
            return await super().create_server(lambda: Gate(protocol_factory, context, config), *args, **kwargs)

    return Loop


class KeybrokerConfig(uvicorn.Config):
    """uvicorn's configuration plus the guards' settings; pickled whole into each worker process."""

    def __init__(self, app: Any, settings: Settings, **options: Any) -> None:
        self.header_timeout = settings.server.header_timeout_seconds
        self.max_header_bytes = settings.server.max_header_bytes
        self.max_body_bytes = settings.server.max_body_bytes
        self.max_connections_per_address = settings.limits.max_connections_per_address
        self.addresses = ClientAddresses(settings.limits.trusted_proxies)
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
        return _gated(base, self)


def worker_app(settings: Settings) -> Any:
    """The application of one of several server processes: it builds its own services (database connections and
    backend sessions cannot be shared across processes) from the settings the parent loaded."""
    from keybroker.api.app import create_app
    from keybroker.logs import configure_logging
    from keybroker.services import build_services

    configure_logging(settings.logging)
    return create_app(build_services(settings), settings.server.role, owns_services=True)


class _Workers(Multiprocess):
    """uvicorn's supervisor; SIGHUP reloads the settings before the workers are replaced."""

    def __init__(self, config: KeybrokerConfig, reload: Callable[[], Settings], **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._reload = reload

    def handle_hup(self) -> None:
        try:
            settings = self._reload()
        except ConfigurationError as exc:
            log.error("reload_refused", detail=exc.detail)
            return
        self.config.app = functools.partial(worker_app, settings)
        log.info("settings_reloaded", detail="replacing the worker processes")
        super().handle_hup()


def run(settings: Settings, app: Any, tls: dict[str, Any], reload: Callable[[], Settings] | None = None) -> None:
    """Serve ``app`` in this process, or (``server.workers`` > 1) ``settings.server.workers`` processes that each
    build their own application with ``worker_app``; ``app`` is then not used, and ``reload`` (loading the settings
    again, as at start) is what SIGHUP calls."""
    if settings.server.workers > 1:
        config = KeybrokerConfig(
            functools.partial(worker_app, settings), settings, factory=True, workers=settings.server.workers, **tls
        )
        _Workers(config, reload or (lambda: settings), sockets=[config.bind_socket()]).run()
        return
    uvicorn.Server(KeybrokerConfig(app, settings, **tls)).run()
