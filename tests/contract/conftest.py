"""Every backend, started for real, behind one fixture: ``backend_config`` is the ``[backends.<name>]`` table that
selects it, so the contract suite goes through the same configuration and wiring as a deployment.

Peers are session-scoped (one OpenBao dev server, one SoftHSM2 token directory, one PyKMIP server); each test gets
fresh names (key ids are UUIDs, the PKCS#11 KEK gets its own label), so tests do not see each other's objects.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peers.openbao import ROOT_TOKEN, DevBao
from tests.peers.softhsm import SoftHsm, Token

BAO_TOKEN_ENV = "KB_TEST_BAO_TOKEN"
HSM_PIN_ENV = "KB_TEST_HSM_PIN"
KV1_MOUNT = "keybroker"  # as in the guide: `vault secrets enable -path=keybroker kv`
KV2_MOUNT = "keybroker-v2"


@dataclass
class Peers:
    tmp: Path
    _hsm: SoftHsm
    _bao: DevBao | None = None
    _token: Token | None = None
    _kmip: Any = None

    def bao(self) -> DevBao:
        if self._bao is None:
            self._bao = DevBao(self.tmp / "bao")
            self._bao.enable_kv(KV1_MOUNT, 1)
            self._bao.enable_kv(KV2_MOUNT, 2)
            self._bao.enable_transit()
        return self._bao

    def token(self) -> Token:
        if self._token is None:
            self._token = self._hsm.token("kb-contract")
        return self._token

    def kmip(self) -> Any:
        if self._kmip is None:
            from tests.peers.kmip import KmipServer

            self._kmip = KmipServer(self.tmp / "kmip")
            self._kmip.start()
        return self._kmip

    def close(self) -> None:
        if self._bao is not None:
            self._bao.stop()
        if self._kmip is not None:
            self._kmip.stop()


@pytest.fixture(scope="session")
def peers(tmp_path_factory: pytest.TempPathFactory, softhsm: SoftHsm) -> Iterator[Peers]:
    started = Peers(tmp_path_factory.mktemp("peers"), softhsm)
    yield started
    started.close()


def _vault_auth() -> dict[str, Any]:
    return {"method": "token", "token": {"env": BAO_TOKEN_ENV}}


def _embedded(peers: Peers) -> dict[str, Any]:
    return {"type": "embedded"}


def _vault_kv1(peers: Peers) -> dict[str, Any]:
    return {"type": "vault", "url": peers.bao().url, "mount": KV1_MOUNT, "kv_version": 1, "auth": _vault_auth()}


def _vault_kv2(peers: Peers) -> dict[str, Any]:
    return {"type": "vault", "url": peers.bao().url, "mount": KV2_MOUNT, "kv_version": 2, "auth": _vault_auth()}


def _transit(peers: Peers) -> dict[str, Any]:
    wrapper = {"type": "vault-transit", "url": peers.bao().url, "key_name": f"kek-{uuid.uuid4().hex[:8]}"}
    return {"type": "embedded", "wrapper": {**wrapper, "auth": _vault_auth()}}


def _pkcs11(peers: Peers) -> dict[str, Any]:
    token = peers.token()
    wrapper = {
        "type": "pkcs11",
        "module": token.module,
        "token_label": token.label,
        "key_label": f"kek-{uuid.uuid4().hex[:8]}",
        "pin": {"env": HSM_PIN_ENV},
    }
    return {"type": "embedded", "wrapper": wrapper}


def _kmip(peers: Peers) -> dict[str, Any]:
    server = peers.kmip()
    return {"type": "kmip", **server.backend_settings()}


BACKENDS: dict[str, Callable[[Peers], dict[str, Any]]] = {
    "embedded": _embedded,
    "vault-kv1": _vault_kv1,
    "vault-kv2": _vault_kv2,
    "embedded-transit": _transit,
    "embedded-pkcs11": _pkcs11,
    "kmip": _kmip,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_config(backend_name: str, peers: Peers, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The settings table of the backend under test; its credentials come from the environment, as in production."""
    monkeypatch.setenv(BAO_TOKEN_ENV, ROOT_TOKEN)
    monkeypatch.setenv(HSM_PIN_ENV, peers.token().pin if backend_name == "embedded-pkcs11" else "unused")
    return BACKENDS[backend_name](peers)


OUTAGE_BACKENDS = ("vault-kv1", "vault-kv2", "embedded-transit", "embedded-pkcs11", "kmip")


@contextlib.contextmanager
def outage(backend_name: str, peers: Peers) -> Iterator[None]:
    """The backend's server really goes away, then comes back: OpenBao is sealed and unsealed, the PyKMIP server
    is stopped and started again on the same port and database, the SoftHSM2 token disappears and returns."""
    if backend_name in {"vault-kv1", "vault-kv2", "embedded-transit"}:
        peers.bao().seal()
        try:
            yield
        finally:
            peers.bao().unseal()
    elif backend_name == "kmip":
        peers.kmip().stop()
        try:
            yield
        finally:
            peers.kmip().start()
    elif backend_name == "embedded-pkcs11":
        with token_outage(peers):
            yield
    else:
        raise AssertionError(f"no outage for {backend_name}")


@contextlib.contextmanager
def token_outage(peers: Peers) -> Iterator[None]:
    """SoftHSM2 keeps each token in a directory of its own: moved away, the token is gone for the running library
    (its handles become invalid, re-initialising finds no such token); moved back, it returns."""
    directory = peers.token().directory
    assert directory is not None
    away = peers.tmp / f"away-{directory.name}"  # out of the token directory, which SoftHSM scans for tokens
    directory.rename(away)
    try:
        yield
    finally:
        away.rename(directory)
