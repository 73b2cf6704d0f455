"""KeyService over real backends: what a create never destroys, what cannot be adopted twice, a reconciler racing a
create, and several embedded backends (each with its own KEK) living side by side across restarts."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.ids import BackendRef, KeyId
from keybroker.services import build_services, initialise
from tests.conftest import NOW
from tests.contract.conftest import KV1_MOUNT, KV2_MOUNT, Peers
from tests.transfer.conftest import World, open_world, released_bytes, request_transfer, sim_dir  # noqa: F401 - sim_dir is a fixture, used by name

UNDER_TEST = "under-test"


@pytest.fixture
def world(tmp_path: Path, sim_dir: Path, backend_config: dict[str, Any]) -> Iterator[World]:  # noqa: F811 - this module's world
    backends = {"embedded": {}, UNDER_TEST: backend_config}
    with open_world(tmp_path, sim_dir, backends=backends, keys={"default_backend": UNDER_TEST}) as opened:
        yield opened


def _aes_body(policy_id: str, key_id: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "algorithm": "AES",
        "key_length": 256,
        "key_string": base64.b64encode(os.urandom(32)).decode(),
    }
    if key_id is not None:
        info["id"] = key_id
    return {"key_information": info, "transfer_policy_id": policy_id}


@pytest.mark.parametrize("backend_name", ["vault-kv1", "vault-kv2"], indirect=True)
def test_a_chosen_id_never_destroys_what_the_backend_already_holds(
    world: World, backend_name: str, peers: Peers
) -> None:
    key_id = str(uuid.uuid4())
    mount = KV1_MOUNT if backend_name == "vault-kv1" else KV2_MOUNT
    root = peers.bao().client()
    if backend_name == "vault-kv1":
        root.secrets.kv.v1.create_or_update_secret(key_id, {"owner": "someone else"}, mount_point=mount)
    else:
        root.secrets.kv.v2.create_or_update_secret(key_id, {"owner": "someone else"}, mount_point=mount)
    refused = world.api.post("/kbs/v1/keys", json=_aes_body(world.policy(), key_id))
    assert (refused.status_code, refused.json()["code"]) == (409, "key_exists")
    if backend_name == "vault-kv1":
        kept = root.secrets.kv.v1.read_secret(key_id, mount_point=mount)["data"]
    else:
        read = root.secrets.kv.v2.read_secret_version(key_id, mount_point=mount, raise_on_deleted_version=True)
        kept = read["data"]["data"]
    assert kept == {"owner": "someone else"}
    assert world.services.keys.pending() == []


@pytest.mark.parametrize("backend_name", ["kmip"], indirect=True)
def test_kmip_objects_cannot_be_adopted_twice_nor_keybrokers_own(world: World, backend_name: str, peers: Peers) -> None:
    from kmip.core import enums
    from kmip.pie import objects

    policy_id = world.policy()
    created = world.api.post("/kbs/v1/keys", json=_aes_body(policy_id))
    assert created.status_code == 201, created.text
    with world.services.database.transaction() as session:
        from keybroker.storage.tables import KeyRow

        row = session.get(KeyRow, created.json()["id"])
        assert row is not None
        own_uid = row.backend_ref
    # A key keybroker stored itself (another key's object) cannot be laid under a new policy.
    body: dict[str, Any] = {
        "key_information": {"algorithm": "AES", "key_length": 256, "kmip_key_id": own_uid},
        "transfer_policy_id": world.policy(allow_simulated=True),
    }
    taken = world.api.post("/kbs/v1/keys", json=body)
    assert (taken.status_code, taken.json()["code"]) == (409, "kmip_object_in_use")
    # Nor one that another keybroker (sharing the KMIP identity) stored under its own transfer policy.
    aes = enums.CryptographicAlgorithm.AES
    with peers.kmip().client() as client:
        foreign = client.register(objects.SymmetricKey(aes, 256, os.urandom(32), name=f"keybroker:{uuid.uuid4()}"))
        uid = client.register(objects.SymmetricKey(aes, 256, os.urandom(32), name="made-by-ops"))
    body["key_information"]["kmip_key_id"] = foreign
    managed = world.api.post("/kbs/v1/keys", json=body)
    assert (managed.status_code, managed.json()["code"]) == (400, "kmip_object_managed")
    # An operator's object can back one key only.
    body["key_information"]["kmip_key_id"] = uid
    first = world.api.post("/kbs/v1/keys", json=body)
    assert first.status_code == 201, first.text
    second = world.api.post("/kbs/v1/keys", json=body)
    assert (second.status_code, second.json()["code"]) == (409, "kmip_object_in_use")


@pytest.mark.parametrize("backend_name", ["vault-kv1", "kmip"], indirect=True)
def test_a_reconciler_racing_a_create_never_leaves_a_record_without_material(
    world: World, backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler takes a create's outbox row (older_than=0) right after the material was written: the create
    gives up (503) instead of writing a record whose material was purged."""
    store = world.services.keys.backends[UNDER_TEST]
    real_put = store.put
    written: list[tuple[KeyId, BackendRef]] = []

    def put_then_reconcile(key_id: KeyId, material: Any) -> BackendRef:
        ref = real_put(key_id, material)
        written.append((key_id, ref))
        assert world.services.keys.reconcile(older_than=timedelta(0)).finished == 1
        return ref

    monkeypatch.setattr(store, "put", put_then_reconcile)
    response = world.api.post("/kbs/v1/keys", json=_aes_body(world.policy()))
    assert (response.status_code, response.json()["code"]) == (503, "key_write_interrupted")
    monkeypatch.undo()
    ((key_id, ref),) = written
    assert world.api.get(f"/kbs/v1/keys/{key_id}").status_code == 404
    from keybroker.errors import NotFound
    from keybroker.keys.models import Algorithm, KeySpec

    with pytest.raises(NotFound):
        store.get(key_id, ref, KeySpec(Algorithm.AES, 256))
    assert world.services.keys.pending() == []


