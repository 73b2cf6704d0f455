"""The ``KeyStore`` on Vault / OpenBao's KV engine (v1 as in the Intel guide, or v2).

Layout: one secret per key at ``<mount>/<path_prefix><key id>`` (the guide mounts KV v1 at ``keybroker``), holding
``{"key_id", "algorithm", "key_length", "curve_type", "material"}`` with the material base64-encoded. ``get``
checks that the secret names the key id and spec it is read for, so a record pointed at another key's path does
not yield that key. Writes never overwrite: KV v2 uses check-and-set 0, KV v1 refuses a path that exists.

A write is idempotent by path: a path that already holds exactly the secret being written counts as written, not
as a conflict. That is what a write sent again after a failover finds when its first try was stored but its answer
was lost (a leader killed after committing, a connection reset); anything else at the path stays a ``Conflict``.
The existing secret is read in the same operation, from the active node (``VaultSession``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import hvac
import hvac.exceptions

from keybroker.backends.base import Capability
from keybroker.backends.vault.failures import nothing_stored
from keybroker.backends.vault.session import VaultSession
from keybroker.clock import Clock
from keybroker.config import SecretReader, VaultBackendSettings
from keybroker.errors import Conflict, NotFound, StoredKeyCorrupt
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import Algorithm, KeyMaterial, KeySpec


class VaultKvStore:
    """Key material in a KV v1 or v2 engine (module docstring)."""

    capabilities = frozenset({Capability.STORE})

    def __init__(self, name: str, session: VaultSession, mount: str, kv_version: int, path_prefix: str) -> None:
        self.name = name
        self._session = session
        self._mount = mount.strip("/")
        self._version = kv_version
        self._prefix = path_prefix.lstrip("/")

    @classmethod
    def from_settings(
        cls, name: str, secrets: SecretReader, config: VaultBackendSettings, clock: Clock
    ) -> VaultKvStore:
        return cls(name, VaultSession(secrets, config, clock), config.mount, config.kv_version, config.path_prefix)

    def __repr__(self) -> str:
        return f"VaultKvStore(name={self.name!r}, url={self._session.url!r}, mount={self._mount!r}, v{self._version})"

    def _path(self, key_id: str) -> str:
        return f"{self._prefix}{key_id}"

    def _where(self, verb: str, path: str) -> str:
        return f"{verb} on {self._mount}/{path}"

    def supports(self, spec: KeySpec) -> bool:
        return True

    def put(self, key_id: KeyId, material: KeyMaterial) -> BackendRef:
        path = self._path(key_id)
        spec = material.spec
        secret = {
            "key_id": key_id,
            "algorithm": spec.algorithm.value,
            "key_length": spec.key_length,
            "curve_type": spec.curve.value if spec.curve else None,
            "material": base64.b64encode(material.secret).decode("ascii"),
        }
        occupied = Conflict(f"{self._mount}/{path} already holds a secret", code="key_exists")
        if self._version == 2:

            def write_v2(client: hvac.Client) -> None:
                try:
                    client.secrets.kv.v2.create_or_update_secret(path, secret, cas=0, mount_point=self._mount)
                except hvac.exceptions.InvalidRequest as exc:
                    if "check-and-set" not in str(exc):
                        raise
                    # Something is there (a deleted version too: it reads as nothing, and is not this secret).
                    if self._stored(client, path) != secret:
                        raise occupied from None

            self._session.call(self._where("create", path), write_v2)
        else:
            existing = self._read(path)
            if existing == secret:
                return BackendRef(path)
            if existing is not None:
                raise occupied
            self._session.call(
                self._where("create", path),
                lambda client: client.secrets.kv.v1.create_or_update_secret(path, secret, mount_point=self._mount),
            )
        return BackendRef(path)

    def _stored(self, client: hvac.Client, path: str) -> dict[str, Any] | None:
        try:
            if self._version == 2:
                result = client.secrets.kv.v2.read_secret_version(
                    path, mount_point=self._mount, raise_on_deleted_version=True
                )
                return dict(result["data"]["data"])
            return dict(client.secrets.kv.v1.read_secret(path, mount_point=self._mount)["data"])
        except hvac.exceptions.InvalidPath as exc:
            if nothing_stored(exc):
                return None
            raise

    def _read(self, path: str) -> dict[str, Any] | None:
        return self._session.call(self._where("read", path), lambda client: self._stored(client, path))

    def get(self, key_id: KeyId, ref: BackendRef, spec: KeySpec) -> KeyMaterial:
        data = self._read(ref)
        if data is None:
            raise NotFound(f"the key material is not in Vault at {self._mount}/{ref}", code="key_material_missing")
        stored_curve = data.get("curve_type")
        stored = (data.get("key_id"), data.get("algorithm"), data.get("key_length"), stored_curve)
        expected = (key_id, spec.algorithm.value, spec.key_length, spec.curve.value if spec.curve else None)
        if stored != expected:
            raise StoredKeyCorrupt(f"the secret at {self._mount}/{ref} belongs to another key or spec")
        try:
            secret = base64.b64decode(str(data.get("material", "")), validate=True)
        except (binascii.Error, ValueError):
            raise StoredKeyCorrupt(f"the secret at {self._mount}/{ref} is not valid base64") from None
        if spec.algorithm is Algorithm.AES and len(secret) * 8 != spec.key_length:
            raise StoredKeyCorrupt(f"the secret at {self._mount}/{ref} has the wrong length")
        return KeyMaterial(spec, secret)

    def delete(self, ref: BackendRef) -> None:
        def remove(client: hvac.Client) -> None:
            try:
                if self._version == 2:
                    client.secrets.kv.v2.delete_metadata_and_all_versions(ref, mount_point=self._mount)
                else:
                    client.secrets.kv.v1.delete_secret(ref, mount_point=self._mount)
            except hvac.exceptions.InvalidPath as exc:
                if not nothing_stored(exc):
                    raise

        self._session.call(self._where("delete", ref), remove)

    def purge(self, key_id: KeyId) -> None:
        self.delete(BackendRef(self._path(key_id)))

    def check(self) -> None:
        self._session.health()

    def renew_if_due(self) -> float | None:
        """``VaultSession.renew_if_due``, for the server's background task."""
        return self._session.renew_if_due()

    def close(self) -> None:
        self._session.close()
