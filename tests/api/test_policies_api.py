"""/kbs/v1/key-transfer-policies: CRUD, strict validation, policy_in_use and immutable."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from keybroker.services import Services
from tests.conftest import assert_problem, sgx_policy, snapshot

POLICIES = "/kbs/v1/key-transfer-policies"


def test_create_get_list_replace_delete(api: TestClient) -> None:
    created = api.post(POLICIES, json=sgx_policy())
    assert created.status_code == 201, created.text
    policy = created.json()
    assert policy["attestation_type"] == ["SGX"]
    assert policy["sgx"]["attributes"]["isvsvn"] == 1
    assert policy["immutable"] is False
    assert policy["created_at"] == policy["updated_at"] == "2026-11-27T12:00:00Z"
    assert api.get(f"{POLICIES}/{policy['id']}").json() == policy
    assert [p["id"] for p in api.get(POLICIES).json()] == [policy["id"]]

    changed = sgx_policy(attestation_type="SGX", client_permissions_allof=["nginx"])
    replaced = api.put(f"{POLICIES}/{policy['id']}", json=changed)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["client_permissions_allof"] == ["nginx"]
    assert replaced.json()["id"] == policy["id"]

    assert api.delete(f"{POLICIES}/{policy['id']}").status_code == 204
    assert_problem(api.get(f"{POLICIES}/{policy['id']}"), 404, "policy_not_found")
    assert_problem(api.delete(f"{POLICIES}/{policy['id']}"), 404, "policy_not_found")
    assert_problem(api.put(f"{POLICIES}/{policy['id']}", json=changed), 404, "policy_not_found")


def test_policy_in_use_cannot_be_deleted(api: TestClient, services: Services, policy_id: str) -> None:
    key = api.post(
        "/kbs/v1/keys",
        json={"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": policy_id},
    ).json()
    before = snapshot(services)
    assert_problem(api.delete(f"{POLICIES}/{policy_id}"), 409, "policy_in_use")
    assert snapshot(services) == before
    assert api.delete(f"/kbs/v1/keys/{key['id']}").status_code == 204
    assert api.delete(f"{POLICIES}/{policy_id}").status_code == 204


def test_immutable_policy_cannot_change(api: TestClient, services: Services) -> None:
    policy = api.post(POLICIES, json=sgx_policy(immutable=True)).json()
    before = snapshot(services)
    assert_problem(api.put(f"{POLICIES}/{policy['id']}", json=sgx_policy()), 409, "policy_immutable")
    assert_problem(api.delete(f"{POLICIES}/{policy['id']}"), 409, "policy_immutable")
    assert snapshot(services) == before


def test_a_mutable_policy_can_be_frozen(api: TestClient) -> None:
    policy = api.post(POLICIES, json=sgx_policy()).json()
    assert api.put(f"{POLICIES}/{policy['id']}", json=sgx_policy(immutable=True)).json()["immutable"] is True
    assert_problem(api.put(f"{POLICIES}/{policy['id']}", json=sgx_policy()), 409, "policy_immutable")


@pytest.mark.parametrize(
    "change",
    [
        {"attestation_type": ["SGX"], "sgx": {"attributes": {"mrenclave": ["ab" * 32], "mr_signer": ["ab" * 32]}}},
        {"sgx": {"attributes": {"mrenclave": ["ab" * 30]}}},
        {"attestation_type": "TDX"},
        {"allow_simulated": "true"},
        {"unexpected": 1},
    ],
    ids=["typo-attribute", "short-hex", "type-without-section", "string-bool", "unknown-field"],
)
def test_invalid_policies_are_refused_and_change_nothing(
    api: TestClient, services: Services, policy_id: str, change: dict[str, Any]
) -> None:
    before = snapshot(services)
    for response in (
        api.post(POLICIES, json=sgx_policy(**change)),
        api.put(f"{POLICIES}/{policy_id}", json=sgx_policy(**change)),
    ):
        problem = assert_problem(response, 400, "invalid_request")
        assert problem["errors"]
        assert all(set(error) == {"loc", "msg", "type"} for error in problem["errors"])
    assert snapshot(services) == before


def test_list_pagination_and_unknown_parameters(api: TestClient) -> None:
    ids = {api.post(POLICIES, json=sgx_policy()).json()["id"] for _ in range(3)}
    first = api.get(POLICIES, params={"limit": 2})
    assert len(first.json()) == 2
    second = api.get(POLICIES, params={"limit": 2, "cursor": first.headers["x-next-cursor"]})
    assert "x-next-cursor" not in second.headers
    assert {p["id"] for p in first.json() + second.json()} == ids
    assert_problem(api.get(POLICIES, params={"attestation_type": "SGX"}), 400, "unknown_query_parameter")
    assert_problem(api.get(f"{POLICIES}/{uuid.uuid4()}"), 404, "policy_not_found")
