"""/kbs/v1/keys over the in-process app: the three create modes, listing, re-assignment, deletion and every
refusal (each with its code, and with the database left exactly as it was)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient

from keybroker.ids import KeyId
from keybroker.services import Services
from tests.conftest import assert_problem, sgx_policy, snapshot

KEYS = "/kbs/v1/keys"


def _body(policy_id: str, **info: Any) -> dict[str, Any]:
    return {"key_information": info, "transfer_policy_id": policy_id}


@pytest.mark.parametrize(
    ("info", "length", "curve"),
    [
        ({"algorithm": "AES", "key_length": 128}, 128, None),
        ({"algorithm": "AES", "key_length": 256}, 256, None),
        ({"algorithm": "RSA", "key_length": 2048}, 2048, None),
        ({"algorithm": "EC", "curve_type": "prime256v1"}, 256, "secp256r1"),
        ({"algorithm": "EC", "curve_type": "secp521r1", "key_length": 521}, 521, "secp521r1"),
    ],
)
def test_generate(api: TestClient, policy_id: str, info: dict[str, Any], length: int, curve: str | None) -> None:
    response = api.post(KEYS, json={**_body(policy_id, **info), "label": "l1", "usage": "tls"})
    assert response.status_code == 201, response.text
    key = response.json()
    uuid.UUID(key["id"], version=4)
    assert key["key_information"] == {
        "algorithm": info["algorithm"],
        "key_length": length,
        "curve_type": curve,
        "kmip_key_id": None,
    }
    assert key["label"] == "l1"
    assert key["usage"] == "tls"
    assert key["backend"] == "embedded"
    assert key["transfer_policy_id"] == policy_id
    assert key["transfer_link"] == f"https://127.0.0.1:9443/kbs/v1/keys/{key['id']}/transfer"  # never from Host
    assert key["created_at"] == "2026-11-27T12:00:00Z"
    assert set(key) == {
        "id",
        "key_information",
        "label",
        "usage",
        "transfer_policy_id",
        "backend",
        "created_at",
        "transfer_link",
    }
    assert api.get(f"{KEYS}/{key['id']}").json() == key


def test_import_stores_exactly_the_given_material(api: TestClient, services: Services, policy_id: str) -> None:
    raw = bytes(range(32))
    aes = api.post(
        KEYS, json=_body(policy_id, algorithm="AES", key_length=256, key_string=base64.b64encode(raw).decode())
    )
    assert aes.status_code == 201, aes.text
    rsa_key = rsa.generate_private_key(65537, 3072)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    rsa_resp = api.post(KEYS, json=_body(policy_id, algorithm="RSA", key_length=3072, key_string=pem))
    assert rsa_resp.status_code == 201, rsa_resp.text
    ec_key = ec.generate_private_key(ec.SECP384R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    ec_resp = api.post(KEYS, json=_body(policy_id, algorithm="EC", curve_type="secp384r1", key_string=ec_pem))
    assert ec_resp.status_code == 201, ec_resp.text

    def material(key_id: str) -> bytes:
        return services.keys.load_material(services.keys.get(KeyId(key_id))).secret

    pkcs8 = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert material(aes.json()["id"]) == raw
    assert material(rsa_resp.json()["id"]) == rsa_key.private_bytes(*pkcs8)
    assert material(ec_resp.json()["id"]) == ec_key.private_bytes(*pkcs8)
    for response in (aes, rsa_resp, ec_resp):
        assert "key_string" not in response.text
        assert base64.b64encode(raw).decode() not in response.text


def test_client_chosen_id_from_the_guide_body(api: TestClient, policy_id: str) -> None:
    chosen = str(uuid.uuid4())
    response = api.post(KEYS, json=_body(policy_id, algorithm="AES", key_length=256, id=chosen))
    assert response.status_code == 201
    assert response.json()["id"] == chosen
    again = api.post(KEYS, json=_body(policy_id, algorithm="AES", key_length=256, id=chosen))
    assert_problem(again, 409, "key_exists")


def test_list_filters_and_pagination(api: TestClient, policy_id: str, clock: Any) -> None:
    from datetime import timedelta

    other_policy = api.post("/kbs/v1/key-transfer-policies", json=sgx_policy()).json()["id"]
    created = []
    for info, pid in [
        ({"algorithm": "AES", "key_length": 128}, policy_id),
        ({"algorithm": "AES", "key_length": 256}, policy_id),
        ({"algorithm": "AES", "key_length": 256}, other_policy),
        ({"algorithm": "EC", "curve_type": "secp256r1"}, policy_id),
        ({"algorithm": "EC", "curve_type": "secp384r1"}, other_policy),
    ]:
        clock.advance(timedelta(seconds=1))
        created.append(api.post(KEYS, json=_body(pid, **info)).json()["id"])

    def ids(**params: Any) -> list[str]:
        response = api.get(KEYS, params=params)
        assert response.status_code == 200, response.text
        return [key["id"] for key in response.json()]

    assert ids() == created
    assert ids(algorithm="AES") == created[:3]
    assert ids(algorithm="aes", keyLength=256) == created[1:3]
    assert ids(curveType="prime256v1") == [created[3]]
    assert ids(transferPolicyId=other_policy) == [created[2], created[4]]
    assert ids(algorithm="RSA") == []

    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    pages = 0
    while True:
        response = api.get(KEYS, params=params)
        seen += [key["id"] for key in response.json()]
        pages += 1
        cursor = response.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in response.headers
            break
        assert response.headers["link"].endswith('rel="next"')
        params["cursor"] = cursor
    assert seen == created
    assert pages == 3


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"algoritm": "AES"}, "unknown_query_parameter"),
        ({"algorithm": "DES"}, "unsupported_algorithm"),
        ({"curveType": "secp256k1"}, "unsupported_curve"),
        ({"keyLength": "big"}, "invalid_request"),
        ({"limit": 0}, "invalid_limit"),
        ({"limit": 100000}, "invalid_limit"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
    ],
)
def test_list_refuses_bad_queries(api: TestClient, policy_id: str, params: dict[str, Any], code: str) -> None:
    assert_problem(api.get(KEYS, params=params), 400, code)


def test_reassign_policy(api: TestClient, policy_id: str) -> None:
    key = api.post(KEYS, json=_body(policy_id, algorithm="AES", key_length=256)).json()
    other = api.post("/kbs/v1/key-transfer-policies", json=sgx_policy()).json()["id"]
    response = api.put(f"{KEYS}/{key['id']}", json={"transfer_policy_id": other})
    assert response.status_code == 200
    assert response.json()["transfer_policy_id"] == other
    assert api.get(f"{KEYS}/{key['id']}").json()["transfer_policy_id"] == other


def test_delete_removes_record_and_material(api: TestClient, services: Services, policy_id: str) -> None:
    key = api.post(KEYS, json=_body(policy_id, algorithm="AES", key_length=256)).json()
    record = services.keys.get(key["id"])
    response = api.delete(f"{KEYS}/{key['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(api.get(f"{KEYS}/{key['id']}"), 404, "key_not_found")
    assert_problem(api.delete(f"{KEYS}/{key['id']}"), 404, "key_not_found")
    assert snapshot(services)["material"] == []
    with pytest.raises(Exception, match="not in the embedded store"):
        services.keys.load_material(record)


# --- every refusal of POST /kbs/v1/keys, each leaving the database unchanged ---------------------------------

_PEM_2048 = (
    rsa.generate_private_key(65537, 2048)
    .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    .decode()
)

CREATE_REFUSALS: list[tuple[str, Any, int, str]] = [
    ("missing-key-information", {"transfer_policy_id": "{policy}"}, 400, "invalid_request"),
    ("missing-policy", {"key_information": {"algorithm": "AES", "key_length": 256}}, 400, "invalid_request"),
    ("unknown-field", {**_body("{policy}", algorithm="AES", key_length=256), "colour": "red"}, 400, "invalid_request"),
    ("unknown-info-field", _body("{policy}", algorithm="AES", key_length=256, bits=256), 400, "invalid_request"),
    ("length-as-string", _body("{policy}", algorithm="AES", key_length="256"), 400, "invalid_request"),
    ("unknown-algorithm", _body("{policy}", algorithm="3DES", key_length=168), 400, "unsupported_algorithm"),
    ("aes-bad-length", _body("{policy}", algorithm="AES", key_length=512), 400, "unsupported_key_length"),
    ("rsa-1024", _body("{policy}", algorithm="RSA", key_length=1024), 400, "unsupported_key_length"),
    (
        "rsa-with-curve",
        _body("{policy}", algorithm="RSA", key_length=2048, curve_type="secp256r1"),
        400,
        "unsupported_curve",
    ),
    ("ec-no-curve", _body("{policy}", algorithm="EC"), 400, "unsupported_curve"),
    ("ec-bad-curve", _body("{policy}", algorithm="EC", curve_type="secp256k1"), 400, "unsupported_curve"),
    (
        "ec-curve-length-mismatch",
        _body("{policy}", algorithm="EC", curve_type="secp256r1", key_length=384),
        400,
        "unsupported_key_length",
    ),
    (
        "key-string-garbage",
        _body("{policy}", algorithm="RSA", key_length=2048, key_string="hello"),
        400,
        "invalid_key_material",
    ),
    (
        "key-string-wrong-size",
        _body("{policy}", algorithm="RSA", key_length=3072, key_string=_PEM_2048),
        400,
        "invalid_key_material",
    ),
    (
        "aes-key-string-short",
        _body("{policy}", algorithm="AES", key_length=256, key_string=base64.b64encode(b"k" * 16).decode()),
        400,
        "invalid_key_material",
    ),
    (
        "both-sources",
        _body("{policy}", algorithm="AES", key_length=256, key_string="AAAA", kmip_key_id="7"),
        400,
        "conflicting_key_source",
    ),
    (
        "kmip-without-backend",
        _body("{policy}", algorithm="AES", key_length=256, kmip_key_id="7"),
        400,
        "backend_unsupported",
    ),
    ("unknown-policy", _body(str(uuid.uuid4()), algorithm="AES", key_length=256), 400, "unknown_transfer_policy"),
    ("policy-not-uuid", _body("policy-1", algorithm="AES", key_length=256), 400, "invalid_request"),
    (
        "unknown-backend",
        {**_body("{policy}", algorithm="AES", key_length=256), "backend": "vault"},
        400,
        "unknown_backend",
    ),
    ("id-not-uuid", _body("{policy}", algorithm="AES", key_length=256, id="my-key"), 400, "invalid_request"),
    (
        "label-too-long",
        {**_body("{policy}", algorithm="AES", key_length=256), "label": "x" * 257},
        400,
        "invalid_request",
    ),
    ("body-is-array", [], 400, "invalid_request"),
]


def _fill(value: Any, policy_id: str) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, policy_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, policy_id) for v in value]
    return policy_id if value == "{policy}" else value


@pytest.mark.parametrize(
    ("body", "status", "code"), [r[1:] for r in CREATE_REFUSALS], ids=[r[0] for r in CREATE_REFUSALS]
)
def test_create_refusals_change_nothing(
    api: TestClient, services: Services, policy_id: str, body: Any, status: int, code: str
) -> None:
    before = snapshot(services)
    problem = assert_problem(api.post(KEYS, json=_fill(body, policy_id)), status, code)
    assert snapshot(services) == before
    # Refusals never echo key material back.
    key_string = (body.get("key_information") or {}).get("key_string") if isinstance(body, dict) else None
    if key_string:
        material_lines = [line for line in key_string.splitlines() if line and not line.startswith("-----")]
        for line in material_lines:
            assert line[:16] not in json.dumps(problem)


def test_validation_errors_never_echo_the_input(api: TestClient, policy_id: str) -> None:
    secret = base64.b64encode(b"S" * 32).decode()
    body = {
        "key_information": {"algorithm": "AES", "key_length": 256, "key_string": secret, "extra": secret},
        "transfer_policy_id": policy_id,
    }
    response = api.post(KEYS, json=body)
    problem = assert_problem(response, 400, "invalid_request")
    assert secret not in response.text
    assert problem["errors"] == [
        {"loc": "key_information.extra", "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
    ]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b'{"key_information": ', "application/json", 400, "invalid_json"),
        (b"", "application/json", 400, "invalid_json"),
        (b"\xff\xfe", "application/json", 400, "invalid_json"),
        (b"key_information=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"a": 1}', "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_malformed_bodies(
    api: TestClient, services: Services, content: bytes, content_type: str, status: int, code: str
) -> None:
    before = snapshot(services)
    response = api.post(KEYS, content=content, headers={"content-type": content_type})
    assert_problem(response, status, code)
    assert snapshot(services) == before


def test_oversized_body_is_413_and_changes_nothing(api: TestClient, services: Services, policy_id: str) -> None:
    before = snapshot(services)
    body = _body(policy_id, algorithm="AES", key_length=256)
    body["label"] = "x" * (services.settings.server.max_body_bytes + 1)
    assert_problem(api.post(KEYS, json=body), 413, "payload_too_large")

    # A chunked body with no Content-Length is counted while it is read.
    def chunks() -> Any:
        for _ in range(200):
            yield b"x" * 10_000

    assert_problem(
        api.post(KEYS, content=chunks(), headers={"content-type": "application/json"}), 413, "payload_too_large"
    )
    assert snapshot(services) == before


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "unauthorized"),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, "unauthorized"),
        ({"Authorization": "Bearer "}, "unauthorized"),
        ({"Authorization": "Bearer kb_" + "A" * 43}, "invalid_token"),
        ({"Authorization": "Bearer not-a-keybroker-token"}, "invalid_token"),
    ],
)
def test_missing_or_wrong_token(
    api: TestClient, services: Services, policy_id: str, headers: dict[str, str], code: str
) -> None:
    before = snapshot(services)
    api.headers.pop("Authorization")
    body = _body(policy_id, algorithm="AES", key_length=256)
    for response in (api.post(KEYS, json=body, headers=headers), api.get(KEYS, headers=headers)):
        problem = assert_problem(response, 401, code)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "request_id" in problem
    # Authentication is decided before the body is read: garbage gets 401, not 400.
    assert_problem(api.post(KEYS, content=b"{", headers={**headers, "content-type": "application/json"}), 401, code)
    assert snapshot(services) == before


def test_unknown_route_and_method_are_problems(api: TestClient) -> None:
    assert_problem(api.get("/kbs/v1/nothing"), 404, "not_found")
    assert_problem(api.patch(KEYS), 405, "method_not_allowed")
    assert_problem(api.get(f"{KEYS}/{uuid.uuid4()}"), 404, "key_not_found")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"transfer_policy_id": str(uuid.uuid4())}, 400, "unknown_transfer_policy"),
        ({"transfer_policy_id": "nope"}, 400, "invalid_request"),
        ({}, 400, "invalid_request"),
        ({"transfer_policy_id": "{policy}", "label": "x"}, 400, "invalid_request"),
    ],
)
def test_reassign_refusals(
    api: TestClient, services: Services, policy_id: str, body: dict[str, Any], status: int, code: str
) -> None:
    key = api.post(KEYS, json=_body(policy_id, algorithm="AES", key_length=256)).json()
    before = snapshot(services)
    assert_problem(api.put(f"{KEYS}/{key['id']}", json=_fill(body, policy_id)), status, code)
    assert snapshot(services) == before
    assert_problem(api.put(f"{KEYS}/{uuid.uuid4()}", json={"transfer_policy_id": policy_id}), 404, "key_not_found")


def test_request_id_is_echoed_or_generated(api: TestClient) -> None:
    assert api.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = api.get("/healthz", headers={"x-request-id": "bad id\r\nInjected: 1"}).headers["x-request-id"]
    assert len(generated) == 32
