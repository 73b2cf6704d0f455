"""The audit log: what is recorded, that secrets never are, that a failed audit write fails the action, and that
every kind of tampering is found, naming the first bad entry."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, text, update

from keybroker.audit.chain import GENESIS, verify_chain
from keybroker.services import Services
from keybroker.storage.tables import AuditEventRow
from tests.conftest import assert_problem, sgx_policy, snapshot

KEYS = "/kbs/v1/keys"


def _chain(api: TestClient) -> tuple[list[dict[str, Any]], int, str]:
    response = api.get("/kbs/v1/audit")
    assert response.status_code == 200, response.text
    seq, _, digest = response.headers["x-audit-head"].partition(":")
    return response.json(), int(seq), digest


def _activity(api: TestClient) -> dict[str, str]:
    """A bit of everything: policy, imported and generated keys, a refused request, a token, a deletion."""
    policy = api.post("/kbs/v1/key-transfer-policies", json=sgx_policy()).json()["id"]
    secret = base64.b64encode(b"Q" * 32).decode()
    imported = api.post(
        KEYS,
        json={
            "key_information": {"algorithm": "AES", "key_length": 256, "key_string": secret},
            "transfer_policy_id": policy,
        },
    ).json()["id"]
    generated = api.post(
        KEYS, json={"key_information": {"algorithm": "EC", "curve_type": "secp256r1"}, "transfer_policy_id": policy}
    ).json()["id"]
    api.delete(f"/kbs/v1/key-transfer-policies/{policy}")  # refused: in use
    token = api.post("/kbs/v1/tokens", json={"name": "ci", "roles": ["auditor"], "context": ["nginx"]}).json()
    api.delete(f"{KEYS}/{generated}")
    return {
        "policy": policy,
        "imported": imported,
        "generated": generated,
        "secret": secret,
        "token": token["token"],
        "token_id": token["id"],
    }


def test_actions_are_recorded_with_who_and_what(api: TestClient) -> None:
    made = _activity(api)
    entries, head_seq, head_hash = _chain(api)
    actions = [(e["action"], e["outcome"], e["target"]) for e in entries]
    assert actions[0] == ("token.create", "success", actions[0][2])  # the bootstrap admin token, at init
    assert actions[1:] == [
        ("policy.create", "success", made["policy"]),
        ("key.create", "success", made["imported"]),
        ("key.create", "success", made["generated"]),
        ("request.failed", "failure", "DELETE /kbs/v1/key-transfer-policies/{policy_id}"),
        ("token.create", "success", made["token_id"]),
        ("key.delete", "success", made["generated"]),
    ]
    imported = entries[2]
    assert imported["details"]["mode"] == "import"
    assert imported["details"]["algorithm"] == "AES"
    assert imported["actor"].endswith("(bootstrap-admin)")
    assert imported["client"] == "testclient"
    assert len(imported["request_id"]) == 32
    assert entries[4]["details"]["code"] == "policy_in_use"
    assert verify_chain(entries, head_seq, head_hash).ok
    assert entries[0]["prev_hash"] == GENESIS


def test_audit_never_holds_secrets(api: TestClient, services: Services) -> None:
    made = _activity(api)
    with services.database.transaction() as session:
        dump = json.dumps(
            [[r.action, r.actor, r.target, r.details, r.request_id] for r in session.query(AuditEventRow)]
        )
    assert made["secret"] not in dump
    assert base64.b64decode(made["secret"]).hex() not in dump
    assert made["token"] not in dump
    assert made["token"][-43:] not in dump
    admin = api.headers["Authorization"].split()[1]
    assert admin[-43:] not in dump


def test_a_failed_audit_write_fails_the_action(api: TestClient, services: Services, policy_id: str) -> None:
    before = snapshot(services)
    with services.database.transaction() as session:
        session.execute(text("ALTER TABLE audit_events RENAME TO audit_events_gone"))
    try:
        response = api.post(
            KEYS, json={"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": policy_id}
        )
        assert_problem(response, 503, "audit_unavailable")
        assert_problem(api.post("/kbs/v1/key-transfer-policies", json=sgx_policy()), 503, "audit_unavailable")
        assert snapshot(services) == before  # neither the key record nor its material, nor a policy
    finally:
        with services.database.transaction() as session:
            session.execute(text("ALTER TABLE audit_events_gone RENAME TO audit_events"))


def _tamper(services: Services, how: str) -> int:
    """Damage the stored chain in one way; returns the seq that verification must name."""
    with services.database.transaction() as session:
        if how == "edit":
            session.execute(update(AuditEventRow).where(AuditEventRow.seq == 3).values(outcome="denied"))
            return 3
        if how == "edit-details":
            row = session.get(AuditEventRow, 4)
            assert row is not None
            row.details = {**row.details, "algorithm": "RSA"}
            return 4
        if how == "delete":
            session.execute(delete(AuditEventRow).where(AuditEventRow.seq == 2))
            return 2
        if how == "delete-last":
            last = max(r.seq for r in session.query(AuditEventRow))
            session.execute(delete(AuditEventRow).where(AuditEventRow.seq == last))
            return last
        if how == "insert":
            # Move entries 3.. up by one and put a forged entry at 3, chained to 2 but not to what follows.
            rows = sorted(session.query(AuditEventRow), key=lambda r: -r.seq)
            for row in rows:
                if row.seq >= 3:
                    row.seq += 1
                    session.flush()
            two = session.get(AuditEventRow, 2)
            assert two is not None
            session.add(
                AuditEventRow(
                    seq=3,
                    at=two.at,
                    action="key.delete",
                    outcome="success",
                    actor=None,
                    target="x",
                    request_id=None,
                    client=None,
                    details={},
                    prev_hash=two.hash,
                    hash="f" * 64,
                )
            )
            return 3
        if how == "reorder":
            three, four = session.get(AuditEventRow, 3), session.get(AuditEventRow, 4)
            assert three is not None
            assert four is not None
            three.seq, four.seq = 1000, 1001
            session.flush()
            three.seq, four.seq = 4, 3
            return 3
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["edit", "edit-details", "delete", "delete-last", "insert", "reorder"])
def test_tampering_is_found_at_the_first_bad_entry(api: TestClient, services: Services, how: str) -> None:
    _activity(api)
    entries, seq, digest = _chain(api)
    assert verify_chain(entries, seq, digest).ok
    first_bad = _tamper(services, how)
    entries, seq, digest = _chain(api)
    report = verify_chain(entries, seq, digest)
    assert not report.ok
    assert report.first_bad_seq == first_bad, report


def test_audit_list_filters(api: TestClient) -> None:
    made = _activity(api)
    about_key = api.get("/kbs/v1/audit", params={"target": made["generated"]}).json()
    assert [e["action"] for e in about_key] == ["key.create", "key.delete"]
    assert api.get("/kbs/v1/audit", params={"since": "2030-01-01T00:00:00Z"}).json() == []
    assert_problem(api.get("/kbs/v1/audit", params={"since": "2030-01-01T00:00:00"}), 400, "invalid_request")
    assert_problem(api.get("/kbs/v1/audit", params={"seq": 1}), 400, "unknown_query_parameter")
    page = api.get("/kbs/v1/audit", params={"limit": 2})
    assert [e["seq"] for e in page.json()] == [1, 2]
    assert page.headers["x-next-cursor"] == "2"


def test_readyz_reports_an_unreachable_backend(
    api: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keybroker.errors import BackendUnavailable

    assert api.get("/readyz").status_code == 200

    def down() -> None:
        raise BackendUnavailable("connection refused")

    monkeypatch.setattr(services.keys.backends["embedded"], "check", down)
    # Within READY_CACHE_SECONDS the last answer is reused: a public endpoint must not drive backend round trips.
    assert api.get("/readyz").status_code == 200
    monkeypatch.setattr("keybroker.api.routes.ops.READY_CACHE_SECONDS", 0.0)
    response = api.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "schema": "ok", "backend:embedded": "backend_unavailable"},
    }


def test_the_server_renews_vault_tokens_in_the_background(services: Services) -> None:
    """The lifespan task calls renew_if_due on every backend that has one, and keeps going when one fails."""
    import asyncio

    from keybroker.api.background import _renew_vault_tokens

    calls: list[str] = []

    class Holder:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.fail = name, fail

        def renew_if_due(self) -> float | None:
            calls.append(self.name)
            if self.fail:
                raise RuntimeError("refused")
            return 0.01

    assert services.backends is not None
    stores = services.backends.stores
    assert isinstance(stores, dict)
    stores["vault-a"] = Holder("a", fail=True)
    stores["vault-b"] = Holder("b", fail=False)

    async def run() -> None:
        task = asyncio.create_task(_renew_vault_tokens(services))
        await asyncio.sleep(1.5)  # the loop waits at least 1 s between rounds
        task.cancel()

    try:
        asyncio.run(run())
    finally:
        del stores["vault-a"], stores["vault-b"]
    assert calls[:2] == ["a", "b"]
    assert calls.count("b") >= 2  # a failing holder did not stop the loop
