"""PostgreSQL's one-statement append (AuditLog.append_guarded): the database computes the same chain hash as Python
for any content, a guard that comes short writes no entry, concurrent appends (mixed with the Python path) make
one chain that verifies; and the canonical form split around ``seq`` that it relies on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from keybroker.audit.chain import canonical, canonical_around_seq, verify_chain
from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.clock import FixedClock
from keybroker.storage.db import Database
from keybroker.storage.guard import Guard
from tests.peers.postgres import Postgres

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
AWKWARD = [
    {},
    {"seq": 5, "target": "x", "zeta": [1, 2.5, None, True]},  # a "seq" of its own inside details
    {"reasons": [{"code": "c", "detail": 'ünïcödé ✓ \u2028 "quoted" \\ back\nslash\t\x00nul'}]},
    {"nested": {"b": {"d": 1, "c": 2}, "a": []}, "emoji": "🔑", "big": 2**60, "neg": -1.5e-10},
]


@pytest.mark.parametrize("details", AWKWARD)
@pytest.mark.parametrize("seq", [0, 1, 9, 10, 123456789012])
def test_the_canonical_form_splits_around_seq(details: dict[str, object], seq: int) -> None:
    entry = {"at": "2026-12-03T12:00:00.000000Z", "action": "a", "outcome": "success", "actor": None,
             "target": "t", "request_id": None, "client": "127.0.0.1", "details": details}  # fmt: skip
    before, after = canonical_around_seq(entry)
    assert f"{before}{seq}{after}".encode() == canonical({**entry, "seq": seq})


@pytest.fixture
def postgres_db(postgres: Postgres) -> Iterator[Database]:
    url = postgres.url_for(postgres.create_database(), password=True).replace("postgresql://", "postgresql+psycopg://")
    database = Database.from_url(url)
    database.migrate()
    yield database
    database.close()


def _verify(log: AuditLog) -> int:
    seq, head = log.head()
    report = verify_chain(log.entries(limit=100_000), seq, head)
    assert report.ok, report
    return report.checked


def test_the_database_hashes_exactly_as_python_for_any_content(postgres_db: Database) -> None:
    clock = FixedClock(T0)
    log = AuditLog(postgres_db, clock)
    context = AuditContext(actor="tester", request_id="r-1", client="::1")
    for n, details in enumerate(AWKWARD):
        log.record(context, AuditEvent("python.path", "success", f"t{n}", details))  # the Python-hashed path
        guard = Guard("INSERT INTO revision (id, counter) VALUES (-1 - :g_n, 0) RETURNING 1", 1, {"g_n": n})
        assert log.append_guarded(context, AuditEvent("guarded.path", "denied", None, details), guard) == 2 * n + 2
        clock.advance(timedelta(microseconds=7))
    assert _verify(log) == 2 * len(AWKWARD)


def test_a_guard_that_comes_short_writes_no_entry(postgres_db: Database) -> None:
    log = AuditLog(postgres_db, FixedClock(T0))
    first = Guard("INSERT INTO revision (id, counter) VALUES (-5, 0) ON CONFLICT DO NOTHING RETURNING 1", 1)
    assert log.append_guarded(AuditContext(), AuditEvent("a", "success"), first) == 1
    assert log.append_guarded(AuditContext(), AuditEvent("a", "success"), first) is None  # the row is there now
    two = Guard("INSERT INTO revision (id, counter) VALUES (-5, 0), (-6, 0) ON CONFLICT DO NOTHING RETURNING 1", 2)
    assert log.append_guarded(AuditContext(), AuditEvent("a", "success"), two) is None  # one of two: short
    assert log.head()[0] == 1
    assert _verify(log) == 1


def test_concurrent_appends_through_both_paths_make_one_chain(postgres_db: Database) -> None:
    log = AuditLog(postgres_db, FixedClock(T0))
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        barrier.wait()
        try:
            for i in range(15):
                event = AuditEvent("concurrent", "success", f"{n}-{i}", {"n": n, "i": i})
                if (n + i) % 2:
                    log.record(AuditContext(actor=f"w{n}"), event)
                else:
                    guard = Guard(
                        "INSERT INTO revision (id, counter) VALUES (-1000 - :g_id, 0) RETURNING 1",
                        1,
                        {"g_id": n * 100 + i},
                    )
                    assert log.append_guarded(AuditContext(actor=f"w{n}"), event, guard) is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _verify(log) == 8 * 15


def test_write_one_is_for_postgresql_only(tmp_path: Path) -> None:
    database = Database.from_url(f"sqlite:///{tmp_path / 'kb.db'}")
    with pytest.raises(AssertionError, match="write_one is for PostgreSQL"):
        database.write_one(text("SELECT 1"))
    database.close()
