"""A backend that goes down mid-operation (its real server sealed, stopped or gone), for every external backend:

* key creation in both orders of failure leaves no record without material and, once the backend is back and
  the outbox is reconciled, no material without a record;
* a transfer of a key whose backend is down is a 503, audited; once the backend is back the same keybroker
  (not restarted) releases the key again;
* a delete while the backend is down removes the record (204) and finishes the material later.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from keybroker.backends.base import KeyStore
from keybroker.errors import BackendUnavailable, NotFound
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import Algorithm, KeySpec
from keybroker.storage.tables import AuditEventRow, KeyRow, PendingMaterialRow
from tests.contract.conftest import OUTAGE_BACKENDS, Peers, outage
from tests.transfer.conftest import World, open_world, released_bytes, request_transfer, sim_dir  # noqa: F401 - sim_dir is a fixture, used by name

UNDER_TEST = "under-test"
AES = KeySpec(Algorithm.AES, 256)


@pytest.fixture(params=OUTAGE_BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def world(tmp_path: Path, sim_dir: Path, backend_config: dict[str, Any]) -> Iterator[World]:  # noqa: F811 - this module's world
    backends = {"embedded": {}, UNDER_TEST: backend_config}
    with open_world(tmp_path, sim_dir, backends=backends, keys={"default_backend": UNDER_TEST}) as opened:
        yield opened


def _store(world: World) -> KeyStore:
    return world.services.keys.backends[UNDER_TEST]


def _count(world: World, table: Any) -> int:
    with world.services.database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def _create(world: World, policy_id: str, key: bytes) -> Any:
    body = {
        "key_information": {"algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(key).decode()},
        "transfer_policy_id": policy_id,
    }
    return world.api.post("/kbs/v1/keys", json=body)


def _record_puts(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> list[tuple[KeyId, BackendRef]]:
    seen: list[tuple[KeyId, BackendRef]] = []
    real_put = store.put

    def put(key_id: KeyId, material: Any) -> BackendRef:
        ref = real_put(key_id, material)
        seen.append((key_id, ref))
        return ref

    monkeypatch.setattr(store, "put", put)
    return seen


def test_backend_down_before_the_write(world: World, backend_name: str, peers: Peers) -> None:
    """Order 1: the backend fails the write itself. 503, no record; nothing left once reconciled."""
    policy_id = world.policy()
    keys_before = _count(world, KeyRow)
    with outage(backend_name, peers):
        response = _create(world, policy_id, os.urandom(32))
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "backend_unavailable"
    assert _count(world, KeyRow) == keys_before
    result = world.services.keys.reconcile(older_than=timedelta(0))
    assert result.waiting == 0
    assert _count(world, PendingMaterialRow) == 0


def test_record_fails_after_the_write_and_the_backend_is_down_for_the_cleanup(
    world: World, backend_name: str, peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Order 2: the material is written, then the record cannot be (audit write fails) and the backend is gone
    before the material can be removed. No record; the outbox keeps the orphan until the backend is back."""
    policy_id = world.policy()
    store = _store(world)
    puts = _record_puts(store, monkeypatch)
    real_append = world.services.audit.append

    def append_then_fail(session: Any, context: Any, event: Any) -> None:
        if event.action == "key.create":
            raise BackendUnavailable("the audit log cannot be written", code="audit_unavailable")
        real_append(session, context, event)

    monkeypatch.setattr(world.services.audit, "append", append_then_fail)
    real_purge = store.purge

    def purge_during_outage(key_id: KeyId) -> None:
        with outage(backend_name, peers):
            real_purge(key_id)

    monkeypatch.setattr(store, "purge", purge_during_outage)
    secret = os.urandom(32)
    response = _create(world, policy_id, secret)
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "audit_unavailable"
    assert _count(world, KeyRow) == 0
    ((key_id, ref),) = puts
    monkeypatch.setattr(store, "purge", real_purge)
    pending = [(row.key_id, row.operation) for row in world.services.keys.pending()]
    if backend_name in {"embedded-transit", "embedded-pkcs11"}:
        # The material sits in keybroker's own database: removing it needs no KEK, so it is already gone.
        assert pending == []
        with pytest.raises(NotFound):
            store.get(key_id, ref, AES)
        return
    assert pending == [(key_id, "create")]
    assert store.get(key_id, ref, AES).secret == secret  # the orphan really is in the backend, for now
    result = world.services.keys.reconcile(older_than=timedelta(0))
    assert (result.finished, result.waiting) == (1, 0)
    assert world.services.keys.pending() == []
    with pytest.raises(NotFound):
        store.get(key_id, ref, AES)


def test_transfer_while_the_backend_is_down_is_503_audited_and_recovers(
    world: World, backend_name: str, peers: Peers
) -> None:
    secret = os.urandom(32)
    response = _create(world, world.policy(), secret)
    assert response.status_code == 201, response.text
    key_id = response.json()["id"]
    audits_before = _count(world, AuditEventRow)
    with outage(backend_name, peers):
        refused = request_transfer(world, key_id, world.evidence())
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "backend_unavailable"
    assert "wrapped_key" not in refused.json()
    with world.services.database.transaction() as session:
        entries = list(session.scalars(select(AuditEventRow).order_by(AuditEventRow.seq).offset(audits_before)))
    transfer_entries = [entry for entry in entries if entry.action == "key.transfer"]
    assert transfer_entries, "the refused transfer is audited"
    assert transfer_entries[-1].outcome != "success"
    released = request_transfer(world, key_id, world.evidence())
    assert released.status_code == 200, released.text
    assert released_bytes(released) == secret


