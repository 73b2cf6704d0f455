"""Appending to and reading the audit chain.

``append`` runs inside the caller's transaction, so an action and its audit entry commit or fail together. It
first increments the head row, which takes the database's write lock before anything is read: concurrent appends
(threads, processes, replicas) are serialised by the database, never interleaved.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, bindparam, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from keybroker.attestation.nonce import NonceUse
from keybroker.audit.chain import canonical, canonical_around_seq, entry_hash
from keybroker.clock import Clock
from keybroker.errors import BackendUnavailable
from keybroker.storage.db import Database, UTCDateTime
from keybroker.storage.direct import Cursor, Statement
from keybroker.storage.tables import AuditEventRow, AuditHeadRow


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Who asked, from where: taken from the request at the API edge."""

    actor: str | None = None
    request_id: str | None = None
    client: str | None = None


SYSTEM = AuditContext(actor="system")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """``details`` must never hold key material, token secrets or nonce values."""

    action: str
    outcome: str  # "success" | "denied" | "failure"
    target: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


# The statements of an append, each written once: as SQLAlchemy text (inside a caller's session) and as a driver
# Statement (the transfer's write, storage.direct). Built once: compiling per call cost more than the writes.
_BUMP_HEAD_SQL = "UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash"
_INSERT_EVENT_SQL = (
    "INSERT INTO audit_events (seq, at, action, outcome, actor, target, request_id, client, details, prev_hash, hash)"
    " VALUES (:seq, :at, :action, :outcome, :actor, :target, :request_id, :client, :details, :prev_hash, :hash)"
)
_SET_HEAD_HASH_SQL = "UPDATE audit_head SET hash = :hash, prev_hash = :prev_hash WHERE id = 1"
_BUMP_HEAD = text(_BUMP_HEAD_SQL)
_INSERT_EVENT = text(_INSERT_EVENT_SQL).bindparams(
    bindparam("at", type_=UTCDateTime()), bindparam("details", type_=JSON())
)
_SET_HEAD_HASH = text(_SET_HEAD_HASH_SQL)
# PostgreSQL, one statement: the guard's rows, then (only if it produced them all) the head moved on with the hash
# computed by the database from the entry's canonical form around its new seq (audit.chain), then the entry.
_GUARDED = """WITH guard AS ({guard}),
head AS (
  UPDATE audit_head SET seq = seq + 1, prev_hash = hash,
    hash = encode(sha256(convert_to(hash || chr(10) || :before || (seq + 1)::text || :after, 'UTF8')), 'hex')
  WHERE id = 1 AND (SELECT count(*) FROM guard) = :expected
  RETURNING seq, prev_hash, hash)
INSERT INTO audit_events (seq, at, action, outcome, actor, target, request_id, client, details, prev_hash, hash)
SELECT seq, :at, :action, :outcome, :actor, :target, :request_id, :client, :details, prev_hash, hash FROM head
RETURNING seq, hash"""


# The transfer's write on the driver itself (storage.direct): the nonce's use and the entry, one transaction.
def _nonce_rows(purposes: int) -> str:
    values = ", ".join(f"(:digest, :purpose_{i}, :expires)" for i in range(purposes))
    return f"INSERT INTO used_nonces (digest, purpose, expires_at) VALUES {values}"  # noqa: S608 - only bind names are formatted in


_USE_NONCE = {n: Statement(_nonce_rows(n)) for n in (1, 2)}
_DIRECT_BUMP_HEAD = Statement(_BUMP_HEAD_SQL)
_DIRECT_INSERT_EVENT = Statement(_INSERT_EVENT_SQL)
_DIRECT_SET_HEAD_HASH = Statement(_SET_HEAD_HASH_SQL)
# PostgreSQL: the parameters in the SELECT list are typed for the server (psycopg sends strings untyped).
_DIRECT_GUARDED = {
    n: Statement(
        _GUARDED.format(guard=_nonce_rows(n) + " RETURNING 1")
        .replace(":details", "CAST(:details AS json)")
        .replace(":before", "CAST(:before AS text)")
        .replace(":after", "CAST(:after AS text)")
        .replace(":expected", "CAST(:expected AS bigint)")
    )
    for n in (1, 2)
}


def _sqlite_time(at: datetime) -> str:
    """As SQLAlchemy's SQLite ``DateTime`` stores it (UTC, no zone): what ``UTCDateTime`` reads back."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def format_time(at: datetime) -> str:
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _content(context: AuditContext, event: AuditEvent, at: datetime) -> dict[str, Any]:
    """An entry's content but its seq (which the database assigns): what the chain hash covers."""
    return {
        "at": format_time(at),
        "action": event.action,
        "outcome": event.outcome,
        "actor": context.actor,
        "target": event.target,
        "request_id": context.request_id,
        "client": context.client,
        "details": dict(event.details),
    }


