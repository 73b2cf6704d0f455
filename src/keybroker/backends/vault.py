"""HashiCorp Vault / OpenBao: a ``KeyStore`` on the KV engine (v1 as in the Intel guide, or v2), and the
authenticated session that the Transit ``KeyWrapper`` (``transit.py``) shares.

Layout: one secret per key at ``<mount>/<path_prefix><key id>`` (the guide mounts KV v1 at ``keybroker``), holding
``{"key_id", "algorithm", "key_length", "curve_type", "material"}`` with the material base64-encoded. ``get``
checks that the secret names the key id and spec it is read for, so a record pointed at another key's path does
not yield that key. Writes never overwrite: KV v2 uses check-and-set 0, KV v1 refuses a path that exists.

Failures: an unreachable, sealed or standby-only Vault is ``BackendUnavailable`` (503 ``backend_unavailable``);
a policy that denies a path is ``BackendUnavailable`` with code ``backend_misconfigured`` naming the path and the
capability, because the operator must fix Vault's policy, not the client its request.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from keybroker.backends.base import Capability
from keybroker.clock import Clock
from keybroker.config import Settings, VaultBackendSettings, VaultConnectionSettings
from keybroker.errors import BackendUnavailable, Conflict, NotFound, StoredKeyCorrupt
from keybroker.keys.models import Algorithm, BackendRef, KeyId, KeyMaterial, KeySpec

T = TypeVar("T")

# Renew the token once two thirds of its lifetime have passed; log in again (AppRole) if renewal fails.
_RENEW_AT = 2 / 3


class VaultSession:
    """An authenticated hvac client, renewed in time, safe from many threads (hvac's requests session is)."""

    def __init__(self, settings: Settings, config: VaultConnectionSettings, clock: Clock) -> None:
        self.url = config.url
        self._config = config
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        verify: str | bool = str(settings.resolve(config.ca_file)) if config.ca_file else True
        self._client = hvac.Client(
            url=config.url, verify=verify, timeout=config.timeout_seconds, namespace=config.namespace
        )
        self._renew_after: datetime | None = None  # None: the token does not expire
        self._logged_in = False
        # Credentials are read now, so that a missing token file stops the start; an unreachable or sealed Vault
        # does not: keybroker starts, reports the backend unavailable (/readyz, 503s) and logs in once it is back.
        self._credentials()
        with contextlib.suppress(BackendUnavailable):
            self._login()

    def __repr__(self) -> str:
        return f"VaultSession(url={self.url!r}, auth={self._config.auth.method!r})"

    def _credentials(self) -> str:
        auth = self._config.auth
        if auth.method == "token":
            assert auth.token is not None
            return self._settings.read_secret(auth.token, "Vault token")
        assert auth.secret_id is not None
        return self._settings.read_secret(auth.secret_id, "Vault AppRole secret id")

    def _ensure_login(self) -> None:
        if not self._logged_in:
            with self._lock:
                if not self._logged_in:
                    self._login()

    def _login(self) -> None:
        auth = self._config.auth
        try:
            if auth.method == "token":
                self._client.token = self._credentials()
                data = self._client.auth.token.lookup_self()["data"]
                ttl = int(data.get("ttl") or 0)
                renewable = bool(data.get("renewable"))
            else:
                assert auth.role_id is not None
                secret_id = self._credentials()
                result = self._client.auth.approle.login(
                    role_id=auth.role_id, secret_id=secret_id, mount_point=auth.approle_mount
                )
                ttl = int(result["auth"].get("lease_duration") or 0)
                renewable = bool(result["auth"].get("renewable"))
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized, hvac.exceptions.InvalidRequest):
            raise BackendUnavailable(
                f"Vault at {self.url} refused keybroker's {auth.method} login (check the credentials)",
                code="backend_misconfigured",
            ) from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise _unavailable(self.url, exc) from None
        self._schedule(ttl, renewable or auth.method == "approle")
        self._logged_in = True

    def _schedule(self, ttl: int, refreshable: bool) -> None:
        self._renew_after = self._clock.now() + timedelta(seconds=ttl * _RENEW_AT) if ttl and refreshable else None

    def _refresh_if_due(self) -> None:
        if self._renew_after is None or self._clock.now() < self._renew_after:
            return
        with self._lock:
            if self._renew_after is None or self._clock.now() < self._renew_after:
                return
            try:
                result = self._client.auth.token.renew_self()
                self._schedule(int(result["auth"].get("lease_duration") or 0), True)
            except (hvac.exceptions.VaultError, requests.RequestException):
                # Not renewable any more (max TTL reached) or expired: AppRole logs in again; a static token
                # cannot be refreshed and the next call reports Vault's refusal.
                if self._config.auth.method == "approle":
                    self._login()
                else:
                    self._renew_after = None

    def call(self, what: str, operation: Callable[[hvac.Client], T]) -> T:
        """Run ``operation`` with the authenticated client; ``what`` names the path for error messages. A
        refusal under AppRole triggers one fresh login and retry (the token may have been revoked)."""
        self._ensure_login()
        self._refresh_if_due()
        try:
            return operation(self._client)
        except hvac.exceptions.Forbidden:
            if self._config.auth.method != "approle":
                raise _forbidden(self.url, what) from None
        except (hvac.exceptions.VaultDown, hvac.exceptions.BadGateway, hvac.exceptions.InternalServerError) as exc:
            raise _unavailable(self.url, exc) from None
        except requests.RequestException as exc:
            raise _unavailable(self.url, exc) from None
        with self._lock:
            self._login()
        try:
            return operation(self._client)
        except hvac.exceptions.Forbidden:
            raise _forbidden(self.url, what) from None
        except (hvac.exceptions.VaultDown, hvac.exceptions.BadGateway, hvac.exceptions.InternalServerError) as exc:
            raise _unavailable(self.url, exc) from None
        except requests.RequestException as exc:
            raise _unavailable(self.url, exc) from None

    def health(self) -> None:
        """Raise ``BackendUnavailable`` unless Vault is initialised, unsealed and active (or a usable standby)."""
        try:
            response = self._client.adapter.get("/v1/sys/health", params={"standbyok": "true"}, raise_exception=False)
        except requests.RequestException as exc:
            raise _unavailable(self.url, exc) from None
        status = getattr(response, "status_code", 200)
        if status != 200:
            state = {501: "not initialised", 503: "sealed", 429: "a standby"}.get(status, f"status {status}")
            raise BackendUnavailable(f"Vault at {self.url} is {state}")
        self._ensure_login()
        self._refresh_if_due()

    def close(self) -> None:
        self._client.adapter.close()


