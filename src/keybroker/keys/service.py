"""KeyService: creates, imports, lists, re-assigns and deletes keys; routes material to its backend, through the
outbox (``keys.outbox``) that makes a key's record and its material converge."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import structlog
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.backends.base import Capability, GeneratingKeyStore, KeyStore, RegisteringKeyStore
from keybroker.clock import Clock
from keybroker.errors import (
    BackendUnavailable,
    BackendUnsupported,
    Conflict,
    InvalidRequest,
    NotFound,
    UnknownReference,
)
from keybroker.ids import BackendRef, KeyId, PolicyId, canonical_uuid
from keybroker.keys import material as key_material
from keybroker.keys.models import CURVE_ALIASES, KEY_LENGTHS, Algorithm, Curve, KeyMaterial, KeyRecord, KeySpec
from keybroker.keys.outbox import Outbox, ReconcileResult
from keybroker.policy.store import PolicyStore
from keybroker.storage import revision
from keybroker.storage.db import Database
from keybroker.storage.pagination import Page
from keybroker.storage.tables import KeyRow, PendingMaterialRow


@dataclass(frozen=True, slots=True)
class NewKey:
    """A validated create request. ``key_string`` (import mode) is excluded from repr."""

    spec: KeySpec
    transfer_policy_id: PolicyId
    label: str | None = None
    usage: str | None = None
    backend: str | None = None
    key_id: KeyId | None = None
    key_string: str | None = field(default=None, repr=False)
    kmip_key_id: str | None = None


log = structlog.get_logger("keybroker.keys")


@dataclass(frozen=True, slots=True)
class KeyFilter:
    algorithm: Algorithm | None = None
    key_length: int | None = None
    curve: Curve | None = None
    transfer_policy_id: str | None = None


def parse_algorithm(value: str) -> Algorithm:
    try:
        return Algorithm(value.upper())
    except ValueError:
        raise InvalidRequest(
            f"algorithm must be one of {', '.join(a.value for a in Algorithm)}", code="unsupported_algorithm"
        ) from None


def parse_curve(value: str) -> Curve:
    curve = CURVE_ALIASES.get(value.lower())
    if curve is None:
        raise InvalidRequest(
            "curve_type must be secp256r1 (prime256v1), secp384r1 or secp521r1", code="unsupported_curve"
        )
    return curve


def build_spec(algorithm: str, key_length: int | None, curve_type: str | None) -> KeySpec:
    """The spec for a create request, with a precise reason for every inconsistent combination."""
    alg = parse_algorithm(algorithm)
    lengths = ", ".join(str(n) for n in KEY_LENGTHS[alg])
    if alg is Algorithm.EC:
        if curve_type is None:
            raise InvalidRequest("EC keys need curve_type", code="unsupported_curve")
        curve = parse_curve(curve_type)
        if key_length is not None and key_length != curve.bits:
            raise InvalidRequest(
                f"key_length {key_length} does not match curve {curve} ({curve.bits} bits)",
                code="unsupported_key_length",
            )
        return KeySpec(alg, curve.bits, curve)
    if curve_type is not None:
        raise InvalidRequest(f"curve_type is only for EC keys, not {alg}", code="unsupported_curve")
    if key_length is None or key_length not in KEY_LENGTHS[alg]:
        raise InvalidRequest(f"{alg} key_length must be one of {lengths}", code="unsupported_key_length")
    return KeySpec(alg, key_length)


def key_not_found(key_id: str) -> NotFound:
    shown = canonical_uuid(key_id) or "with that id"
    return NotFound(f"key {shown} does not exist", code="key_not_found")


def _record(row: KeyRow) -> KeyRecord:
    curve = Curve(row.curve_type) if row.curve_type else None
    return KeyRecord(
        id=KeyId(row.id),
        spec=KeySpec(Algorithm(row.algorithm), row.key_length, curve),
        label=row.label,
        usage=row.usage,
        transfer_policy_id=PolicyId(row.transfer_policy_id),
        backend=row.backend,
        backend_ref=BackendRef(row.backend_ref),
        kmip_key_id=row.kmip_key_id,
        created_at=row.created_at,
    )


class KeyService:
    def __init__(
        self,
        database: Database,
        stores: Mapping[str, KeyStore],
        default_backend: str,
        policies: PolicyStore,
        audit: AuditLog,
        clock: Clock,
    ) -> None:
        self._audit = audit
        self._db = database
        self._stores = dict(stores)
        self._default_backend = default_backend
        self._policies = policies
        self._clock = clock
        self._outbox = Outbox(database, clock)

    @property
    def backends(self) -> Mapping[str, KeyStore]:
        return self._stores

    def check_new(self, new: NewKey) -> None:
        """Cheap checks before any key is generated (generation can take seconds)."""
        backend = new.backend or self._default_backend
        if backend not in self._stores:
            raise UnknownReference(
                f"backend {backend!r} is not configured (configured: {', '.join(sorted(self._stores))})",
                code="unknown_backend",
            )
        if new.kmip_key_id is not None and Capability.REGISTER_EXISTING not in self._stores[backend].capabilities:
            raise BackendUnsupported(
                f"backend {backend!r} cannot register existing objects by kmip_key_id; choose a KMIP backend"
            )
        if new.kmip_key_id is None and not self._stores[backend].supports(new.spec):
            raise BackendUnsupported(f"backend {backend!r} cannot store {new.spec.describe()} keys")
        if not self._policies.exists(new.transfer_policy_id):
            raise UnknownReference(
                f"transfer_policy_id {new.transfer_policy_id} does not exist", code="unknown_transfer_policy"
            )
        if new.key_id is not None:
            with self._db.transaction() as session:
                if session.get(KeyRow, new.key_id) is not None:
                    raise Conflict(f"a key with id {new.key_id} already exists", code="key_exists")

    @staticmethod
    def make_material(new: NewKey) -> KeyMaterial:
        """Parse the imported ``key_string`` or generate fresh material (CPU-bound; may take seconds)."""
        if new.key_string is not None:
            return key_material.parse_import(new.spec, new.key_string)
        return key_material.generate(new.spec)

    def store(self, new: NewKey, material: KeyMaterial, audit: AuditContext) -> KeyRecord:
        """Write ``material`` to the chosen backend and the record to the database (module docstring)."""
        backend = new.backend or self._default_backend
        store = self._stores[backend]
        key_id = new.key_id or KeyId(str(uuid.uuid4()))
        self._outbox.reserve(key_id, backend)
        try:
            ref = store.put(key_id, material)
        except Conflict:
            # The backend already holds something under this key id that this attempt did not write (a chosen id
            # that another deployment or the guide's own tooling used): it is not ours to remove.
            self._outbox.release_own(key_id, "create")
            raise
        except BaseException:
            self._outbox.abandon(store, key_id)
            raise
        mode = "import" if new.key_string is not None else "generate"
        return self._record_new(new, key_id, backend, ref, mode, audit)

    def generate_in_backend(self, new: NewKey, audit: AuditContext) -> KeyRecord | None:
        """The "generate" mode for a backend that creates keys of ``new.spec`` itself (a KMIP server: Create,
        CreateKeyPair), so that the material originates in the KMS and never passes through keybroker here. The
        outbox works as for ``store``: whatever a failed ``generate`` may have left is purged by the key's id.

        ``None`` (and nothing done) for an import or a registration, or when the backend cannot generate the spec:
        the caller then generates the material and ``store``s it."""
        if new.key_string is not None or new.kmip_key_id is not None:
            return None
        backend = new.backend or self._default_backend
        store = self._stores[backend]
        if (
            Capability.GENERATE not in store.capabilities
            or not isinstance(store, GeneratingKeyStore)
            or not store.can_generate(new.spec)
        ):
            return None
        key_id = new.key_id or KeyId(str(uuid.uuid4()))
        self._outbox.reserve(key_id, backend)
        try:
            ref = store.generate(key_id, new.spec)
        except Conflict:
            self._outbox.release_own(
                key_id, "create"
            )  # as in store(): what the backend holds under this id is not ours
            raise
        except BaseException:
            self._outbox.abandon(store, key_id)
            raise
        return self._record_new(new, key_id, backend, ref, "generate", audit, generated_by="backend")

    def register(self, new: NewKey, audit: AuditContext) -> KeyRecord:
        """The third create mode: adopt an object that already exists in a KMIP backend (``kmip_key_id``)."""
        backend = new.backend or self._default_backend
        store = self._stores[backend]
        assert new.kmip_key_id is not None
        if Capability.REGISTER_EXISTING not in store.capabilities or not isinstance(store, RegisteringKeyStore):
            raise BackendUnsupported(f"backend {backend!r} cannot register existing objects by kmip_key_id")
        key_id = new.key_id or KeyId(str(uuid.uuid4()))
        self._refuse_adopted_twice(backend, new.kmip_key_id)
        self._outbox.reserve(key_id, backend)
        try:
            ref = store.register_existing(key_id, new.kmip_key_id, new.spec)
        except BaseException:
            self._outbox.release_own(key_id, "create")  # nothing was written to the backend
            raise
        return self._record_new(new, key_id, backend, ref, "register", audit, kmip_key_id=new.kmip_key_id)

    def _refuse_adopted_twice(self, backend: str, object_id: str) -> None:
        """One KMIP object, one key: a second key over the same object could carry a laxer transfer policy. (The
        unique index on (backend, kmip_key_id) closes the race between two concurrent registrations.)"""
        query = select(KeyRow.id).where(
            KeyRow.backend == backend,
            (KeyRow.kmip_key_id == object_id) | (KeyRow.backend_ref == object_id),
        )
        with self._db.transaction() as session:
            if session.scalars(query.limit(1)).first() is not None:
                raise Conflict(f"KMIP object {object_id} already backs a key", code="kmip_object_in_use")

    def _record_new(
        self,
        new: NewKey,
        key_id: KeyId,
        backend: str,
        ref: BackendRef,
        mode: str,
        audit: AuditContext,
        kmip_key_id: str | None = None,
        generated_by: str | None = None,
    ) -> KeyRecord:
        store = self._stores[backend]
        row = KeyRow(
            id=key_id,
            algorithm=new.spec.algorithm.value,
            key_length=new.spec.key_length,
            curve_type=new.spec.curve.value if new.spec.curve else None,
            label=new.label,
            usage=new.usage,
            transfer_policy_id=new.transfer_policy_id,
            backend=backend,
            backend_ref=ref,
            kmip_key_id=kmip_key_id,
            created_at=self._clock.now(),
        )
        details = {
            "mode": mode,
            "algorithm": new.spec.algorithm.value,
            "key_length": new.spec.key_length,
            "curve_type": row.curve_type,
            "backend": backend,
            "transfer_policy_id": new.transfer_policy_id,
            "label": new.label,
            "kmip_key_id": kmip_key_id,
        }
        if generated_by is not None:
            details["generated_by"] = generated_by  # "backend": the key was created inside the backend (KMIP)
        try:
            with self._db.transaction(write=True) as session:
                revision.bump(session)
                session.add(row)
                session.flush()  # the record's constraints are checked before the audit entry is written
                claimed = session.execute(
                    delete(PendingMaterialRow).where(
                        PendingMaterialRow.key_id == key_id,
                        PendingMaterialRow.operation == "create",
                        PendingMaterialRow.claimed_at.is_(None),
                    )
                )
                if getattr(claimed, "rowcount", 1) != 1:
                    # The reconciler took this create for abandoned (and purged its material): give up cleanly.
                    raise BackendUnavailable("the key's write was interrupted; try again", code="key_write_interrupted")
                self._audit.append(session, audit, AuditEvent("key.create", "success", key_id, details))
        except IntegrityError:
            self._undo_new(store, key_id, kmip_key_id)
            if kmip_key_id is not None and self._adopted(backend, kmip_key_id):
                raise Conflict(f"KMIP object {kmip_key_id} already backs a key", code="kmip_object_in_use") from None
            if not self._policies.exists(new.transfer_policy_id):
                raise UnknownReference(
                    f"transfer_policy_id {new.transfer_policy_id} does not exist",
                    code="unknown_transfer_policy",
                ) from None
            raise Conflict(f"a key with id {key_id} already exists", code="key_exists") from None
        except BaseException:
            self._undo_new(store, key_id, kmip_key_id)
            raise
        return _record(row)

    def _adopted(self, backend: str, object_id: str) -> bool:
        with self._db.transaction() as session:
            query = select(KeyRow.id).where(KeyRow.backend == backend, KeyRow.kmip_key_id == object_id).limit(1)
            return session.scalars(query).first() is not None

    def _undo_new(self, store: KeyStore, key_id: KeyId, kmip_key_id: str | None) -> None:
        if kmip_key_id is None:
            self._outbox.abandon(store, key_id)
        else:
            self._outbox.release_own(key_id, "create")  # a registered object is not ours to destroy

    def get(self, key_id: str) -> KeyRecord:
        if canonical_uuid(key_id) is None:
            raise key_not_found(key_id)
        with self._db.transaction() as session:
            row = session.get(KeyRow, key_id)
            if row is None:
                raise key_not_found(key_id)
            return _record(row)

    def list(self, key_filter: KeyFilter, page: Page) -> tuple[list[KeyRecord], str | None]:
        query = select(KeyRow)
        if key_filter.algorithm is not None:
            query = query.where(KeyRow.algorithm == key_filter.algorithm.value)
        if key_filter.key_length is not None:
            query = query.where(KeyRow.key_length == key_filter.key_length)
        if key_filter.curve is not None:
            query = query.where(KeyRow.curve_type == key_filter.curve.value)
        if key_filter.transfer_policy_id is not None:
            query = query.where(KeyRow.transfer_policy_id == key_filter.transfer_policy_id)
        query = page.apply(query, KeyRow.created_at, KeyRow.id)
        with self._db.transaction() as session:
            rows, cursor = page.cut(list(session.scalars(query)))
        return [_record(row) for row in rows], cursor

    def set_policy(self, key_id: str, policy_id: PolicyId, audit: AuditContext) -> KeyRecord:
        if canonical_uuid(key_id) is None:
            raise key_not_found(key_id)
        try:
            with self._db.transaction(write=True) as session:
                revision.bump(session)
                row = session.get(KeyRow, key_id, with_for_update=True)
                if row is None:
                    raise key_not_found(key_id)
                if not self._policies.exists(policy_id):
                    raise UnknownReference(
                        f"transfer_policy_id {policy_id} does not exist", code="unknown_transfer_policy"
                    )
                before = row.transfer_policy_id
                row.transfer_policy_id = policy_id
                session.flush()
                self._audit.append(
                    session,
                    audit,
                    AuditEvent("key.update", "success", key_id, {"transfer_policy_id": [before, policy_id]}),
                )
                return _record(row)
        except IntegrityError:
            raise UnknownReference(
                f"transfer_policy_id {policy_id} does not exist", code="unknown_transfer_policy"
            ) from None

    def load_material(self, record: KeyRecord) -> KeyMaterial:
        """The key bytes, from the backend that holds them. Callers must have decided to release them."""
        return self._store_of(record).get(record.id, record.backend_ref, record.spec)

    def _store_of(self, record: KeyRecord) -> KeyStore:
        """The backend holding ``record``; 503 ``backend_not_configured`` when the configuration no longer names it
        (the key is intact: configuring the backend again makes it available)."""
        store = self._stores.get(record.backend)
        if store is None:
            raise BackendUnavailable(
                f"key {record.id} lives in backend {record.backend!r}, which is not configured",
                code="backend_not_configured",
            )
        return store

    def delete(self, key_id: str, audit: AuditContext) -> None:
        """Delete the record (with its audit entry and an outbox row), then the backend material.

        The record goes first so that a failed audit write leaves the key fully intact. Once that transaction has
        committed the key is deleted, and the answer says so (204) whatever the backend does next: if it cannot
        delete the material now, the outbox row makes ``reconcile`` finish it once the backend is back (logged as
        ``key_material_delete_queued``). One request, one audit entry.
        """
        record = self.get(key_id)
        store = self._store_of(record)
        registered = record.kmip_key_id is not None
        with self._db.transaction(write=True) as session:
            revision.bump(session)
            row = session.get(KeyRow, key_id, with_for_update=True)
            if row is None:
                raise key_not_found(key_id)
            session.delete(row)
            session.flush()
            if not registered:
                self._outbox.add_pending_delete(session, record)
            self._audit.append(session, audit, AuditEvent("key.delete", "success", key_id, {"backend": record.backend}))
        if registered:
            return  # registered objects belong to the KMIP server's owner; keybroker only forgets them
        try:
            store.delete(record.backend_ref)
            store.purge(record.id)  # also a duplicate a retried write may have left under the key's name (KMIP)
        except Exception as exc:  # the key is deleted; its material follows through the outbox
            log.warning(
                "key_material_delete_queued",
                key_id=key_id,
                backend=record.backend,
                error_type=type(exc).__name__,
                code=getattr(exc, "instance_code", None),
            )
            return
        self._outbox.release_own(record.id, "delete")

    def pending(self) -> Sequence[PendingMaterialRow]:
        """The outbox (for ``keybroker backends reconcile`` and tests)."""
        return self._outbox.pending()

    def reconcile(self, older_than: timedelta = timedelta(minutes=10)) -> ReconcileResult:
        """Finish the outbox rows older than ``older_than`` in the configured backends (``Outbox.reconcile``)."""
        return self._outbox.reconcile(self._stores, older_than)
