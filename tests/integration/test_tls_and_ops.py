"""HTTPS by default with the service CA, pinning by fingerprint, CSR signing, plain HTTP only when asked for,
and the operations endpoints and logs."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from keybroker.cli.main import app
from tests.conftest import EXAMPLE_POLICY
from tests.integration.conftest import Server, start_server, stop

runner = CliRunner()


def test_server_certificate_is_issued_by_the_service_ca(server: Server) -> None:
    pem = ssl.get_server_certificate(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    leaf = x509.load_pem_x509_certificate(pem.encode())
    ca = x509.load_pem_x509_certificate(server.ca_file.read_bytes())
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v) for v in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    # localhost plus this host's own name, so replicas behind a balancer verify by name too
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", socket.gethostname()}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(server.ca_file))) as client:
        assert client.get(f"{server.url}/healthz").status_code == 200
        assert client.get(server.url.replace("127.0.0.1", "localhost") + "/healthz").status_code == 200


def test_untrusted_and_plain_http_clients_are_refused(server: Server) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/healthz")  # the system trust store does not know the service CA
    plain = server.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/kbs/v1/keys", headers={"Authorization": f"Bearer {server.token}"})


def test_pinning_the_ca_fingerprint(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["ca", "fingerprint", "--data-dir", str(server.data_dir)])
    assert result.exit_code == 0
    pin = result.stdout.strip()
    der = x509.load_pem_x509_certificate(server.ca_file.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert pin == hashlib.sha384(der).hexdigest()
    monkeypatch.setenv("KEYBROKER_ADDR", server.url)
    monkeypatch.setenv("KEYBROKER_TOKEN", server.token)
    colons = ":".join(pin[i : i + 2] for i in range(0, len(pin), 2)).upper()
    result = runner.invoke(app, ["key", "list", "--ca-fingerprint", colons, "-o", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    wrong = "00" * 48
    result = runner.invoke(app, ["key", "list", "--ca-fingerprint", wrong])
    assert result.exit_code == 1
    assert f"not the pinned {wrong}" in result.stderr


def test_ca_issue_signs_a_csr(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBROKER_ADDR", server.url)
    monkeypatch.setenv("KEYBROKER_TOKEN", server.token)
    monkeypatch.setenv("KEYBROKER_CACERT", str(server.ca_file))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestation.internal")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("attestation.internal")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "req.pem").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    result = runner.invoke(
        app, ["ca", "issue", str(tmp_path / "req.pem"), "--out", str(tmp_path / "c.pem"), "--days", "30"]
    )
    assert result.exit_code == 0, result.output
    chain = x509.load_pem_x509_certificates((tmp_path / "c.pem").read_bytes())
    chain[0].verify_directly_issued_by(x509.load_pem_x509_certificate(server.ca_file.read_bytes()))
    assert chain[0].public_key() == key.public_key()
    assert chain[0].subject.rfc4514_string() == "CN=attestation.internal"
    assert not chain[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    result = runner.invoke(app, ["ca", "issue", str(tmp_path / "bad.pem"), "--out", str(tmp_path / "x.pem")])
    assert result.exit_code == 1
    assert "invalid_csr, HTTP 400" in result.stderr


def test_plain_http_only_when_configured_and_with_a_warning(tmp_path: Path) -> None:
    server = start_server(tmp_path / ".data", KEYBROKER_TLS__ENABLED="false")
    stop(server.process)
    assert server.url.startswith("http://")
    warnings = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert any(w["event"] == "tls_disabled" and w["level"] == "warning" for w in warnings)


def test_readyz_metrics_and_request_ids_in_logs(server: Server) -> None:
    with server.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "checks": {"database": "ok", "schema": "ok", "backend:embedded": "ok"},
        }
        policy = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY).json()["id"]
        body = {"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": policy}
        key = client.post("/kbs/v1/keys", json=body).json()["id"]
        client.get(f"/kbs/v1/keys/{key}")
        refused = client.post("/kbs/v1/keys", json={**body, "key_information": {"algorithm": "AES"}})
        request_id = refused.json()["request_id"]
        assert refused.headers["x-request-id"] == request_id
        metrics = client.get("/metrics").text
    assert 'keybroker_http_requests_total{method="GET",route="/kbs/v1/keys/{key_id}",status="200"} 1.0' in metrics
    assert 'keybroker_key_operations_total{operation="create",outcome="success"} 1.0' in metrics
    assert 'keybroker_key_operations_total{operation="create",outcome="http_400"} 1.0' in metrics
    assert "keybroker_http_request_duration_seconds_bucket" in metrics
    assert key not in metrics  # ids never become labels
    stop(server.process)
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    refused_line = next(line for line in lines if line.get("request_id") == request_id)
    assert (refused_line["event"], refused_line["status"], refused_line["method"]) == ("request", 400, "POST")
    assert server.token not in server.log.read_text()
