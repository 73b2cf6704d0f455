"""Hostile input: duplicate members, huge numbers, forged cursors, odd path ids, control characters, oversized
keys. Each is refused with its own code, and nothing changes."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from pydantic import ValidationError

from keybroker.policy.model import TransferPolicyDocument
from keybroker.services import Services
from keybroker.storage.pagination import encode_cursor
from tests.conftest import assert_problem, snapshot
from tests.unit.test_policy_model import REJECTIONS, _set

KEYS = "/kbs/v1/keys"
POLICIES = "/kbs/v1/key-transfer-policies"


def _post_raw(api: TestClient, path: str, text: str) -> Any:
    return api.post(path, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (
            KEYS,
            '{"key_information": {"algorithm": "AES", "key_length": 256, "key_length": 128},'
            ' "transfer_policy_id": "{policy}"}',
        ),
        (
            KEYS,
            '{"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": "{policy}",'
            ' "transfer_policy_id": "{policy}"}',
        ),
        (
            POLICIES,
            '{"attestation_type": "SGX", "sgx": {"attributes": {"mrenclave": ["' + "aa" * 32 + '"],'
            ' "mrenclave": ["' + "bb" * 32 + '"]}}}',
        ),
        (
            POLICIES,
            '{"attestation_type": "SGX", "sgx": {"attributes": {"mrsigner": ["' + "aa" * 32 + '"]}},'
            ' "sgx": {"attributes": {"mrsigner": ["' + "bb" * 32 + '"]}}}',
        ),
    ],
    ids=["key-length-twice", "policy-id-twice", "mrenclave-twice", "sgx-section-twice"],
)
def test_duplicate_members_are_refused(
    api: TestClient, services: Services, policy_id: str, path: str, text: str
) -> None:
    before = snapshot(services)
    assert_problem(_post_raw(api, path, text.replace("{policy}", policy_id)), 400, "duplicate_member")
    assert snapshot(services) == before


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"keyLength": str(2**63)}, "invalid_request"),
        ({"limit": str(2**70)}, "invalid_request"),
        ({"algorithm": ""}, "invalid_request"),
        ({"curveType": ""}, "invalid_request"),
        ([("algorithm", "AES"), ("algorithm", "RSA")], "duplicate_query_parameter"),
    ],
)
def test_list_queries_that_could_overflow_or_widen(api: TestClient, params: Any, code: str) -> None:
    assert_problem(api.get(KEYS, params=params), 400, code)


@pytest.mark.parametrize(
    "cursor",
    [
        base64.urlsafe_b64encode(b'["0001-01-01T00:00:00+01:00","a"]').decode().rstrip("="),
        base64.urlsafe_b64encode(b'["9999-12-31T23:59:59-01:00","a"]').decode().rstrip("="),
        base64.urlsafe_b64encode(b'["2026-01-01T00:00:00","a"]').decode().rstrip("="),
        base64.urlsafe_b64encode(b"[" * 300).decode(),
        encode_cursor.__name__,
    ],
    ids=["year-1", "year-9999", "naive", "deep-nesting", "garbage"],
)
def test_forged_cursors(api: TestClient, cursor: str) -> None:
    assert_problem(api.get(KEYS, params={"cursor": cursor}), 400, "invalid_cursor")


@pytest.mark.parametrize(
    "key_id",
    [str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}", "x" * 5000, "%00", "..", "k%0Aey"],
    ids=["upper", "braces", "huge", "nul", "dots", "newline"],
)
def test_path_ids_that_are_not_canonical_uuids(api: TestClient, key_id: str) -> None:
    for response in (api.get(f"{KEYS}/{key_id}"), api.delete(f"{KEYS}/{key_id}"), api.get(f"{POLICIES}/{key_id}")):
        if response.status_code == 404 and response.headers["content-type"].startswith("application/problem"):
            assert key_id not in response.json()["detail"]
            assert len(response.text) < 600
        else:
            assert response.status_code in (400, 404, 405), response.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("label", "a\x00b"), ("usage", "tls\nInjected: yes"), ("label", "\x1b[31mred")],
)
def test_control_characters_in_text(
    api: TestClient, services: Services, policy_id: str, field: str, value: str
) -> None:
    before = snapshot(services)
    body = {"key_information": {"algorithm": "AES", "key_length": 128}, "transfer_policy_id": policy_id, field: value}
    assert_problem(api.post(KEYS, json=body), 400, "invalid_request")
    assert snapshot(services) == before


def test_caller_chosen_ids_must_be_uuid4(api: TestClient, policy_id: str) -> None:
    for chosen in ("00000000-0000-0000-0000-000000000000", str(uuid.uuid1()), str(uuid.uuid4()).upper()):
        body = {
            "key_information": {"algorithm": "AES", "key_length": 128, "id": chosen},
            "transfer_policy_id": policy_id,
        }
        assert_problem(api.post(KEYS, json=body), 400, "invalid_request")


def test_oversized_and_too_large_rsa_keys_are_refused_cheaply(api: TestClient, policy_id: str) -> None:
    big = rsa.generate_private_key(65537, 8192)
    pem = big.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    body = {
        "key_information": {"algorithm": "RSA", "key_length": 7680, "key_string": pem},
        "transfer_policy_id": policy_id,
    }
    problem = assert_problem(api.post(KEYS, json=body), 400, "invalid_key_material")
    assert "larger than 7680 bits" in problem["detail"]
    body["key_information"]["key_string"] = pem + "\n" * 4000
    problem = assert_problem(api.post(KEYS, json=body), 400, "invalid_request")
    assert problem["errors"][0]["loc"] == "key_information.key_string"


@pytest.mark.parametrize(
    ("document", "path", "value", "reason"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_every_policy_rejection_also_over_http(
    api: TestClient, services: Services, document: dict[str, Any], path: str, value: Any, reason: str
) -> None:
    """The schema table of tests/unit/test_policy_model.py, through the API (JSON mode, not Python mode)."""
    changed = _set(document, path, value)
    with pytest.raises(ValidationError):
        TransferPolicyDocument.model_validate(changed)
    before = snapshot(services)
    problem = assert_problem(api.post(POLICIES, json=changed), 400, "invalid_request")
    assert reason.lower() in str(problem).lower()
    assert snapshot(services) == before


def test_an_unexpected_error_is_a_bare_500(
    api: TestClient,
    services: Services,
    policy_id: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def explode(*_args: object) -> None:
        raise RuntimeError("SELECT secret FROM somewhere")

    monkeypatch.setattr(services.keys, "get", explode)
    response = api.get(f"{KEYS}/{uuid.uuid4()}")
    problem = assert_problem(response, 500, "internal_error")
    assert "SELECT" not in response.text
    assert problem["request_id"] == response.headers["x-request-id"]
    assert "SELECT secret" not in capsys.readouterr().err
