"""The CLI against servers that answer what keybroker never does: a redirect, a 1xx or a 200 where a 204 is due, a 200
from another service with JSON of another shape, a problem whose detail holds escape sequences, an address or a
proxy that is not a URL. Each is one line on stderr, a non-zero exit, no traceback, and nothing reported done. Run
as a user runs it: ``.venv/bin/keybroker`` with ``KEYBROKER_ADDR``/``KEYBROKER_TOKEN``."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import clean_env

pytestmark = pytest.mark.integration

KEYBROKER = str(REPO / ".venv" / "bin" / "keybroker")
TOKEN = "kb_0123456789ab_secrettokenvalue"


class _Scripted(BaseHTTPRequestHandler):
    """Answers every request with ``server.answer``: (status, headers, body)."""

    def _answer(self) -> None:
        assert isinstance(self.server, _FakeServer)
        status, headers, body = self.server.answer
        self.send_response_only(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status >= 200:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status >= 200:
            self.wfile.write(body)
        else:  # a 1xx, then nothing more: the client must not read it as the answer
            self.wfile.flush()
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


class _FakeServer(ThreadingHTTPServer):
    answer: tuple[int, dict[str, str], bytes] = (200, {}, b"")


@pytest.fixture(scope="module")
def fake() -> Iterator[_FakeServer]:
    server = _FakeServer(("127.0.0.1", 0), _Scripted)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _url(server: _FakeServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def keybroker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KEYBROKER, *args], capture_output=True, text=True, env=clean_env(COLUMNS="80", **env), timeout=90, check=False
    )


def one_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr, result.stdout)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


REMOVALS = [
    ("token", "revoke", "t1"),
    ("key", "delete", "k1"),
    ("policy", "delete", "p1"),
    ("role", "delete", "r1"),
    ("attestation", "policy", "delete", "a1"),
]


def _removal_commands() -> list[tuple[str, ...]]:
    return REMOVALS


@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_redirect_is_an_error_naming_where(fake: _FakeServer, status: int) -> None:
    fake.answer = (status, {"Location": "https://elsewhere.example:9443/kbs/v1/x"}, b"")
    for command in _removal_commands():
        result = keybroker(*command, KEYBROKER_ADDR=_url(fake), KEYBROKER_TOKEN=TOKEN)
        line = one_error(result)
        assert "answered a redirect to https://elsewhere.example:9443/kbs/v1/x" in line, line
        assert "does not follow redirects (they would carry your token): use that address" in line, line
        assert "deleted" not in result.stderr + result.stdout
        assert "revoked" not in result.stderr + result.stdout


@pytest.mark.parametrize("status", [200, 202])
def test_a_delete_answered_other_than_204_is_not_done(fake: _FakeServer, status: int) -> None:
    fake.answer = (status, {"Content-Type": "text/html"}, b"<html>welcome to nginx</html>")
    for command in _removal_commands():
        result = keybroker(*command, KEYBROKER_ADDR=_url(fake), KEYBROKER_TOKEN=TOKEN)
        line = one_error(result)
        assert f"answered HTTP {status} to DELETE" in line, line
        assert "is it a keybroker?" in line


def test_a_1xx_alone_is_not_an_answer(fake: _FakeServer) -> None:
    fake.answer = (102, {}, b"")
    result = keybroker("key", "delete", "k1", KEYBROKER_ADDR=_url(fake), KEYBROKER_TOKEN=TOKEN)
    one_error(result)
    assert "deleted" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("key", "list"),
        ("backends", "check"),
        ("token", "list"),
        ("cluster", "status"),
        ("audit", "verify"),
        ("policy", "list"),
        ("key", "show", "k1"),
        ("role", "list"),
    ],
)
@pytest.mark.parametrize("body", [{"data": []}, [1, 2], {"data": {"id": 1}}, "text", None])
def test_another_services_json_is_an_unexpected_answer(
    fake: _FakeServer, command: tuple[str, ...], body: object
) -> None:
    fake.answer = (200, {"Content-Type": "application/json"}, json.dumps(body).encode())
    result = keybroker(*command, KEYBROKER_ADDR=_url(fake), KEYBROKER_TOKEN=TOKEN)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:  # (an empty list, or an object that is one of a keybroker answer's forms)
        return
    line = one_error(result)
    assert "unexpected answer from" in line, line
    assert "is it a keybroker?" in line


def test_escape_sequences_in_a_problem_are_not_sent_to_the_terminal(fake: _FakeServer) -> None:
    detail = "\x1b]0;pwned\x07\x1b[2J\x1b[31mfake: token revoked OK\x1b[0m\nsecond line"
    problem = {"type": "about:blank", "title": "Bad", "status": 400, "code": "bad", "detail": detail}
    fake.answer = (400, {"Content-Type": "application/problem+json"}, json.dumps(problem).encode())
    result = keybroker("key", "list", KEYBROKER_ADDR=_url(fake), KEYBROKER_TOKEN=TOKEN)
    line = one_error(result)
    assert "\x1b" not in result.stderr, repr(result.stderr)
    assert "\x07" not in result.stderr
    assert "\\x1b[31mfake: token revoked OK" in line, line
    assert "second line" in line


def test_http_with_a_ca_is_refused_before_anything_is_sent(fake: _FakeServer, tmp_path: Path) -> None:
    fake.answer = (200, {"Content-Type": "application/json"}, b"[]")
    ca = tmp_path / "ca.pem"
    ca.write_text("not used")
    for option in (("--cacert", str(ca)), ("--ca-fingerprint", "ab" * 48)):
        result = keybroker("key", "list", *option, KEYBROKER_ADDR=_url(fake), KEYBROKER_TOKEN=TOKEN)
        line = one_error(result, 2)
        for said in ("is plain HTTP", "in clear", "use https://"):
            assert said in line, line
    via_env = keybroker("key", "list", KEYBROKER_ADDR=_url(fake), KEYBROKER_TOKEN=TOKEN, KEYBROKER_CACERT=str(ca))
    assert "is plain HTTP" in one_error(via_env, 2)


def test_http_with_a_token_to_another_host_warns(fake: _FakeServer) -> None:
    fake.answer = (200, {"Content-Type": "application/json"}, b"[]")
    port = fake.server_address[1]
    # 127.0.0.2 is loopback too, but not one of the names the warning spares: through a proxy-free path it arrives
    # at the fake server (Linux routes all of 127/8 to lo). Name it by a non-loopback spelling: localhost.localdomain
    # may not resolve, so the warning is checked on a host that does not need to answer.
    quiet = keybroker("key", "list", KEYBROKER_ADDR=f"http://127.0.0.1:{port}", KEYBROKER_TOKEN=TOKEN)
    assert quiet.returncode == 0, quiet.stderr
    assert "Warning" not in quiet.stderr
    loud = keybroker("key", "list", KEYBROKER_ADDR="http://192.0.2.1:9", KEYBROKER_TOKEN=TOKEN,
                     HTTPS_PROXY="", HTTP_PROXY=f"http://127.0.0.1:{port}")  # fmt: skip
    assert loud.stderr.splitlines()[0].startswith("Warning: http://192.0.2.1:9 is plain HTTP: the token crosses"), (
        loud.stderr
    )
    assert TOKEN not in loud.stderr


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"KEYBROKER_ADDR": "https://[::1"}, 1),
        ({"KEYBROKER_ADDR": "https://[::1]x:9443"}, 1),
        ({"KEYBROKER_ADDR": "https://a..b:9443"}, 1),
        ({"KEYBROKER_ADDR": f"https://{'a' * 64}.example:9443"}, 1),
        ({"KEYBROKER_ADDR": "https://\udcff.example:9443"}, 1),
        ({"KEYBROKER_ADDR": "https://bücher.example:9443/pfad/ä"}, 1),
        ({"KEYBROKER_ADDR": "https://127.0.0.1:9", "HTTPS_PROXY": "http://[::1"}, 1),
        ({"KEYBROKER_ADDR": "https://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:99999"}, 1),
    ],
)
def test_addresses_and_proxies_that_are_not_urls(env: dict[str, str], code: int) -> None:
    result = subprocess.run(
        [KEYBROKER, "key", "list"],
        capture_output=True,
        env={**clean_env(KEYBROKER_TOKEN=TOKEN), **{k: v for k, v in env.items()}},
        timeout=60,
        check=False,
    )
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert result.returncode == code, stderr
    assert len(stderr.splitlines()) == 1, stderr


def test_a_deeply_nested_policy_file(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    result = keybroker("policy", "create", str(deep), KEYBROKER_ADDR="http://127.0.0.1:9", KEYBROKER_TOKEN=TOKEN)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr  # (a bad FILE argument, as for JSON that does not parse)
    assert "its JSON is nested too deeply" in result.stderr


def test_a_ca_file_and_a_pin_together_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("unused")
    for given in (
        {"KEYBROKER_CACERT": str(ca), "KEYBROKER_CA_FINGERPRINT": "ab" * 48},
        {"KEYBROKER_CACERT": str(ca)},
    ):
        result = keybroker("key", "list", "--ca-fingerprint", "ab" * 48, KEYBROKER_ADDR="https://127.0.0.1:9",
                           KEYBROKER_TOKEN=TOKEN, **given)  # fmt: skip
        line = one_error(result, 2)
        assert line.endswith("(its SHA-384), not both"), line


def test_keybroker_config_names_the_settings_file(tmp_path: Path) -> None:
    missing = keybroker("config", "check", "--data-dir", str(tmp_path), KEYBROKER_CONFIG=str(tmp_path / "none.toml"))
    assert one_error(missing, 2) == f"Configuration error: configuration file {tmp_path / 'none.toml'} does not exist"
    settings = tmp_path / "settings.toml"
    settings.write_text('[keys]\ndefault_backend = "nope"\n')
    read = keybroker("config", "check", "--data-dir", str(tmp_path), KEYBROKER_CONFIG=str(settings))
    assert read.returncode == 2, read.stderr
    assert "keys.default_backend 'nope' is not among the configured backends" in read.stderr


def test_ca_issue_out_never_follows_a_symlink_nor_overwrites_without_force(fake: _FakeServer, tmp_path: Path) -> None:
    chain = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    fake.answer = (201, {"Content-Type": "application/json"}, json.dumps({"certificate": chain}).encode())
    csr = tmp_path / "x.csr"
    csr.write_text("-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = tmp_path / "out.pem"
    link.symlink_to(victim)
    dangling = tmp_path / "dangling.pem"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    existing = tmp_path / "existing.pem"
    existing.write_text("old\n")
    env = {"KEYBROKER_ADDR": _url(fake), "KEYBROKER_TOKEN": TOKEN}
    for out in (link, dangling, existing):
        refused = keybroker("ca", "issue", str(csr), "--out", str(out), **env)
        assert one_error(refused) == f"Error: cannot write {out}: it exists already; pass --force to replace it"
    assert victim.read_text() == "precious\n"
    assert existing.read_text() == "old\n"
    assert not (tmp_path / "created-through-the-link").exists()
    for out in (link, dangling, existing):
        forced = keybroker("ca", "issue", str(csr), "--out", str(out), "--force", **env)
        assert forced.returncode == 0, forced.stderr
        assert not out.is_symlink()
        assert out.read_text() == chain
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "created-through-the-link").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # (no temporary file left)
    fresh = tmp_path / "fresh.pem"
    assert keybroker("ca", "issue", str(csr), "--out", str(fresh), **env).returncode == 0
    assert fresh.read_text() == chain


def test_proxy_errors_name_the_proxy_and_never_its_password() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused = keybroker("key", "list", KEYBROKER_ADDR="https://kbs.example:9443", KEYBROKER_TOKEN=TOKEN,
                        HTTPS_PROXY=f"http://user:s3cretpw@127.0.0.1:{port}", NO_PROXY="")  # fmt: skip
    line = one_error(refused)
    assert f"the proxy 127.0.0.1:{port} (HTTPS_PROXY/HTTP_PROXY) refused the connection" in line, line
    assert "nothing listens there" not in line
    assert "s3cretpw" not in refused.stderr
    for proxy in ("http://user:s3cretpw@[::1", "http://user:s3cretpw@127.0.0.1:99999", "socks5://user:s3cretpw@p:1"):
        bad = keybroker("key", "list", KEYBROKER_ADDR="https://kbs.example:9443", KEYBROKER_TOKEN=TOKEN,
                        HTTPS_PROXY=proxy, NO_PROXY="")  # fmt: skip
        line = one_error(bad)
        assert "is not an http:// proxy URL" in line, line
        assert "s3cretpw" not in bad.stderr
        assert "user:***@" in line


def test_the_demo_talks_to_its_own_server_past_a_proxy(tmp_path: Path) -> None:
    """HTTPS_PROXY names a proxy that is not there: the demo's clients reach its loopback server directly."""
    from tests.integration.test_demo_cleanup import _env as demo_env

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**demo_env(tmpdir), "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": ""}
    ran = subprocess.run([KEYBROKER, "demo"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "attested and received both keys" in ran.stdout + ran.stderr
