"""Connection guards below HTTP: what a slow or greedy client can hold, bounded in time and size.

* ``Gate`` is the protocol of every accepted connection. It counts the connection against its client's bound
  (``limits.max_connections_per_address``; an IPv6 client by its /64; trusted proxies exempt) *before* any TLS
  work, then puts the loop's TLS protocol in place itself, with a handshake deadline of
  ``server.header_timeout_seconds``, and hands the connection to the HTTP protocol. (Had the event loop done the
  handshake, a connection would be visible only once it was complete, and unfinished handshakes would escape the
  bound.)
* ``GuardedHttpProtocol`` is uvicorn's httptools protocol with three more limits: the request head (request line
  and headers) must be complete within ``server.header_timeout_seconds`` and fit in ``server.max_header_bytes``
  (408 and 431 otherwise), and the body must arrive within the head timeout plus one second per
  ``BODY_MIN_BYTES_PER_SECOND`` it declares (408). uvicorn itself only bounds the idle time between requests.

Everything here runs on the event loop's thread; the counters need no lock.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import functools
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from keybroker.net import client_key, normalise

if TYPE_CHECKING:
    from keybroker.api.server import KeybrokerConfig

log = structlog.get_logger("keybroker.server")

BODY_MIN_BYTES_PER_SECOND = 64 * 1024

# Open connections per client key in this process.
_open: dict[str, int] = {}


def _count(key: str) -> None:
    _open[key] = _open.get(key, 0) + 1


def _uncount(key: str) -> None:
    left = _open.get(key, 1) - 1
    if left > 0:
        _open[key] = left
    else:
        _open.pop(key, None)


def open_connections(key: str) -> int:
    return _open.get(key, 0)


class Gate(asyncio.Protocol):
    """An accepted connection until its HTTP protocol takes over (see the module docstring)."""

    def __init__(
        self,
        inner: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext | None,
        config: KeybrokerConfig,
    ) -> None:
        self._inner = inner
        self._context = context
        self._config = config
        self._key: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        peer = transport.get_extra_info("peername")
        address = normalise(peer[0]) if isinstance(peer, tuple) and peer else None
        if address is not None and not self._config.addresses.is_trusted(address):
            key = client_key(address)
            if open_connections(key) >= self._config.max_connections_per_address:
                log.warning("connection_refused", reason="too_many_connections", client=address)
                transport.abort()
                return
            _count(key)
            self._key = key
        protocol = self._inner()
        if isinstance(protocol, GuardedHttpProtocol):
            protocol.counted_as, self._key = self._key, None  # the HTTP protocol releases the count when it closes
        if self._context is None:
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            return
        # The TLS layer is put in place here, synchronously, so that not one byte of the ClientHello can arrive
        # before it (which a task running loop.start_tls later would allow). It calls the HTTP protocol's
        # connection_made once the handshake is done.
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        secured = _ssl_protocol(loop)(
            loop,
            protocol,
            self._context,
            done,
            server_side=True,
            ssl_handshake_timeout=self._config.header_timeout,
            ssl_shutdown_timeout=self._config.header_timeout,  # a closing connection must not wait 30 s for a peer
        )
        # As loop.start_tls does it: reading paused around the switch, so that the transport reads for the TLS
        # protocol the way that one reads (buffered), not the way it began reading for this one.
        transport.pause_reading()
        transport.set_protocol(secured)
        loop.call_soon(secured.connection_made, transport)
        loop.call_soon(transport.resume_reading)
        done.add_done_callback(functools.partial(_handshake_done, protocol))

    def _release(self) -> None:
        if self._key is not None:
            _uncount(self._key)
            self._key = None

    def connection_lost(self, exc: Exception | None) -> None:
        """Only while the gate is still the transport's protocol (a refused connection)."""
        self._release()


def _handshake_done(protocol: asyncio.Protocol, done: asyncio.Future[None]) -> None:
    """A failed or abandoned handshake: the HTTP protocol never saw the connection, so release its count here."""
    failed = done.cancelled() or done.exception() is not None
    if failed and isinstance(protocol, GuardedHttpProtocol) and protocol.counted_as is not None:
        _uncount(protocol.counted_as)
        protocol.counted_as = None


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol class of ``loop``: uvloop's own (in C) on uvloop, asyncio's otherwise."""
    try:
        import uvloop
        from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]  # in uvloop's C module, not its stubs
    except ImportError:
        return asyncio.sslproto.SSLProtocol
    return SSLProtocol if isinstance(loop, uvloop.Loop) else asyncio.sslproto.SSLProtocol


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines and a size bound for the request head and the body."""

    config: KeybrokerConfig

    def __init__(self, config: KeybrokerConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_head = False
        self._head_bytes = 0
        self.counted_as: str | None = None  # set by the Gate

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's signature
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.counted_as is not None:
            _uncount(self.counted_as)
            self.counted_as = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # Counted after the parser has seen the chunk: a chunk that completes the head (and may carry the body)
            # resets the count in on_headers_complete instead.
            self._head_bytes += len(data)
            if self._head_bytes > self.config.max_header_bytes:
                self._refuse(b"431 Request Header Fields Too Large", "header_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head()  # the next request on a kept-alive connection gets its own deadline and budget

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._disarm()
        super().on_headers_complete()
        declared = next((value for name, value in self.headers if name == b"content-length"), None)
        chunked = any(name == b"transfer-encoding" for name, _ in self.headers)
        if declared is not None or chunked:
            size = int(declared) if declared is not None and declared.isdigit() else self.config.max_body_bytes
            allowed = self.config.header_timeout + min(size, self.config.max_body_bytes) / BODY_MIN_BYTES_PER_SECOND
            self._deadline = self.loop.call_later(allowed, self._too_slow, "body_timeout")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _start_head(self) -> None:
        if not self._in_head:
            self._in_head, self._head_bytes = True, 0
            self._disarm()
            self._deadline = self.loop.call_later(self.config.header_timeout, self._too_slow, "header_timeout")

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, reason: str) -> None:
        self._deadline = None
        self._refuse(b"408 Request Timeout", reason)

    def _refuse(self, status: bytes, reason: str) -> None:
        if self.transport.is_closing():
            return
        log.info("connection_closed", reason=reason, client=self.client[0] if self.client else None)
        # A status line only where the client expects one: not while an earlier (pipelined) request's response is
        # still due, nor after this request's response has begun.
        idle = self.cycle is None or self.cycle.response_complete
        if idle or (not self._in_head and not self.cycle.response_started):
            self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        if self.cycle is not None and not self._in_head:
            self.cycle.disconnected = True  # the application sees a disconnect, not a partial body
            self.cycle.message_event.set()
        self.transport.close()
