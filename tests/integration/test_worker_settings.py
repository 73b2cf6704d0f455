"""Red-team finding 4: with ``--workers 2`` every setting of ``DATA_DIR/keybroker.toml`` takes effect in every
worker process, exactly as with one process. One setting of each section is observed through the API, on fresh
connections until both workers have answered each check."""

from __future__ import annotations

import base64
import re
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from typer.testing import CliRunner

from keybroker.cli.main import app
from tests.conftest import EXAMPLE_POLICY
from tests.integration.conftest import Server, start_server, stop

runner = CliRunner()
PID = re.compile(r"\bpid=(\d+)")


@dataclass
class Setup:
    server: Server
    quote: bytes


def _toml(base: Path, sim: Path) -> str:
    return f"""
[server]
max_body_bytes = 200000
public_url = "https://kb.example.test:9443"

[database]
url = "sqlite:///{base}/elsewhere/kb.db"

[keys]
default_backend = "second"

[backends.embedded]

[backends.second]
type = "embedded"
wrapper = {{ master_key_file = "second.key" }}

[tls]
san = ["localhost", "127.0.0.1", "kb.example.test"]

[auth]
default_token_ttl_days = 3

[attestation]
simulated_root = "{sim}/root-ca.pem"
token_ttl_seconds = 77

[limits]
unauthenticated_rps = 0.001
unauthenticated_burst = 40

[logging]
format = "console"
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("workers")
    sim = base / "sim"
    assert runner.invoke(app, ["sim", "init", str(sim)]).exit_code == 0
    assert runner.invoke(app, ["sim", "collateral", str(sim), "--out", str(sim / "coll")]).exit_code == 0
    assert runner.invoke(app, ["sim", "quote", str(sim), "--out", str(base / "quote.bin")]).exit_code == 0
    (base / "elsewhere").mkdir(mode=0o700)
    server = start_server(base / ".data", "--workers", "2", toml=_toml(base, sim))
    try:
        result = runner.invoke(
            app,
            [
                *("collateral", "import", str(sim / "coll")),
                *("--addr", server.url, "--token", server.token, "--cacert", str(server.ca_file)),
            ],
        )
        assert result.exit_code == 0, result.output
        yield Setup(server, (base / "quote.bin").read_bytes())
    finally:
        stop(server.process)


def _pids(server: Server) -> list[int]:
    """The process of every access log line so far (only workers answer requests)."""
    lines = server.log.read_text().splitlines()
    return [int(match.group(1)) for line in lines if "duration_ms=" in line and (match := PID.search(line))]


def _on_both_workers(server: Server, check: Callable[[httpx.Client], None], tries: int = 60) -> None:
    """Run ``check`` on fresh connections until two different worker processes have answered it (the access log
    line of each request names its process), failing if one never gets a request."""
    seen: set[int] = set()
    for _ in range(tries):
        before = len(_pids(server))
        with server.client() as client:
            check(client)
        seen.update(_pids(server)[before:])
        if len(seen) >= 2:
            return
    pytest.fail(f"only worker(s) {seen} answered")


def test_server_section(setup: Setup) -> None:
    def check(client: httpx.Client) -> None:
        response = client.post("/kbs/v1/key-transfer-policies", content=b" " * 200_001, headers={"content-type": "x"})
        assert (response.status_code, response.json()["code"]) == (413, "payload_too_large")

    _on_both_workers(setup.server, check)


def test_keys_backends_and_database_sections(setup: Setup) -> None:
    with setup.server.client() as client:
        policy = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY).json()["id"]

    def check(client: httpx.Client) -> None:
        body = {"key_information": {"algorithm": "AES", "key_length": 128}, "transfer_policy_id": policy}
        key = client.post("/kbs/v1/keys", json=body).json()
        assert key["backend"] == "second"
        assert key["transfer_link"].startswith("https://kb.example.test:9443/kbs/v1/keys/")

    _on_both_workers(setup.server, check)
    assert (setup.server.data_dir.parent / "elsewhere" / "kb.db").is_file()
    assert not (setup.server.data_dir / "keybroker.db").exists()


def test_auth_section(setup: Setup) -> None:
    def check(client: httpx.Client) -> None:
        token = client.post("/kbs/v1/tokens", json={"name": "t", "roles": ["auditor"]}).json()
        lifetime = datetime.fromisoformat(token["expires_at"]) - datetime.fromisoformat(token["created_at"])
        assert lifetime.days == 3

    _on_both_workers(setup.server, check)


def test_attestation_section(setup: Setup) -> None:
    def check(client: httpx.Client) -> None:
        response = client.post("/appraisal/v1/attest", json={"quote": base64.b64encode(setup.quote).decode()})
        assert response.status_code == 200, response.text
        claims = jwt.decode(response.json()["token"], options={"verify_signature": False})
        assert claims["keybroker_simulated"] is True
        assert claims["exp"] - claims["iat"] == 77

    _on_both_workers(setup.server, check)


def test_tls_section(setup: Setup) -> None:
    host, port = setup.server.url.removeprefix("https://").split(":")
    pem = ssl.get_server_certificate((host, int(port)))
    names = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "kb.example.test" in names.value.get_values_for_type(x509.DNSName)


def test_logging_section(setup: Setup) -> None:
    lines = [line for line in setup.server.log.read_text().splitlines() if "duration_ms=" in line]
    assert len({PID.search(line).group(1) for line in lines}) >= 2
    assert not [line for line in lines if line.lstrip().startswith("{")]  # console format, not JSON, everywhere


def test_limits_section(setup: Setup) -> None:
    """40 anonymous requests per address and process, and (nearly) no refill: each worker lets at most 40 of 200
    through and refuses the rest with 429 rate_limited."""
    before = len(setup.server.log.read_text().splitlines())
    with httpx.Client(base_url=setup.server.url, verify=setup.server.verify()) as client:
        statuses = [client.get("/healthz", headers={"connection": "close"}).status_code for _ in range(200)]
        refused = client.get("/healthz")
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert statuses.count(429) >= 120
    answered: dict[str, list[str]] = {}
    for line in setup.server.log.read_text().splitlines()[before:]:
        pid, status = PID.search(line), re.search(r"\bstatus=(\d+)", line)
        if pid and status and "path=/healthz" in line:
            answered.setdefault(pid.group(1), []).append(status.group(1))
    assert len(answered) == 2, answered
    for pid, seen in answered.items():
        assert seen.count("200") <= 40, pid


def test_sighup_reloads_the_settings_into_new_workers(setup: Setup) -> None:
    """Runs last in this module: the file is edited and the supervisor told; the replaced workers apply it."""
    toml = setup.server.data_dir / "keybroker.toml"
    toml.write_text(toml.read_text().replace("unauthenticated_burst = 40", "unauthenticated_burst = 3"))
    log = setup.server.log
    started_before = log.read_text().count("Started server process")
    setup.server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while log.read_text().count("Started server process") < started_before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "settings_reloaded" in log.read_text()
    time.sleep(1.0)  # the old workers retire after their replacements serve
    before = len(log.read_text().splitlines())
    with httpx.Client(base_url=setup.server.url, verify=setup.server.verify()) as client:
        for _ in range(40):
            client.get("/healthz", headers={"connection": "close"})
    answered: dict[str, list[str]] = {}
    for line in log.read_text().splitlines()[before:]:
        pid, status = PID.search(line), re.search(r"\bstatus=(\d+)", line)
        if pid and status and "path=/healthz" in line:
            answered.setdefault(pid.group(1), []).append(status.group(1))
    assert answered
    for pid, seen in answered.items():
        assert seen.count("200") <= 3, (pid, seen)
