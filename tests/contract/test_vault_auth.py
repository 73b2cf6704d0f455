"""Vault/OpenBao authentication and failures against the real server (the session's DevBao).

Token lifetime runs on an injected ``FixedClock`` with Vault TTLs of an hour or more, so real time does not
matter: a renewal shows as ``last_renewal_time`` on the token (looked up with the root token). One test waits in
real time, for a token's max TTL to cut into what a renewal can give back.

Covered: AppRole renewal, a new login once the token is revoked or capped (and the old token revoked); a static
token renewed after Vault was sealed at the due time; a token file rotated on disk; an invalid or expired token
reported as such; a path the policy denies reported naming path and capability, without a new login; a missing
mount, a KV v1 store on a KV v2 mount, a missing Transit mount or key, rate limiting and every other hvac error
translated (never a 500, never a secret or Vault's body in the message).
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from keybroker.backends.transit import TransitKeyWrapper
from keybroker.backends.vault.session import RETRY_AFTER, VaultSession
from keybroker.backends.vault.store import VaultKvStore
from keybroker.clock import Clock, FixedClock, SystemClock
from keybroker.config import (
    EmbeddedBackendSettings,
    Settings,
    TransitWrapperSettings,
    VaultBackendSettings,
    load_settings,
)
from keybroker.errors import BackendUnavailable, ConfigurationError, NotFound
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import Algorithm, KeyMaterial, KeySpec
from tests.conftest import NOW
from tests.contract.conftest import BAO_TOKEN_ENV, KV1_MOUNT, KV2_MOUNT, Peers
from tests.peers.openbao import ROOT_TOKEN

AES = KeySpec(Algorithm.AES, 256)
FULL = f'path "{KV1_MOUNT}/*" {{ capabilities = ["create", "read", "update", "delete"] }}'
MISCONFIGURED = "backend_misconfigured"


def _root(peers: Peers) -> hvac.Client:
    return peers.bao().client()


def _policy(peers: Peers, policy: str) -> str:
    name = f"kb-{uuid.uuid4().hex[:8]}"
    _root(peers).sys.create_or_update_policy(name=name, policy=policy)
    return name


def _approle(peers: Peers, policy: str, **role: Any) -> tuple[str, str]:
    root = _root(peers)
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    name = _policy(peers, policy)
    root.auth.approle.create_or_update_approle(role_name=name, token_policies=[name], **role)
    role_id = root.auth.approle.read_role_id(role_name=name)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role_name=name)["data"]["secret_id"]
    return role_id, secret_id


def _token(peers: Peers, policy: str = FULL, **token: Any) -> str:
    """A token for keybroker's static token auth, periodic (renewable for ever) unless told otherwise."""
    token.setdefault("period", "1h")
    created = _root(peers).auth.token.create(policies=[_policy(peers, policy)], **token)
    return str(created["auth"]["client_token"])


def _write_secret(path: Path, value: str) -> None:
    path.write_text(value + "\n")
    path.chmod(0o600)


def _settings(tmp_path: Path, backend: dict[str, Any]) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data", overrides={"backends": {"vault": backend}, "keys": {"default_backend": "vault"}}
    )


def _kv_store(tmp_path: Path, peers: Peers, auth: dict[str, Any], clock: Clock, **backend: Any) -> VaultKvStore:
    settings = _settings(
        tmp_path, {"type": "vault", "url": peers.bao().url, "mount": KV1_MOUNT, **backend, "auth": auth}
    )
    config = settings.backends["vault"]
    assert isinstance(config, VaultBackendSettings)
    return VaultKvStore.from_settings("vault", settings.secrets, config, clock)


def _approle_store(
    tmp_path: Path, peers: Peers, role_id: str, secret_id: str, clock: Clock | None = None
) -> tuple[VaultKvStore, Settings]:
    _write_secret(tmp_path / "secret-id", secret_id)
    auth = {"method": "approle", "role_id": role_id, "secret_id": {"file": str(tmp_path / "secret-id")}}
    store = _kv_store(tmp_path, peers, auth, clock or SystemClock())
    return store, _settings(tmp_path, {"type": "vault", "url": peers.bao().url, "mount": KV1_MOUNT, "auth": auth})


