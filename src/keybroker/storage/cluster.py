"""What the replicas of a deployment share beyond its data: leases for the jobs that must run once at a time across
the cluster, and the replicas' heartbeats.

* ``Leases``: a job (the outbox reconciler, the collateral refresh, the nonce purge) runs where its lease is held.
  A lease is a row (name, holder, expiry); ``acquire`` takes it when it is free or expired and renews it for its
  holder. A holder that dies stops renewing, and its lease is taken over once it expires: nothing waits longer than
  one lease for a dead replica. On SQLite the same rows order the processes of one host.
* ``Replicas``: every serving process writes its replica's row (id, address, version, schema revision) every
  ``HEARTBEAT`` and at start; ``keybroker cluster status`` lists them with their last heartbeat.

Thread-safe (each call is one transaction).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from keybroker.clock import Clock
from keybroker.storage.db import Database
from keybroker.storage.tables import LeaseRow, ReplicaRow

HEARTBEAT = timedelta(seconds=10)


class Leases:
    def __init__(self, database: Database, clock: Clock, holder: str) -> None:
        self._db = database
        self._clock = clock
        self.holder = holder

    def acquire(self, name: str, ttl: timedelta) -> bool:
        """Take or renew the lease ``name`` for ``ttl``; False if another holder's lease has not expired."""
        now = self._clock.now()
        try:
            with self._db.transaction(write=True) as session:
                row = session.get(LeaseRow, name, with_for_update=True)
                if row is None:
                    session.add(LeaseRow(name=name, holder=self.holder, expires_at=now + ttl))
                    return True
                if row.holder != self.holder and row.expires_at > now:
                    return False
                row.holder, row.expires_at = self.holder, now + ttl
                return True
        except IntegrityError:  # another holder inserted it at the same moment
            return False

    def release(self, name: str) -> None:
        with self._db.transaction(write=True) as session:
            session.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == self.holder))

    def holder_of(self, name: str) -> str | None:
        with self._db.transaction() as session:
            row = session.get(LeaseRow, name)
            return row.holder if row is not None and row.expires_at > self._clock.now() else None


@dataclass(frozen=True, slots=True)
class Replica:
    id: str
    address: str
    version: str
    schema_revision: str
    started_at: datetime
    heartbeat_at: datetime

    def as_dict(self, now: datetime) -> dict[str, object]:
        return {
            "id": self.id,
            "address": self.address,
            "version": self.version,
            "schema_revision": self.schema_revision,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at,
            "alive": now - self.heartbeat_at <= 3 * HEARTBEAT,
        }


class Replicas:
    def __init__(self, database: Database, clock: Clock) -> None:
        self._db = database
        self._clock = clock

    def heartbeat(self, replica_id: str, address: str, version: str, schema_revision: str) -> None:
        now = self._clock.now()
        try:
            with self._db.transaction(write=True) as session:
                row = session.get(ReplicaRow, replica_id, with_for_update=True)
                if row is None:
                    session.add(
                        ReplicaRow(
                            id=replica_id,
                            address=address,
                            version=version,
                            schema_revision=schema_revision,
                            started_at=now,
                            heartbeat_at=now,
                        )
                    )
                    return
                if row.version != version or row.address != address:
                    row.started_at = now  # restarted with another version or address
                row.address, row.version, row.schema_revision, row.heartbeat_at = (
                    address,
                    version,
                    schema_revision,
                    now,
                )
        except IntegrityError:  # a sibling process of the replica wrote the first row at the same moment
            pass

    def all(self) -> list[Replica]:
        with self._db.transaction() as session:
            rows = session.scalars(select(ReplicaRow).order_by(ReplicaRow.id))
            return [Replica(r.id, r.address, r.version, r.schema_revision, r.started_at, r.heartbeat_at) for r in rows]

    def forget_silent(self, older_than: timedelta) -> int:
        """Remove replicas silent for longer than ``older_than`` (a host that was decommissioned)."""
        cutoff = self._clock.now() - older_than
        with self._db.transaction(write=True) as session:
            result = session.execute(delete(ReplicaRow).where(ReplicaRow.heartbeat_at < cutoff))
            return int(getattr(result, "rowcount", 0) or 0)
