"""The transfer's one write (AuditLog.append_transfer, on the DB-API driver): on SQLite and PostgreSQL alike the
chain hash is the one Python computes for any content (PostgreSQL computes it in the database), a nonce used
already (for one purpose or all) writes nothing, concurrent writes mixed with the SQLAlchemy path make one chain
that verifies, and a database that is gone is 503 ``audit_unavailable``; plus the canonical form split around
``seq`` that PostgreSQL's statement relies on."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from keybroker.attestation.nonce import NonceUse
from keybroker.audit.chain import canonical, canonical_around_seq, verify_chain
from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.clock import FixedClock
from keybroker.errors import BackendUnavailable
from keybroker.storage.db import Database

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


def _use(*purposes: str) -> NonceUse:
    return NonceUse(os.urandom(32).hex(), purposes, T0 + timedelta(minutes=5))


def _verify(log: AuditLog) -> int:
    seq, head = log.head()
    report = verify_chain(log.entries(limit=100_000), seq, head)
    assert report.ok, report
    return report.checked


def test_the_chain_hash_is_pythons_for_any_content(database: Database) -> None:
    clock = FixedClock(T0)
    log = AuditLog(database, clock)
    context = AuditContext(actor="tester", request_id="r-1", client="::1")
    for n, details in enumerate(AWKWARD):
        log.record(context, AuditEvent("python.path", "success", f"t{n}", details))  # the SQLAlchemy path
        event = AuditEvent("key.transfer", "allowed", None, details)
        assert log.append_transfer(context, event, _use("attest", "transfer")) == 2 * n + 2
        clock.advance(timedelta(microseconds=7))
    assert _verify(log) == 2 * len(AWKWARD)
    entries = log.entries()
    assert [e["details"] for e in entries[1::2]] == AWKWARD  # what was written reads back as it was
    assert entries[1]["at"] == "2026-12-03T12:00:00.000000Z"


def test_a_nonce_used_already_writes_nothing(database: Database) -> None:
    log = AuditLog(database, FixedClock(T0))
    event = AuditEvent("key.transfer", "allowed", "k")
    first = _use("attest", "transfer")
    assert log.append_transfer(AuditContext(), event, first) == 1
    assert log.append_transfer(AuditContext(), event, first) is None  # both purposes taken
    passport = NonceUse(first.digest, ("transfer",), first.expires_at)
    assert log.append_transfer(AuditContext(), event, passport) is None  # one of them taken
    attest_only = _use("attest")
    assert log.append_transfer(AuditContext(), event, attest_only) == 2
    both = NonceUse(attest_only.digest, ("attest", "transfer"), attest_only.expires_at)
    assert log.append_transfer(AuditContext(), event, both) is None  # "transfer" is free, "attest" is not
    assert log.append_transfer(AuditContext(), event, NonceUse(both.digest, ("transfer",), both.expires_at)) == 3
    assert log.head()[0] == 3
    assert _verify(log) == 3
    with database.transaction() as session:
        assert session.execute(text("SELECT count(*) FROM used_nonces")).scalar_one() == 4


def test_concurrent_writes_through_both_paths_make_one_chain(database: Database) -> None:
    log = AuditLog(database, FixedClock(T0))
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
                    assert log.append_transfer(AuditContext(actor=f"w{n}"), event, _use("transfer")) is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _verify(log) == 8 * 15


def test_a_write_that_fails_is_audit_unavailable_and_leaves_nothing(database: Database) -> None:
    log = AuditLog(database, FixedClock(T0))
    with database.transaction(write=True) as session:
        session.execute(text("ALTER TABLE audit_events RENAME TO audit_events_gone"))
    use = _use("attest", "transfer")
    with pytest.raises(BackendUnavailable) as refused:
        log.append_transfer(AuditContext(), AuditEvent("key.transfer", "allowed", "k"), use)
    assert refused.value.instance_code == "audit_unavailable"
    with database.transaction(write=True) as session:
        session.execute(text("ALTER TABLE audit_events_gone RENAME TO audit_events"))
        assert session.execute(text("SELECT count(*) FROM used_nonces")).scalar_one() == 0  # rolled back whole
    assert log.append_transfer(AuditContext(), AuditEvent("key.transfer", "allowed", "k"), use) == 1
    assert _verify(log) == 1
