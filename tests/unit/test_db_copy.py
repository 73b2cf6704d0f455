"""``keybroker db migrate`` and ``keybroker.storage.copy``: a SQLite deployment copied into PostgreSQL row for row
(every table, primary keys, BLOBs, timestamps), the audit chain still verifying, sequences continuing after the
copied ids; and every refusal clean (exit code, message, no traceback, no password, the target unchanged).

The tests with the ``postgres`` fixture are integration tests (tests/conftest.py); the others start nothing."""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, inspect, select, text
from typer.testing import CliRunner

from keybroker.api.app import create_app
from keybroker.cli.db import verify_audit
from keybroker.cli.main import app
from keybroker.config import load_settings
from keybroker.errors import CopyFailed
from keybroker.services import build_services, initialise
from keybroker.storage.copy import copy_database, copy_plan, sqlite_snapshot
from keybroker.storage.db import Database, schema_head
from keybroker.storage.tables import (
    Base,
    CollateralRow,
    LeaseRow,
    PendingMaterialRow,
    ReplicaRow,
    UsedNonceRow,
)
from tests.conftest import PG_PASSWORD_ENV, sgx_policy
from tests.peers.postgres import Postgres

runner = CliRunner()
# Timestamps with microseconds, and one far from now: they must come back exactly.
AT = datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)


@dataclass
class Source:
    data_dir: Path
    token: str
    keys: list[str]

    @property
    def file(self) -> Path:
        return self.data_dir / "keybroker.db"

    def engine(self) -> Engine:
        return create_engine(f"sqlite:///{self.file}")


def _populate(data_dir: Path) -> Source:
    """A deployment with something in every table: keys of several kinds (and a certificate), policies, tokens
    (one revoked), a custom role, appraisal policies and a signing key, the audit entries all that made; and, for
    the tables only a running server fills, rows written directly."""
    settings = load_settings(data_dir=data_dir)
    token = initialise(settings).admin_token
    assert token is not None
    services = build_services(settings)
    try:
        with TestClient(create_app(services), raise_server_exceptions=False) as api:
            api.headers["Authorization"] = f"Bearer {token}"

            def post(path: str, body: dict[str, Any], status: int = 201) -> Any:
                response = api.post(path, json=body)
                assert response.status_code == status, response.text
                return response.json()

            policy = post("/kbs/v1/key-transfer-policies", sgx_policy())["id"]
            other = post("/kbs/v1/key-transfer-policies", sgx_policy(immutable=True))["id"]
            ec_pem = (
                ec.generate_private_key(ec.SECP384R1())
                .private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                .decode()
            )
            infos: list[dict[str, Any]] = [
                {"algorithm": "AES", "key_length": 256},
                {"algorithm": "AES", "key_length": 128, "key_string": base64.b64encode(os.urandom(16)).decode()},
                {"algorithm": "RSA", "key_length": 2048},
                {"algorithm": "EC", "curve_type": "secp256r1"},
                {"algorithm": "EC", "curve_type": "secp384r1", "key_string": ec_pem},
            ]
            keys = [
                post("/kbs/v1/keys", {"key_information": info, "transfer_policy_id": policy, "label": f"k{n}"})["id"]
                for n, info in enumerate(infos)
            ]
            doomed = post("/kbs/v1/keys", {"key_information": infos[0], "transfer_policy_id": other})["id"]
            assert api.delete(f"/kbs/v1/keys/{doomed}").status_code == 204
            post(f"/kbs/v1/keys/{keys[3]}/certificate", {"subject": "CN=workload", "san": ["w.example"]})
            assert api.put("/kbs/v1/roles/auditor", json={"permissions": ["audit:read"]}).status_code == 200
            post("/kbs/v1/tokens", {"name": "reader", "roles": ["auditor"], "context": ["nginx"]})
            revoked = post("/kbs/v1/tokens", {"name": "gone", "roles": ["admin"]})["id"]
            assert api.delete(f"/kbs/v1/tokens/{revoked}").status_code == 204
            rego = "package policy\nimport rego.v1\ndefault allow := false\nallow if input.x == 1\n"
            post("/appraisal/v1/policies", {"name": "p", "policy": rego})
            post("/appraisal/v1/keys/rotate", {}, status=200)
            assert api.get("/appraisal/v1/nonce").status_code == 200  # the nonce key (a service secret)
        with services.database.transaction(write=True) as session:
            session.add(LeaseRow(name="test-lease", holder="host:1/2", expires_at=AT))
            session.add(ReplicaRow(id="host:1", address="https://h:9443", version="1", schema_revision=schema_head(),
                                   started_at=AT, heartbeat_at=AT + timedelta(microseconds=1)))  # fmt: skip
            session.add(PendingMaterialRow(key_id="k-pending", backend="embedded", backend_ref=None,
                                           operation="create", created_at=AT, claimed_at=None))  # fmt: skip
            session.add(UsedNonceRow(digest="ab" * 32, purpose="transfer", expires_at=AT))
            session.add(CollateralRow(key="tcb:00906ED50000", issue_date=AT, next_update=AT + timedelta(days=30),
                                      body=bytes(range(256)) * 3, issuer_chain="-----PEM-----", source="test",
                                      imported_at=AT))  # fmt: skip
    finally:
        services.close()
    source = Source(data_dir, token, keys)
    empty = [name for name, rows in dump(source.engine()).items() if not rows]
    assert empty == [], f"populate these tables in _populate, so that their copy is checked: {empty}"
    return source


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return _populate(tmp_path / "sqlite")


