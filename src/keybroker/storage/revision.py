"""The key/policy revision counter (see migration 0004): caches of keys and policies are valid while it stands."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

_BUMP = text("UPDATE revision SET counter = counter + 1 WHERE id = 1")
_READ = text("SELECT counter FROM revision WHERE id = 1")


def bump(session: Session) -> None:
    """Call inside the transaction that changes a key or a transfer policy."""
    session.execute(_BUMP)


def current(session: Session) -> int:
    return int(session.execute(_READ).scalar_one())
