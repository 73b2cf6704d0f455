"""``keybroker ca rotate`` and ``keybroker ca retire`` with a real server process, as docs/operations.md has an
operator run them: clients that trust the old ca.pem, the bundle, the new CA alone, or pin the old CA's fingerprint
all keep working through the transition (the server restarted with a certificate of the new CA); after the
retirement (and a restart) one that trusts only the old CA fails and one that pins it is refused, while the bundle
and the new CA work. Both steps are audited and the chain verifies."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keybroker.ca import fingerprint
from keybroker_client import PinMismatch, ssl_context
from tests.integration.conftest import Server, clean_env, start_server, stop, wait_until_serving
from tests.integration.replicas import audit_verify

pytestmark = pytest.mark.integration


def ca(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keybroker", "ca", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )


def restart(server: Server) -> Server:
    """The same server again (``serve`` issues its certificate at start), on the same port."""
    stop(server.process)
    port = server.url.rsplit(":", 1)[1]
    with server.log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(server.data_dir), "--listen",
             f"127.0.0.1:{port}"],
            stdout=sink, stderr=subprocess.STDOUT, env=clean_env(),
        )  # fmt: skip
    wait_until_serving(server.url, process, server.log, ssl.create_default_context(cafile=str(server.ca_file)))
    return Server(server.url, server.token, server.data_dir, server.log, process)


def trusting(server: Server, ca_file: Path) -> str | None:
    """GET /healthz trusting only ``ca_file``: None when it verifies, else why not."""
    try:
        httpx.get(f"{server.url}/healthz", verify=ssl.create_default_context(cafile=str(ca_file)), timeout=30)
    except httpx.ConnectError as exc:
        return str(exc)
    return None


def pinning(server: Server, pin: str) -> str | None:
    """The client library's pinning (GET /cms/v1/ca-certificates, checked against ``pin``), then GET /healthz."""
    try:
        httpx.get(f"{server.url}/healthz", verify=ssl_context(server.url, None, pin), timeout=30)
    except (PinMismatch, httpx.ConnectError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def test_clients_keep_working_through_a_ca_rotation_until_the_old_ca_is_retired(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        old_pem = tmp_path / "old-ca.pem"
        shutil.copy(server.ca_file, old_pem)
        old_pin = fingerprint(old_pem.read_bytes())

        rotated = ca("rotate", data_dir=server.data_dir)  # the server keeps running meanwhile
        assert rotated.returncode == 0, rotated.stderr
        bundle_pem = tmp_path / "bundle.pem"
        shutil.copy(server.ca_file, bundle_pem)
        certs = x509.load_pem_x509_certificates(bundle_pem.read_bytes())
        assert len(certs) == 2
        new_pem = tmp_path / "new-ca.pem"
        new_pem.write_bytes(certs[1].public_bytes(serialization.Encoding.PEM))
        new_pin = fingerprint(new_pem.read_bytes())
        assert f"new service CA: SHA-384 {new_pin}" in rotated.stderr
        assert f"retiring CA:    SHA-384 {old_pin}" in rotated.stderr
        assert (
            httpx.get(
                f"{server.url}/cms/v1/ca-certificates", verify=ssl.create_default_context(cafile=str(old_pem))
            ).content
            == bundle_pem.read_bytes()
        )

        # Before the restart the server still shows its certificate of the old CA; after it, one of the new CA.
        assert trusting(server, old_pem) is None
        assert trusting(server, new_pem) is not None
        server = restart(server)
        for trusted in (old_pem, bundle_pem, new_pem):
            assert trusting(server, trusted) is None, trusted
        assert pinning(server, old_pin) is None  # a pin of the old CA keeps working until the retirement

        retired = ca("retire", data_dir=server.data_dir)
        assert retired.returncode == 0, retired.stderr
        assert f"retired the CA with SHA-384 {old_pin}" in retired.stderr
        assert server.ca_file.read_bytes() == new_pem.read_bytes()
        server = restart(server)
        assert "certificate verify failed" in (trusting(server, old_pem) or "")
        assert trusting(server, bundle_pem) is None
        assert trusting(server, new_pem) is None
        assert (pinning(server, old_pin) or "").startswith("PinMismatch")
        assert pinning(server, new_pin) is None
        fingerprinted = subprocess.run(
            [sys.executable, "-m", "keybroker", "ca", "fingerprint", "--data-dir", str(server.data_dir)],
            capture_output=True, text=True, env=clean_env(), timeout=60, check=True,
        )  # fmt: skip
        assert fingerprinted.stdout.strip() == new_pin

        with server.client() as http:
            audited = http.get("/kbs/v1/audit", params={"target": "ca:service"}).json()
        assert [entry["action"] for entry in audited] == ["ca.rotate", "ca.retire"]
        assert audited[0]["details"] == {"old_sha384": old_pin, "new_sha384": new_pin}
        assert "audit chain intact" in audit_verify(server)

        again = ca("retire", data_dir=server.data_dir)
        assert again.returncode == 1
        assert "Error: the service CA has no predecessor to retire" in again.stderr
    finally:
        stop(server.process)