def dump(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, as Python values, in primary key order (sorted here: collations differ)."""
    tables: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as connection:
        for table in copy_plan():
            rows = [row._asdict() for row in connection.execute(select(table))]
            keys = [column.name for column in table.primary_key.columns]
            tables[table.name] = sorted(rows, key=lambda row: tuple(repr(row[k]) for k in keys))
    engine.dispose()
    return tables


def pg_engine(postgres: Postgres, database: str) -> Engine:
    return create_engine(postgres.url_for(database, password=True).replace("postgresql://", "postgresql+psycopg://"))


def migrate(source: Path, to: str, *extra: str) -> Result:
    return runner.invoke(app, ["db", "migrate", "--data-dir", str(source), "--to", to, *extra])


def assert_clean_failure(result: Result, *secrets: str) -> str:
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for secret in secrets:
        assert secret not in result.output
    return " ".join(result.output.split())  # independent of where a narrow terminal would fold


# --- the plan --------------------------------------------------------------------------------------------------


def test_every_table_is_copied_parents_first(tmp_path: Path) -> None:
    """The copy discovers its tables: every table of the metadata, which is every table the migrations make (a
    table a migration added without a model would be refused by check_source, never skipped)."""
    plan = [table.name for table in copy_plan()]
    assert sorted(plan) == sorted(Base.metadata.tables)
    database = Database.from_url(f"sqlite:///{tmp_path / 'fresh.db'}")
    database.migrate()
    assert set(inspect(database.engine).get_table_names()) == {*plan, "alembic_version"}
    database.close()
    for position, table in enumerate(copy_plan()):
        for key in table.foreign_keys:
            assert plan.index(key.column.table.name) < position, f"{table.name} before its parent"


# --- the copy --------------------------------------------------------------------------------------------------


def test_migrate_copies_every_row_exactly(source: Source, postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PG_PASSWORD_ENV, postgres.password)
    before = dump(source.engine())
    target = postgres.create_database()
    result = migrate(source.data_dir, postgres.url_for(target), "--password-env", PG_PASSWORD_ENV)
    assert result.exit_code == 0, result.output
    assert postgres.password not in result.output
    said = " ".join(result.output.split())
    assert f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/{target}" in said
    assert f"Audit chain intact on the target: {len(before['audit_events'])} entries" in said
    assert f"export KEYBROKER_DATABASE__PASSWORD__ENV={PG_PASSWORD_ENV}" in said
    assert (
        f'KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY="$(base64 -w0 < {source.data_dir / "master.key"})"' in said
    )
    assert base64.b64encode((source.data_dir / "master.key").read_bytes()).decode() not in result.output
    assert dump(pg_engine(postgres, target)) == before  # every table, every row, every column
    assert dump(source.engine()) == before  # the source is untouched
    engine = pg_engine(postgres, target)
    with engine.connect() as connection:
        assert verify_audit(connection, "target").entries == len(before["audit_events"])
        # Sequences continue after the copied ids: a row numbered by the database does not collide.
        with connection.begin() as transaction:
            new_id = connection.execute(
                text("INSERT INTO deployment (deployment_id, created_at) VALUES ('x', now()) RETURNING id")
            ).scalar()
            assert new_id == max(row["id"] for row in before["deployment"]) + 1
            transaction.rollback()
    engine.dispose()
    status = runner.invoke(app, ["db", "status", "--data-dir", str(source.data_dir), "-o", "json"])
    assert status.exit_code == 0, status.output
    assert '"revision": "' + schema_head() + '"' in status.stdout


def test_the_copy_serves_the_same_keys(source: Source, postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica on the copy, given the SQLite deployment's KEK through the environment, opens every key to the
    same material, accepts the old admin token, and keeps appending to the same audit chain."""
    monkeypatch.setenv(PG_PASSWORD_ENV, postgres.password)
    target = postgres.create_database()
    result = migrate(source.data_dir, postgres.url_for(target), "--password-env", PG_PASSWORD_ENV, "-o", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["tables"]) == set(Base.metadata.tables)
    assert summary["rows"] == sum(summary["tables"].values())
    assert summary["audit"]["entries"] == summary["tables"]["audit_events"]
    assert summary["target"] == postgres.url_for(target)
    assert postgres.password not in result.stdout
    old = build_services(load_settings(data_dir=source.data_dir))
    try:
        expected = {key: old.keys.load_material(old.keys.get(key)).secret for key in source.keys}
    finally:
        old.close()
    master = base64.b64encode((source.data_dir / "master.key").read_bytes()).decode()
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY", master)
    monkeypatch.setenv("KEYBROKER_DATABASE__URL", postgres.url_for(target))
    monkeypatch.setenv("KEYBROKER_DATABASE__PASSWORD__ENV", PG_PASSWORD_ENV)
    replica = load_settings(data_dir=source.data_dir.parent / "replica")
    assert initialise(replica).admin_token is None  # joined: no new deployment, no new admin token
    services = build_services(replica)
    try:
        assert {key: services.keys.load_material(services.keys.get(key)).secret for key in source.keys} == expected
        with TestClient(create_app(services), raise_server_exceptions=False) as api:
            api.headers["Authorization"] = f"Bearer {source.token}"
            assert api.delete(f"/kbs/v1/keys/{source.keys[0]}").status_code == 204
        with services.database.engine.connect() as connection:
            verify_audit(connection, "the replica")
    finally:
        services.close()
    status = runner.invoke(app, ["db", "status", "--data-dir", str(replica.data_dir), "-o", "json"])
    assert status.exit_code == 0, status.output
    shown = json.loads(status.stdout)
    assert shown["kind"] == "postgresql"
    assert shown["database"] == postgres.url_for(target)  # without the password
    assert shown["up_to_date"] is True


def test_a_failed_copy_leaves_the_target_empty(source: Source, postgres: Postgres) -> None:
    target = postgres.create_database()
    database = Database.from_url(pg_engine(postgres, target).url.render_as_string(hide_password=False))

    def fail(_connection: object) -> None:
        raise CopyFailed("verification refused")

    with sqlite_snapshot(source.file) as snapshot, pytest.raises(CopyFailed, match="verification refused"):
        copy_database(snapshot, database, verify=fail)
    assert inspect(database.engine).get_table_names() == []
    database.close()
    assert [p.name for p in source.data_dir.iterdir() if "snapshot" in p.name] == []  # the snapshot is gone


# --- refusals --------------------------------------------------------------------------------------------------


def test_a_target_with_a_deployment_is_refused_and_unchanged(
    source: Source, postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PG_PASSWORD_ENV, postgres.password)
    target = postgres.create_database()
    assert migrate(source.data_dir, postgres.url_for(target), "--password-env", PG_PASSWORD_ENV).exit_code == 0
    before = dump(pg_engine(postgres, target))
    password_file = source.data_dir.parent / "db-password"
    password_file.write_text(postgres.password + "\n")
    password_file.chmod(0o600)
    said = assert_clean_failure(
        migrate(source.data_dir, postgres.url_for(target), "--password-file", str(password_file)), postgres.password
    )
    assert "the target database holds a keybroker deployment already" in said
    assert "nothing was changed" in said
    assert dump(pg_engine(postgres, target)) == before


def test_a_target_with_keybroker_tables_is_refused(source: Source, postgres: Postgres) -> None:
    target = postgres.create_database()
    url = postgres.url_for(target, password=True)
    migrated = Database.from_url(url.replace("postgresql://", "postgresql+psycopg://"))
    migrated.migrate()  # the schema of a replica that started on it, without a deployment
    migrated.close()
    said = assert_clean_failure(migrate(source.data_dir, url), postgres.password)
    assert "the target database is not empty" in said
    assert "alembic_version" in said


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("sqlite:///{tmp}/other.db", "the target must be PostgreSQL"),
        ("mysql://u@h/db", "the target must be PostgreSQL"),
        ("not a url", "not a database URL"),
        ("postgresql://u@h", "give the database"),
    ],
)
def test_targets_other_than_postgresql_are_refused(source: Source, tmp_path: Path, to: str, expected: str) -> None:
    said = assert_clean_failure(migrate(source.data_dir, to.format(tmp=tmp_path)))
    assert expected in said
    assert not (tmp_path / "other.db").exists()


