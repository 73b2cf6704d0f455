"""Red-team finding 2: every integer (and time) value that reaches SQL or arithmetic is bounded at the edge, so an
out-of-range value is a 400 with a code, never a 500 (SQLite binds at most int64; PostgreSQL's BIGINT likewise).

The query parameters are found from the OpenAPI document, so a new integer parameter is covered without editing
this file; body fields are listed by hand (bodies are parsed by ``json_body``)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from keybroker.api.app import ROUTERS
from keybroker.services import Services
from tests.conftest import assert_problem, snapshot

HUGE = ["9223372036854775808", "-9223372036854775809", "1" + "0" * 40, "18446744073709551616"]


def _integer_query_parameters() -> list[tuple[str, str]]:
    app = FastAPI()
    for router in ROUTERS:
        app.include_router(router)
    found = []
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query" and "integer" in repr(parameter["schema"]):
                    found.append((f"{method.upper()} {path}", parameter["name"]))
    return found


INTEGER_QUERIES = _integer_query_parameters()


def test_the_integer_query_parameters_are_found() -> None:
    assert ("GET /kbs/v1/audit", "after") in INTEGER_QUERIES
    assert ("GET /kbs/v1/keys", "limit") in INTEGER_QUERIES


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize(("route", "name"), INTEGER_QUERIES, ids=[f"{r}?{n}" for r, n in INTEGER_QUERIES])
def test_out_of_range_integers_in_queries_are_400(api: TestClient, route: str, name: str, value: str) -> None:
    method, path = route.split(" ", 1)
    response = api.request(method, path, params={name: value})
    body = assert_problem(response, 400, "invalid_request")
    assert [error["loc"] for error in body["errors"]] == [f"query.{name}"]


@pytest.mark.parametrize(
    "since",
    ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "99999-01-01T00:00:00Z", "2026-01-01T00:00:00+25:00"],
)
def test_out_of_range_times_are_400(api: TestClient, since: str) -> None:
    assert_problem(api.get("/kbs/v1/audit", params={"since": since}), 400, "invalid_request")


def _body_cases(policy_id: str) -> list[tuple[str, str, dict[str, Any], str]]:
    huge = 2**63
    aes = {"algorithm": "AES", "key_length": huge}
    return [
        ("POST", "/kbs/v1/tokens", {"name": "x", "roles": ["admin"], "ttl_seconds": huge}, "invalid_request"),
        ("POST", "/kbs/v1/tokens", {"name": "x", "roles": ["admin"], "ttl_seconds": 10**40}, "invalid_request"),
        ("POST", "/kbs/v1/keys", {"key_information": aes, "transfer_policy_id": policy_id}, "unsupported_key_length"),
        (
            "POST",
            "/kbs/v1/keys",
            {"key_information": {**aes, "key_length": -huge}, "transfer_policy_id": policy_id},
            "unsupported_key_length",
        ),
        (
            "POST",
            "/kbs/v1/key-transfer-policies",
            {"attestation_type": "SGX", "sgx": {"attributes": {"isvsvn": huge}}},
            "invalid_request",
        ),
        (
            "POST",
            "/kbs/v1/key-transfer-policies",
            {"attestation_type": "SGX", "sgx": {"attributes": {"isvprodid": [huge]}}},
            "invalid_request",
        ),
        (
            "POST",
            "/kbs/v1/key-transfer-policies",
            {"attestation_type": "TDX", "tdx": {"attributes": {"seamsvn": -1}}},
            "invalid_request",
        ),
        ("POST", "/cms/v1/certificates", {"csr": "x", "days": huge}, "invalid_request"),
    ]


def test_out_of_range_integers_in_bodies_are_400(api: TestClient, services: Services, policy_id: str) -> None:
    before = snapshot(services)
    for method, path, body, code in _body_cases(policy_id):
        response = api.request(method, path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert_problem(response, 400, code)
    assert snapshot(services) == before