def test_delete_while_the_backend_is_down_finishes_later(world: World, backend_name: str, peers: Peers) -> None:
    response = _create(world, world.policy(), os.urandom(32))
    assert response.status_code == 201, response.text
    key_id = response.json()["id"]
    with world.services.database.transaction() as session:
        row = session.get(KeyRow, key_id)
        assert row is not None
        ref = BackendRef(row.backend_ref)
    head = world.services.audit.head()[0]
    with outage(backend_name, peers):
        # Red-team finding 5: this was a 503 although the key was gone. The key is deleted (204, one audit entry);
        # its material is removed through the outbox once the backend is back.
        deleted = world.api.delete(f"/kbs/v1/keys/{key_id}")
        assert deleted.status_code == 204, deleted.text
        assert world.api.get(f"/kbs/v1/keys/{key_id}").status_code == 404
        if backend_name not in {"embedded-transit", "embedded-pkcs11"}:
            # (Embedded material is in keybroker's own database: deleting it needs no KEK, so it just works.)
            assert [row.operation for row in world.services.keys.pending()] == ["delete"]
            assert world.services.keys.reconcile(older_than=timedelta(0)).waiting == 1
    (entry,) = [e for e in world.services.audit.entries(after_seq=head) if e["action"].startswith("key.")]
    assert (entry["action"], entry["outcome"], entry["target"]) == ("key.delete", "success", key_id)
    world.services.keys.reconcile(older_than=timedelta(0))
    assert world.services.keys.pending() == []
    with pytest.raises(NotFound):
        _store(world).get(KeyId(key_id), ref, AES)


@pytest.mark.parametrize("backend_name", ["vault-kv2"], indirect=True)
def test_keybroker_starts_while_vault_is_sealed_and_serves_once_it_is_unsealed(
    tmp_path: Path, backend_name: str, backend_config: dict[str, Any], peers: Peers
) -> None:
    from keybroker.clock import FixedClock
    from keybroker.config import load_settings
    from keybroker.keys.models import KeyMaterial
    from keybroker.services import build_services, initialise
    from tests.conftest import NOW

    settings = load_settings(
        data_dir=tmp_path / "data",
        overrides={"backends": {"embedded": {}, UNDER_TEST: backend_config}, "keys": {"default_backend": UNDER_TEST}},
    )
    initialise(settings, FixedClock(NOW))
    with outage(backend_name, peers):
        services = build_services(settings, FixedClock(NOW))  # does not need Vault to start
        store = services.keys.backends[UNDER_TEST]
        with pytest.raises(BackendUnavailable):
            store.check()
        with pytest.raises(BackendUnavailable):
            store.put(KeyId("00000000-0000-4000-8000-000000000001"), KeyMaterial(AES, os.urandom(32)))
    try:
        store.check()
        key_id = KeyId(str(uuid.uuid4()))
        secret = os.urandom(32)
        ref = store.put(key_id, KeyMaterial(AES, secret))
        assert store.get(key_id, ref, AES).secret == secret
    finally:
        services.close()


@pytest.mark.parametrize("backend_name", ["vault-kv1"], indirect=True)
def test_reusing_the_id_of_a_key_whose_delete_is_unfinished_says_so(
    world: World, backend_name: str, peers: Peers
) -> None:
    key_id = str(uuid.uuid4())
    body = {
        "key_information": {"id": key_id, "algorithm": "AES", "key_length": 256},
        "transfer_policy_id": world.policy(),
    }
    assert world.api.post("/kbs/v1/keys", json=body).status_code == 201
    with outage(backend_name, peers):
        assert world.api.delete(f"/kbs/v1/keys/{key_id}").status_code == 204
    again = world.api.post("/kbs/v1/keys", json=body)
    assert (again.status_code, again.json()["code"]) == (409, "key_delete_pending")
    world.services.keys.reconcile(older_than=timedelta(0))
    assert world.api.post("/kbs/v1/keys", json=body).status_code == 201


@pytest.mark.parametrize("backend_name", ["vault-kv1", "kmip"], indirect=True)
def test_the_key_id_stays_reserved_while_the_reconciler_deletes_its_material(
    world: World, backend_name: str, peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-create of the id while the reconciler is removing the old material is refused; had it been accepted,
    the reconciler's delete would have destroyed the new key's material."""
    key_id = str(uuid.uuid4())
    body = {
        "key_information": {"id": key_id, "algorithm": "AES", "key_length": 256},
        "transfer_policy_id": world.policy(),
    }
    assert world.api.post("/kbs/v1/keys", json=body).status_code == 201
    with outage(backend_name, peers):
        assert world.api.delete(f"/kbs/v1/keys/{key_id}").status_code == 204
    store = _store(world)
    real_delete = store.delete
    during: list[int] = []

    def delete_while_someone_recreates(ref: BackendRef) -> None:
        during.append(world.api.post("/kbs/v1/keys", json=body).status_code)
        real_delete(ref)

    monkeypatch.setattr(store, "delete", delete_while_someone_recreates)
    assert world.services.keys.reconcile(older_than=timedelta(0)).finished == 1
    assert during  # (Vault purges through delete too: once or twice)
    assert set(during) == {409}
    monkeypatch.undo()
    created = world.api.post("/kbs/v1/keys", json=body)
    assert created.status_code == 201, created.text
    released = request_transfer(world, key_id, world.evidence())
    assert released.status_code == 200, released.text  # the new key's material is intact
