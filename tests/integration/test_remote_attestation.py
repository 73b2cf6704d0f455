"""A KBS pointed at a separate attestation service (``attestation.url``): nonces, verification and tokens come
from the attestation service process; binding, single use and the transfer policy stay with the KBS."""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from keybroker.api.app import create_app
from keybroker.cli.main import app
from keybroker.config import load_settings
from keybroker.services import build_services, initialise
from keybroker_client._client import unwrap
from keybroker_client.evidence import SimulatedEvidence
from tests.conftest import assert_problem
from tests.integration.conftest import Server, start_server, stop
from tests.transfer.conftest import cached_workload_key

runner = CliRunner()
MRENCLAVE = b"\x77" * 32


@pytest.fixture(scope="module")
def attestation_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    base = tmp_path_factory.mktemp("remote")
    sim = base / "sim"
    assert runner.invoke(app, ["sim", "init", str(sim)]).exit_code == 0
    assert runner.invoke(app, ["sim", "collateral", str(sim), "--out", str(sim / "coll")]).exit_code == 0
    server = start_server(
        base / "as",
        KEYBROKER_ATTESTATION__SIMULATED_ROOT=str(sim / "root-ca.pem"),
        KEYBROKER_SERVER__ROLE="attestation",
    )
    try:
        result = runner.invoke(
            app,
            [
                "collateral",
                "import",
                str(sim / "coll"),
                "--addr",
                server.url,
                "--token",
                server.token,
                "--cacert",
                str(server.ca_file),
            ],
        )
        assert result.exit_code == 0, result.output
        yield server, sim
    finally:
        stop(server.process)


@pytest.fixture
def kbs(tmp_path: Path, attestation_service: tuple[Server, Path]) -> Iterator[TestClient]:
    remote, sim = attestation_service
    settings = load_settings(
        data_dir=tmp_path / "kbs",
        overrides={
            "attestation": {
                "url": remote.url,
                "url_ca_file": str(remote.ca_file),
                "simulated_root": str(sim / "root-ca.pem"),
            }
        },
    )
    token = initialise(settings).admin_token
    services = build_services(settings)
    with TestClient(create_app(services, "kbs"), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client
    services.close()


def _key(kbs: TestClient) -> str:
    policy = kbs.post(
        "/kbs/v1/key-transfer-policies",
        json={
            "attestation_type": "SGX",
            "allow_simulated": True,
            "sgx": {"attributes": {"mrenclave": [MRENCLAVE.hex()]}},
        },
    )
    assert policy.status_code == 201, policy.text
    key = kbs.post(
        "/kbs/v1/keys",
        json={
            "key_information": {
                "algorithm": "AES",
                "key_length": 256,
                "key_string": base64.b64encode(b"K" * 32).decode(),
            },
            "transfer_policy_id": policy.json()["id"],
        },
    )
    return str(key.json()["id"])


def _quote(sim: Path, nonce: dict[str, str], user: bytes, mrenclave: bytes = MRENCLAVE) -> str:
    data = hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + user).digest()
    return base64.b64encode(SimulatedEvidence(sim, "sgx", mrenclave=mrenclave).quote(data)).decode()


def test_background_check_through_the_attestation_service(
    kbs: TestClient, attestation_service: tuple[Server, Path]
) -> None:
    _, sim = attestation_service
    key_id = _key(kbs)
    path = f"/kbs/v1/keys/{key_id}/transfer"
    private, user = cached_workload_key()
    nonce = kbs.post(path, json={}).json()  # issued by the attestation service
    body = {"quote": _quote(sim, nonce, user), "nonce": nonce, "user_data": base64.b64encode(user).decode()}
    released = kbs.post(path, json=body, headers={"Attestation-Type": "SGX"})
    assert released.status_code == 200, released.text
    assert (
        unwrap(
            base64.b64decode(released.json()["wrapped_key"]), base64.b64decode(released.json()["wrapped_swk"]), private
        )
        == b"K" * 32
    )
    assert_problem(kbs.post(path, json=body, headers={"Attestation-Type": "SGX"}), 409, "nonce_replayed")
    nonce = kbs.post(path, json={}).json()
    wrong = {
        "quote": _quote(sim, nonce, user, b"\x01" * 32),
        "nonce": nonce,
        "user_data": base64.b64encode(user).decode(),
    }
    problem = assert_problem(kbs.post(path, json=wrong, headers={"Attestation-Type": "SGX"}), 403, "policy_denied")
    assert [r["code"] for r in problem["reasons"]] == ["mrenclave_mismatch"]
    nonce = kbs.post(path, json={}).json()
    unbound = {
        "quote": _quote(sim, nonce, cached_workload_key(4096)[1]),
        "nonce": nonce,
        "user_data": base64.b64encode(user).decode(),
    }
    problem = assert_problem(
        kbs.post(path, json=unbound, headers={"Attestation-Type": "SGX"}), 401, "attestation_failed"
    )
    assert problem["reasons"][0]["code"] == "report_data_mismatch"


def test_passport_with_a_token_of_the_attestation_service(
    kbs: TestClient, attestation_service: tuple[Server, Path]
) -> None:
    remote, sim = attestation_service
    key_id = _key(kbs)
    path = f"/kbs/v1/keys/{key_id}/transfer"
    private, user = cached_workload_key()
    nonce = kbs.post(path, json={}).json()
    with httpx.Client(base_url=remote.url, verify=ssl.create_default_context(cafile=str(remote.ca_file))) as http:
        token = http.post(
            "/appraisal/v1/attest",
            json={
                "quote": _quote(sim, nonce, user),
                "verifier_nonce": nonce,
                "runtime_data": base64.b64encode(user).decode(),
            },
        ).json()["token"]
    released = kbs.post(path, json={"attestation_token": token})
    assert released.status_code == 200, released.text
    assert (
        unwrap(
            base64.b64decode(released.json()["wrapped_key"]), base64.b64decode(released.json()["wrapped_swk"]), private
        )
        == b"K" * 32
    )
    assert_problem(kbs.post(path, json={"attestation_token": token}), 409, "nonce_replayed")
    # A token the KBS's own (local) issuer signed is not the attestation service's: unknown key.
    problem = assert_problem(
        kbs.post(path, json={"attestation_token": token[:-8] + "AAAAAAAA"}), 401, "attestation_failed"
    )
    assert problem["reasons"][0]["code"] in ("token_invalid", "token_unknown_key")


def test_an_unreachable_attestation_service_is_503(tmp_path: Path) -> None:
    from tests.integration.conftest import free_port

    settings = load_settings(
        data_dir=tmp_path / "kbs", overrides={"attestation": {"url": f"https://127.0.0.1:{free_port()}"}}
    )
    token = initialise(settings).admin_token
    services = build_services(settings)
    try:
        with TestClient(create_app(services, "kbs"), raise_server_exceptions=False) as kbs:
            kbs.headers["Authorization"] = f"Bearer {token}"
            key_id = _key(kbs)
            assert_problem(kbs.post(f"/kbs/v1/keys/{key_id}/transfer", json={}), 503, "attestation_unavailable")
    finally:
        services.close()
