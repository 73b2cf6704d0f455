"""Roles: named sets of permissions, stored in the database. Built-in roles are seeded at init and may be edited
(a permission removed from a role stops working for every token of that role at once) but not deleted, except
``admin``, whose permissions are fixed: it is the recovery path (``keybroker init --new-admin-token``).

Lock-out guard: no role change, role deletion or token revocation may leave the deployment without a token that
grants ``tokens:manage``, is not revoked and stays valid for at least ``MANAGER_MIN_LIFETIME`` (a manager that
expires a second later is no manager); such a change is refused with 409 ``role_lockout``. The check runs inside
the changing transaction with every role row locked (always all of them, in name order, before any other row, so
that concurrent changes can neither deadlock nor each pass the check and together lock everyone out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, bindparam, func, select, text
from sqlalchemy.orm import Session

from keybroker.audit.log import SYSTEM, AuditContext, AuditEvent, AuditLog
from keybroker.auth.permissions import ADMIN_ROLE, BUILTIN_ROLES, MANAGE_PERMISSION, ROLE_NAME, validate_permissions
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


# A managing token that expires sooner does not keep the deployment open: its holder could not act in time.
MANAGER_MIN_LIFETIME = timedelta(hours=24)


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

    @staticmethod
    def lock_all(session: Session) -> dict[str, RoleRow]:
        """Every role row, locked, in name order (the one lock order of this module)."""
        return {row.name: row for row in session.scalars(select(RoleRow).order_by(RoleRow.name).with_for_update())}

    def seed(self, session: Session) -> None:
        """Create the built-in roles that do not exist yet (init, serve and upgrades), and give ``admin`` back
        exactly its fixed permissions if anything ever changed them (an edited database, an older version, a
        permission added by an upgrade)."""
        rows = self.lock_all(session)
        for name, permissions in BUILTIN_ROLES.items():
            row = rows.get(name)
            if row is None:
                session.add(
                    RoleRow(name=name, permissions=sorted(permissions), builtin=True, updated_at=self._clock.now())
                )
            elif name == ADMIN_ROLE and (sorted(row.permissions) != sorted(permissions) or not row.builtin):
                before = sorted(row.permissions)
                row.permissions, row.builtin, row.updated_at = sorted(permissions), True, self._clock.now()
                self._audit.append(
                    session,
                    SYSTEM,
                    AuditEvent("role.restore", "success", name, {"before": before, "after": sorted(permissions)}),
                )

    def refuse_lockout(
        self,
        session: Session,
        changed: Mapping[str, frozenset[str] | None] | None = None,
        revoking: str | None = None,
        locked: Mapping[str, RoleRow] | None = None,
    ) -> None:
        """Raise 409 ``role_lockout`` if, after the change, no lasting token would grant ``tokens:manage``.
        ``changed`` maps role names to their new permissions (``None``: deleted); ``revoking`` is a token id.
        Call it inside the changing transaction; it locks every role row first unless given them (``locked``)."""
        rows = locked if locked is not None else self.lock_all(session)
        permissions = {name: frozenset(row.permissions) for name, row in rows.items()}
        for name, after in (changed or {}).items():
            if after is None:
                permissions.pop(name, None)
            else:
                permissions[name] = after
        lasting = self._clock.now() + MANAGER_MIN_LIFETIME
        active = session.execute(
            select(ApiTokenRow.id, ApiTokenRow.roles).where(
                ApiTokenRow.revoked_at.is_(None),
                ApiTokenRow.expires_at.is_(None) | (ApiTokenRow.expires_at >= lasting),
            )
        )
        for token_id, roles in active:
            if token_id != revoking and any(MANAGE_PERMISSION in permissions.get(role, ()) for role in roles):
                return
        hours = int(MANAGER_MIN_LIFETIME.total_seconds() // 3600)
        raise Conflict(
            f"this would leave no unrevoked token that grants {MANAGE_PERMISSION} for at least another {hours} hours, "
            "and so soon nobody able to manage roles and tokens; issue another such token first",
            code="role_lockout",
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
        with self._db.transaction(write=True) as session:
            rows = self.lock_all(session)
            # A change that would lock everyone out says so first (also for admin), any other change to admin is
            # refused as such.
            self.refuse_lockout(session, {name: granted}, locked=rows)
            row = rows.get(name)
            before = sorted(row.permissions) if row else None
            if name == ADMIN_ROLE and before != sorted(granted):
                raise Conflict(
                    f"the built-in role {ADMIN_ROLE!r} always grants every permission (it is the recovery path); "
                    "make a new role for narrower tokens",
                    code="role_fixed",
                )
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
            rows = self.lock_all(session)
            row = rows.get(name)
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
            self.refuse_lockout(session, {name: None}, locked=rows)
            session.delete(row)
            self._audit.append(session, audit, AuditEvent("role.delete", "success", name, {}))

    def count(self) -> int:
        with self._db.transaction(write=True) as session:
            return int(session.scalar(select(func.count()).select_from(RoleRow)) or 0)
