"""PROTOCOL.md §9 with real processes on a real PostgreSQL: ``keybroker init`` creates a deployment or joins it
(the same CA, no second admin token, another KEK refused with nothing changed), nothing SQLite is made, and two
replicas serve one deployment: a nonce from one is good at the other once, a change on one is in force on the other
at the next request (token revocation included), one audit chain, ``keybroker cluster status``."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from keybroker.cli.main import app
from keybroker_client import Client
from keybroker_client.evidence import SimulatedEvidence
from tests.integration.conftest import Server
from tests.integration.independent_client import fetch_key
from tests.integration.replicas import (
    MRENCLAVE,
    Deployment,
    audit_verify,
    cli,
    files_in,
    provision,
    simulated_tee,
    table_counts,
)
from tests.peers.postgres import Postgres

runner = CliRunner()


def _deployment(postgres: Postgres, base: Path, sim: Path | None = None) -> Deployment:
    return Deployment(postgres, postgres.create_database(), base, sim=sim)


def test_init_creates_the_deployment_then_joins_it_and_refuses_another_kek(postgres: Postgres, tmp_path: Path) -> None:
    deployment = _deployment(postgres, tmp_path)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"

    created = deployment.init(a)
    assert created.returncode == 0, created.stderr
    assert stat.S_IMODE((a / "admin-token").stat().st_mode) == 0o600
    # no SQLite database, no master key, no CA key: the CA certificates only (ca.pem for clients)
    assert list(files_in(a)) == ["admin-token", "ca.pem", "workload-ca.pem"]

    joined = deployment.init(b)
    assert joined.returncode == 0, joined.stderr
    assert "joined" in joined.stderr
    assert list(files_in(b)) == ["ca.pem", "workload-ca.pem"]  # no admin token: a's works on b
    assert (b / "ca.pem").read_bytes() == (a / "ca.pem").read_bytes()

    before = table_counts(postgres, deployment.database)
    other_kek = base64.b64encode(os.urandom(32)).decode()
    refused = deployment.init(c, KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY=other_kek)
    assert refused.returncode != 0
    assert "KEK" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (c / "ca.pem").exists()
    assert not (c / "admin-token").exists()
    no_kek = deployment.init(c, KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY="")
    assert no_kek.returncode != 0
    assert "every replica must hold the same KEK" in no_kek.stderr
    assert not (c / "master.key").exists()  # a KEK of this host alone would split the deployment
    assert table_counts(postgres, deployment.database) == before

    again = deployment.init(a)  # idempotent: no second token, the same CA
    assert again.returncode == 0, again.stderr
    assert table_counts(postgres, deployment.database)["api_tokens"] == before["api_tokens"] == 1


def test_init_on_an_unreachable_database_says_so_without_a_traceback(postgres: Postgres, tmp_path: Path) -> None:
    deployment = _deployment(postgres, tmp_path)
    wrong = deployment.init(tmp_path / "a", **{deployment.env()["KEYBROKER_DATABASE__PASSWORD__ENV"]: "not-it"})
    assert wrong.returncode != 0
    assert "Traceback" not in wrong.stderr
    assert "not-it" not in wrong.stderr
    assert postgres.password not in wrong.stderr
    assert "database" in wrong.stderr.lower()
    assert not (tmp_path / "a" / "admin-token").exists()


@pytest.fixture(scope="module")
def two(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Server, Server]]:
    base = tmp_path_factory.mktemp("replicas")
    deployment = _deployment(postgres, base, simulated_tee(base))
    try:
        first = deployment.replica("a")
        second = deployment.replica("b")
        yield deployment, first, second
    finally:
        deployment.stop_all()


@pytest.fixture(scope="module")
def keys(two: tuple[Deployment, Server, Server]) -> dict[str, bytes]:
    deployment, first, _ = two
    assert deployment.sim is not None
    return provision(first, deployment.sim, count=3)


def _evidence(deployment: Deployment) -> SimulatedEvidence:
    assert deployment.sim is not None
    return SimulatedEvidence(deployment.sim, "sgx", mrenclave=MRENCLAVE)


def test_a_key_made_on_one_replica_is_released_by_the_other(
    two: tuple[Deployment, Server, Server], keys: dict[str, bytes]
) -> None:
    deployment, first, second = two
    for server in (first, second):
        with httpx.Client(base_url=server.url, verify=server.verify(), timeout=60) as http:
            for key_id, material in keys.items():
                assert fetch_key(http, key_id, "sgx", _evidence(deployment).quote) == material
    with Client([first.url, second.url], ca=first.ca_file) as client:
        assert {client.fetch_key(k, _evidence(deployment)).key for k in keys} == set(keys.values())


def _nonce_and_body(server: Server, key_id: str, deployment: Deployment) -> dict[str, object]:
    with httpx.Client(base_url=server.url, verify=server.verify(), timeout=60) as http:
        nonce = http.post(f"/kbs/v1/keys/{key_id}/transfer", json={}).json()
    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    user_data = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    report = hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + user_data).digest()
    return {
        "quote": base64.b64encode(_evidence(deployment).quote(report)).decode(),
        "nonce": nonce,
        "user_data": base64.b64encode(user_data).decode(),
    }


def test_a_nonce_from_one_replica_is_good_at_the_other_exactly_once(
    two: tuple[Deployment, Server, Server], keys: dict[str, bytes]
) -> None:
    deployment, first, second = two
    key_id = next(iter(keys))
    body = _nonce_and_body(first, key_id, deployment)
    barrier = threading.Barrier(16)

    def use(n: int) -> tuple[int, str]:
        server = (first, second)[n % 2]
        with httpx.Client(base_url=server.url, verify=server.verify(), timeout=60) as http:
            barrier.wait()
            answer = http.post(f"/kbs/v1/keys/{key_id}/transfer", json=body, headers={"Attestation-Type": "SGX"})
            return answer.status_code, answer.json().get("code", "")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(use, range(16)))
    assert [status for status, _ in answers].count(200) == 1, answers
    assert sorted(answers)[1:] == [(409, "nonce_replayed")] * 15, answers


def test_a_change_on_one_replica_is_in_force_on_the_other_at_the_next_request(
    two: tuple[Deployment, Server, Server], keys: dict[str, bytes], tmp_path: Path
) -> None:
    deployment, first, second = two
    with first.client() as http_a, second.client() as http_b:
        made = http_a.post("/kbs/v1/tokens", json={"name": "ops", "roles": ["auditor"], "ttl_seconds": 3600})
        assert made.status_code == 201, made.text
        token, token_id = made.json()["token"], made.json()["id"]
        headers = {"Authorization": f"Bearer {token}"}
        assert http_b.get("/kbs/v1/audit", headers=headers).status_code == 200
        assert http_a.delete(f"/kbs/v1/tokens/{token_id}").status_code == 204
        assert http_b.get("/kbs/v1/audit", headers=headers).status_code == 401  # revoked: refused at once

        key_id = next(iter(keys))
        strict = {"mrenclave": [MRENCLAVE.hex()], "isvsvn": 99}
        denying = {"attestation_type": "SGX", "allow_simulated": True, "sgx": {"attributes": strict}}
        policy = http_a.post("/kbs/v1/key-transfer-policies", json=denying).json()["id"]
        original = http_a.get(f"/kbs/v1/keys/{key_id}").json()["transfer_policy_id"]
        assert http_a.put(f"/kbs/v1/keys/{key_id}", json={"transfer_policy_id": policy}).status_code == 200
        try:
            body = _nonce_and_body(second, key_id, deployment)
            refused = http_b.post(f"/kbs/v1/keys/{key_id}/transfer", json=body, headers={"Attestation-Type": "SGX"})
            assert refused.status_code == 403, refused.text
            assert "isvsvn_below_minimum" in refused.text
        finally:
            http_a.put(f"/kbs/v1/keys/{key_id}", json={"transfer_policy_id": original})
        deleted = http_a.post(
            "/kbs/v1/keys",
            json={"key_information": {"algorithm": "AES", "key_length": 128}, "transfer_policy_id": policy},
        ).json()["id"]
        assert http_b.get(f"/kbs/v1/keys/{deleted}").status_code == 200
        assert http_a.delete(f"/kbs/v1/keys/{deleted}").status_code == 204
        assert http_b.get(f"/kbs/v1/keys/{deleted}").status_code == 404


def test_one_audit_chain_after_concurrent_writes_through_both_replicas(
    two: tuple[Deployment, Server, Server], keys: dict[str, bytes]
) -> None:
    deployment, first, second = two

    def work(n: int) -> bytes:
        server = (first, second)[n % 2]
        with Client(server.url, ca=server.ca_file) as client:
            return client.fetch_key(list(keys)[n % len(keys)], _evidence(deployment)).key

    with ThreadPoolExecutor(8) as pool:
        released = list(pool.map(work, range(24)))
    assert released == [keys[list(keys)[n % len(keys)]] for n in range(24)]
    assert "audit chain intact" in audit_verify(first)
    assert "audit chain intact" in audit_verify(second)


def test_cluster_status_lists_both_replicas(two: tuple[Deployment, Server, Server]) -> None:
    _, first, second = two
    out = cli(second, "cluster", "status", "-o", "json")
    import json

    listed = json.loads(out)
    assert {r["address"] for r in listed} == {first.url, second.url}
    assert all(r["alive"] and r["schema_revision"] for r in listed)
    table = runner.invoke(
        app, ["cluster", "status", "--addr", first.url, "--token", first.token, "--cacert", str(first.ca_file)]
    )
    assert table.exit_code == 0, table.output
    assert "ALIVE" in table.output
