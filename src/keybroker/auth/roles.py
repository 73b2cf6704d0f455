"""Roles: named sets of permissions, stored in the database. Built-in roles are seeded at init and may be edited
(a permission removed from a role stops working for every token of that role at once) but not deleted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, bindparam, func, select, text
from sqlalchemy.orm import Session

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.auth.permissions import BUILTIN_ROLES, ROLE_NAME, validate_permissions
from keybroker.clock import Clock
from keybroker.errors import Conflict, InvalidRequest, NotFound, UnknownReference
from keybroker.storage.db import Database
from keybroker.storage.tables import ApiTokenRow, RoleRow


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    permissions: tuple[str, ...]
    builtin: bool
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "permissions": list(self.permissions),
            "builtin": self.builtin,
            "updated_at": self.updated_at,
        }


_PERMISSIONS_OF = (
    text("SELECT permissions FROM roles WHERE name IN :names")
    .bindparams(bindparam("names", expanding=True))
    .columns(permissions=JSON())
)


def _role(row: RoleRow) -> Role:
    return Role(row.name, tuple(sorted(row.permissions)), row.builtin, row.updated_at)


def role_not_found(name: str) -> NotFound:
    shown = repr(name) if ROLE_NAME.match(name) else "with that name"
    return NotFound(f"role {shown} does not exist", code="role_not_found")


class RoleStore:
    def __init__(self, database: Database, audit: AuditLog, clock: Clock) -> None:
        self._db = database
        self._audit = audit
        self._clock = clock

    def seed(self, session: Session) -> None:
        """Create the built-in roles that do not exist yet (init and upgrades)."""
        for name, permissions in BUILTIN_ROLES.items():
            if session.get(RoleRow, name) is None:
                session.add(
                    RoleRow(name=name, permissions=sorted(permissions), builtin=True, updated_at=self._clock.now())
                )

    def permissions_of(self, session: Session, roles: Sequence[str]) -> frozenset[str]:
        rows = session.execute(_PERMISSIONS_OF, {"names": list(roles)}).scalars()
        return frozenset(p for permissions in rows for p in permissions)

    def require_existing(self, session: Session, roles: Sequence[str]) -> None:
        found = set(session.scalars(select(RoleRow.name).where(RoleRow.name.in_(list(roles)))))
        missing = sorted(set(roles) - found)
        if missing:
            raise UnknownReference(f"unknown role(s): {', '.join(missing)}", code="unknown_role")

    def list(self) -> list[Role]:
        with self._db.transaction() as session:
            return [_role(row) for row in session.scalars(select(RoleRow).order_by(RoleRow.name))]

    def get(self, name: str) -> Role:
        with self._db.transaction() as session:
            row = session.get(RoleRow, name)
            if row is None:
                raise role_not_found(name)
            return _role(row)

    def put(self, name: str, permissions: Sequence[str], audit: AuditContext) -> Role:
        """Create a role or replace its permissions."""
        if not ROLE_NAME.match(name):
            raise InvalidRequest(
                "role names are lowercase letters, digits and '-', starting with a letter", code="invalid_role_name"
            )
        try:
            granted = validate_permissions(list(permissions))
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="unknown_permission") from None
        with self._db.transaction() as session:
            row = session.get(RoleRow, name, with_for_update=True)
            before = sorted(row.permissions) if row else None
            if row is None:
                row = RoleRow(name=name, permissions=sorted(granted), builtin=False, updated_at=self._clock.now())
                session.add(row)
            else:
                row.permissions = sorted(granted)
                row.updated_at = self._clock.now()
            self._audit.append(
                session, audit, AuditEvent("role.put", "success", name, {"before": before, "after": sorted(granted)})
            )
            return _role(row)

    def delete(self, name: str, audit: AuditContext) -> None:
        with self._db.transaction(write=True) as session:
            row = session.get(RoleRow, name, with_for_update=True)
            if row is None:
                raise role_not_found(name)
            if row.builtin:
                raise Conflict(f"role {name!r} is built in; change its permissions instead", code="role_builtin")
            holders = [
                r
                for r in session.scalars(select(ApiTokenRow.roles).where(ApiTokenRow.revoked_at.is_(None)))
                if name in r
            ]
            if holders:
                raise Conflict(f"role {name!r} is held by {len(holders)} unrevoked token(s)", code="role_in_use")
            session.delete(row)
            self._audit.append(session, audit, AuditEvent("role.delete", "success", name, {}))

    def count(self) -> int:
        with self._db.transaction(write=True) as session:
            return int(session.scalar(select(func.count()).select_from(RoleRow)) or 0)
