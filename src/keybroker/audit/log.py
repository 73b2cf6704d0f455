"""Appending to and reading the audit chain.

``append`` runs inside the caller's transaction, so an action and its audit entry commit or fail together. It
first increments the head row, which takes the database's write lock before anything is read: concurrent appends
(threads, processes, replicas) are serialised by the database, never interleaved.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from keybroker.audit.chain import entry_hash
from keybroker.clock import Clock
from keybroker.errors import BackendUnavailable
from keybroker.storage.db import Database
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


def format_time(at: datetime) -> str:
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


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
        with self._lock:
            session.execute(update(AuditHeadRow).where(AuditHeadRow.id == 1).values(seq=AuditHeadRow.seq + 1))
            head = session.execute(select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.id == 1)).one()
            seq, prev_hash = int(head.seq), str(head.hash)
            now = self._clock.now()
            entry: dict[str, Any] = {
                "seq": seq,
                "at": format_time(now),
                "action": event.action,
                "outcome": event.outcome,
                "actor": context.actor,
                "target": event.target,
                "request_id": context.request_id,
                "client": context.client,
                "details": dict(event.details),
            }
            digest = entry_hash(prev_hash, entry)
            session.add(
                AuditEventRow(
                    seq=seq,
                    at=now,
                    action=event.action,
                    outcome=event.outcome,
                    actor=context.actor,
                    target=event.target,
                    request_id=context.request_id,
                    client=context.client,
                    details=dict(event.details),
                    prev_hash=prev_hash,
                    hash=digest,
                )
            )
            session.execute(update(AuditHeadRow).where(AuditHeadRow.id == 1).values(hash=digest))
            session.flush()
            return seq

    def record(self, context: AuditContext, event: AuditEvent) -> int:
        """Append in a transaction of its own (refusals, which change nothing else)."""
        with self._db.transaction() as session:
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
