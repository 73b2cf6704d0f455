"""POST/GET /kbs/v1/keys/{id}/certificate (PROTOCOL.md §1): a certificate for a broker-held RSA/EC key, signed by
the service CA, whose public key is that key's; every bad request refused with its code; audited; gone with the
key."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from keybroker.clock import FixedClock
from keybroker.services import Services
from keybroker.storage.tables import AuditEventRow, KeyCertificateRow

PEM = serialization.Encoding.PEM


def _import(
    api: TestClient, policy_id: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, info: dict[str, Any]
) -> str:
    pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    response = api.post(
        "/kbs/v1/keys", json={"key_information": {**info, "key_string": pem}, "transfer_policy_id": policy_id}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.parametrize("kind", ["RSA", "EC"])
def test_certificate_for_a_key_matches_it_and_chains_to_the_service_ca(
    api: TestClient, services: Services, policy_id: str, kind: str
) -> None:
    if kind == "RSA":
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = rsa.generate_private_key(65537, 2048)
        key_id = _import(api, policy_id, key, {"algorithm": "RSA", "key_length": 2048})
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        key_id = _import(api, policy_id, key, {"algorithm": "EC", "curve_type": "secp256r1"})
    response = api.post(
        f"/kbs/v1/keys/{key_id}/certificate",
        json={
            "subject": "CN=web.example,O=Example",
            "san": ["DNS:web.example", "IP:127.0.0.1", "localhost"],
            "days": 30,
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    chain = x509.load_pem_x509_certificates(body["certificate"].encode())
    leaf, ca = chain
    assert services.workload_ca is not None
    assert ca.public_bytes(PEM) == services.workload_ca.certificate_pem()
    # Never signed by the service CA that keybroker's own clients trust: it cannot impersonate keybroker.
    service_ca = x509.load_pem_x509_certificate(services.ca.certificate_pem())
    assert ca != service_ca
    with pytest.raises((ValueError, TypeError)):
        leaf.verify_directly_issued_by(service_ca)
    assert leaf.public_key().public_bytes(
        PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert body["public_key"].encode() == key.public_key().public_bytes(
        PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.rfc4514_string() == "CN=web.example,O=Example"
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["web.example", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30
    assert body["san"] == ["DNS:web.example", "IP:127.0.0.1", "DNS:localhost"]
    if isinstance(key, rsa.RSAPrivateKey):  # the key keybroker holds is the one the certificate certifies
        signature = key.sign(b"hello", padding.PKCS1v15(), hashes.SHA256())
        public = leaf.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, b"hello", padding.PKCS1v15(), hashes.SHA256())
    got = api.get(f"/kbs/v1/keys/{key_id}/certificate")
    assert got.status_code == 200
    assert got.json()["serial"] == body["serial"]
    assert "PRIVATE" not in response.text
    assert "PRIVATE" not in got.text
    with services.database.transaction() as session:
        actions = list(session.scalars(select(AuditEventRow.action).where(AuditEventRow.target == key_id)))
    assert "key.certify" in actions


def test_get_returns_the_newest_and_delete_removes_them(
    api: TestClient, services: Services, clock: FixedClock, policy_id: str
) -> None:
    key_id = _import(
        api, policy_id, ec.generate_private_key(ec.SECP384R1()), {"algorithm": "EC", "curve_type": "secp384r1"}
    )
    assert api.get(f"/kbs/v1/keys/{key_id}/certificate").json()["code"] == "certificate_not_found"
    first = api.post(f"/kbs/v1/keys/{key_id}/certificate", json={"subject": "CN=one"}).json()
    clock.advance(timedelta(seconds=1))
    second = api.post(f"/kbs/v1/keys/{key_id}/certificate", json={"subject": "CN=two"}).json()
    assert first["serial"] != second["serial"]
    assert api.get(f"/kbs/v1/keys/{key_id}/certificate").json()["subject"] == "CN=two"
    assert api.delete(f"/kbs/v1/keys/{key_id}").status_code == 204
    with services.database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(KeyCertificateRow)) == 0
    assert api.get(f"/kbs/v1/keys/{key_id}/certificate").json()["code"] == "key_not_found"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"subject": "not a name"}, "invalid_subject"),
        ({"subject": "CN=x", "san": ["IP:999.1.1.1"]}, "invalid_san"),
        ({"subject": "CN=x", "san": ["DNS:bad_name!"]}, "invalid_san"),
        ({"subject": "CN=x", "san": ["URI:https://x"]}, "invalid_san"),
        ({"subject": "CN=x", "days": 0}, "invalid_request"),
        ({"subject": "CN=x", "days": 826}, "invalid_request"),
        ({"subject": "CN=x", "days": "30"}, "invalid_request"),
        ({"subject": "CN=x", "extra": 1}, "invalid_request"),
        ({"san": ["DNS:x"]}, "invalid_request"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(
    api: TestClient, services: Services, policy_id: str, body: dict[str, Any], code: str
) -> None:
    key_id = _import(
        api, policy_id, ec.generate_private_key(ec.SECP256R1()), {"algorithm": "EC", "curve_type": "secp256r1"}
    )
    response = api.post(f"/kbs/v1/keys/{key_id}/certificate", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == code
    with services.database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(KeyCertificateRow)) == 0


def test_aes_keys_and_unknown_keys_are_refused(api: TestClient, policy_id: str) -> None:
    aes = api.post(
        "/kbs/v1/keys",
        json={"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": policy_id},
    ).json()["id"]
    refused = api.post(f"/kbs/v1/keys/{aes}/certificate", json={"subject": "CN=x"})
    assert (refused.status_code, refused.json()["code"]) == (400, "key_not_asymmetric")
    missing = api.post("/kbs/v1/keys/0d1f6b0e-3a5c-4c1e-9a47-9b2f3c2a1d00/certificate", json={"subject": "CN=x"})
    assert (missing.status_code, missing.json()["code"]) == (404, "key_not_found")
