"""The key outbox under races between a create and the reconciler (embedded backend; the same code serves every
backend): a claimed row is never freed by anyone but its claimant, a create whose row was claimed never writes its
record, and a key id stays reserved until the reconciler's backend work is done."""

from __future__ import annotations

import base64
import os
import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from keybroker.errors import BackendUnavailable
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import KeyMaterial
from keybroker.services import Services


def _body(policy_id: str, key_id: str, secret: bytes) -> dict[str, Any]:
    info = {"id": key_id, "algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(secret).decode()}
    return {"key_information": info, "transfer_policy_id": policy_id}


def test_a_re_create_waits_until_the_reconciler_has_purged_the_abandoned_write(
    api: TestClient, services: Services, policy_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = services.keys.backends["embedded"]
    key_id = str(uuid.uuid4())
    real_put, real_purge = store.put, store.purge
    retried: list[tuple[int, str]] = []

    def purge_while_the_client_retries(purged: KeyId) -> None:
        response = api.post("/kbs/v1/keys", json=_body(policy_id, key_id, os.urandom(32)))
        retried.append((response.status_code, response.json().get("code", "")))
        real_purge(purged)

    def put_then_the_reconciler_claims(claimed: KeyId, material: KeyMaterial) -> BackendRef:
        ref = real_put(claimed, material)
        monkeypatch.setattr(store, "purge", purge_while_the_client_retries)
        assert services.keys.reconcile(older_than=timedelta(0)).finished == 1
        monkeypatch.setattr(store, "purge", real_purge)
        return ref

    monkeypatch.setattr(store, "put", put_then_the_reconciler_claims)
    first = api.post("/kbs/v1/keys", json=_body(policy_id, key_id, os.urandom(32)))
    assert (first.status_code, first.json()["code"]) == (503, "key_write_interrupted")
    assert retried == [(409, "key_delete_pending")]  # the id stayed reserved while the reconciler worked
    monkeypatch.setattr(store, "put", real_put)
    secret = os.urandom(32)
    assert api.post("/kbs/v1/keys", json=_body(policy_id, key_id, secret)).status_code == 201
    assert services.keys.load_material(services.keys.get(key_id)).secret == secret
    assert services.keys.pending() == []


def test_a_create_whose_row_was_claimed_never_writes_its_record_even_after_a_failed_purge(
    api: TestClient, services: Services, policy_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = services.keys.backends["embedded"]
    key_id = str(uuid.uuid4())
    real_put, real_purge = store.put, store.purge

    def purge_then_fail(purged: KeyId) -> None:
        real_purge(purged)  # the material is gone...
        raise BackendUnavailable("the reply timed out")  # ...but the reconciler cannot know it

    def put_then_a_failed_reconcile(claimed: KeyId, material: KeyMaterial) -> BackendRef:
        ref = real_put(claimed, material)
        monkeypatch.setattr(store, "purge", purge_then_fail)
        assert services.keys.reconcile(older_than=timedelta(0)).waiting == 1
        monkeypatch.setattr(store, "purge", real_purge)
        return ref

    monkeypatch.setattr(store, "put", put_then_a_failed_reconcile)
    response = api.post("/kbs/v1/keys", json=_body(policy_id, key_id, os.urandom(32)))
    assert (response.status_code, response.json()["code"]) == (503, "key_write_interrupted")
    assert api.get(f"/kbs/v1/keys/{key_id}").status_code == 404  # no record without material
    (row,) = services.keys.pending()
    assert (row.operation, row.claimed_at) == ("purge", None)  # given back for a later round, still a purge
    assert services.keys.reconcile(older_than=timedelta(0)).finished == 1
    assert services.keys.pending() == []


def test_a_stale_claim_is_taken_over_and_the_old_claimant_changes_nothing(services: Services) -> None:
    from keybroker.keys.outbox import Outbox
    from keybroker.storage.tables import PendingMaterialRow

    outbox = Outbox(services.database, services.clock)
    key_id = str(uuid.uuid4())
    outbox.reserve(KeyId(key_id), "embedded")
    (row,) = outbox.pending()
    first = outbox.claim(row)
    assert first is not None
    assert outbox.claim(row) is None  # held
    services.clock.advance(timedelta(hours=2))
    second = outbox.claim(row)
    assert second is not None  # the first claimant is presumed dead
    outbox.unclaim(row, first)
    outbox.finish(row, first)  # the old claimant's late writes are fenced off
    with services.database.transaction() as session:
        held = session.get(PendingMaterialRow, key_id)
        assert held is not None
        assert held.claimed_at == second
    outbox.finish(row, second)
    assert outbox.pending() == []
