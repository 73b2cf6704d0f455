"""No server may run with the old KEK while ``keybroker kek rotate`` moves records away from it: it would go on
wrapping new keys (and their data keys) with the old KEK, behind the rotation's back. Three locks on that door:

* before anything changes (``Guard.refuse_running``): on SQLite no other process has the database open (asked
  before this process opens it: ``open_deployment(exclusive=True)``); on PostgreSQL no replica has sent a heartbeat
  in the last 30 s, by the DATABASE's clock (``now()``), not this host's, which may be another than the replicas'.
* after every batch and before the rotation finishes (``Guard.check``): on SQLite still no other process has the
  database open (this process first closes its own connections, which would hide nobody but whose locks a check
  from this process would drop: ``storage.copy.sqlite_in_use``); on PostgreSQL no heartbeat has appeared or changed
  since the first look, whatever clock the replica stamps it with, and none is younger than 30 s. A server found
  stops the rotation (``Conflict`` ``replicas_running``): what has moved stays moved, every record wholly under one
  KEK, and the same command run again once that server is stopped finishes the work.
* a server refuses to start while the newest rotation entry is an unfinished start (``kek_records.check_keks``),
  and a replica announces itself (its heartbeat, ``Services.join``) before it checks that: either the rotation
  sees the replica, or the replica sees the rotation.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from keybroker.clock import SystemClock
from keybroker.errors import Conflict
from keybroker.storage.cluster import HEARTBEAT, Replica, Replicas
from keybroker.storage.copy import sqlite_in_use
from keybroker.storage.db import Database

STOPPED_AFTER = 3 * HEARTBEAT  # a replica silent this long counts as stopped (as in ``keybroker cluster status``)


class Guard:
    """The checks of one rotation run (module docstring); ``sqlite``: the database file, None on PostgreSQL."""

    def __init__(self, database: Database, sqlite: Path | None) -> None:
        self._db = database
        self._sqlite = sqlite
        self._seen: dict[str, datetime] = {}

    def refuse_running(self) -> None:
        """``Conflict`` (``replicas_running``) while a replica has sent a heartbeat in the last 30 s; remembers the
        heartbeats for ``check``. (SQLite: asked by ``open_deployment``.)"""
        if self._sqlite is not None:
            return
        now, replicas = self._now(), self._replicas()
        alive = [r for r in replicas if now - r.heartbeat_at <= STOPPED_AFTER]
        if alive:
            raise Conflict(
                f"replicas are running (last heartbeat: {_ages(alive, now)}): stop every replica of the deployment "
                f"first (a replica counts as stopped {int(STOPPED_AFTER.total_seconds())} s after its last heartbeat, "
                "by the database's clock); nothing was changed",
                code="replicas_running",
            )
        self._seen = {r.id: r.heartbeat_at for r in replicas}

    def check(self, then: str) -> None:
        """``Conflict`` (``replicas_running``) if a server appeared since ``refuse_running``; ``then`` says what
        that leaves (``nothing was changed``, or how to finish)."""
        if self._sqlite is not None:
            self._db.engine.dispose()  # (reconnected at the next statement)
            if sqlite_in_use(self._sqlite):
                raise Conflict(
                    f"another process opened {self._sqlite} while the rotation ran (a keybroker serve started "
                    f"meanwhile?): it would wrap new keys with the old KEK. Stop it; {then}",
                    code="replicas_running",
                )
            return
        now = self._now()
        appeared = [
            r
            for r in self._replicas()
            if self._seen.get(r.id) != r.heartbeat_at or now - r.heartbeat_at <= STOPPED_AFTER
        ]
        if appeared:
            seen = ", ".join(f"{r.id} ({r.address})" for r in appeared)
            raise Conflict(
                f"a replica sent a heartbeat while the rotation ran: {seen}; it would wrap new keys with the old KEK. "
                f"Stop it; {then}",
                code="replicas_running",
            )

    def _replicas(self) -> list[Replica]:
        return Replicas(self._db, SystemClock()).all()  # (the clock is for writing heartbeats: none is written here)

    def _now(self) -> datetime:
        value = self._db.query(text("SELECT now()"))[0][0]
        if not isinstance(value, datetime):  # pragma: no cover - PostgreSQL's now() is a timestamptz
            raise TypeError("now() is not a timestamp")
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _ages(replicas: list[Replica], now: datetime) -> str:
    def age(r: Replica) -> int:
        return max(0, int((now - r.heartbeat_at) / timedelta(seconds=1)))

    return ", ".join(f"{r.id} ({r.address}, {age(r)} s ago)" for r in replicas)