def _token_store(tmp_path: Path, peers: Peers, token: str, clock: Clock, **backend: Any) -> VaultKvStore:
    _write_secret(tmp_path / "vault-token", token)
    return _kv_store(
        tmp_path, peers, {"method": "token", "token": {"file": str(tmp_path / "vault-token")}}, clock, **backend
    )


@pytest.fixture
def root_token_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv(BAO_TOKEN_ENV, ROOT_TOKEN)
    return {"method": "token", "token": {"env": BAO_TOKEN_ENV}}


def _session(store: VaultKvStore) -> VaultSession:
    return store._session


def _token_of(store: VaultKvStore) -> str:
    return str(_session(store)._client.token)


def _lookup(peers: Peers, token: str) -> dict[str, Any]:
    return dict(_root(peers).auth.token.lookup(token)["data"])


def _renewed(peers: Peers, token: str) -> bool:
    return bool(_lookup(peers, token).get("last_renewal_time"))


def _valid(peers: Peers, token: str) -> bool:
    try:
        _lookup(peers, token)
    except hvac.exceptions.Forbidden:  # revoked or expired: "bad token"
        return False
    return True


def _round_trip(store: VaultKvStore) -> None:
    key_id, secret = KeyId(str(uuid.uuid4())), os.urandom(32)
    ref = store.put(key_id, KeyMaterial(AES, secret))
    assert store.get(key_id, ref, AES).secret == secret
    store.delete(ref)


@contextlib.contextmanager
def _sealed(peers: Peers) -> Iterator[None]:
    peers.bao().seal()
    try:
        yield
    finally:
        peers.bao().unseal()


# --- token lifetime ------------------------------------------------------------------------------------------------


def test_approle_token_is_renewed_when_due_and_replaced_once_revoked(tmp_path: Path, peers: Peers) -> None:
    clock = FixedClock(NOW)
    role_id, secret_id = _approle(peers, FULL, token_ttl="1h", token_max_ttl="24h", secret_id_num_uses=0)
    store, _ = _approle_store(tmp_path, peers, role_id, secret_id, clock)
    try:
        _round_trip(store)
        first = _token_of(store)
        clock.advance(timedelta(minutes=30))
        assert store.renew_if_due() == pytest.approx(10 * 60)  # due at two thirds of the hour
        assert not _renewed(peers, first)
        clock.advance(timedelta(minutes=11))
        _round_trip(store)  # a request renews a token that is due
        assert _token_of(store) == first
        assert _renewed(peers, first)
        assert _lookup(peers, first)["ttl"] > 3500
        assert store.renew_if_due() == pytest.approx(40 * 60)

        _root(peers).auth.token.revoke(first)  # as at its max TTL: Vault refuses the renewal
        clock.advance(timedelta(minutes=41))
        store.renew_if_due()  # the background task: AppRole logs in again
        second = _token_of(store)
        assert second != first
        assert _valid(peers, second)
        _round_trip(store)
    finally:
        store.close()


def test_approle_logs_in_again_when_the_max_ttl_caps_renewal_and_revokes_the_old_token(
    tmp_path: Path, peers: Peers
) -> None:
    clock = FixedClock(NOW)
    role_id, secret_id = _approle(peers, FULL, token_ttl="6s", token_max_ttl="6s", secret_id_num_uses=0)
    store, _ = _approle_store(tmp_path, peers, role_id, secret_id, clock)
    try:
        first = _token_of(store)
        # The one real-time wait: two thirds of the max TTL pass, so a renewal gives back at most 2 s of the 6 s.
        # (On a machine so slow that the token has expired meanwhile, Vault refuses the renewal: a new login too.)
        time.sleep(4.0)
        clock.advance(timedelta(seconds=5))
        store.renew_if_due()
        clock.advance(timedelta(minutes=1))
        store.renew_if_due()
        assert _token_of(store) != first
        assert not _valid(peers, first)  # revoked rather than left to expire
        _round_trip(store)
    finally:
        store.close()


