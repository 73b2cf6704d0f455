"""The CLI's overall deadline per request: a server that trickles its answer (a byte of header now and then, each
read within the socket's timeout) does not hold a command forever. In-process: a thread that trickles."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from keybroker.cli import http
from keybroker.cli.http import AdminApi, Connection
from keybroker_client import TransportError


@pytest.fixture
def trickler() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.05):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_a_trickling_server_meets_the_deadline(trickler: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "DEADLINE_SECONDS", 1.0)
    started = time.monotonic()
    with AdminApi(Connection(f"http://127.0.0.1:{trickler}", None, None)) as api, pytest.raises(TransportError) as late:
        api.request("GET", "/kbs/v1/keys")
    assert time.monotonic() - started < 3.0
    assert str(late.value) == (
        f"cannot reach keybroker at http://127.0.0.1:{trickler}: no complete answer within 1 s "
        "(is it a keybroker, and is it overloaded?)"
    )
