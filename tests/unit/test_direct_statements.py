"""keybroker.storage.direct: the hot path's statements on the driver. Parameters in each driver's style, reads that
survive a connection the database dropped, writes never retried, every driver failure one domain error, a
constraint's refusal rolled back whole, and the connections kept out of the engine's pool."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text

from keybroker.errors import BackendUnavailable
from keybroker.storage.db import Database
from keybroker.storage.direct import Cursor, Statement
from tests.peers.postgres import Postgres

READ = Statement("SELECT counter FROM revision WHERE id = :id")


def test_parameters_in_each_drivers_style() -> None:
    statement = Statement("SELECT :a, CAST(:b AS text), x::text, :c_1 FROM t WHERE y = 'ab'")
    assert statement.sql.count(":a") == 1
    assert statement.postgres == "SELECT %(a)s, CAST(%(b)s AS text), x::text, %(c_1)s FROM t WHERE y = 'ab'"


def _insert(value: int) -> Statement:
    return Statement(f"INSERT INTO revision (id, counter) VALUES ({value}, 0)")


def test_reads_writes_and_a_constraints_refusal(database: Database) -> None:
    direct = database.direct
    assert direct.fetch(READ, {"id": 1}) == [(0,)]

    def two_rows(cursor: Cursor) -> int:
        cursor.execute(_insert(-1), {})
        cursor.execute(_insert(-2), {})
        return 2

    assert direct.write(two_rows) == 2
    assert direct.write(two_rows, conflict_table="revision") is None  # the primary key refuses: nothing written
    if database.is_sqlite:  # a transaction of several statements: None rolls it back (PostgreSQL's is one statement)
        assert direct.write(lambda cursor: cursor.execute(_insert(-3), {})) is None
    with database.transaction() as session:
        ids = sorted(session.execute(text("SELECT id FROM revision WHERE id < 0")).scalars())
    assert ids == [-2, -1]

    # The engine's own sessions still run transactions: the driver's autocommit never leaked into its pool.
    def insert_then_fail() -> None:
        with database.transaction(write=True) as session:
            session.execute(text("INSERT INTO revision (id, counter) VALUES (-9, 0)"))
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        insert_then_fail()
    assert direct.fetch(READ, {"id": -9}) == []


def test_every_driver_failure_is_one_domain_error(database: Database) -> None:
    missing = Statement("SELECT x FROM no_such_table")
    with pytest.raises(BackendUnavailable) as read:
        database.direct.fetch(missing)
    assert read.value.instance_code == "database_unavailable"
    assert "no_such_table" not in read.value.detail  # nothing of the statement in the client's answer

    def failing(cursor: Cursor) -> int:
        cursor.execute(missing, {})
        return 1

    with pytest.raises(BackendUnavailable) as write:
        database.direct.write(failing, "audit_unavailable")
    assert write.value.instance_code == "audit_unavailable"
    assert database.direct.fetch(READ, {"id": 1}) == [(0,)]  # the next statement gets a working connection


def _many_idle(database: Database, count: int) -> None:
    """``count`` connections in the stack at once (each taken while the others are held)."""
    held = [database.direct._connection() for _ in range(count)]
    for connection in held:
        connection.__enter__()
    for connection in reversed(held):
        connection.__exit__(None, None, None)
    assert len(database.direct._idle) == count


def test_after_a_restart_the_next_read_works_and_a_write_is_not_retried(postgres: Postgres) -> None:
    database_name = postgres.create_database()
    url = postgres.url_for(database_name, password=True).replace("postgresql://", "postgresql+psycopg://")
    database = Database.from_url(url)
    database.migrate()
    kill = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database_name}'"
    try:
        _many_idle(database, 4)  # every one of them dies with the restart
        postgres.admin_sql(kill)
        for _ in range(3):  # the first read finds a dead connection, drops them all and retries on a fresh one
            assert database.direct.fetch(READ, {"id": 1}) == [(0,)]
        _many_idle(database, 3)
        postgres.admin_sql(kill)
        with pytest.raises(BackendUnavailable) as write:
            database.direct.write(lambda cursor: cursor.execute(_insert(-1), {}) or 1)
        assert write.value.instance_code == "database_unavailable"
        assert database.direct._idle == []  # the dead ones went with it: the next write gets a live connection
        assert database.direct.write(lambda cursor: cursor.execute(_insert(-2), {}) or 1) == 1
        assert database.direct.fetch(READ, {"id": -1}) == []  # the failed write did not run (twice or once)
    finally:
        database.close()


def test_a_statement_that_times_out_is_not_run_again(postgres: Postgres) -> None:
    database_name = postgres.create_database()
    url = postgres.url_for(database_name, password=True).replace("postgresql://", "postgresql+psycopg://")
    database = Database.from_url(url, statement_timeout=0.5)
    database.migrate()
    runs = Statement("SELECT counter FROM revision WHERE id = 1 AND pg_sleep(2) IS NOT NULL")
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as slow:
            database.direct.fetch(runs)
        assert slow.value.instance_code == "database_unavailable"
        assert time.monotonic() - started < 1.4  # one timeout (0.5 s), not two
        assert database.direct.fetch(READ, {"id": 1}) == [(0,)]
    finally:
        database.close()


def test_a_conflict_elsewhere_than_the_named_table_is_a_failure(database: Database) -> None:
    direct = database.direct
    assert direct.write(lambda cursor: cursor.execute(_insert(-1), {}) or 1, conflict_table="revision") == 1
    assert direct.write(lambda cursor: cursor.execute(_insert(-1), {}) or 1, conflict_table="revision") is None
    with pytest.raises(BackendUnavailable) as other:
        direct.write(lambda cursor: cursor.execute(_insert(-1), {}) or 1, "audit_unavailable", "used_nonces")
    assert other.value.instance_code == "audit_unavailable"


def test_a_database_that_is_gone(tmp_path: Path) -> None:
    database = Database.from_url(f"sqlite:///{tmp_path / 'missing' / 'kb.db'}")  # its directory does not exist
    try:
        with pytest.raises(BackendUnavailable) as gone:
            database.direct.fetch(READ, {"id": 1})
        assert gone.value.instance_code == "database_unavailable"
    finally:
        database.close()
