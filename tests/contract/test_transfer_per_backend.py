"""An attested transfer (PROTOCOL.md §3) of keys held in each real backend returns exactly the imported bytes."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.transfer.conftest import World, open_world, released_bytes, request_transfer, sim_dir  # noqa: F401 - sim_dir is a fixture, used by name

UNDER_TEST = "under-test"


@pytest.fixture
def world(tmp_path: Path, sim_dir: Path, backend_config: dict[str, Any]) -> Iterator[World]:  # noqa: F811 - this module's world
    # The backend is not the default: the create request picks it by name ("backend"), as PROTOCOL.md §1 allows.
    with open_world(tmp_path, sim_dir, backends={"embedded": {}, UNDER_TEST: backend_config}) as opened:
        yield opened


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _der(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_transfer_of_keys_in_each_backend(world: World, backend_name: str) -> None:
    policy_id = world.policy()
    store = world.services.keys.backends[UNDER_TEST]
    aes = os.urandom(32)
    rsa_key = rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    cases: list[tuple[dict[str, Any], bytes]] = [
        ({"algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(aes).decode()}, aes),
        ({"algorithm": "RSA", "key_length": 2048, "key_string": _pem(rsa_key)}, _der(rsa_key)),
        ({"algorithm": "EC", "curve_type": "secp384r1", "key_string": _pem(ec_key)}, _der(ec_key)),
    ]
    transferred = 0
    for info, expected in cases:
        response = world.api.post(
            "/kbs/v1/keys", json={"key_information": info, "transfer_policy_id": policy_id, "backend": UNDER_TEST}
        )
        if response.status_code == 400 and response.json()["code"] == "backend_unsupported":
            from keybroker.api.schemas import KeyCreateRequest

            spec = KeyCreateRequest.model_validate({"key_information": info, "transfer_policy_id": policy_id})
            assert not store.supports(spec.to_new_key().spec), "refused only what the store says it cannot hold"
            continue
        assert response.status_code == 201, response.text
        assert response.json()["backend"] == UNDER_TEST
        released = request_transfer(world, response.json()["id"], world.evidence())
        assert released.status_code == 200, released.text
        assert released_bytes(released) == expected
        transferred += 1
    assert transferred == len(cases)  # every backend here holds AES, RSA and EC keys


@pytest.mark.parametrize("backend_name", ["kmip"], indirect=True)
def test_a_registered_kmip_object_is_released_and_survives_the_key_delete(
    world: World, backend_name: str, peers: Any
) -> None:
    """The guide's third create mode: register an object that already exists in the KMIP server by kmip_key_id."""
    from kmip.core import enums
    from kmip.pie import objects

    secret = os.urandom(32)
    server = peers.kmip()
    with server.client() as client:
        uid = client.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 256, secret, name="made-by-ops"))
    body = {
        "key_information": {"algorithm": "AES", "key_length": 256, "kmip_key_id": uid},
        "transfer_policy_id": world.policy(),
        "backend": UNDER_TEST,
    }
    created = world.api.post("/kbs/v1/keys", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["key_information"]["kmip_key_id"] == uid
    key_id = created.json()["id"]
    released = request_transfer(world, key_id, world.evidence())
    assert released.status_code == 200, released.text
    assert released_bytes(released) == secret
    assert world.api.delete(f"/kbs/v1/keys/{key_id}").status_code == 204
    with server.client() as client:
        assert client.get(uid).value == secret  # keybroker only forgot it
    missing = world.api.post(
        "/kbs/v1/keys", json={**body, "key_information": {**body["key_information"], "kmip_key_id": "999999"}}
    )
    assert (missing.status_code, missing.json()["code"]) == (400, "kmip_object_not_found")
    wrong = world.api.post(
        "/kbs/v1/keys", json={**body, "key_information": {"algorithm": "AES", "key_length": 128, "kmip_key_id": uid}}
    )
    assert (wrong.status_code, wrong.json()["code"]) == (400, "invalid_key_material")


@pytest.mark.parametrize("backend_name", ["embedded", "vault-kv1"], indirect=True)
def test_kmip_key_id_is_refused_by_a_backend_that_cannot_register(world: World, backend_name: str) -> None:
    body = {
        "key_information": {"algorithm": "AES", "key_length": 256, "kmip_key_id": "1"},
        "transfer_policy_id": world.policy(),
        "backend": UNDER_TEST,
    }
    refused = world.api.post("/kbs/v1/keys", json=body)
    assert (refused.status_code, refused.json()["code"]) == (400, "backend_unsupported")
