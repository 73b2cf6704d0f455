"""What replicas share beyond the data (storage.cluster), on SQLite and on a real PostgreSQL: job leases (one
holder at a time, renewal, takeover after expiry, concurrent acquisition), heartbeats; and the schema guards (a
schema newer than the code is refused untouched; /readyz answers 503 when the shared schema moved away)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from keybroker.api.routes.ops import _readiness
from keybroker.clock import FixedClock
from keybroker.errors import ConfigurationError
from keybroker.services import Services
from keybroker.storage.cluster import HEARTBEAT, Leases, Replicas
from keybroker.storage.db import Database, schema_head

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=60)


def test_one_holder_at_a_time_renewal_and_takeover_after_expiry(database: Database) -> None:
    clock = FixedClock(T0)
    a, b = Leases(database, clock, "host-a/1"), Leases(database, clock, "host-b/1")
    assert a.acquire("reconcile", TTL)
    assert not b.acquire("reconcile", TTL)
    assert a.holder_of("reconcile") == "host-a/1"
    clock.advance(timedelta(seconds=50))
    assert a.acquire("reconcile", TTL)  # renewed: now valid until T0 + 110 s
    clock.advance(timedelta(seconds=50))
    assert not b.acquire("reconcile", TTL)
    clock.advance(timedelta(seconds=11))  # a died and stopped renewing: b takes over
    assert a.holder_of("reconcile") is None
    assert b.acquire("reconcile", TTL)
    assert not a.acquire("reconcile", TTL)
    assert b.holder_of("reconcile") == "host-b/1"
    a.release("reconcile")  # not a's to release
    assert b.holder_of("reconcile") == "host-b/1"
    b.release("reconcile")
    assert a.acquire("reconcile", TTL)
    assert b.acquire("nonce-purge", TTL)  # leases are independent of each other


def test_concurrent_acquisition_has_exactly_one_winner(database: Database) -> None:
    clock = FixedClock(T0)
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def contend(n: int) -> None:
        leases = Leases(database, clock, f"host-{n}/1")
        barrier.wait()
        results.append(leases.acquire("collateral-refresh", TTL))

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


def test_heartbeats_list_the_replicas_and_tell_the_silent_ones(database: Database) -> None:
    clock = FixedClock(T0)
    replicas = Replicas(database, clock)
    replicas.heartbeat("host-a:1", "https://a:9443", "1.0", "0008")
    replicas.heartbeat("host-b:1", "https://b:9443", "1.0", "0008")
    clock.advance(HEARTBEAT)
    replicas.heartbeat("host-a:1", "https://a:9443", "1.0", "0008")
    listed = {r.id: r for r in replicas.all()}
    assert set(listed) == {"host-a:1", "host-b:1"}
    assert listed["host-a:1"].started_at == T0
    assert listed["host-a:1"].heartbeat_at == T0 + HEARTBEAT
    clock.advance(3 * HEARTBEAT)
    alive = {r.id: r.as_dict(clock.now())["alive"] for r in replicas.all()}
    assert alive == {"host-a:1": True, "host-b:1": False}
    replicas.heartbeat("host-a:1", "https://a:9443", "1.1", "0009")  # restarted with another version
    upgraded = next(r for r in replicas.all() if r.id == "host-a:1")
    assert (upgraded.version, upgraded.schema_revision, upgraded.started_at) == ("1.1", "0009", clock.now())
    assert replicas.forget_silent(timedelta(seconds=35)) == 1
    assert [r.id for r in replicas.all()] == ["host-a:1"]


def test_a_schema_newer_than_the_code_is_refused_and_left_alone(database: Database) -> None:
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    with pytest.raises(ConfigurationError, match="schema is revision ffffffffffff, newer than this keybroker knows"):
        database.migrate()
    assert database.schema_revision() == "ffffffffffff"


def test_readiness_reports_a_schema_that_moved_away_from_the_code(services: Services) -> None:
    assert _readiness(services) == (
        200,
        {"status": "ready", "checks": {"database": "ok", "schema": "ok", "backend:embedded": "ok"}},
    )
    with services.database.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    status, body = _readiness(services)
    assert status == 503
    assert body["checks"] == {"database": "ok", "schema": "schema_mismatch", "backend:embedded": "ok"}
    with services.database.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :head"), {"head": schema_head()})
    assert _readiness(services)[0] == 200
