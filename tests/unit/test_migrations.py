"""Upgrading a database that holds data: 0006 -> head backfills the backend of embedded material and refuses (without
changing anything) a database in which two keys adopt the same KMIP object; 0009 -> 0010 (SQLite and PostgreSQL)
keeps the CAs and admits only the rows of a CA rotation beside them, and is not undone while a rotation runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from keybroker.storage.db import _MIGRATIONS, Database

NOW = "2026-11-27 12:00:00.000000"


def _at_0006(path: Path) -> Database:
    database = Database.from_url(f"sqlite:///{path}")
    with database.engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0006")
    with database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO transfer_policies (id, document, immutable, created_at, updated_at) "
                "VALUES ('p1', '{}', 0, :now, :now)"
            ),
            {"now": NOW},
        )
    return database


def _key(database: Database, key_id: str, backend: str, ref: str, kmip_key_id: str | None = None) -> None:
    with database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO keys (id, algorithm, key_length, transfer_policy_id, backend, backend_ref, kmip_key_id, "
                "created_at) VALUES (:id, 'AES', 256, 'p1', :backend, :ref, :kmip, :now)"
            ),
            {"id": key_id, "backend": backend, "ref": ref, "kmip": kmip_key_id, "now": NOW},
        )


def _version(database: Database) -> str:
    with database.engine.begin() as connection:
        return str(connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one())


def test_embedded_material_gets_the_backend_of_its_key(tmp_path: Path) -> None:
    database = _at_0006(tmp_path / "kb.db")
    try:
        with database.engine.begin() as connection:
            for ref, key_id in (("r1", "k1"), ("r2", "k2"), ("r3", None)):
                connection.execute(
                    text(
                        "INSERT INTO embedded_key_material (ref, key_id, kek_id, wrapped_dek, ciphertext, created_at) "
                        "VALUES (:ref, :key_id, 'local:x', x'00', x'00', :now)"
                    ),
                    {"ref": ref, "key_id": key_id, "now": NOW},
                )
        _key(database, "k1", "embedded", "r1")
        _key(database, "k2", "hsm", "r2")
        database.migrate()
        with database.engine.begin() as connection:
            rows: dict[str, str | None] = dict(
                connection.execute(text("SELECT ref, backend FROM embedded_key_material")).all()
            )
        assert rows == {"r1": "embedded", "r2": "hsm", "r3": None}  # r3: an orphan, nobody's
    finally:
        database.close()


def test_two_keys_over_one_kmip_object_stop_the_upgrade_and_change_nothing(tmp_path: Path) -> None:
    database = _at_0006(tmp_path / "kb.db")
    try:
        _key(database, "k1", "kmip", "registered:7", kmip_key_id="7")
        _key(database, "k2", "kmip", "registered:7", kmip_key_id="7")
        _key(database, "k3", "kmip", "registered:8", kmip_key_id="8")
        with pytest.raises(RuntimeError, match=r"kmip/7 \(2 keys\)"):
            database.migrate()
        assert _version(database) == "0006"
        with database.engine.begin() as connection:
            columns = {row[1] for row in connection.execute(text("PRAGMA table_info(embedded_key_material)"))}
        assert "backend" not in columns
        with database.engine.begin() as connection:
            connection.execute(text("DELETE FROM keys WHERE id = 'k2'"))
        database.migrate()  # once the double is gone the upgrade goes through
        assert _version(database) != "0006"
    finally:
        database.close()


def test_an_upgrade_interrupted_half_way_runs_again(tmp_path: Path) -> None:
    """SQLite commits DDL as it goes: after a failure part of 0007 may be in place while the version says 0006."""
    database = _at_0006(tmp_path / "kb.db")
    try:
        with database.engine.begin() as connection:
            connection.execute(text("ALTER TABLE embedded_key_material ADD COLUMN backend VARCHAR(64)"))
        database.migrate()
        assert _version(database) != "0006"
    finally:
        database.close()


@pytest.fixture
def database_at_0009(database_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty database of either kind at revision 0009, with its two CAs."""
    if database_kind == "sqlite":
        database = Database.from_url(f"sqlite:///{tmp_path / 'kb.db'}")
    else:
        server = request.getfixturevalue("postgres")
        database = Database.from_url(server.url_for(server.create_database(), password=True))
    try:
        _upgrade(database, "0009")
        for name in ("service", "workload"):
            _ca(database, name)
        yield database
    finally:
        database.close()


def _upgrade(database: Database, revision: str, down: bool = False) -> None:
    with database.engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def _ca(database: Database, name: str) -> None:
    with database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO certificate_authorities (name, cert_pem, key_wrapped, kek_id, created_at) "
                "VALUES (:name, 'PEM', :blob, 'local:x', :now)"
            ),
            {"name": name, "blob": b"\x00", "now": NOW},
        )


def test_0010_keeps_the_cas_and_admits_only_the_rows_of_a_rotation(database_at_0009: Database) -> None:
    database = database_at_0009
    database.migrate()
    assert _version(database) == "0010"
    for name in ("service:next", "workload:old"):
        _ca(database, name)
    with pytest.raises(IntegrityError):
        _ca(database, "service:other")
    with database.engine.begin() as connection:
        names = sorted(connection.execute(text("SELECT name FROM certificate_authorities")).scalars())
    assert names == ["service", "service:next", "workload", "workload:old"]
    with pytest.raises(RuntimeError, match=r"a CA rotation is in progress \(service:next, workload:old\)"):
        _upgrade(database, "0009", down=True)
    assert _version(database) == "0010"
    with database.engine.begin() as connection:
        connection.execute(text("DELETE FROM certificate_authorities WHERE name LIKE '%:%'"))
    _upgrade(database, "0009", down=True)
    assert _version(database) == "0009"
    _ca(database, "service:other")  # (0009 had no such rule)