def test_an_uninitialised_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    said = assert_clean_failure(migrate(tmp_path / "empty", "postgresql://u@127.0.0.1:1/db"))
    assert "is not initialised" in said
    assert list((tmp_path / "empty").iterdir()) == []  # no database made by the refusal


def test_a_source_behind_the_code_is_refused(source: Source) -> None:
    with sqlite3.connect(source.file) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0007'")
    said = assert_clean_failure(migrate(source.data_dir, "postgresql://u@127.0.0.1:1/db"))
    assert f"the source database's schema is revision 0007, this keybroker's is {schema_head()}" in said
    assert "run 'keybroker init' or 'serve' on it with this version first" in said


def test_a_broken_audit_chain_is_not_copied(source: Source) -> None:
    with sqlite3.connect(source.file) as connection:
        connection.execute("UPDATE audit_events SET outcome = 'denied' WHERE seq = 2")
    said = assert_clean_failure(migrate(source.data_dir, "postgresql://u@127.0.0.1:1/db"))
    assert "is BROKEN at entry 2" in said


def test_a_wrong_password_is_a_clean_error(source: Source, postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PG_PASSWORD_ENV, "not-the-password-4711")
    target = postgres.create_database()
    said = assert_clean_failure(
        migrate(source.data_dir, postgres.url_for(target), "--password-env", PG_PASSWORD_ENV),
        "not-the-password-4711",
        postgres.password,
    )
    assert "password authentication failed" in said
    wrong_in_url = postgres.url_for(target).replace("@", ":Inline-Secret-99@", 1)
    said = assert_clean_failure(migrate(source.data_dir, wrong_in_url), "Inline-Secret-99")
    assert "password authentication failed" in said
    said = assert_clean_failure(migrate(source.data_dir, postgres.url_for(target), "--password-env", "KB_UNSET_VAR"))
    assert "environment variable KB_UNSET_VAR is not set" in said
    said = assert_clean_failure(migrate(source.data_dir, wrong_in_url, "--password-env", PG_PASSWORD_ENV))
    assert "the URL has a password already; give it in one place only" in said
    password_file = source.data_dir.parent / "readable-password"
    password_file.write_text("x")
    password_file.chmod(0o644)
    said = assert_clean_failure(
        migrate(source.data_dir, postgres.url_for(target), "--password-file", str(password_file))
    )
    assert "is readable by others; chmod 600 it" in said


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a stuck server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def test_an_unreachable_target_fails_within_the_connect_timeout(source: Source, silent_port: int) -> None:
    started = time.monotonic()
    said = assert_clean_failure(
        migrate(source.data_dir, f"postgresql://u@127.0.0.1:{silent_port}/db", "--connect-timeout", "1")
    )
    assert time.monotonic() - started < 10  # the snapshot and checks of the source, then one second
    assert "cannot connect to the target database" in said
    assert "timeout" in said
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    said = assert_clean_failure(migrate(source.data_dir, f"postgresql://u@127.0.0.1:{port}/db"))
    assert "Connection refused" in said


def test_db_status_of_a_sqlite_deployment(source: Source) -> None:
    result = runner.invoke(app, ["db", "status", "--data-dir", str(source.data_dir)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"database: sqlite {source.file}" in said
    assert f"schema: {schema_head()} (this keybroker: {schema_head()}, up to date)" in said