def _unavailable(url: str, exc: BaseException) -> BackendUnavailable:
    if isinstance(exc, hvac.exceptions.VaultDown):
        return BackendUnavailable(f"Vault at {url} is sealed or down")
    if isinstance(exc, requests.Timeout):
        return BackendUnavailable(f"Vault at {url} did not answer in time")
    if isinstance(exc, requests.exceptions.SSLError):
        return BackendUnavailable(f"TLS with Vault at {url} failed (check ca_file)", code="backend_misconfigured")
    if isinstance(exc, requests.RequestException):
        return BackendUnavailable(f"Vault at {url} cannot be reached")
    return BackendUnavailable(f"Vault at {url} failed ({type(exc).__name__})")


def _forbidden(url: str, what: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"Vault at {url} denied keybroker {what}: grant it in keybroker's Vault policy",
        code="backend_misconfigured",
    )


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
    def from_settings(cls, name: str, settings: Settings, config: VaultBackendSettings, clock: Clock) -> VaultKvStore:
        return cls(name, VaultSession(settings, config, clock), config.mount, config.kv_version, config.path_prefix)

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
        if self._version == 2:

            def write_v2(client: hvac.Client) -> None:
                try:
                    client.secrets.kv.v2.create_or_update_secret(path, secret, cas=0, mount_point=self._mount)
                except hvac.exceptions.InvalidRequest as exc:
                    if "check-and-set" in str(exc):
                        raise Conflict(f"{self._mount}/{path} already holds a secret", code="key_exists") from None
                    raise

            self._session.call(self._where("create", path), write_v2)
        else:
            if self._read(path) is not None:
                raise Conflict(f"{self._mount}/{path} already holds a secret", code="key_exists")
            self._session.call(
                self._where("create", path),
                lambda client: client.secrets.kv.v1.create_or_update_secret(path, secret, mount_point=self._mount),
            )
        return BackendRef(path)

    def _read(self, path: str) -> dict[str, Any] | None:
        def read(client: hvac.Client) -> dict[str, Any] | None:
            try:
                if self._version == 2:
                    result = client.secrets.kv.v2.read_secret_version(
                        path, mount_point=self._mount, raise_on_deleted_version=True
                    )
                    return dict(result["data"]["data"])
                return dict(client.secrets.kv.v1.read_secret(path, mount_point=self._mount)["data"])
            except hvac.exceptions.InvalidPath:
                return None

        return self._session.call(self._where("read", path), read)

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
            except hvac.exceptions.InvalidPath:
                return

        self._session.call(self._where("delete", ref), remove)

    def purge(self, key_id: KeyId) -> None:
        self.delete(BackendRef(self._path(key_id)))

    def check(self) -> None:
        self._session.health()

    def close(self) -> None:
        self._session.close()
