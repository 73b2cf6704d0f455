"""keybroker.api.hot: GET /healthz and POST /kbs/v1/keys/{key_id}/transfer are served past FastAPI's router, and
only those: a path that merely resembles them reaches the router and gets what it always got. What the hot routes
answer goes through the same edge (request id, access log, metrics under the route's template, problem bodies)."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from keybroker.api.app import create_app
from keybroker.services import Services
from tests.conftest import assert_problem


def _key(api: TestClient, policy_id: str) -> str:
    info = {"algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(b"k" * 32).decode()}
    response = api.post("/kbs/v1/keys", json={"key_information": info, "transfer_policy_id": policy_id})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_healthz_as_before(api: TestClient) -> None:
    response = api.get("/healthz", headers={"X-Request-Id": "probe-1"})
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "probe-1"
    assert_problem(api.get("/healthz/"), 404, "not_found")  # not the hot route: the router's answer
    assert_problem(api.post("/healthz"), 405, "method_not_allowed")


def test_the_nonce_step_and_lookalike_paths(api: TestClient, policy_id: str) -> None:
    key_id = _key(api, policy_id)
    nonce = api.post(f"/kbs/v1/keys/{key_id}/transfer", json={})
    assert nonce.status_code == 200
    assert set(nonce.json()) == {"val", "iat", "signature"}
    assert nonce.headers["attestation-type"] == "SGX"
    assert nonce.headers["x-request-id"]
    assert_problem(api.post("/kbs/v1/keys/00000000-0000-4000-8000-000000000000/transfer", json={}), 404,
                   "key_not_found")  # fmt: skip
    assert_problem(api.post(f"/kbs/v1/keys/{key_id}/x/transfer", json={}), 404, "not_found")  # two segments
    assert_problem(api.post("/kbs/v1/keys//transfer", json={}), 404, "not_found")  # no id
    assert_problem(api.post(f"/kbs/v1/keys/{key_id}/transfer/", json={}), 404, "not_found")
    assert_problem(api.get(f"/kbs/v1/keys/{key_id}/transfer"), 405, "method_not_allowed")
    metrics = api.get("/metrics").text
    route = 'route="/kbs/v1/keys/{key_id}/transfer",status="200"'
    assert f'keybroker_http_requests_total{{method="POST",{route}}} 1.0' in metrics
    assert 'keybroker_http_requests_total{method="POST",route="unmatched",status="404"}' in metrics


def test_a_role_without_transfers_does_not_serve_them(services: Services, admin_token: str) -> None:
    with TestClient(create_app(services, role="attestation"), raise_server_exceptions=False) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        response = client.post("/kbs/v1/keys/00000000-0000-4000-8000-000000000000/transfer", json={})
        assert_problem(response, 404, "not_found")


def test_a_transfer_that_cannot_start_is_server_busy_and_never_runs(
    api: TestClient, policy_id: str, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from keybroker.api.routes.transfer import TransferPool
    from keybroker.transfer.service import TransferService

    key_id = _key(api, policy_id)
    monkeypatch.setattr(TransferPool, "START_DEADLINE", 0.2)
    pool: TransferPool = api.app.state.transfer_pool  # type: ignore[attr-defined]  # Starlette's app is untyped here
    release = threading.Event()
    lookups: list[str] = []
    monkeypatch.setattr(TransferService, "lookup", lambda self, key, max_age=0.0: lookups.append(key))
    held = [pool._executor.submit(release.wait) for _ in range(services.settings.server.transfer_threads)]
    try:
        body = {"quote": "AA==", "nonce": {"val": "", "iat": "", "signature": ""}, "user_data": "AA=="}
        response = api.post(f"/kbs/v1/keys/{key_id}/transfer", json=body, headers={"Attestation-Type": "SGX"})
        assert_problem(response, 503, "server_busy")
        assert response.headers["retry-after"] == "1"
    finally:
        release.set()
        for future in held:
            future.result()
    assert lookups == []  # it never ran: nothing looked up, nothing audited
    assert 'keybroker_transfer_decisions_total{outcome="server_busy"} 1.0' in api.get("/metrics").text
