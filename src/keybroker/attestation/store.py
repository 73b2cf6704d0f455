"""The collateral cache in the database, with an in-memory index in front of it.

Every version of an item is kept; a quote is verified with the newest version valid at its ``now`` (so a quote
from the past still verifies with the collateral of its time). Verification reads memory only: the index is
reloaded when this process imports collateral, and at most every ``reload_seconds`` to see other replicas'
imports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509
from sqlalchemy import select

from keybroker.attestation.collateral import CollateralItem, inner_object
from keybroker.clock import Clock
from keybroker.errors import Conflict
from keybroker.storage.db import Database
from keybroker.storage.tables import CollateralRow


def same_content(kind: str, a: bytes, b: bytes) -> bool:
    """Whether two versions of an item with the same date say the same thing (signatures may differ in bytes)."""
    if a == b:
        return True
    if kind in ("tcb", "qe"):
        member = "tcbInfo" if kind == "tcb" else "enclaveIdentity"
        return inner_object(a.decode(), member)[0] == inner_object(b.decode(), member)[0]
    first, second = x509.load_der_x509_crl(a), x509.load_der_x509_crl(b)
    return (
        first.issuer == second.issuer
        and first.next_update_utc == second.next_update_utc
        and sorted(r.serial_number for r in first) == sorted(r.serial_number for r in second)
    )


class CollateralLookup(Protocol):
    def select(self, key: str, now: datetime) -> CollateralItem | None:
        """The version of item ``key`` to verify with at ``now`` (see ``choose``); None if there is none."""
        ...


def choose(versions: list[CollateralItem] | None, now: datetime) -> CollateralItem | None:
    """The newest version valid at ``now``; else the newest issued before ``now`` (expired: verification will say
    so); else the oldest (not yet valid). ``versions`` are sorted by issue date."""
    if not versions:
        return None
    issued = [v for v in versions if v.issue_date <= now]
    valid = [v for v in issued if now < v.next_update]
    if valid:
        return valid[-1]
    return issued[-1] if issued else versions[0]


class MemoryCollateral:
    """Items held in memory: offline verification from bundle folders (no database, no server)."""

    def __init__(self, items: Iterable[CollateralItem]) -> None:
        self._index: dict[str, list[CollateralItem]] = {}
        for item in sorted(items, key=lambda i: (i.key, i.issue_date)):
            versions = self._index.setdefault(item.key, [])
            if not any(v.issue_date == item.issue_date for v in versions):
                versions.append(item)

    def select(self, key: str, now: datetime) -> CollateralItem | None:
        return choose(self._index.get(key), now)


@dataclass(frozen=True, slots=True)
class ItemStatus:
    key: str
    issue_date: datetime
    next_update: datetime
    source: str


class CollateralStore:
    def __init__(self, database: Database, clock: Clock, reload_seconds: float = 60.0) -> None:
        self._db = database
        self._clock = clock
        self._reload_seconds = reload_seconds
        self._lock = threading.Lock()
        self._index: dict[str, list[CollateralItem]] = {}
        self._loaded_at = -1e9
        self.generation = 0  # bumps on every reload; verifiers key their caches on it

    def put(self, items: Iterable[CollateralItem], source: str) -> int:
        """Store checked items; versions already present are left alone. Returns how many were new."""
        added = 0
        with self._db.transaction(write=True) as session:
            for item in items:
                existing = session.get(CollateralRow, (item.key, item.issue_date))
                if existing is not None and not same_content(item.kind, existing.body, item.body):
                    # Two different documents claiming the same date: refuse rather than let the first one win
                    # (a CRL revoking a platform must never be shadowed by an older copy).
                    raise Conflict(
                        f"{item.key} of {item.issue_date.isoformat()} is already cached with other content",
                        code="collateral_conflict",
                    )
                if existing is None:
                    session.add(
                        CollateralRow(
                            key=item.key,
                            issue_date=item.issue_date,
                            next_update=item.next_update,
                            body=item.body,
                            issuer_chain=item.issuer_chain,
                            source=source,
                            imported_at=self._clock.now(),
                        )
                    )
                    added += 1
        self.reload()
        return added

    def reload(self) -> None:
        with self._db.transaction() as session:
            rows = list(session.scalars(select(CollateralRow).order_by(CollateralRow.key, CollateralRow.issue_date)))
            index: dict[str, list[CollateralItem]] = {}
            for row in rows:
                index.setdefault(row.key, []).append(
                    CollateralItem(row.key, row.body, row.issuer_chain, row.issue_date, row.next_update)
                )
        with self._lock:
            self._index = index
            self._loaded_at = time.monotonic()
            self.generation += 1

    def _fresh_index(self) -> dict[str, list[CollateralItem]]:
        if time.monotonic() - self._loaded_at > self._reload_seconds:
            self.reload()
        return self._index

    def select(self, key: str, now: datetime) -> CollateralItem | None:
        return choose(self._fresh_index().get(key), now)

    def status(self) -> list[ItemStatus]:
        with self._db.transaction() as session:
            rows = session.scalars(select(CollateralRow).order_by(CollateralRow.key, CollateralRow.issue_date))
            return [ItemStatus(r.key, r.issue_date, r.next_update, r.source) for r in rows]

    def newest(self, key: str) -> CollateralItem | None:
        versions = self._fresh_index().get(key)
        return versions[-1] if versions else None

    def item_keys(self) -> list[str]:
        return sorted(self._fresh_index())