def test_a_renewal_that_finds_vault_sealed_is_retried(tmp_path: Path, peers: Peers) -> None:
    clock = FixedClock(NOW)
    token = _token(peers)
    store = _token_store(tmp_path, peers, token, clock)
    try:
        _round_trip(store)
        clock.advance(timedelta(minutes=41))
        with _sealed(peers):
            assert store.renew_if_due() == RETRY_AFTER.total_seconds()  # no exception: an outage is retried
            with pytest.raises(BackendUnavailable) as down:
                _round_trip(store)
            assert down.value.instance_code == "backend_unavailable"
        assert not _renewed(peers, token)
        clock.advance(timedelta(seconds=10))
        assert store.renew_if_due() == pytest.approx(RETRY_AFTER.total_seconds() - 10)
        assert not _renewed(peers, token)
        clock.advance(RETRY_AFTER)
        store.renew_if_due()
        assert _renewed(peers, token)
        assert _lookup(peers, token)["ttl"] > 3500
        _round_trip(store)
    finally:
        store.close()


def test_a_static_token_that_cannot_be_renewed_is_left_alone(tmp_path: Path, peers: Peers) -> None:
    clock = FixedClock(NOW)
    token = _token(peers, period=None, ttl="1h", renewable=False)
    store = _token_store(tmp_path, peers, token, clock)
    try:
        assert store.renew_if_due() is None  # nothing to renew; it ends at its TTL
        clock.advance(timedelta(minutes=50))
        _round_trip(store)
        assert not _renewed(peers, token)
        assert _token_of(store) == token
    finally:
        store.close()


def test_a_valid_token_its_policy_does_not_let_renew_itself_is_not_taken_for_invalid(
    tmp_path: Path, peers: Peers
) -> None:
    clock = FixedClock(NOW)
    lookup_only = FULL + '\npath "auth/token/lookup-self" { capabilities = ["read"] }'
    token = _token(peers, lookup_only, no_default_policy=True)  # renew-self comes with the default policy
    store = _token_store(tmp_path, peers, token, clock)
    try:
        clock.advance(timedelta(minutes=41))
        assert store.renew_if_due() is None  # refused for good: no more renewals, no "invalid token"
        _round_trip(store)
        assert _token_of(store) == token
    finally:
        store.close()


def test_a_rotated_token_file_is_read_again_and_an_invalid_token_is_reported_as_such(
    tmp_path: Path, peers: Peers
) -> None:
    first = _token(peers)
    store = _token_store(tmp_path, peers, first, SystemClock())
    try:
        _round_trip(store)
        second = _token(peers)
        _write_secret(tmp_path / "vault-token", second)  # rotated on disk, then the old one revoked
        _root(peers).auth.token.revoke(first)
        _round_trip(store)
        assert _token_of(store) == second

        _root(peers).auth.token.revoke(second)  # revoked (or expired) with nothing new in the file
        for _ in range(2):
            with pytest.raises(BackendUnavailable) as refused:
                _round_trip(store)
            assert refused.value.instance_code == MISCONFIGURED
            assert "invalid or expired" in refused.value.detail
            assert "policy" not in refused.value.detail
            assert second not in str(refused.value)
        with pytest.raises(BackendUnavailable, match="invalid or expired"):
            store.check()

        third = _token(peers)
        _write_secret(tmp_path / "vault-token", third)
        _round_trip(store)  # a valid token in the file again: no restart needed
        assert _token_of(store) == third
    finally:
        store.close()


def test_an_approle_token_revoked_behind_keybrokers_back_is_replaced(tmp_path: Path, peers: Peers) -> None:
    role_id, secret_id = _approle(peers, FULL, secret_id_num_uses=0)
    store, _ = _approle_store(tmp_path, peers, role_id, secret_id)
    try:
        _round_trip(store)
        first = _token_of(store)
        _root(peers).auth.token.revoke(first)
        _round_trip(store)  # refused, lookup_self refused too: one new login, then the request again
        assert _token_of(store) != first
    finally:
        store.close()


# --- refusals --------------------------------------------------------------------------------------------------------


