"""Vault/OpenBao authentication against the real server: AppRole login, renewal of a short-lived token and a fresh
login once its maximum TTL has passed, and a policy that denies a path reported as a configuration problem that
names the path."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from keybroker.backends.vault import VaultKvStore
from keybroker.clock import SystemClock
from keybroker.config import Settings, VaultBackendSettings, load_settings
from keybroker.errors import BackendUnavailable, ConfigurationError
from keybroker.keys.models import Algorithm, KeyId, KeyMaterial, KeySpec
from tests.contract.conftest import KV1_MOUNT, Peers

AES = KeySpec(Algorithm.AES, 256)


def _approle(peers: Peers, policy: str, **role: Any) -> tuple[str, str]:
    root = peers.bao().client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    name = f"kb-{uuid.uuid4().hex[:8]}"
    root.sys.create_or_update_policy(name=name, policy=policy)
    root.auth.approle.create_or_update_approle(role_name=name, token_policies=[name], **role)
    role_id = root.auth.approle.read_role_id(role_name=name)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role_name=name)["data"]["secret_id"]
    return role_id, secret_id


def _store(tmp_path: Path, peers: Peers, role_id: str, secret_id: str) -> tuple[VaultKvStore, Settings]:
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id + "\n")
    secret_file.chmod(0o600)
    backend = {
        "type": "vault",
        "url": peers.bao().url,
        "mount": KV1_MOUNT,
        "auth": {"method": "approle", "role_id": role_id, "secret_id": {"file": str(secret_file)}},
    }
    settings = load_settings(
        data_dir=tmp_path / "data", overrides={"backends": {"vault": backend}, "keys": {"default_backend": "vault"}}
    )
    config = settings.backends["vault"]
    assert isinstance(config, VaultBackendSettings)
    return VaultKvStore.from_settings("vault", settings, config, SystemClock()), settings


FULL = f'path "{KV1_MOUNT}/*" {{ capabilities = ["create", "read", "update", "delete"] }}'


def _round_trip(store: VaultKvStore) -> None:
    key_id, secret = KeyId(str(uuid.uuid4())), os.urandom(32)
    ref = store.put(key_id, KeyMaterial(AES, secret))
    assert store.get(key_id, ref, AES).secret == secret
    store.delete(ref)


def test_approle_token_is_renewed_then_replaced_by_a_new_login(tmp_path: Path, peers: Peers) -> None:
    role_id, secret_id = _approle(peers, FULL, token_ttl="3s", token_max_ttl="5s", secret_id_num_uses=0)
    store, _ = _store(tmp_path, peers, role_id, secret_id)
    try:
        _round_trip(store)
        first_token = store._session._client.token
        time.sleep(2.5)  # past two thirds of the TTL: the next call renews the token
        _round_trip(store)
        assert store._session._client.token == first_token
        ttl = peers.bao().client().auth.token.lookup(first_token)["data"]["ttl"]
        assert ttl >= 2  # renewed (capped by the max TTL); without renewal about 0.5 s would be left
        time.sleep(3.0)  # past the maximum TTL: renewal is refused, AppRole logs in again
        _round_trip(store)
        assert store._session._client.token != first_token
    finally:
        store.close()


def test_a_denied_path_is_a_misconfiguration_naming_it(tmp_path: Path, peers: Peers) -> None:
    read_only = f'path "{KV1_MOUNT}/*" {{ capabilities = ["read"] }}'
    role_id, secret_id = _approle(peers, read_only)
    store, _ = _store(tmp_path, peers, role_id, secret_id)
    try:
        with pytest.raises(BackendUnavailable) as denied:
            store.put(KeyId("7a1d4c52-0d55-4d4b-a3d1-5b1f3e0e9c11"), KeyMaterial(AES, os.urandom(32)))
        assert denied.value.instance_code == "backend_misconfigured"
        assert f"create on {KV1_MOUNT}/7a1d4c52-0d55-4d4b-a3d1-5b1f3e0e9c11" in denied.value.detail
        assert secret_id not in str(denied.value)
    finally:
        store.close()


def test_a_wrong_secret_id_is_refused_without_showing_it(tmp_path: Path, peers: Peers) -> None:
    role_id, _ = _approle(peers, FULL)
    wrong = str(uuid.uuid4())
    store, _ = _store(tmp_path, peers, role_id, wrong)  # starts: Vault may be down at start, so login is retried
    try:
        with pytest.raises(BackendUnavailable) as refused:
            store.check()
        assert refused.value.instance_code == "backend_misconfigured"
        assert wrong not in str(refused.value)
    finally:
        store.close()


def test_a_missing_or_world_readable_credential_file_stops_the_start(tmp_path: Path, peers: Peers) -> None:
    role_id, secret_id = _approle(peers, FULL)
    store, settings = _store(tmp_path, peers, role_id, secret_id)
    store.close()
    config = settings.backends["vault"]
    assert isinstance(config, VaultBackendSettings)
    (tmp_path / "secret-id").chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        VaultKvStore.from_settings("vault", settings, config, SystemClock())
    (tmp_path / "secret-id").unlink()
    with pytest.raises(ConfigurationError, match="cannot read"):
        VaultKvStore.from_settings("vault", settings, config, SystemClock())
