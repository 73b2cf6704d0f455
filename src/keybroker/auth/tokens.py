"""Bearer tokens: random secrets handed out once, stored only as SHA-256 hashes, with roles, a permission
context, an expiry and revocation.

A token reads ``kb_<deployment>_<secret>``: ``deployment`` is the first 12 hex digits of this deployment's id
(so a token of another keybroker is refused with its own reason), ``secret`` is 256 random bits. With that much
entropy a fast hash is safe (no password stretching needed); the lookup is by hash, so no secret is ever compared
directly. What a token may do is resolved at every request from its roles, which live in the database.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, String, select, text

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.auth.permissions import CONTEXT_VALUE
from keybroker.auth.roles import RoleStore
from keybroker.clock import Clock
from keybroker.errors import InvalidRequest, NotFound, Unauthenticated
from keybroker.ids import canonical_uuid
from keybroker.storage.db import Database, UTCDateTime
from keybroker.storage.deployment import deployment_id
from keybroker.storage.tables import ApiTokenRow

TOKEN_PREFIX = "kb_"  # noqa: S105 - a public prefix, not a secret
_TOKEN = re.compile(r"^kb_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
MAX_TTL = timedelta(days=366)


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str
    name: str
    roles: tuple[str, ...]
    permissions: frozenset[str]
    context: tuple[str, ...]

    @property
    def actor(self) -> str:
        return f"token:{self.token_id} ({self.name})"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as listed: never its secret."""

    id: str
    name: str
    roles: tuple[str, ...]
    context: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "roles": list(self.roles),
            "context": list(self.context),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }


# Prepared once: authentication runs on every admin request.
_BY_HASH = text(
    "SELECT id, name, roles, context, expires_at, revoked_at FROM api_tokens WHERE token_hash = :token_hash"
).columns(id=String(), name=String(), roles=JSON(), context=JSON(), expires_at=UTCDateTime(), revoked_at=UTCDateTime())


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _info(row: ApiTokenRow) -> TokenInfo:
    return TokenInfo(
        row.id, row.name, tuple(row.roles), tuple(row.context), row.created_at, row.expires_at, row.revoked_at
    )


class TokenStore:
    def __init__(self, database: Database, roles: RoleStore, audit: AuditLog, clock: Clock) -> None:
        self._db = database
        self._roles = roles
        self._audit = audit
        self._clock = clock
        self._deployment: str | None = None

    @property
    def deployment_tag(self) -> str:
        if self._deployment is None:
            self._deployment = deployment_id(self._db)[:12]
        return self._deployment

    def issue(
        self,
        name: str,
        roles: Sequence[str],
        context: Sequence[str],
        ttl: timedelta,
        audit: AuditContext,
        created_by: str | None = None,
    ) -> tuple[str, TokenInfo]:
        """Create a token; returns its secret (the only time it exists outside the caller) and its info."""
        if not 0 < ttl.total_seconds() <= MAX_TTL.total_seconds():
            raise InvalidRequest(
                f"a token's lifetime must be between 1 second and {MAX_TTL.days} days", code="invalid_ttl"
            )
        bad_context = [value for value in context if not CONTEXT_VALUE.match(value)]
        if bad_context or len(set(context)) != len(context):
            raise InvalidRequest("context values are unique words without spaces or commas", code="invalid_context")
        if not roles or len(set(roles)) != len(roles):
            raise InvalidRequest("a token needs at least one role, each named once", code="invalid_roles")
        token = f"{TOKEN_PREFIX}{self.deployment_tag}_{secrets.token_urlsafe(32)}"
        now = self._clock.now()
        row = ApiTokenRow(
            id=str(uuid.uuid4()),
            token_hash=hash_token(token),
            name=name,
            roles=list(roles),
            context=list(context),
            created_by=created_by,
            created_at=now,
            expires_at=now + ttl,
            revoked_at=None,
        )
        with self._db.transaction(write=True) as session:
            self._roles.require_existing(session, roles)
            session.add(row)
            self._audit.append(
                session,
                audit,
                AuditEvent(
                    "token.create",
                    "success",
                    row.id,
                    {
                        "name": name,
                        "roles": list(roles),
                        "context": list(context),
                        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
                    },
                ),
            )
        return token, _info(row)

    def list(self) -> list[TokenInfo]:
        with self._db.transaction() as session:
            rows = session.scalars(select(ApiTokenRow).order_by(ApiTokenRow.created_at, ApiTokenRow.id))
            return [_info(row) for row in rows]

    def count(self) -> int:
        with self._db.transaction() as session:
            return len(list(session.scalars(select(ApiTokenRow.id))))

    def revoke(self, token_id: str, audit: AuditContext) -> TokenInfo:
        canonical = canonical_uuid(token_id)
        if canonical is None:
            raise NotFound("no token has that id", code="token_not_found")
        token_id = canonical
        with self._db.transaction(write=True) as session:
            roles = self._roles.lock_all(session)  # role rows first: the lock order of RoleStore
            row = session.get(ApiTokenRow, token_id, with_for_update=True)
            if row is None:
                raise NotFound(f"token {token_id} does not exist", code="token_not_found")
            if row.revoked_at is None:
                self._roles.refuse_lockout(session, revoking=token_id, locked=roles)
                row.revoked_at = self._clock.now()
                self._audit.append(session, audit, AuditEvent("token.revoke", "success", token_id, {"name": row.name}))
            return _info(row)

    def authenticate(self, token: str) -> Principal:
        """The principal of a bearer token, or ``Unauthenticated`` with the precise reason."""
        match = _TOKEN.match(token)
        if match is None:
            raise Unauthenticated("the bearer token is malformed", code="invalid_token")
        if not secrets.compare_digest(match.group(1), self.deployment_tag):
            raise Unauthenticated(
                "the bearer token belongs to another keybroker deployment", code="token_wrong_deployment"
            )
        with self._db.transaction() as session:
            row = session.execute(_BY_HASH, {"token_hash": hash_token(token)}).one_or_none()
            if row is None:
                raise Unauthenticated("the bearer token is not valid", code="invalid_token")
            if row.revoked_at is not None:
                raise Unauthenticated("the bearer token has been revoked", code="token_revoked")
            if row.expires_at is not None and row.expires_at <= self._clock.now():
                raise Unauthenticated("the bearer token has expired", code="token_expired")
            # Resolved at every request, so that a permission taken from a role stops working at once.
            permissions = self._roles.permissions_of(session, row.roles)
            return Principal(row.id, row.name, tuple(row.roles), permissions, tuple(row.context))