def test_a_denied_path_is_a_misconfiguration_naming_it_without_a_new_login(tmp_path: Path, peers: Peers) -> None:
    read_only = f'path "{KV1_MOUNT}/*" {{ capabilities = ["read"] }}'
    role_id, secret_id = _approle(peers, read_only, secret_id_num_uses=1)  # a second login would be refused
    store, _ = _approle_store(tmp_path, peers, role_id, secret_id)
    try:
        first = _token_of(store)
        key_id = KeyId(str(uuid.uuid4()))
        for _ in range(3):
            with pytest.raises(BackendUnavailable) as denied:
                store.put(key_id, KeyMaterial(AES, os.urandom(32)))
            assert denied.value.instance_code == MISCONFIGURED
            assert f"create on {KV1_MOUNT}/{key_id}" in denied.value.detail
            assert "policy" in denied.value.detail
            assert "invalid or expired" not in denied.value.detail
            assert secret_id not in str(denied.value)
        assert _token_of(store) == first
        assert _valid(peers, first)
        with pytest.raises(NotFound):  # what the policy allows still works with the same token
            store.get(key_id, BackendRef(key_id), AES)
    finally:
        store.close()


def test_a_wrong_secret_id_is_refused_without_showing_it(tmp_path: Path, peers: Peers) -> None:
    role_id, _ = _approle(peers, FULL)
    wrong = str(uuid.uuid4())
    store, _ = _approle_store(
        tmp_path, peers, role_id, wrong
    )  # starts: Vault may be down at start, so login is retried
    try:
        with pytest.raises(BackendUnavailable) as refused:
            store.check()
        assert refused.value.instance_code == MISCONFIGURED
        assert wrong not in str(refused.value)
        with pytest.raises(BackendUnavailable) as again:
            store.renew_if_due()
        assert again.value.instance_code == MISCONFIGURED
    finally:
        store.close()


def test_a_missing_or_world_readable_credential_file_stops_the_start(tmp_path: Path, peers: Peers) -> None:
    role_id, secret_id = _approle(peers, FULL)
    store, settings = _approle_store(tmp_path, peers, role_id, secret_id)
    store.close()
    config = settings.backends["vault"]
    assert isinstance(config, VaultBackendSettings)
    (tmp_path / "secret-id").chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        VaultKvStore.from_settings("vault", settings.secrets, config, SystemClock())
    (tmp_path / "secret-id").unlink()
    with pytest.raises(ConfigurationError, match="cannot read"):
        VaultKvStore.from_settings("vault", settings.secrets, config, SystemClock())


# --- mounts and other Vault errors -----------------------------------------------------------------------------------


def test_a_missing_mount_is_a_misconfiguration_naming_it(
    tmp_path: Path, peers: Peers, root_token_env: dict[str, Any]
) -> None:
    mount = f"kb-missing-{uuid.uuid4().hex[:8]}"
    store = _kv_store(tmp_path, peers, root_token_env, SystemClock(), mount=mount)
    key_id = KeyId(str(uuid.uuid4()))
    try:
        attempts = (
            lambda: store.put(key_id, KeyMaterial(AES, os.urandom(32))),  # KV v1 reads first: "read on ..."
            lambda: store.get(key_id, BackendRef(key_id), AES),  # not "key material missing"
            lambda: store.delete(BackendRef(key_id)),  # not "already gone"
        )
        for attempt in attempts:
            with pytest.raises(BackendUnavailable) as wrong:
                attempt()
            assert wrong.value.instance_code == MISCONFIGURED
            assert f" on {mount}/{key_id}" in wrong.value.detail
            assert "mount" in wrong.value.detail
    finally:
        store.close()


def test_a_kv1_store_on_a_kv2_mount_does_not_read_as_a_missing_key(
    tmp_path: Path, peers: Peers, root_token_env: dict[str, Any]
) -> None:
    store = _kv_store(tmp_path, peers, root_token_env, SystemClock(), mount=KV2_MOUNT, kv_version=1)
    key_id = KeyId(str(uuid.uuid4()))
    try:
        with pytest.raises(BackendUnavailable) as wrong:
            store.get(key_id, BackendRef(key_id), AES)
        assert wrong.value.instance_code == MISCONFIGURED
        assert f"read on {KV2_MOUNT}/{key_id}" in wrong.value.detail
    finally:
        store.close()


def _transit(tmp_path: Path, peers: Peers, auth: dict[str, Any], mount: str, key_name: str) -> TransitKeyWrapper:
    wrapper = {"type": "vault-transit", "url": peers.bao().url, "mount": mount, "key_name": key_name, "auth": auth}
    settings = load_settings(data_dir=tmp_path / "data", overrides={"backends": {"embedded": {"wrapper": wrapper}}})
    backend = settings.backends["embedded"]
    assert isinstance(backend, EmbeddedBackendSettings)
    assert isinstance(backend.wrapper, TransitWrapperSettings)
    return TransitKeyWrapper.from_settings(settings.secrets, backend.wrapper, SystemClock())


