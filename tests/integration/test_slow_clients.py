"""Slow clients against a real server: request heads that take too long, TLS handshakes that never finish, and
too many connections from one address are all cut off, while normal clients are served."""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Server, start_server, stop

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    toml = f"[server]\nheader_timeout_seconds = {TIMEOUT}\n[limits]\nmax_connections_per_address = 5\n"
    running = start_server(tmp_path_factory.mktemp("slow") / ".data", toml=toml)
    try:
        yield running
    finally:
        stop(running.process)


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("https://").split(":")
    return host, int(port)


def _tls(server: Server) -> ssl.SSLSocket:
    raw = socket.create_connection(_address(server), timeout=10)
    return server.verify().wrap_socket(raw, server_hostname="127.0.0.1")


def _closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Read until the server closes; how long that took and what it sent."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic() - started, received


def _get(sock: ssl.SSLSocket) -> bytes:
    """GET /healthz on an open connection: the whole response."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    received = b""
    while not received.endswith(b'{"status":"ok"}'):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_an_unfinished_request_head_is_closed_with_408(server: Server) -> None:
    with _tls(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the head never ends
        took, received = _closed_after(sock, 10)
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 3
    assert received.startswith(b"HTTP/1.1 408 ")


def test_a_head_dribbled_byte_by_byte_is_closed_too(server: Server) -> None:
    """Each byte resets no deadline: the whole head must arrive within the timeout."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60
    with _tls(server) as sock:
        started = time.monotonic()
        received = b""
        for byte in head:
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                received = sock.recv(4096)
                break
        took = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 ")
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 2


def test_a_tls_handshake_that_never_starts_is_closed(server: Server) -> None:
    with socket.create_connection(_address(server), timeout=10) as raw:
        took, received = _closed_after(raw, 10)
    assert received == b""
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 3


def test_the_next_request_on_a_kept_alive_connection_gets_its_own_deadline(server: Server) -> None:
    with _tls(server) as sock:
        for _ in range(3):
            assert _get(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(TIMEOUT * 0.6)  # idle between requests: not a slow head (keep-alive is 5 s)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        took, received = _closed_after(sock, 10)
    assert b"408" in received
    assert took < TIMEOUT + 3


def test_connections_per_address_are_bounded(server: Server) -> None:
    held = [_tls(server) for _ in range(5)]
    try:
        for sock in held:
            assert _get(sock).startswith(b"HTTP/1.1 200 ")
        extra = _tls(server)  # the handshake completes, then the server drops the connection
        with extra:
            try:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                _, received = _closed_after(extra, 5)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                received = b""
        assert b"200" not in received
        held.pop().close()
        time.sleep(0.2)
        with _tls(server) as again:
            assert _get(again).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()
