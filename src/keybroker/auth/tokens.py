"""Bearer tokens: random secrets handed out once, stored only as SHA-256 hashes.

A token is ``kb_`` followed by 43 URL-safe base64 characters (256 random bits). 256 bits of entropy make a fast
hash safe here (no password stretching needed); the lookup is by hash, so no secret is ever compared directly.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from keybroker.clock import Clock
from keybroker.errors import Unauthenticated
from keybroker.storage.db import Database
from keybroker.storage.tables import ApiTokenRow

TOKEN_PREFIX = "kb_"  # noqa: S105 - a public prefix, not a secret
ADMIN_ROLE = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str
    name: str
    role: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenStore:
    def __init__(self, database: Database, clock: Clock) -> None:
        self._db = database
        self._clock = clock

    def issue(self, name: str, role: str, expires_at: datetime | None = None) -> str:
        """Create a token and return its secret (the only time it is available)."""
        token = new_token()
        with self._db.transaction() as session:
            session.add(
                ApiTokenRow(
                    id=str(uuid.uuid4()),
                    token_hash=hash_token(token),
                    name=name,
                    role=role,
                    created_at=self._clock.now(),
                    expires_at=expires_at,
                    revoked_at=None,
                )
            )
        return token

    def count(self) -> int:
        with self._db.transaction() as session:
            return len(list(session.scalars(select(ApiTokenRow.id))))

    def authenticate(self, token: str) -> Principal:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
            raise Unauthenticated("the bearer token is not valid", code="invalid_token")
        with self._db.transaction() as session:
            row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_hash == hash_token(token)))
            if row is None:
                raise Unauthenticated("the bearer token is not valid", code="invalid_token")
            if row.revoked_at is not None:
                raise Unauthenticated("the bearer token has been revoked", code="token_revoked")
            if row.expires_at is not None and row.expires_at <= self._clock.now():
                raise Unauthenticated("the bearer token has expired", code="token_expired")
            return Principal(token_id=row.id, name=row.name, role=row.role)
