"""The two backend Protocols.

``KeyStore``: where key material lives (embedded database, Vault/OpenBao KV, KMIP). ``KeyWrapper``: who holds a
key-encryption key and only wraps/unwraps data keys (a local master key, Vault Transit, a PKCS#11 token). The
embedded store is a ``KeyStore`` composed with a ``KeyWrapper``.

The service owns the key record (id, spec, policy, ``backend``, ``backend_ref``); reads and deletes always go to
the backend recorded on the key. Backends translate their vendor exceptions into ``keybroker.errors``:
``NotFound`` for a missing object, ``BackendUnavailable`` when the KMS cannot be reached. Implementations must be
safe to call from several threads at once.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

from keybroker.keys.models import BackendRef, KeyId, KeyMaterial, KeySpec


class Capability(enum.StrEnum):
    STORE = "store"  # put/get/delete/purge of key material (every KeyStore)
    REGISTER_EXISTING = "register_existing"  # adopt an object that already exists (KMIP ``kmip_key_id``)


class KeyStore(Protocol):
    name: str
    capabilities: frozenset[Capability]

    def supports(self, spec: KeySpec) -> bool:
        """Whether ``put`` can store keys of ``spec`` (checked before a key is generated)."""
        ...

    def put(self, key_id: KeyId, material: KeyMaterial) -> BackendRef:
        """Store ``material`` for ``key_id`` and return the backend's handle for it. Never overwrites: material
        already stored for ``key_id`` is a ``Conflict``."""
        ...

    def get(self, key_id: KeyId, ref: BackendRef, spec: KeySpec) -> KeyMaterial:
        """Return the material of key ``key_id`` stored under ``ref``. Raises ``NotFound`` if it is gone.

        Stores that can must bind the material to ``key_id`` (an authenticated context), so that a key record
        pointed at another key's ``ref`` does not yield that other key's material."""
        ...

    def delete(self, ref: BackendRef) -> None:
        """Remove the material under ``ref``. Deleting something already gone is not an error."""
        ...

    def purge(self, key_id: KeyId) -> None:
        """Remove any material stored for ``key_id``, whatever its ref (crash recovery: a put whose record was
        never written). Idempotent; raises ``BackendUnavailable`` if the backend cannot be reached."""
        ...

    def check(self) -> None:
        """Raise ``BackendUnavailable`` if the backend cannot serve requests now (readiness)."""
        ...

    def close(self) -> None:
        """Release connections and sessions (idempotent)."""
        ...


@runtime_checkable
class RegisteringKeyStore(KeyStore, Protocol):
    """A store with ``Capability.REGISTER_EXISTING``: adopts an object created outside keybroker."""

    def register_existing(self, key_id: KeyId, object_id: str, spec: KeySpec) -> BackendRef:
        """Check that ``object_id`` exists, holds a key matching ``spec`` and can be read; return its ref. Raises
        ``UnknownReference`` (code ``kmip_object_not_found``) or ``InvalidKeyMaterial`` when it does not match."""
        ...


class KeyWrapper(Protocol):
    name: str

    @property
    def kek_id(self) -> str:
        """Identifies the KEK that ``wrap`` uses now (recorded beside each wrapped data key)."""
        ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Encrypt ``data_key``, authenticating ``context`` (it must be given again to unwrap)."""
        ...

    def unwrap(self, wrapped: bytes, context: bytes, kek_id: str) -> bytes:
        """Reverse ``wrap``. Raises ``BackendUnavailable`` if the KEK is unreachable, ``StoredKeyCorrupt`` if the
        blob or context was tampered with."""
        ...

    def prepare(self) -> None:
        """At ``keybroker init``: create the KEK if the holder has none yet (never replaces one)."""
        ...

    def check(self) -> None:
        """Raise ``BackendUnavailable`` if the KEK cannot be used now (readiness)."""
        ...

    def close(self) -> None:
        """Release sessions and connections (idempotent)."""
        ...
