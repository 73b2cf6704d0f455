"""The key/policy revision counter (see migration 0004): caches of keys and policies are valid while it stands."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.orm import Session

from keybroker.storage.direct import Statement

if TYPE_CHECKING:
    from keybroker.storage.db import Database

_BUMP = text("UPDATE revision SET counter = counter + 1 WHERE id = 1")
_READ_SQL = "SELECT counter FROM revision WHERE id = 1"
_READ, _READ_DIRECT = text(_READ_SQL), Statement(_READ_SQL)  # in a session; on the driver (the hot path)


_changes = itertools.count(1)
_latest = [0]  # the newest value drawn from _changes: changes made by this process (any thread)


def bump(session: Session) -> None:
    """Call inside the transaction that changes a key or a transfer policy. Also tells this process's caches at
    once (``local_changes``), so that they do not wait for their next look at the counter."""
    session.execute(_BUMP)
    _latest[0] = next(_changes)


def local_changes() -> int:
    """Grows whenever this process changes a key or a policy (even in a transaction that then rolls back)."""
    return _latest[0]


def current(session: Session) -> int:
    return int(session.execute(_READ).scalar_one())


def read(database: Database) -> int:
    """The counter, in one round trip (no transaction around it): the hot path checks it on every transfer."""
    return int(database.direct.fetch(_READ_DIRECT)[0][0])
