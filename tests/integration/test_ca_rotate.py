"""``keybroker ca rotate``, ``ca activate`` and ``ca retire`` with a real server process, as docs/operations.md has
an operator run them. In each phase, clients that trust only the old CA, only the new one, or the bundle are
checked with two verifiers on what the server really sends: OpenSSL (a TLS handshake, as httpx makes it; the chain
read with ``openssl s_client``) and Python cryptography's path builder (webpki-style, as Go's and rustls'); and
clients that pin the old, the new or both fingerprints. Published, the new CA issues nothing; activated (and
restarted), it issues everything; retired, nothing chains to the old CA and its pin is refused. Every step is
audited. A server whose CA has expired refuses to start in one line, and starts again after rotate and activate."""

from __future__ import annotations

import ipaddress
import re
import shutil
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from keybroker.ca import fingerprint
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.services import initialise
from keybroker_client import PinMismatch, ssl_context
from tests.integration.conftest import Server, clean_env, start_server, stop, wait_until_serving
from tests.integration.replicas import audit_verify
from tests.peers.process import free_port

pytestmark = pytest.mark.integration
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)


def ca(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keybroker", "ca", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )


def serve(data_dir: Path, port: int, log: Path, trust: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"],
            stdout=sink, stderr=subprocess.STDOUT, env=clean_env(),
        )  # fmt: skip
    wait_until_serving(f"https://127.0.0.1:{port}", process, log, ssl.create_default_context(cafile=str(trust)))
    return process


def restart(server: Server, trust: Path) -> Server:
    """The same server again (``serve`` issues its certificate at start), on the same port."""
    stop(server.process)
    port = int(server.url.rsplit(":", 1)[1])
    return Server(
        server.url, server.token, server.data_dir, server.log, serve(server.data_dir, port, server.log, trust)
    )


def served_chain(server: Server) -> bytes:
    """The certificates the server sends, as ``openssl s_client`` receives them (leaf first)."""
    host_port = server.url.removeprefix("https://")
    shown = subprocess.run(
        ["openssl", "s_client", "-connect", host_port, "-showcerts", "-servername", "localhost"],
        input=b"", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return b"".join(_PEM.findall(shown.stdout))


def by_cryptography(chain: bytes, trust: Path) -> str | None:
    leaf, *intermediates = x509.load_pem_x509_certificates(chain)
    roots = Store(x509.load_pem_x509_certificates(trust.read_bytes()))
    verifier = PolicyBuilder().store(roots).build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        return str(exc)
    return None


def by_openssl(server: Server, trust: Path) -> str | None:
    try:
        httpx.get(f"{server.url}/healthz", verify=ssl.create_default_context(cafile=str(trust)), timeout=30)
    except httpx.ConnectError as exc:
        return str(exc)
    return None


def expect(server: Server, clients: dict[Path, bool]) -> None:
    chain = served_chain(server)
    assert len(x509.load_pem_x509_certificates(chain)) == 2  # the server's certificate and its CA: nothing else
    for trust, ok in clients.items():
        verdicts = (by_cryptography(chain, trust), by_openssl(server, trust))
        if ok:
            assert verdicts == (None, None), trust.name
        else:
            assert verdicts[0] is not None, f"{trust.name}: cryptography's verifier accepted it"
            assert "certificate verify failed" in (verdicts[1] or ""), f"{trust.name}: OpenSSL accepted it"


def pinning(server: Server, *pins: str) -> str | None:
    """The client library's pinning (GET /cms/v1/ca-certificates, checked against the pins), then GET /healthz."""
    try:
        httpx.get(f"{server.url}/healthz", verify=ssl_context(server.url, None, list(pins)), timeout=30)
    except PinMismatch as exc:
        return f"PinMismatch: {exc}"
    except httpx.ConnectError as exc:
        return f"ConnectError: {exc}"
    return None


def test_clients_through_the_three_steps_of_a_ca_rotation(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        old_pem = tmp_path / "old-ca.pem"
        shutil.copy(server.ca_file, old_pem)
        old_pin = fingerprint(old_pem.read_bytes())
        expect(server, {old_pem: True})

        # 1. rotate (the server keeps running): the bundle is published, the old CA still issues.
        rotated = ca("rotate", data_dir=server.data_dir)
        assert rotated.returncode == 0, rotated.stderr
        bundle_pem = tmp_path / "bundle.pem"
        shutil.copy(server.ca_file, bundle_pem)
        certs = x509.load_pem_x509_certificates(bundle_pem.read_bytes())
        assert len(certs) == 2
        new_pem = tmp_path / "new-ca.pem"
        new_pem.write_bytes(certs[1].public_bytes(serialization.Encoding.PEM))
        new_pin = fingerprint(new_pem.read_bytes())
        assert f"new service CA:   SHA-384 {new_pin}" in rotated.stderr
        published = httpx.get(
            f"{server.url}/cms/v1/ca-certificates", verify=ssl.create_default_context(cafile=str(old_pem))
        )
        assert published.content == bundle_pem.read_bytes()
        assert fingerprint(published.content) == old_pin  # a client reading the first certificate keeps the old CA
        server = restart(server, old_pem)  # (a restart changes nothing in this phase)
        expect(server, {old_pem: True, bundle_pem: True, new_pem: False})
        assert pinning(server, old_pin) is None
        assert pinning(server, old_pin, new_pin) is None
        assert (pinning(server, new_pin) or "").startswith("ConnectError")  # new pinned alone: not issuing yet

        # 2. activate, then restart: the new CA issues.
        activated = ca("activate", data_dir=server.data_dir)
        assert activated.returncode == 0, activated.stderr
        expect(server, {old_pem: True, bundle_pem: True})  # not restarted yet: its certificate of the old CA
        server = restart(server, new_pem)
        expect(server, {old_pem: False, bundle_pem: True, new_pem: True})
        assert (pinning(server, old_pin) or "").startswith("ConnectError")
        assert pinning(server, old_pin, new_pin) is None
        assert pinning(server, new_pin) is None

        # 3. retire, then restart: the old CA is gone from the bundle, its pin is refused.
        retired = ca("retire", data_dir=server.data_dir)
        assert retired.returncode == 0, retired.stderr
        assert f"retired the CA with SHA-384 {old_pin} and deleted its key" in retired.stderr
        assert server.ca_file.read_bytes() == new_pem.read_bytes()
        server = restart(server, new_pem)
        expect(server, {old_pem: False, bundle_pem: True, new_pem: True})
        assert (pinning(server, old_pin) or "").startswith("PinMismatch")
        assert pinning(server, old_pin, new_pin) is None
        assert pinning(server, new_pin) is None
        fingerprinted = subprocess.run(
            [sys.executable, "-m", "keybroker", "ca", "fingerprint", "--data-dir", str(server.data_dir)],
            capture_output=True, text=True, env=clean_env(), timeout=60, check=True,
        )  # fmt: skip
        assert fingerprinted.stdout.strip() == new_pin

        with server.client() as http:
            audited = http.get("/kbs/v1/audit", params={"target": "ca:service"}).json()
        assert [entry["action"] for entry in audited] == ["ca.rotate", "ca.activate", "ca.retire"]
        assert audited[0]["details"] == {"issuing_sha384": old_pin, "sha384": new_pin}
        assert "audit chain intact" in audit_verify(server)

        again = ca("retire", data_dir=server.data_dir)
        assert again.returncode == 1
        assert "Error: the service CA has no predecessor to retire" in again.stderr
    finally:
        stop(server.process)


def test_a_server_whose_ca_expired_says_so_and_starts_after_an_emergency_rotation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    initialise(load_settings(data_dir=data), FixedClock(datetime.now(UTC) - timedelta(days=3651)))
    port = free_port()
    refused = subprocess.run(
        [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert "Error: the service CA expired at " in refused.stderr
    assert "rotate it: keybroker ca rotate, then keybroker ca activate" in refused.stderr.replace("\n", " ")
    assert "Traceback" not in refused.stderr
    for step in ("rotate", "activate"):
        done = ca(step, data_dir=data)
        assert done.returncode == 0, done.stderr
    new_pem = tmp_path / "new-ca.pem"
    new_pem.write_bytes(
        x509.load_pem_x509_certificates((data / "ca.pem").read_bytes())[1].public_bytes(serialization.Encoding.PEM)
    )
    process = serve(data, port, tmp_path / "serve.log", new_pem)
    try:
        server = Server(f"https://127.0.0.1:{port}", "", data, tmp_path / "serve.log", process)
        expect(server, {new_pem: True})
    finally:
        stop(process)
    assert ca("retire", data_dir=data).returncode == 0
