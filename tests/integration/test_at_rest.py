"""Key bytes never reach the disk unencrypted: after generating and importing keys through the real server, no
file in the data directory (database, WAL, journal, anything) contains them in any common encoding."""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.config import load_settings
from keybroker.services import build_services
from tests.conftest import EXAMPLE_POLICY
from tests.integration.conftest import Server, stop


def _encodings(secret: bytes) -> list[bytes]:
    """Forms in which ``secret`` (or a recognisable part of it) could sit in a file."""
    forms = [secret, base64.b64encode(secret), binascii.hexlify(secret), binascii.hexlify(secret).upper()]
    if len(secret) > 64:  # DER: also look for an inner slice, so a partial copy is found too
        middle = secret[len(secret) // 2 : len(secret) // 2 + 24]
        forms += [middle, binascii.hexlify(middle)]
    return forms


def _pem_body_lines(pem: str) -> list[bytes]:
    return [line.encode() for line in pem.splitlines() if line and not line.startswith("-----")]


def test_no_key_bytes_in_the_data_directory(server: Server) -> None:
    aes_raw = bytes.fromhex("8f3a61c2d94b07e5a1c33b9e7d20f4186a5c90b2e7d14f3309ab6c2e5d817f40")
    rsa_key = rsa.generate_private_key(65537, 3072)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    pkcs8 = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    generated_ids = []
    with server.client() as client:
        policy_id = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY).json()["id"]

        def create(**info: object) -> str:
            response = client.post("/kbs/v1/keys", json={"key_information": info, "transfer_policy_id": policy_id})
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        imported_ids = [
            create(algorithm="AES", key_length=256, key_string=base64.b64encode(aes_raw).decode()),
            create(algorithm="RSA", key_length=3072, key_string=rsa_pem),
            create(algorithm="EC", curve_type="secp384r1", key_string=ec_pem),
        ]
        for info in (
            {"algorithm": "AES", "key_length": 128},
            {"algorithm": "RSA", "key_length": 2048},
            {"algorithm": "EC", "curve_type": "secp256r1"},
        ):
            generated_ids.append(create(**info))
    stop(server.process)

    needles: list[bytes] = []
    needles += _encodings(aes_raw)
    needles += _encodings(rsa_key.private_bytes(*pkcs8)) + _pem_body_lines(rsa_pem)
    needles += _encodings(ec_key.private_bytes(*pkcs8)) + _pem_body_lines(ec_pem)
    # The generated keys' bytes are only known to keybroker: read them back through the service (which holds the
    # master key), then look for them on disk.
    services = build_services(load_settings(data_dir=server.data_dir))
    try:
        stored = {
            key_id: services.keys.load_material(services.keys.get(key_id)).secret
            for key_id in imported_ids + generated_ids
        }
    finally:
        services.close()
    assert stored[imported_ids[0]] == aes_raw
    assert stored[imported_ids[1]] == rsa_key.private_bytes(*pkcs8)
    assert stored[imported_ids[2]] == ec_key.private_bytes(*pkcs8)
    for key_id in generated_ids:
        needles += _encodings(stored[key_id])
    needles += [line for pem in (rsa_pem, ec_pem) for line in _pem_body_lines(pem)]

    files = [path for path in server.data_dir.rglob("*") if path.is_file()]
    assert {p.name for p in files} >= {"keybroker.db", "master.key", "admin-token"}
    contents = {path: path.read_bytes() for path in files}
    contents[server.log] = server.log.read_bytes()  # the server's log too
    assert sum(len(c) for c in contents.values()) > 10_000  # the search really covers the stored data
    for path, content in contents.items():
        for needle in needles:
            assert needle not in content, f"key bytes found in {path.name}"
