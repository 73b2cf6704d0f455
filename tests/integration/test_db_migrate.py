"""``keybroker db migrate`` with real processes: a SQLite deployment of 1,000 keys moved to PostgreSQL, every key
then transferred by a (simulated) attested workload from a server on PostgreSQL, and the audit chain verifying
across the move; a running server detected, and a copy made while one writes consistent anyway."""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import create_engine, func, select
from typer.testing import CliRunner

import keybroker_client._client
from keybroker.cli.db import verify_audit
from keybroker.cli.main import app
from keybroker.storage.tables import AuditEventRow, KeyRow
from keybroker_client import Client
from keybroker_client.evidence import SimulatedEvidence
from tests.conftest import PG_PASSWORD_ENV
from tests.integration.conftest import Server, clean_env, stop, wait_until_serving
from tests.peers.postgres import Postgres
from tests.peers.process import free_port

runner = CliRunner()
MRENCLAVE = b"\x3c" * 32
PKCS8 = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
PEM = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def launch(data_dir: Path, env: dict[str, str], *serve_args: str) -> Server:
    """``keybroker init`` and ``serve`` with the same environment (``start_server`` gives ``init`` none: a replica of
    a PostgreSQL deployment needs its database and KEK settings for both)."""
    done = subprocess.run(
        [sys.executable, "-m", "keybroker", "init", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    port = free_port()
    log = data_dir.parent / f"server-{port}.log"
    argv = [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"]
    with log.open("wb") as sink:
        process = subprocess.Popen([*argv, *serve_args], stdout=sink, stderr=subprocess.STDOUT, env=clean_env(**env))
    url = f"https://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, log, ssl.create_default_context(cafile=str(data_dir / "ca.pem")))
    except Exception:
        stop(process)
        raise
    token_file = data_dir / "admin-token"
    return Server(url, token_file.read_text().strip() if token_file.exists() else "", data_dir, log, process)


def keybroker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keybroker", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=300,
        check=False,
    )


def cli(server: Server, *args: str, token: str | None = None) -> str:
    connection = ["--addr", server.url, "--token", token or server.token, "--cacert", str(server.ca_file)]
    result = runner.invoke(app, [*args, *connection])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("migrate-sim") / "sim"
    assert runner.invoke(app, ["sim", "init", str(directory)]).exit_code == 0
    assert runner.invoke(app, ["sim", "collateral", str(directory), "--out", str(directory / "coll")]).exit_code == 0
    return directory


@pytest.fixture
def one_workload_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client makes a fresh RSA-3072 key for every transfer (about 0.1-1 s of CPU each); for 1,000 transfers
    one key serves them all. (The server still checks each request in full.)"""
    key = rsa.generate_private_key(65537, 3072)

    class OneKey:  # what keybroker_client._client uses of cryptography's rsa module
        RSAPrivateKey = rsa.RSAPrivateKey

        @staticmethod
        def generate_private_key(public_exponent: int, key_size: int) -> rsa.RSAPrivateKey:
            assert (public_exponent, key_size) == (65537, 3072)
            return key

    monkeypatch.setattr(keybroker_client._client, "rsa", OneKey)


def _materials(count: int) -> list[tuple[dict[str, Any], bytes]]:
    """``count`` keys to import: mostly AES-256, and AES-128, EC (P-256, P-384) and RSA-2048 among them."""
    rsa_keys = [rsa.generate_private_key(65537, 2048) for _ in range(5)]
    made: list[tuple[dict[str, Any], bytes]] = []
    for n in range(count):
        if n % 20 == 1:
            curve, name = (ec.SECP256R1(), "secp256r1") if n % 40 == 1 else (ec.SECP384R1(), "secp384r1")
            key = ec.generate_private_key(curve)
            info = {"algorithm": "EC", "curve_type": name, "key_string": key.private_bytes(*PEM).decode()}
            made.append((info, key.private_bytes(*PKCS8)))
        elif n % 20 == 2:
            private = rsa_keys[n % len(rsa_keys)]
            info = {"algorithm": "RSA", "key_length": 2048, "key_string": private.private_bytes(*PEM).decode()}
            made.append((info, private.private_bytes(*PKCS8)))
        else:
            secret = os.urandom(16 if n % 20 == 3 else 32)
            info = {"algorithm": "AES", "key_length": len(secret) * 8, "key_string": base64.b64encode(secret).decode()}
            made.append((info, secret))
    return made


def _setup_sqlite(tmp_path: Path, sim: Path) -> tuple[Server, str]:
    server = launch(tmp_path / "sqlite", {"KEYBROKER_ATTESTATION__SIMULATED_ROOT": str(sim / "root-ca.pem")})
    try:
        cli(server, "collateral", "import", str(sim / "coll"))
        sgx = {"attributes": {"mrenclave": [MRENCLAVE.hex()]}}
        document = {"attestation_type": "SGX", "allow_simulated": True, "sgx": sgx}
        (tmp_path / "policy.json").write_text(json.dumps(document))
        return server, cli(server, "policy", "create", str(tmp_path / "policy.json"), "-o", "id").strip()
    except BaseException:
        stop(server.process)
        raise


def _create_keys(server: Server, policy: str, materials: list[tuple[dict[str, Any], bytes]]) -> list[str]:
    local = threading.local()

    def create(material: tuple[dict[str, Any], bytes]) -> str:
        if not hasattr(local, "client"):
            local.client = server.client()
        response = local.client.post(
            "/kbs/v1/keys", json={"key_information": material[0], "transfer_policy_id": policy}
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(create, materials))


def _audit_head(server: Server) -> tuple[int, str]:
    with server.client() as admin:
        head = admin.get("/kbs/v1/audit", params={"limit": 1}).headers["x-audit-head"]
    seq, _, digest = head.partition(":")
    return int(seq), digest


def test_a_1000_key_deployment_moves_to_postgresql(
    tmp_path: Path, sim: Path, postgres: Postgres, one_workload_key: None
) -> None:
    """The acceptance test of the issue: every key transfers afterwards, and audit verify passes."""
    materials = _materials(1000)
    old, policy = _setup_sqlite(tmp_path, sim)
    try:
        started = time.monotonic()
        keys = _create_keys(old, policy, materials)
        print(f"\n1,000 keys created through the API: {time.monotonic() - started:.2f} s")
        head_seq, head_hash = _audit_head(old)
    finally:
        stop(old.process)
    target = postgres.create_database()
    password = {PG_PASSWORD_ENV: postgres.password}
    started = time.monotonic()
    migrated = keybroker(
        "db", "migrate", "--data-dir", str(old.data_dir), "--to", postgres.url_for(target), "--password-env",
        PG_PASSWORD_ENV, env=password,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert migrated.returncode == 0, migrated.stderr
    assert postgres.password not in migrated.stdout + migrated.stderr
    said = " ".join(migrated.stderr.split())
    assert f"Audit chain intact on the target: {head_seq} entries" in said
    copied = re.search(r"\(schema \w+\) in ([0-9.]+) s:", said)
    assert copied is not None, said
    print(f"\nmigration of 1,000 keys: {elapsed:.2f} s for the command, {copied[1]} s for the copy itself")
    assert elapsed < 20

    master_key = base64.b64encode((old.data_dir / "master.key").read_bytes()).decode()
    replica_env = {
        "KEYBROKER_ATTESTATION__SIMULATED_ROOT": str(sim / "root-ca.pem"),
        "KEYBROKER_DATABASE__URL": postgres.url_for(target),
        "KEYBROKER_DATABASE__PASSWORD__ENV": PG_PASSWORD_ENV,
        PG_PASSWORD_ENV: postgres.password,
        "KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY": master_key,  # as the next steps print it
    }
    new = launch(tmp_path / "replica", replica_env, "--workers", "2")
    try:
        assert new.token == ""  # joined: no new admin token; the old one is the deployment's
        assert (new.data_dir / "ca.pem").read_bytes() == (old.data_dir / "ca.pem").read_bytes()  # the same CA
        expected = dict(zip(keys, (secret for _, secret in materials), strict=True))
        started = time.monotonic()
        released = _transfer_all(new, sim, keys)
        print(f"1,000 transfers from the PostgreSQL replica: {time.monotonic() - started:.2f} s")
        assert released == expected
        verified = cli(new, "audit", "verify", token=old.token)
        entries = int(verified.split("audit chain intact: ")[1].split(" entries")[0])
        assert entries >= head_seq + len(keys)  # the copied entries, then one per transfer, in one chain
        with new.client() as admin:
            admin.headers["Authorization"] = f"Bearer {old.token}"
            at_move = admin.get("/kbs/v1/audit", params={"after": head_seq - 1, "limit": 2}).json()
        assert (at_move[0]["seq"], at_move[0]["hash"]) == (head_seq, head_hash)
        assert at_move[1]["prev_hash"] == head_hash
    finally:
        stop(new.process)


def _transfer_all(server: Server, sim: Path, keys: list[str]) -> dict[str, bytes]:
    chunks = [keys[n::8] for n in range(8)]

    def fetch(chunk: list[str]) -> dict[str, bytes]:
        evidence = SimulatedEvidence(sim, "sgx", mrenclave=MRENCLAVE)
        with Client(server.url, ca=server.ca_file) as client:
            return {key: client.fetch_key(key, evidence).key for key in chunk}

    released: dict[str, bytes] = {}
    with ThreadPoolExecutor(len(chunks)) as pool:
        for part in pool.map(fetch, chunks):
            released.update(part)
    return released


@pytest.fixture
def running(tmp_path: Path, sim: Path) -> Iterator[Server]:
    server, _ = _setup_sqlite(tmp_path, sim)
    try:
        yield server
    finally:
        stop(server.process)


def test_a_running_server_is_detected_and_a_snapshot_is_consistent(
    running: Server, tmp_path: Path, postgres: Postgres
) -> None:
    password = {PG_PASSWORD_ENV: postgres.password}
    target = postgres.create_database()
    command = ["db", "migrate", "--data-dir", str(running.data_dir), "--to", postgres.url_for(target)]
    command += ["--password-env", PG_PASSWORD_ENV]
    refused = keybroker(*command, env=password)
    assert refused.returncode == 1
    assert "is open in another process (a running 'keybroker serve'?): stop it first" in " ".join(
        refused.stderr.split()
    )
    assert "Traceback" not in refused.stderr

    with running.client() as admin:
        policy = admin.get("/kbs/v1/key-transfer-policies").json()[0]["id"]
    stop_writing = threading.Event()
    written: list[int] = []

    def writer() -> None:  # keys keep being created while the snapshot is taken
        with running.client() as admin:
            while not stop_writing.is_set():
                body = {"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": policy}
                written.append(admin.post("/kbs/v1/keys", json=body).status_code)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.5)
        copied = keybroker(*command, "--allow-running", env=password)
        time.sleep(0.3)
    finally:
        stop_writing.set()
        thread.join(timeout=60)
    assert copied.returncode == 0, copied.stderr
    assert set(written) == {201}
    assert len(written) > 5
    engine = create_engine(postgres.url_for(target, password=True).replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as connection:
        verify_audit(connection, "the copy")  # one snapshot: the chain and its head agree
        keys = connection.execute(select(func.count()).select_from(KeyRow)).scalar_one()
        creations = connection.execute(
            select(func.count()).select_from(AuditEventRow).where(AuditEventRow.action == "key.create")
        ).scalar_one()
    engine.dispose()
    assert keys == creations  # every key with its audit entry, no entry without its key
    assert 0 < keys < len(written)  # some written before the snapshot, some after it (and not copied)
