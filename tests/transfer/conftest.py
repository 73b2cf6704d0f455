"""A keybroker that trusts the simulated TEE, with collateral for three simulated platforms (UpToDate, OutOfDate
with an advisory, Revoked), and helpers that speak PROTOCOL.md §3 like a workload."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from keybroker.api.app import create_app
from keybroker.attestation.collateral import read_bundle
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.services import Services, build_services, initialise
from keybroker.sim.collateral import CollateralSpec, make_collateral
from keybroker.sim.pki import PlatformSpec, add_platform, init_pki
from keybroker_client._client import unwrap
from keybroker_client.evidence import SimulatedEvidence

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
MRENCLAVE = "11" * 32
MRSIGNER = "22" * 32
MRTD = "33" * 48
PLATFORMS = {
    "default": ("00906ED50000", "UpToDate", ()),
    "outdated": ("00906ED50001", "OutOfDate", ("INTEL-SA-00615",)),
    "revoked": ("00906ED50002", "Revoked", ()),
}


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("transfer-sim")
    pki = init_pki(directory, NOW - timedelta(days=400))
    for name, (fmspc, status, advisories) in PLATFORMS.items():
        add_platform(pki, PlatformSpec(name=name, fmspc=fmspc), NOW - timedelta(days=400))
        make_collateral(
            pki,
            directory / "coll" / name,
            CollateralSpec(platform=name, tcb_status=status, advisories=advisories, valid_from=NOW - timedelta(days=1)),
            NOW,
        )
    return directory


@dataclass
class World:
    api: TestClient
    services: Services
    clock: FixedClock
    sim: Path

    def policy(self, **changes: Any) -> str:
        document: dict[str, Any] = {
            "attestation_type": ["SGX", "TDX"],
            "sgx": {"attributes": {"mrenclave": [MRENCLAVE], "mrsigner": [MRSIGNER], "isvprodid": [1], "isvsvn": 2}},
            "tdx": {"attributes": {"mrtd": [MRTD], "seamsvn": 3}},
            "allow_simulated": True,
        }
        for name, value in changes.items():
            if value is None:
                document.pop(name, None)
            else:
                document[name] = value
        response = self.api.post("/kbs/v1/key-transfer-policies", json=document)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def key(self, policy_id: str, **info: Any) -> str:
        info = info or {"algorithm": "AES", "key_length": 256}
        response = self.api.post("/kbs/v1/keys", json={"key_information": info, "transfer_policy_id": policy_id})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def evidence(self, tee: str = "sgx", platform: str = "default", **measurements: Any) -> SimulatedEvidence:
        defaults: dict[str, Any] = (
            {"mrenclave": bytes.fromhex(MRENCLAVE), "mrsigner": bytes.fromhex(MRSIGNER), "isvprodid": 1, "isvsvn": 2}
            if tee == "sgx"
            else {"mrtd": bytes.fromhex(MRTD)}
        )
        defaults.update(measurements)
        return SimulatedEvidence(self.sim, tee, platform=platform, **defaults)


@pytest.fixture
def world(tmp_path: Path, sim_dir: Path, database_settings: Callable[[Path], dict[str, Any]]) -> Iterator[World]:
    """The transfer tests' deployment, on SQLite and on PostgreSQL (``database_kind``)."""
    with open_world(tmp_path, sim_dir, **database_settings(tmp_path / "data")) as opened:
        yield opened


@contextlib.contextmanager
def open_world(tmp_path: Path, sim_dir: Path, **overrides: Any) -> Iterator[World]:
    """A World whose settings add ``overrides`` (e.g. ``backends``) to the simulated-TEE configuration."""
    settings = load_settings(
        data_dir=tmp_path / "data",
        overrides={"attestation": {"simulated_root": str(sim_dir / "root-ca.pem")}, **overrides},
    )
    clock = FixedClock(NOW)
    token = initialise(settings, clock).admin_token
    services = build_services(settings, clock)
    roots = services.attestation.verifier.anchors.roots()
    for name in PLATFORMS:
        for tee in ("sgx", "tdx"):
            services.collateral.put(read_bundle(sim_dir / "coll" / name / tee, roots), name)
    with TestClient(create_app(services), raise_server_exceptions=False) as api:
        api.headers["Authorization"] = f"Bearer {token}"
        yield World(api, services, clock, sim_dir)
    services.close()


def workload_key(bits: int = 3072) -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(65537, bits)
    return key, key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


_KEY_CACHE: dict[int, tuple[rsa.RSAPrivateKey, bytes]] = {}


def cached_workload_key(bits: int = 3072) -> tuple[rsa.RSAPrivateKey, bytes]:
    if bits not in _KEY_CACHE:
        _KEY_CACHE[bits] = workload_key(bits)
    return _KEY_CACHE[bits]


def request_transfer(
    world: World,
    key_id: str,
    evidence: SimulatedEvidence,
    *,
    user_data: bytes | None = None,
    bind_to: bytes | None = None,
    header: str | None = "auto",
    nonce: dict[str, str] | None = None,
    token: str | None = None,
    passport: bool = False,
) -> Any:
    """One transfer as a workload does it; the knobs make it wrong in one specific way."""
    path = f"/kbs/v1/keys/{key_id}/transfer"
    no_auth = {"Authorization": ""}
    nonce = nonce or world.api.post(path, json={}, headers=no_auth).json()
    if user_data is None:
        user_data = cached_workload_key()[1]
    bound = bind_to if bind_to is not None else user_data
    report_data = hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + bound).digest()
    quote = base64.b64encode(evidence.quote(report_data)).decode()
    headers = {"Authorization": f"Bearer {token}" if token else ""}
    if passport:
        attest = world.api.post(
            "/appraisal/v1/attest",
            headers=no_auth,
            json={"quote": quote, "verifier_nonce": nonce, "runtime_data": base64.b64encode(user_data).decode()},
        )
        assert attest.status_code == 200, attest.text
        return world.api.post(path, headers=headers, json={"attestation_token": attest.json()["token"]})
    if header is not None:
        headers["Attestation-Type"] = evidence.tee_type if header == "auto" else header
    return world.api.post(
        path, headers=headers, json={"quote": quote, "nonce": nonce, "user_data": base64.b64encode(user_data).decode()}
    )


def released_bytes(response: Any, private_key: rsa.RSAPrivateKey | None = None) -> bytes:
    body = response.json()
    return unwrap(
        base64.b64decode(body["wrapped_key"]),
        base64.b64decode(body["wrapped_swk"]),
        private_key or cached_workload_key()[0],
    )
