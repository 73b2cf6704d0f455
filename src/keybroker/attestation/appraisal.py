"""Appraisal policies: Rego (``package policy``, rule ``allow``) evaluated with regopy against a token's claims.
Anything but ``allow == true`` (undefined, false, an error) is a non-match: fail closed."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import regopy
from sqlalchemy import select

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.clock import Clock
from keybroker.errors import InvalidRequest, NotFound
from keybroker.ids import canonical_uuid, new_id
from keybroker.storage.db import Database
from keybroker.storage.tables import AppraisalPolicyRow

_PACKAGE = re.compile(r"^\s*package\s+policy\s*$", re.M)


@dataclass(frozen=True, slots=True)
class AppraisalPolicy:
    id: str
    name: str
    rego: str
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "policy": self.rego,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _policy(row: AppraisalPolicyRow) -> AppraisalPolicy:
    return AppraisalPolicy(row.id, row.name, row.rego, row.created_at, row.updated_at)


def not_found(policy_id: str) -> NotFound:
    shown = canonical_uuid(policy_id) or "with that id"
    return NotFound(f"appraisal policy {shown} does not exist", code="appraisal_policy_not_found")


def _interpreter(rego: str) -> Any:
    interpreter = regopy.Interpreter()
    interpreter.add_module("policy", rego)
    return interpreter


def validate_rego(rego: str) -> None:
    if not _PACKAGE.search(rego):
        raise InvalidRequest(
            "an appraisal policy is a Rego module 'package policy' with a rule 'allow'", code="invalid_rego"
        )
    try:
        interpreter = _interpreter(rego)
        interpreter.set_input_term("{}")
        interpreter.query("data.policy.allow")
    except Exception as exc:  # regopy raises its own RegoError (and others) for every compile problem
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InvalidRequest(f"the Rego module does not compile: {first}", code="invalid_rego") from None


def allows(rego: str, claims: dict[str, Any]) -> bool:
    try:
        interpreter = _interpreter(rego)
        interpreter.set_input_term(json.dumps(claims))
        result = json.loads(str(interpreter.query("data.policy.allow")))
    except Exception:  # undefined (not JSON), runtime errors: not allowed
        return False
    return isinstance(result, dict) and result.get("expressions") == [True]


class AppraisalPolicies:
    def __init__(self, database: Database, audit: AuditLog, clock: Clock) -> None:
        self._db = database
        self._audit = audit
        self._clock = clock
        self._lock = threading.Lock()

    def create(self, name: str, rego: str, audit: AuditContext) -> AppraisalPolicy:
        validate_rego(rego)
        now = self._clock.now()
        row = AppraisalPolicyRow(id=new_id(), name=name, rego=rego, created_at=now, updated_at=now)
        with self._db.transaction(write=True) as session:
            session.add(row)
            self._audit.append(session, audit, AuditEvent("appraisal_policy.create", "success", row.id, {"name": name}))
        return _policy(row)

    def get(self, policy_id: str) -> AppraisalPolicy:
        if canonical_uuid(policy_id) is None:
            raise not_found(policy_id)
        with self._db.transaction() as session:
            row = session.get(AppraisalPolicyRow, policy_id)
            if row is None:
                raise not_found(policy_id)
            return _policy(row)

    def all(self) -> list[AppraisalPolicy]:
        with self._db.transaction() as session:
            rows = session.scalars(select(AppraisalPolicyRow).order_by(AppraisalPolicyRow.created_at))
            return [_policy(row) for row in rows]

    def replace(self, policy_id: str, name: str, rego: str, audit: AuditContext) -> AppraisalPolicy:
        validate_rego(rego)
        if canonical_uuid(policy_id) is None:
            raise not_found(policy_id)
        with self._db.transaction(write=True) as session:
            row = session.get(AppraisalPolicyRow, policy_id, with_for_update=True)
            if row is None:
                raise not_found(policy_id)
            row.name, row.rego, row.updated_at = name, rego, self._clock.now()
            self._audit.append(
                session, audit, AuditEvent("appraisal_policy.update", "success", policy_id, {"name": name})
            )
            return _policy(row)

    def delete(self, policy_id: str, audit: AuditContext) -> None:
        if canonical_uuid(policy_id) is None:
            raise not_found(policy_id)
        with self._db.transaction(write=True) as session:
            row = session.get(AppraisalPolicyRow, policy_id, with_for_update=True)
            if row is None:
                raise not_found(policy_id)
            session.delete(row)
            self._audit.append(session, audit, AuditEvent("appraisal_policy.delete", "success", policy_id, {}))

    def evaluate(self, policy_ids: list[str], claims: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(matched, unmatched). An unknown policy id is unmatched."""
        matched: list[str] = []
        unmatched: list[str] = []
        for policy_id in policy_ids:
            try:
                policy = self.get(policy_id)
            except NotFound:
                unmatched.append(policy_id)
                continue
            (matched if allows(policy.rego, claims) else unmatched).append(policy_id)
        return matched, unmatched