def entry_dict(row: AuditEventRow) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "at": format_time(row.at),
        "action": row.action,
        "outcome": row.outcome,
        "actor": row.actor,
        "target": row.target,
        "request_id": row.request_id,
        "client": row.client,
        "details": row.details,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


class AuditLog:
    def __init__(self, database: Database, clock: Clock) -> None:
        self._db = database
        self._clock = clock
        self._lock = threading.Lock()  # spares SQLite's busy-wait between this process's own threads

    def append(self, session: Session, context: AuditContext, event: AuditEvent) -> int:
        """Append ``event`` in ``session``'s transaction. Raises ``BackendUnavailable`` (``audit_unavailable``)
        if the entry cannot be written; the caller's transaction then rolls back with it."""
        try:
            return self._append(session, context, event)
        except SQLAlchemyError as exc:
            raise BackendUnavailable("the audit log cannot be written", code="audit_unavailable") from exc

    def _append(self, session: Session, context: AuditContext, event: AuditEvent) -> int:
        # Core statements, not ORM objects: this runs on every change and (later) every key transfer.
        # The first statement writes, so the database's write lock is held before the head is read.
        with self._lock:
            head = session.execute(_BUMP_HEAD).one()
            seq, prev_hash = int(head.seq), str(head.hash)
            now = self._clock.now()
            entry = {**_content(context, event, now), "seq": seq}
            digest = entry_hash(prev_hash, entry)
            session.execute(_INSERT_EVENT, {**entry, "at": now, "prev_hash": prev_hash, "hash": digest})
            session.execute(_SET_HEAD_HASH, {"hash": digest, "prev_hash": prev_hash})
            return seq

    def append_transfer(self, context: AuditContext, event: AuditEvent, use: NonceUse) -> int | None:
        """The nonce's ``use`` and ``event`` as one transaction on the driver (the transfer's one write): the
        entry's seq, or None when the nonce was used already (nothing written). Raises ``BackendUnavailable``
        (``audit_unavailable``) if it cannot be written: the transfer then releases nothing."""
        now = self._clock.now()
        entry = _content(context, event, now)
        nonce: dict[str, Any] = {f"purpose_{i}": purpose for i, purpose in enumerate(use.purposes)}
        nonce["digest"] = use.digest
        details = json.dumps(entry["details"])
        if not self._db.is_sqlite:
            before, after = canonical_around_seq(entry)
            if canonical({**entry, "seq": 0}) != f"{before}0{after}".encode():  # never seen; fail closed if it is
                raise BackendUnavailable("the audit entry cannot be encoded", code="audit_unavailable")
            params = {**entry, **nonce, "at": now, "expires": use.expires_at, "details": details}
            params.update(before=before, after=after, expected=len(use.purposes))

            def guarded(cursor: Cursor) -> int | None:
                cursor.execute(_DIRECT_GUARDED[len(use.purposes)], params)
                rows = cursor.rows()
                return int(rows[0][0]) if rows else None

            return self._db.direct.write(guarded, "audit_unavailable", conflict_table="used_nonces")
        nonce["expires"] = _sqlite_time(use.expires_at)

        def write(cursor: Cursor) -> int | None:
            cursor.execute(_USE_NONCE[len(use.purposes)], nonce)  # a use already there: the primary key refuses
            cursor.execute(_DIRECT_BUMP_HEAD, {})
            seq, prev_hash = cursor.rows()[0]
            at = self._clock.now()
            content = {**entry, "seq": int(seq), "at": format_time(at)}  # the time read under the writer lock
            digest = entry_hash(str(prev_hash), content)
            row = {**content, "at": _sqlite_time(at), "details": details}
            cursor.execute(_DIRECT_INSERT_EVENT, {**row, "prev_hash": prev_hash, "hash": digest})
            cursor.execute(_DIRECT_SET_HEAD_HASH, {"hash": digest, "prev_hash": prev_hash})
            return int(seq)

        # Under the writer lock, as transaction(write=True); the time is read there too, so that entries' times grow
        # with their seq.
        return self._db.direct.write(write, "audit_unavailable", conflict_table="used_nonces")

    def record(self, context: AuditContext, event: AuditEvent) -> int:
        """Append in a transaction of its own (refusals, which change nothing else)."""
        with self._db.transaction(write=True) as session:
            return self.append(session, context, event)

    def head(self) -> tuple[int, str]:
        with self._db.transaction() as session:
            row = session.execute(select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.id == 1)).one()
            return int(row.seq), str(row.hash)

    def entries(
        self,
        after_seq: int = 0,
        limit: int = 1000,
        since: datetime | None = None,
        target: str | None = None,
    ) -> list[dict[str, Any]]:
        query = select(AuditEventRow).where(AuditEventRow.seq > after_seq)
        if since is not None:
            query = query.where(AuditEventRow.at >= since)
        if target is not None:
            query = query.where(AuditEventRow.target == target)
        query = query.order_by(AuditEventRow.seq).limit(limit)
        with self._db.transaction() as session:
            return [entry_dict(row) for row in session.scalars(query)]
