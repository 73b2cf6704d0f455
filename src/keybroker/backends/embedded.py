"""The embedded ``KeyStore``: key material in keybroker's own database, envelope-encrypted.

Each key gets a fresh 256-bit data key (DEK). The material is sealed with AES-256-GCM under the DEK, the DEK is
wrapped by the ``KeyWrapper`` (the KEK holder). Both layers authenticate the key id, the row's reference and the
key type as context, so a ciphertext moved to another row, or a key record pointed at another key's row, does not
open.
"""

from __future__ import annotations

import os
import uuid

from sqlalchemy import delete, select

from keybroker.backends.base import Capability, KeyWrapper
from keybroker.clock import Clock
from keybroker.crypto.aead import SealError, open_sealed, seal
from keybroker.errors import NotFound, StoredKeyCorrupt
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import KeyMaterial, KeySpec
from keybroker.storage.db import Database
from keybroker.storage.direct import Statement
from keybroker.storage.tables import EmbeddedMaterialRow

_MATERIAL = Statement("SELECT kek_id, wrapped_dek, ciphertext FROM embedded_key_material WHERE ref = :ref")


def _context(key_id: str, ref: str, spec: KeySpec) -> bytes:
    return f"keybroker/embedded/v1\0{key_id}\0{ref}\0{spec.describe()}".encode()


class EmbeddedKeyStore:
    capabilities = frozenset({Capability.STORE})

    def __init__(self, name: str, database: Database, wrapper: KeyWrapper, clock: Clock) -> None:
        self.name = name
        self._db = database
        self._wrapper = wrapper
        self._clock = clock

    def __repr__(self) -> str:
        return f"EmbeddedKeyStore(name={self.name!r}, wrapper={self._wrapper!r})"

    def supports(self, spec: KeySpec) -> bool:
        return True

    def put(self, key_id: KeyId, material: KeyMaterial) -> BackendRef:
        ref = str(uuid.uuid4())
        context = _context(key_id, ref, material.spec)
        dek = os.urandom(32)
        row = EmbeddedMaterialRow(
            ref=ref,
            key_id=key_id,
            backend=self.name,
            kek_id=self._wrapper.kek_id,
            wrapped_dek=self._wrapper.wrap(dek, context),
            ciphertext=seal(dek, material.secret, context),
            created_at=self._clock.now(),
        )
        with self._db.transaction(write=True) as session:
            session.add(row)
        return BackendRef(ref)

    def get(self, key_id: KeyId, ref: BackendRef, spec: KeySpec) -> KeyMaterial:
        rows = self._db.direct.fetch(_MATERIAL, {"ref": ref})  # on every transfer: one round trip, on the driver
        if not rows:
            raise NotFound("the key material is not in the embedded store", code="key_material_missing")
        kek_id, wrapped_dek, ciphertext = str(rows[0][0]), bytes(rows[0][1]), bytes(rows[0][2])
        context = _context(key_id, ref, spec)
        dek = self._wrapper.unwrap(wrapped_dek, context, kek_id)
        try:
            return KeyMaterial(spec, open_sealed(dek, ciphertext, context))
        except SealError:
            raise StoredKeyCorrupt("stored key material failed authentication") from None

    def delete(self, ref: BackendRef) -> None:
        with self._db.transaction(write=True) as session:
            row = session.get(EmbeddedMaterialRow, ref)
            if row is not None:
                session.delete(row)

    def purge(self, key_id: KeyId) -> None:
        with self._db.transaction(write=True) as session:
            session.execute(
                delete(EmbeddedMaterialRow).where(
                    EmbeddedMaterialRow.key_id == key_id,
                    (EmbeddedMaterialRow.backend == self.name) | (EmbeddedMaterialRow.backend.is_(None)),
                )
            )

    def check(self) -> None:
        self._db.ping()
        self._wrapper.check()

    def close(self) -> None:
        """The database and the wrapper belong to the caller."""

    def kek_ids(self) -> set[str]:
        """The KEKs that wrapped the stored data keys (to refuse starting with the wrong master key)."""
        mine = (EmbeddedMaterialRow.backend == self.name) | (EmbeddedMaterialRow.backend.is_(None))
        with self._db.transaction() as session:
            return set(session.scalars(select(EmbeddedMaterialRow.kek_id).where(mine).distinct()))

    @property
    def wrapper(self) -> KeyWrapper:
        return self._wrapper