def test_two_embedded_backends_with_their_own_keks_survive_restarts_and_a_new_default(
    tmp_path: Path,
    sim_dir: Path,  # noqa: F811 - the imported fixture, by name
    peers: Peers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = peers.token()
    monkeypatch.setenv("KB_TEST_HSM_PIN", token.pin)
    hsm = {
        "type": "embedded",
        "wrapper": {
            "type": "pkcs11",
            "module": token.module,
            "token_label": token.label,
            "key_label": f"kek-{uuid.uuid4().hex[:8]}",
            "pin": {"env": "KB_TEST_HSM_PIN"},
        },
    }
    secrets: dict[str, bytes] = {}
    with open_world(tmp_path, sim_dir, backends={"embedded": {}, "hsm": hsm}) as world:
        policy_id = world.policy()
        for backend in ("embedded", "hsm"):
            secret = os.urandom(32)
            body = {**_aes_body(policy_id), "backend": backend}
            body["key_information"]["key_string"] = base64.b64encode(secret).decode()
            created = world.api.post("/kbs/v1/keys", json=body)
            assert created.status_code == 201, created.text
            secrets[created.json()["id"]] = secret
    # Restart, the other embedded backend now the default: both keys still released, the service's own keys
    # (CA, nonce key, token keys) still open with the KEK that protected them at init.
    with open_world(tmp_path, sim_dir, backends={"embedded": {}, "hsm": hsm}, keys={"default_backend": "hsm"}) as world:
        for key_id, secret in secrets.items():
            released = request_transfer(world, key_id, world.evidence())
            assert released.status_code == 200, released.text
            assert released_bytes(released) == secret


def test_the_service_refuses_to_start_without_the_kek_of_its_own_keys(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    initialise(settings, FixedClock(NOW))
    other = base64.b64encode(os.urandom(32)).decode()
    moved = load_settings(
        data_dir=tmp_path / "data",
        overrides={"backends": {"other": {"wrapper": {"master_key": other}}}, "keys": {"default_backend": "other"}},
    )
    (tmp_path / "data" / "master.key").rename(tmp_path / "master.key.away")
    from keybroker.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="protected by KEK local:"):
        build_services(moved, FixedClock(NOW))


@pytest.mark.parametrize("backend_name", ["vault-kv1"], indirect=True)
def test_a_key_whose_backend_left_the_configuration_is_503_not_500(
    tmp_path: Path,
    sim_dir: Path,  # noqa: F811 - the imported fixture, by name
    backend_config: dict[str, Any],
) -> None:
    """A Vault backend removed from the configuration: its keys' records stay; transferring or deleting one is 503
    ``backend_not_configured`` (never a 500), and configuring the backend again brings the key back."""
    with open_world(tmp_path, sim_dir, backends={"embedded": {}, "vault": backend_config}) as world:
        created = world.api.post("/kbs/v1/keys", json={**_aes_body(world.policy()), "backend": "vault"})
        assert created.status_code == 201, created.text
        key_id = created.json()["id"]
        admin = world.api.headers["Authorization"]  # (a reopened world's init issues no new token)
    with open_world(tmp_path, sim_dir, backends={"embedded": {}}) as world:
        refused = request_transfer(world, key_id, world.evidence())
        assert (refused.status_code, refused.json()["code"]) == (503, "backend_not_configured"), refused.text
        deleted = world.api.delete(f"/kbs/v1/keys/{key_id}", headers={"Authorization": admin})
        assert (deleted.status_code, deleted.json()["code"]) == (503, "backend_not_configured"), deleted.text
    with open_world(tmp_path, sim_dir, backends={"embedded": {}, "vault": backend_config}) as world:
        assert request_transfer(world, key_id, world.evidence()).status_code == 200
