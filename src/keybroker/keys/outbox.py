"""The outbox of key material (``pending_material``): how keys, which span two systems with no transaction across
them (keybroker's database holds the record, a backend the material), converge whatever fails and in which order.

* create: an outbox row for the key id is committed first (it also reserves the id), then the material is written
  to the backend, then the record is written *and* the outbox row removed in one transaction. If the backend
  write or the record fails, the material is purged again; if that purge cannot reach the backend, the outbox row
  stays and ``reconcile`` purges it later. So there is never a record without material, and material without a
  record only until the backend is reachable again.
* delete: the record is removed and an outbox row written in one transaction, then the material is deleted and
  the outbox row removed. An unreachable backend leaves the row for ``reconcile``.

Rows are claimed by whoever works on them (a conditional update that doubles as a fencing token), so that the
reconciler of any process or replica and a create still in flight never undo each other's work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from keybroker.backends.base import KeyStore
from keybroker.clock import Clock
from keybroker.errors import BackendUnavailable, Conflict
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import KeyRecord
from keybroker.storage.db import Database
from keybroker.storage.tables import KeyRow, PendingMaterialRow

log = structlog.get_logger("keybroker.keys")

# A reconciler holding a row this long is presumed dead and its row may be taken over. Far longer than any backend
# call may take (timeouts of seconds), so that a slow reconciler is never mistaken for a dead one.
CLAIM_EXPIRES = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    finished: int = 0
    waiting: int = 0  # backend still unreachable (or not configured): retried on the next run


class Outbox:
    """The ``pending_material`` rows of a database. Thread-safe (every method is one or two transactions)."""

    def __init__(self, database: Database, clock: Clock) -> None:
        self._db = database
        self._clock = clock

    def reserve(self, key_id: KeyId, backend: str) -> None:
        """Commit the outbox row that reserves ``key_id`` before anything is written to a backend."""
        try:
            with self._db.transaction(write=True) as session:
                session.add(
                    PendingMaterialRow(key_id=key_id, backend=backend, operation="create", created_at=self._clock.now())
                )
                session.flush()  # the row first: a concurrent create of the same id now waits or fails here
                if session.get(KeyRow, key_id) is not None:
                    raise IntegrityError("key exists", None, Exception("key exists"))
        except IntegrityError:
            with self._db.transaction() as session:
                pending = session.get(PendingMaterialRow, key_id)
                deleting = pending is not None and pending.operation in {"delete", "purge"}
            if deleting:
                raise Conflict(
                    f"material of an earlier key {key_id} is still being removed from its backend; "
                    "retry once that is done (keybroker backends reconcile)",
                    code="key_delete_pending",
                ) from None
            raise Conflict(f"a key with id {key_id} already exists", code="key_exists") from None

    def release_own(self, key_id: KeyId, operation: str) -> None:
        """Remove this caller's outbox row once its backend work is done, unless a reconciler has claimed it (it
        then holds the key id until its own work is done; freeing the id under it could let a new key with the
        same id be created and then purged by that reconciler)."""
        with self._db.transaction(write=True) as session:
            session.execute(
                delete(PendingMaterialRow).where(
                    PendingMaterialRow.key_id == key_id,
                    PendingMaterialRow.operation == operation,
                    PendingMaterialRow.claimed_at.is_(None),
                )
            )

    def abandon(self, store: KeyStore, key_id: KeyId) -> None:
        """Undo a put whose record will not be written; leaves the outbox row if the backend is unreachable."""
        try:
            store.purge(key_id)
        except BackendUnavailable:
            return  # reconcile() finishes it once the backend is back
        except Exception:  # the original error is the one to report; the row stays for reconcile
            return
        self.release_own(key_id, "create")

    def add_pending_delete(self, session: Session, record: KeyRecord) -> None:
        session.execute(delete(PendingMaterialRow).where(PendingMaterialRow.key_id == record.id))
        session.add(
            PendingMaterialRow(
                key_id=record.id,
                backend=record.backend,
                backend_ref=record.backend_ref,
                operation="delete",
                created_at=self._clock.now(),
            )
        )

    def pending(self) -> Sequence[PendingMaterialRow]:
        """The outbox (for ``keybroker backends status`` and tests)."""
        with self._db.transaction() as session:
            rows = list(session.scalars(select(PendingMaterialRow).order_by(PendingMaterialRow.created_at)))
            session.expunge_all()
            return rows

    def reconcile(self, stores: Mapping[str, KeyStore], older_than: timedelta) -> ReconcileResult:
        """Finish outbox rows older than ``older_than`` (younger ones may belong to a create still in flight):
        purge the material of creates that never got their record, delete the material of deleted keys."""
        cutoff = self._clock.now() - older_than
        finished = waiting = 0
        for row in self.pending():
            if row.created_at > cutoff:
                continue
            store = stores.get(row.backend)
            if store is None:
                waiting += 1  # the backend is not configured (any more): keep the row for when it is
                continue
            claim = self.claim(row)
            if claim is None:
                continue  # another reconciler, or the create itself, got there first
            try:
                if row.operation == "delete" and row.backend_ref is not None:
                    store.delete(BackendRef(row.backend_ref))
                store.purge(KeyId(row.key_id))
            except Exception as exc:  # unreachable, or refusing: the row waits for the next round either way
                log.warning("reconcile_deferred", key_id=row.key_id, backend=row.backend, error_type=type(exc).__name__)
                self.unclaim(row, claim)
                waiting += 1
                continue
            self.finish(row, claim)  # only now is the key id free again
            finished += 1
        return ReconcileResult(finished, waiting)

    def claim(self, row: PendingMaterialRow) -> datetime | None:
        """Mark the outbox row as being worked on (a conditional update) and return the claim, or None if someone
        else holds it. The key id stays reserved until the work is done. A create's row becomes a ``purge`` row for
        good: the create, if it is still in flight, then finds no row of its own and gives up instead of writing a
        record whose material is being (or was partly) purged. A claim older than ``CLAIM_EXPIRES`` (a reconciler
        that died) may be taken over; every later write of a claim is conditional on it (a fencing token)."""
        now = self._clock.now()
        operation = "purge" if row.operation in {"create", "purge"} else row.operation
        with self._db.transaction(write=True) as session:
            taken = session.execute(
                update(PendingMaterialRow)
                .where(
                    PendingMaterialRow.key_id == row.key_id,
                    PendingMaterialRow.created_at == row.created_at,
                    PendingMaterialRow.claimed_at.is_(None) | (PendingMaterialRow.claimed_at < now - CLAIM_EXPIRES),
                )
                .values(claimed_at=now, operation=operation)
            )
            return now if getattr(taken, "rowcount", 0) == 1 else None

    def finish(self, row: PendingMaterialRow, claim: datetime) -> None:
        with self._db.transaction(write=True) as session:
            session.execute(
                delete(PendingMaterialRow).where(
                    PendingMaterialRow.key_id == row.key_id, PendingMaterialRow.claimed_at == claim
                )
            )

    def unclaim(self, row: PendingMaterialRow, claim: datetime) -> None:
        """Give the row back for a later round (the backend was unreachable); a create stays a ``purge``."""
        with self._db.transaction(write=True) as session:
            session.execute(
                update(PendingMaterialRow)
                .where(PendingMaterialRow.key_id == row.key_id, PendingMaterialRow.claimed_at == claim)
                .values(claimed_at=None)
            )
