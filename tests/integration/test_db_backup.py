"""Backup and restore as docs/backup-and-migration.md describes them, with real processes: ``keybroker db backup``
of a SQLite deployment while its server writes, restored (on a copy of the data directory, and in place); and
``pg_dump -Fc`` / ``pg_restore`` of a PostgreSQL deployment by keybroker's own role (no superuser)."""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from keybroker.cli.db import verify_audit
from keybroker.storage.tables import AuditEventRow, KeyRow
from keybroker_client import Client
from keybroker_client.evidence import SimulatedEvidence
from tests.conftest import PG_PASSWORD_ENV
from tests.integration.conftest import Server, stop
from tests.integration.test_db_migrate import MRENCLAVE, cli, keybroker, launch, one_workload_key, sim
from tests.peers.postgres import Postgres, _bin

__all__ = ["one_workload_key", "sim"]  # (fixtures shared with test_db_migrate)
DB_FILES = ("keybroker.db", "keybroker.db-wal", "keybroker.db-shm")


def _policy(server: Server) -> str:
    body = {"attestation_type": "SGX", "allow_simulated": True, "sgx": {"attributes": {"mrenclave": [MRENCLAVE.hex()]}}}
    with server.client() as admin:
        response = admin.post("/kbs/v1/key-transfer-policies", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _import(server: Server, policy: str, count: int) -> dict[str, bytes]:
    made: dict[str, bytes] = {}
    with server.client() as admin:
        for _ in range(count):
            secret = os.urandom(32)
            info = {"algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(secret).decode()}
            response = admin.post("/kbs/v1/keys", json={"key_information": info, "transfer_policy_id": policy})
            assert response.status_code == 201, response.text
            made[str(response.json()["id"])] = secret
    return made


def _listed(server: Server) -> set[str]:
    with server.client() as admin:
        return {key["id"] for key in admin.get("/kbs/v1/keys", params={"limit": 1000}).json()}


def _transfer(server: Server, sim: Path, keys: list[str]) -> dict[str, bytes]:
    def fetch(chunk: list[str]) -> dict[str, bytes]:
        with Client(server.url, ca=server.ca_file) as client:
            evidence = SimulatedEvidence(sim, "sgx", mrenclave=MRENCLAVE)
            return {key: client.fetch_key(key, evidence).key for key in chunk}

    released: dict[str, bytes] = {}
    with ThreadPoolExecutor(4) as pool:
        for part in pool.map(fetch, [keys[n::4] for n in range(4)]):
            released.update(part)
    return released


def _audit_verifies(server: Server, token: str) -> int:
    said = cli(server, "audit", "verify", token=token)
    return int(said.split("audit chain intact: ")[1].split(" entries")[0])


@pytest.fixture
def writing(tmp_path: Path, sim: Path) -> Iterator[tuple[Server, str, dict[str, bytes]]]:
    """A SQLite deployment serving, with 20 keys, the simulated TEE trusted."""
    server = launch(tmp_path / "live", {"KEYBROKER_ATTESTATION__SIMULATED_ROOT": str(sim / "root-ca.pem")})
    try:
        cli(server, "collateral", "import", str(sim / "coll"))
        policy = _policy(server)
        yield server, policy, _import(server, policy, 20)
    finally:
        stop(server.process)


def test_an_online_sqlite_backup_restores(
    writing: tuple[Server, str, dict[str, bytes]], tmp_path: Path, sim: Path, one_workload_key: None
) -> None:
    server, policy, keys = writing
    made: dict[str, bytes] = dict(keys)
    stop_writing = threading.Event()

    def writer() -> None:  # the server keeps writing keys (and their audit entries) during the backup
        while not stop_writing.is_set():
            made.update(_import(server, policy, 1))

    backup = tmp_path / "backups" / "keybroker-backup.db"
    backup.parent.mkdir()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        before = _listed(server)
        done = keybroker("db", "backup", "--data-dir", str(server.data_dir), "--out", str(backup), env={})
        after = _listed(server)
        time.sleep(0.3)
    finally:
        stop_writing.set()
        thread.join(timeout=60)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stderr.split())
    assert "Audit chain intact in the backup" in said
    assert "The KEK (master key) is not in the backup" in said
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert [p.name for p in backup.parent.iterdir()] == [backup.name]  # one file, no -wal, no leftovers

    # The backup opens and verifies, and is one snapshot: every key in it has its audit entry and vice versa.
    with sqlite3.connect(backup) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    engine = create_engine(f"sqlite:///{backup}")
    with engine.connect() as connection:
        verify_audit(connection, "the backup")
        in_backup = set(connection.execute(select(KeyRow.id)).scalars())
        creations = connection.execute(
            select(func.count()).select_from(AuditEventRow).where(AuditEventRow.action == "key.create")
        ).scalar_one()
    engine.dispose()
    assert before <= in_backup <= after
    assert len(in_backup) == creations
    assert len(made) > len(in_backup)  # keys written after the backup: not in it

    first = shutil.copy2(backup, tmp_path / "first.db")  # (replaced by a second backup below)
    refused = keybroker("db", "backup", "--data-dir", str(server.data_dir), "--out", str(backup), env={})
    assert refused.returncode == 1
    assert "exists already; pass --force to replace it" in " ".join(refused.stderr.split())
    forced = keybroker("db", "backup", "--data-dir", str(server.data_dir), "--out", str(backup), "--force", env={})
    assert forced.returncode == 0, forced.stderr

    # A server on a copy of the data directory whose database is the backup serves the keys of backup time.
    env = {"KEYBROKER_ATTESTATION__SIMULATED_ROOT": str(sim / "root-ca.pem")}
    copy = tmp_path / "copy"
    shutil.copytree(server.data_dir, copy, ignore=shutil.ignore_patterns(*DB_FILES))
    shutil.copy2(backup, copy / "keybroker.db")
    restored = launch(copy, env)
    try:
        present = _listed(restored)
        assert present == set(made)  # the second backup, made after the writer stopped: every key
        expected = {key: made[key] for key in sorted(present)}
        assert _transfer(restored, sim, list(expected)) == expected
        assert _audit_verifies(restored, server.token) > len(present)
    finally:
        stop(restored.process)

    # The documented restore: stop the server, replace the database file (and drop its -wal/-shm), start again.
    stop(server.process)
    for name in DB_FILES:
        (server.data_dir / name).unlink(missing_ok=True)
    shutil.copy2(first, server.data_dir / "keybroker.db")
    os.chmod(server.data_dir / "keybroker.db", 0o600)
    again = launch(server.data_dir, env)
    try:
        assert _listed(again) == in_backup  # back to the first backup: later keys are gone
        sample = sorted(in_backup)[:10]
        assert _transfer(again, sim, sample) == {key: made[key] for key in sample}
        _audit_verifies(again, server.token)
    finally:
        stop(again.process)


def _pg_env(postgres: Postgres, database: str, sim: Path, master_key: str) -> dict[str, str]:
    return {
        "KEYBROKER_ATTESTATION__SIMULATED_ROOT": str(sim / "root-ca.pem"),
        "KEYBROKER_DATABASE__URL": postgres.url_for(database),
        "KEYBROKER_DATABASE__PASSWORD__ENV": PG_PASSWORD_ENV,
        PG_PASSWORD_ENV: postgres.password,
        "KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY": master_key,
    }


def _pg_tool(postgres: Postgres, *argv: str) -> None:
    """A PostgreSQL client tool as keybroker's role (its password in PGPASSWORD, as the docs say)."""
    env = {**os.environ, "PGPASSWORD": postgres.password}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_pg_dump_and_pg_restore_by_the_keybroker_role(
    tmp_path: Path, sim: Path, postgres: Postgres, one_workload_key: None
) -> None:
    master_key = base64.b64encode(os.urandom(32)).decode()
    database = postgres.create_database()
    server = launch(tmp_path / "pg", _pg_env(postgres, database, sim, master_key))
    dump = tmp_path / "keybroker.dump"
    try:
        refused = keybroker("db", "backup", "--data-dir", str(server.data_dir), "--out", str(dump),
                            env=_pg_env(postgres, database, sim, master_key))  # fmt: skip
        assert refused.returncode == 1
        said = " ".join(refused.stderr.split())
        assert "back it up with pg_dump" in said
        assert f"pg_dump -Fc -h 127.0.0.1 -p {postgres.port} -U keybroker -d {database} -f {dump}" in said
        assert postgres.password not in refused.stdout + refused.stderr
        cli(server, "collateral", "import", str(sim / "coll"))
        keys = _import(server, _policy(server), 15)
        with server.client() as admin:
            head = admin.get("/kbs/v1/audit", params={"limit": 1}).headers["x-audit-head"]
        # While the server runs: pg_dump reads one snapshot.
        address = ["-h", "127.0.0.1", "-p", str(postgres.port), "-U", postgres.user]
        _pg_tool(postgres, _bin("pg_dump"), "-Fc", *address, "-d", database, "-f", str(dump))
    finally:
        stop(server.process)
    restored_db = postgres.create_database()  # empty, owned by keybroker's role (the docs' CREATE DATABASE)
    _pg_tool(
        postgres, _bin("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
        *address, "-d", restored_db, str(dump),
    )  # fmt: skip
    restored = launch(tmp_path / "restored", _pg_env(postgres, restored_db, sim, master_key))
    try:
        with restored.client() as admin:
            admin.headers["Authorization"] = f"Bearer {server.token}"
            assert admin.get("/kbs/v1/audit", params={"limit": 1}).headers["x-audit-head"] == head
        assert _listed_as(restored, server.token) == set(keys)
        assert _transfer(restored, sim, list(keys)) == keys
        assert _audit_verifies(restored, server.token) > int(head.split(":")[0])
    finally:
        stop(restored.process)


def _listed_as(server: Server, token: str) -> set[str]:
    with server.client() as admin:
        admin.headers["Authorization"] = f"Bearer {token}"
        return {key["id"] for key in admin.get("/kbs/v1/keys", params={"limit": 1000}).json()}