def test_a_missing_transit_mount_or_key_is_a_misconfiguration(
    tmp_path: Path, peers: Peers, root_token_env: dict[str, Any]
) -> None:
    mount = f"transit-missing-{uuid.uuid4().hex[:8]}"
    wrapper = _transit(tmp_path, peers, root_token_env, mount, "kek")
    try:
        for attempt in (wrapper.prepare, lambda: wrapper.wrap(os.urandom(32), b"context")):
            with pytest.raises(BackendUnavailable) as wrong:
                attempt()
            assert wrong.value.instance_code == MISCONFIGURED
            assert f"{mount}/" in wrong.value.detail
    finally:
        wrapper.close()
    wrapper = _transit(tmp_path, peers, root_token_env, "transit", f"kek-missing-{uuid.uuid4().hex[:8]}")
    try:
        ciphertext = b"vault:v1:" + base64.b64encode(os.urandom(60))
        with pytest.raises(BackendUnavailable) as missing:
            wrapper.unwrap(ciphertext, b"context", wrapper.kek_id)
        assert missing.value.instance_code == MISCONFIGURED
        assert "does not exist" in missing.value.detail
    finally:
        wrapper.close()


def test_rate_limiting_is_backend_unavailable(tmp_path: Path, peers: Peers, root_token_env: dict[str, Any]) -> None:
    mount = f"kb-limited-{uuid.uuid4().hex[:8]}"
    peers.bao().enable_kv(mount, 1)
    quota = f"sys/quotas/rate-limit/{mount}"
    _root(peers).write_data(quota, data={"path": f"{mount}/", "rate": 1, "interval": "1m"})
    store = _kv_store(tmp_path, peers, root_token_env, SystemClock(), mount=mount)
    key_id = KeyId(str(uuid.uuid4()))
    try:
        with pytest.raises(NotFound):
            store.get(key_id, BackendRef(key_id), AES)  # the one request a minute the quota allows
        with pytest.raises(BackendUnavailable) as limited:
            store.get(key_id, BackendRef(key_id), AES)
        assert limited.value.instance_code == "backend_unavailable"
        assert "rate-limiting" in limited.value.detail
    finally:
        store.close()
        _root(peers).delete(quota)


SECRET_BODY = '{"errors": ["s3cret-in-the-body"], "data": {"material": "s3cret-in-the-body"}}'


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (hvac.exceptions.UnexpectedError, "backend_unavailable"),
        (hvac.exceptions.InternalServerError, "backend_unavailable"),
        (hvac.exceptions.BadGateway, "backend_unavailable"),
        (hvac.exceptions.VaultDown, "backend_unavailable"),
        (hvac.exceptions.VaultNotInitialized, "backend_unavailable"),
        (hvac.exceptions.PreconditionFailed, "backend_unavailable"),
        (hvac.exceptions.RateLimitExceeded, "backend_unavailable"),
        (hvac.exceptions.InvalidRequest, MISCONFIGURED),
        (hvac.exceptions.UnsupportedOperation, MISCONFIGURED),
        (hvac.exceptions.InvalidPath, MISCONFIGURED),
    ],
)
def test_no_hvac_error_escapes_and_none_shows_vaults_body(
    tmp_path: Path, peers: Peers, root_token_env: dict[str, Any], error: type[hvac.exceptions.VaultError], code: str
) -> None:
    store = _kv_store(tmp_path, peers, root_token_env, SystemClock())

    def fail(client: hvac.Client) -> None:
        raise error("s3cret-in-the-body", errors=["s3cret-in-the-body"], method="get", url="/v1/x", text=SECRET_BODY)

    try:
        with pytest.raises(BackendUnavailable) as caught:
            _session(store).call(f"read on {KV1_MOUNT}/x", fail)
        assert caught.value.instance_code == code
        assert "s3cret" not in str(caught.value)
        assert caught.value.__cause__ is None
    finally:
        store.close()
