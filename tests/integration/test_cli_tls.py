"""The CLI against real servers with the usual connection mistakes: each error says what to do instead, in the CLI's
terms (``--cacert``/``KEYBROKER_CACERT``, ``--ca-fingerprint``/``KEYBROKER_CA_FINGERPRINT``, ``https://``), in one
line, exit 1, no traceback. Run as a user runs it: ``.venv/bin/keybroker``, ``COLUMNS=60``."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import Server, clean_env, start_server, stop
from tests.peers.process import free_port

KEYBROKER = str(REPO / ".venv" / "bin" / "keybroker")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("tls") / ".data")
    try:
        yield running
    finally:
        stop(running.process)


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("plain") / ".data", KEYBROKER_TLS__ENABLED="false")
    try:
        yield running
    finally:
        stop(running.process)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA of another deployment (``keybroker init`` of another data directory)."""
    data_dir = tmp_path_factory.mktemp("other") / ".data"
    subprocess.run([KEYBROKER, "init", "--data-dir", str(data_dir)], check=True, capture_output=True, env=clean_env())
    return data_dir / "ca.pem"


def keybroker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KEYBROKER, *args], capture_output=True, text=True, env=clean_env(COLUMNS="60", **env), timeout=60, check=False
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed command (and nothing else went wrong)."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: cannot reach keybroker at ") or lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_no_ca_given_says_how_to_trust_the_server(tls_server: Server) -> None:
    line = error_line(keybroker("key", "list", KEYBROKER_ADDR=tls_server.url, KEYBROKER_TOKEN=tls_server.token))
    assert line.startswith(f"Error: cannot reach keybroker at {tls_server.url}: its certificate is not trusted: ")
    for what in ("--cacert FILE", "KEYBROKER_CACERT", "ca.pem", "--ca-fingerprint", "KEYBROKER_CA_FINGERPRINT"):
        assert what in line
    assert "'keybroker ca fingerprint'" in line
    assert line.endswith("(certificate verify failed: self-signed certificate in certificate chain)")


def test_the_hint_is_followed(tls_server: Server) -> None:
    """What the hint says works: the CA file, or the fingerprint that 'keybroker ca fingerprint' prints."""
    ok = keybroker("key", "list", KEYBROKER_ADDR=tls_server.url, KEYBROKER_TOKEN=tls_server.token,
                   KEYBROKER_CACERT=str(tls_server.ca_file))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    pin = keybroker("ca", "fingerprint", "--data-dir", str(tls_server.data_dir))
    assert pin.returncode == 0, pin.stderr
    pinned = keybroker("key", "list", "--addr", tls_server.url, "--token", tls_server.token, "--ca-fingerprint",
                       pin.stdout.strip())  # fmt: skip
    assert pinned.returncode == 0, pinned.stderr


def test_another_deployments_ca(tls_server: Server, other_ca: Path) -> None:
    line = error_line(keybroker("key", "list", "--addr", tls_server.url, "--cacert", str(other_ca)))
    assert f"its certificate does not chain to {other_ca} (--cacert/KEYBROKER_CACERT): give this" in line
    pin = keybroker("ca", "fingerprint", "--cacert", str(other_ca)).stdout.strip()
    line = error_line(keybroker("key", "list", "--addr", tls_server.url, "--ca-fingerprint", pin))
    assert "fingerprint" in line
    assert pin in line  # (the client library's PinMismatch: the CA it found, and the pin it was given)


def test_http_on_the_tls_port_says_use_https(tls_server: Server) -> None:
    plain_url = tls_server.url.replace("https://", "http://")
    line = error_line(keybroker("key", "list", KEYBROKER_ADDR=plain_url, KEYBROKER_TOKEN=tls_server.token))
    port = tls_server.url.rsplit(":", 1)[1]
    assert f"it speaks TLS on port {port}: use {tls_server.url} (--addr/KEYBROKER_ADDR)" in line


def test_https_on_a_plain_port_says_use_http(plain_server: Server) -> None:
    tls_url = plain_server.url.replace("http://", "https://")
    line = error_line(keybroker("key", "list", "--addr", tls_url, "--token", plain_server.token))
    port = plain_server.url.rsplit(":", 1)[1]
    assert f"it does not speak TLS on port {port}: use http:// if it serves plain HTTP" in line
    ok = keybroker("key", "list", "--addr", plain_server.url, "--token", plain_server.token)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    ("addr", "says"),
    [
        ("https://127.0.0.1:{port}", "nothing listens there: is keybroker running, and is --addr/KEYBROKER_ADDR"),
        ("127.0.0.1:{port}", "is not a keybroker address (--addr/KEYBROKER_ADDR): give a URL like https://"),
        ("ftp://127.0.0.1:{port}", "is not a keybroker address"),
        ("https://127.0.0.1:99999", "is not a keybroker address"),
        ("https://nonexistent.invalid:{port}", "the name nonexistent.invalid does not resolve"),
    ],
    ids=["nothing listening", "no scheme", "not http", "bad port", "unknown name"],
)
def test_a_wrong_address(addr: str, says: str) -> None:
    line = error_line(keybroker("key", "list", KEYBROKER_ADDR=addr.format(port=free_port())))
    assert says in line


class _ConnectProxy:
    """A forward proxy that only tunnels (HTTP CONNECT), as squid does for https://: it sees the TLS bytes, never
    their content. Counts the tunnels it opened."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.tunnels: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            request = b""
            while b"\r\n\r\n" not in request:
                request += client.recv(4096)
            method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ", 2)
            assert method == "CONNECT"
            self.tunnels.append(target)
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pipes = [threading.Thread(target=_pipe, args=pair) for pair in ((client, upstream), (upstream, client))]
                for pipe in pipes:
                    pipe.start()
                for pipe in pipes:
                    pipe.join()

    def close(self) -> None:
        self._listener.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_https_proxy_and_no_proxy(tls_server: Server) -> None:
    """HTTPS_PROXY is honoured as httpx honours it (a CONNECT tunnel; TLS still verified end to end against the
    CA, for the server's name), and NO_PROXY exempts a host."""
    proxy = _ConnectProxy()
    try:
        env = {
            "KEYBROKER_ADDR": tls_server.url,
            "KEYBROKER_TOKEN": tls_server.token,
            "KEYBROKER_CACERT": str(tls_server.ca_file),
            "HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}",
        }
        through = keybroker("key", "list", **env)
        assert through.returncode == 0, through.stderr
        assert proxy.tunnels == [tls_server.url.removeprefix("https://")]
        untrusted = keybroker("key", "list", **{**env, "KEYBROKER_CACERT": ""})
        assert "its certificate is not trusted" in error_line(untrusted)  # (the tunnel does not relax TLS)
        exempt = keybroker("key", "list", **env, NO_PROXY="127.0.0.1")
        assert exempt.returncode == 0, exempt.stderr
        assert len(proxy.tunnels) == 2
    finally:
        proxy.close()


@pytest.mark.parametrize("token", ["kb_secret\nline", "kb_sécret"], ids=["line break", "not ASCII"])
def test_a_token_that_cannot_be_a_header(token: str) -> None:
    """Refused before anything is sent (http.client would raise on the header), without echoing the token."""
    result = keybroker("key", "list", "--token", token, KEYBROKER_ADDR=f"https://127.0.0.1:{free_port()}")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert "Invalid value for --token / KEYBROKER_TOKEN: a token is printable ASCII" in result.stderr
    assert "cret" not in result.stderr
