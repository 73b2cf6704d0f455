"""Vault over TLS: an OpenBao dev server with ``-dev-tls`` (its own CA, a certificate for 127.0.0.1).

With ``ca_file`` naming that CA the KV store works. Without it keybroker verifies as hvac/requests do with
``verify=True``: against certifi's bundle, or the file named by ``REQUESTS_CA_BUNDLE`` (``CURL_CA_BUNDLE``) when
that is set, not the operating system's store. A certificate that does not verify is ``backend_misconfigured``,
and the message holds neither the token nor anything else secret.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keybroker.backends.vault.store import VaultKvStore
from keybroker.clock import SystemClock
from keybroker.config import VaultBackendSettings, load_settings
from keybroker.errors import BackendUnavailable
from keybroker.ids import KeyId
from keybroker.keys.models import Algorithm, KeyMaterial, KeySpec
from tests.contract.conftest import BAO_TOKEN_ENV, KV1_MOUNT
from tests.peers.openbao import ROOT_TOKEN, DevBao

AES = KeySpec(Algorithm.AES, 256)
CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBao]:
    bao = DevBao(tmp_path_factory.mktemp("bao-tls"), tls=True)
    try:
        bao.enable_kv(KV1_MOUNT, 1)
        yield bao
    finally:
        bao.stop()


def _store(tmp_path: Path, bao: DevBao, ca_file: Path | None) -> VaultKvStore:
    backend: dict[str, Any] = {
        "type": "vault",
        "url": bao.url,
        "mount": KV1_MOUNT,
        "auth": {"method": "token", "token": {"env": BAO_TOKEN_ENV}},
    }
    if ca_file is not None:
        backend["ca_file"] = str(ca_file)
    settings = load_settings(
        data_dir=tmp_path / "data", overrides={"backends": {"vault": backend}, "keys": {"default_backend": "vault"}}
    )
    config = settings.backends["vault"]
    assert isinstance(config, VaultBackendSettings)
    return VaultKvStore.from_settings("vault", settings.secrets, config, SystemClock())


def _round_trip(store: VaultKvStore) -> None:
    key_id, secret = KeyId(str(uuid.uuid4())), os.urandom(32)
    ref = store.put(key_id, KeyMaterial(AES, secret))
    assert store.get(key_id, ref, AES).secret == secret
    store.delete(ref)


def test_with_its_ca_as_ca_file_the_kv_store_round_trips(
    tmp_path: Path, tls_bao: DevBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_bao.url.startswith("https://")
    assert tls_bao.ca_file is not None
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(BAO_TOKEN_ENV, ROOT_TOKEN)
    store = _store(tmp_path, tls_bao, tls_bao.ca_file)
    try:
        store.check()
        _round_trip(store)
    finally:
        store.close()


def test_without_ca_file_default_verification_refuses_vault_without_leaking_secrets(
    tmp_path: Path, tls_bao: DevBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)  # verify=True: certifi's bundle, which lacks the dev CA
    token = f"s.{uuid.uuid4().hex}"  # never reaches Vault: TLS fails first; it must not show either
    monkeypatch.setenv(BAO_TOKEN_ENV, token)
    store = _store(tmp_path, tls_bao, None)  # starts: an unverifiable Vault is reported, not fatal
    secret = os.urandom(32)
    try:
        attempts = (store.check, lambda: store.put(KeyId(str(uuid.uuid4())), KeyMaterial(AES, secret)))
        for attempt in attempts:
            with pytest.raises(BackendUnavailable) as refused:
                attempt()
            assert refused.value.instance_code == "backend_misconfigured"
            assert "TLS" in refused.value.detail
            assert "ca_file" in refused.value.detail
            shown = f"{refused.value} {refused.value.detail} {refused.value.extra}"
            assert token not in shown
            assert base64.b64encode(secret).decode() not in shown
            assert refused.value.__cause__ is None
        with pytest.raises(BackendUnavailable, match="TLS"):
            store.renew_if_due()  # the background task reports it too, rather than retrying quietly
    finally:
        store.close()


def test_requests_ca_bundle_is_what_default_verification_trusts(
    tmp_path: Path, tls_bao: DevBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the README says "certifi's bundle or REQUESTS_CA_BUNDLE", not "the system store"."""
    assert tls_bao.ca_file is not None
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_bao.ca_file))
    monkeypatch.setenv(BAO_TOKEN_ENV, ROOT_TOKEN)
    store = _store(tmp_path, tls_bao, None)
    try:
        _round_trip(store)
    finally:
        store.close()
