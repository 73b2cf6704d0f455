"""Slow clients against a real server: request heads that take too long, TLS handshakes that never finish, and
too many connections from one address are all cut off, while normal clients are served."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A longer deadline, for the tests whose point is not the deadline (a loaded machine is slow)."""
    toml = "[server]\nheader_timeout_seconds = 10\n[limits]\nmax_connections_per_address = 5\n"
    running = start_server(tmp_path_factory.mktemp("patient") / ".data", toml=toml)
    try:
        yield running
    finally:
        stop(running.process)


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("https://").split(":")
    return host, int(port)


def _tls(server: Server) -> ssl.SSLSocket:
    raw = socket.create_connection(_address(server), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small writes leave at once (no Nagle delay)
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


def _poll(sock: ssl.SSLSocket) -> bytes:
    """Application data the server has sent, without waiting. (select() alone would also wake for TLS 1.3
    session tickets, and a recv() then blocks waiting for data that is not coming.)"""
    sock.settimeout(0.01)
    try:
        return sock.recv(4096)
    except (TimeoutError, ssl.SSLWantReadError):
        return b""
    finally:
        sock.settimeout(10)


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
            time.sleep(0.1)
            received = _poll(sock)
            if received:
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
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # refused at accept: no handshake at all
            _tls(server)
        held.pop().close()
        time.sleep(0.2)
        with _tls(server) as again:
            assert _get(again).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()


def test_unfinished_handshakes_count_against_the_bound(patient: Server) -> None:
    """Connections that never send a ClientHello hold their place until the handshake deadline ends them."""
    pending = [socket.create_connection(_address(patient), timeout=10) for _ in range(5)]
    try:
        time.sleep(0.2)
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            _tls(patient)
    finally:
        for sock in pending:
            sock.close()
    time.sleep(0.5)
    with _tls(patient) as again:
        assert _get(again).startswith(b"HTTP/1.1 200 ")


def test_a_request_head_too_large_is_431(patient: Server) -> None:
    """Header lines streamed within the deadline cannot grow the server's memory: 64 KiB, then 431."""
    with _tls(patient) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        lines = (b"X-Filler: " + b"a" * 1000 + b"\r\n") * 8
        received = b""
        try:
            for _ in range(100):
                sock.sendall(lines)
                received = _poll(sock)
                if received:
                    break
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        if not received:
            _, received = _closed_after(sock, 5)
    assert received.startswith(b"HTTP/1.1 431 ")


def test_the_bound_is_per_client_not_global(patient: Server) -> None:
    """Five connections of one client do not keep another out (here: another loopback address)."""
    held = [_tls(patient) for _ in range(5)]
    try:
        raw = socket.create_connection(_address(patient), timeout=10, source_address=("127.0.0.2", 0))
        with patient.verify().wrap_socket(raw, server_hostname="127.0.0.1") as other:
            assert _get(other).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("how", ["stalled", "dribbled"])
def test_a_body_that_does_not_arrive_in_time_is_closed(server: Server, how: str) -> None:
    """A declared body of 1,000 bytes may take the head timeout plus 1000/65536 s: not forever."""
    with _tls(server) as sock:
        sock.sendall(
            b"POST /kbs/v1/keys/x/transfer HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n{"
        )
        started, received = time.monotonic(), b""
        while time.monotonic() - started < TIMEOUT + 5 and not received:
            if how == "dribbled":
                try:
                    sock.sendall(b" ")
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    break
            time.sleep(0.2)
            received = _poll(sock)
        took = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 ")
    assert took < TIMEOUT + 2
