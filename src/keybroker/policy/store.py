"""Persistence and rules of key transfer policies: immutable ones never change, referenced ones stay."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.clock import Clock
from keybroker.errors import Conflict, NotFound
from keybroker.ids import PolicyId, canonical_uuid
from keybroker.policy.model import TransferPolicyDocument
from keybroker.storage import revision
from keybroker.storage.db import Database
from keybroker.storage.pagination import Page
from keybroker.storage.tables import KeyRow, TransferPolicyRow


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    id: PolicyId
    document: TransferPolicyDocument
    created_at: datetime
    updated_at: datetime


def _record(row: TransferPolicyRow) -> PolicyRecord:
    return PolicyRecord(
        id=PolicyId(row.id),
        document=TransferPolicyDocument.model_validate(row.document),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def policy_not_found(policy_id: str) -> NotFound:
    shown = canonical_uuid(policy_id) or "with that id"
    return NotFound(f"key transfer policy {shown} does not exist", code="policy_not_found")


def _summary(document: TransferPolicyDocument) -> dict[str, Any]:
    return {"attestation_type": [t.value for t in document.attestation_type], "immutable": document.immutable}


class PolicyStore:
    def __init__(self, database: Database, audit: AuditLog, clock: Clock) -> None:
        self._db = database
        self._audit = audit
        self._clock = clock

    def create(self, document: TransferPolicyDocument, audit: AuditContext) -> PolicyRecord:
        now = self._clock.now()
        row = TransferPolicyRow(
            id=str(uuid.uuid4()),
            document=document.model_dump(mode="json", exclude_none=True),
            immutable=document.immutable,
            created_at=now,
            updated_at=now,
        )
        with self._db.transaction(write=True) as session:
            revision.bump(session)
            session.add(row)
            self._audit.append(session, audit, AuditEvent("policy.create", "success", row.id, _summary(document)))
        return _record(row)

    def get(self, policy_id: str) -> PolicyRecord:
        if canonical_uuid(policy_id) is None:
            raise policy_not_found(policy_id)
        with self._db.transaction() as session:
            row = session.get(TransferPolicyRow, policy_id)
            if row is None:
                raise policy_not_found(policy_id)
            return _record(row)

    def exists(self, policy_id: str) -> bool:
        if canonical_uuid(policy_id) is None:
            return False
        with self._db.transaction() as session:
            return session.get(TransferPolicyRow, policy_id) is not None

    def list(self, page: Page) -> tuple[list[PolicyRecord], str | None]:
        query = page.apply(select(TransferPolicyRow), TransferPolicyRow.created_at, TransferPolicyRow.id)
        with self._db.transaction() as session:
            rows, cursor = page.cut(list(session.scalars(query)))
        return [_record(row) for row in rows], cursor

    def replace(self, policy_id: str, document: TransferPolicyDocument, audit: AuditContext) -> PolicyRecord:
        if canonical_uuid(policy_id) is None:
            raise policy_not_found(policy_id)
        with self._db.transaction(write=True) as session:
            revision.bump(session)
            row = session.get(TransferPolicyRow, policy_id, with_for_update=True)
            if row is None:
                raise policy_not_found(policy_id)
            if row.immutable:
                raise Conflict(f"key transfer policy {policy_id} is immutable", code="policy_immutable")
            row.document = document.model_dump(mode="json", exclude_none=True)
            row.immutable = document.immutable
            row.updated_at = self._clock.now()
            self._audit.append(session, audit, AuditEvent("policy.update", "success", policy_id, _summary(document)))
            return _record(row)

    def delete(self, policy_id: str, audit: AuditContext) -> None:
        if canonical_uuid(policy_id) is None:
            raise policy_not_found(policy_id)
        in_use = Conflict(f"key transfer policy {policy_id} is referenced by at least one key", code="policy_in_use")
        try:
            with self._db.transaction(write=True) as session:
                revision.bump(session)
                row = session.get(TransferPolicyRow, policy_id, with_for_update=True)
                if row is None:
                    raise policy_not_found(policy_id)
                if row.immutable:
                    raise Conflict(f"key transfer policy {policy_id} is immutable", code="policy_immutable")
                if session.scalar(select(exists().where(KeyRow.transfer_policy_id == policy_id))):
                    raise in_use
                session.delete(row)
                session.flush()
                self._audit.append(session, audit, AuditEvent("policy.delete", "success", policy_id, {}))
        except IntegrityError:
            # A key was attached between the check and the delete; the foreign key caught it.
            raise in_use from None
