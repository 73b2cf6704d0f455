"""A ``KeyWrapper`` whose KEK lives in Vault / OpenBao Transit: no master key exists on the keybroker host.

Each data key is sent to ``<mount>/encrypt/<key_name>`` with the wrap context as AES-GCM associated data, so a
wrapped data key moved to another key's row does not decrypt. Transit versions its key: rotating it in Vault
(``transit/keys/<name>/rotate``) needs nothing here; old ciphertexts keep decrypting while Vault allows their
version. ``prepare`` (``keybroker init``) creates the key as ``aes256-gcm96``, not exportable, if it is missing.
"""

from __future__ import annotations

import base64

import hvac
import hvac.exceptions

from keybroker.backends.vault.failures import nothing_stored
from keybroker.backends.vault.session import VaultSession
from keybroker.clock import Clock
from keybroker.config import SecretReader, TransitWrapperSettings
from keybroker.errors import BackendUnavailable, StoredKeyCorrupt


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class TransitKeyWrapper:
    name = "vault-transit"

    def __init__(self, session: VaultSession, mount: str, key_name: str) -> None:
        self._session = session
        self._mount = mount.strip("/")
        self._key = key_name
        self._kek_id = f"transit:{self._mount}/{key_name}"

    @classmethod
    def from_settings(cls, secrets: SecretReader, config: TransitWrapperSettings, clock: Clock) -> TransitKeyWrapper:
        return cls(VaultSession(secrets, config, clock), config.mount, config.key_name)

    def __repr__(self) -> str:
        return f"TransitKeyWrapper(url={self._session.url!r}, kek_id={self._kek_id!r})"

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        result = self._session.call(
            f"update on {self._mount}/encrypt/{self._key}",
            lambda client: client.secrets.transit.encrypt_data(
                self._key, plaintext=_b64(data_key), associated_data=_b64(context), mount_point=self._mount
            ),
        )
        return str(result["data"]["ciphertext"]).encode("ascii")

    def unwrap(self, wrapped: bytes, context: bytes, kek_id: str) -> bytes:
        if kek_id != self._kek_id:
            raise StoredKeyCorrupt(f"the data key was wrapped by KEK {kek_id}, not by the configured {self._kek_id}")
        try:
            ciphertext = wrapped.decode("ascii")
        except UnicodeDecodeError:
            raise StoredKeyCorrupt("a wrapped data key is not a Transit ciphertext") from None
        if not ciphertext.startswith("vault:v"):
            raise StoredKeyCorrupt("a wrapped data key is not a Transit ciphertext")

        def decrypt(client: hvac.Client) -> bytes:
            try:
                result = client.secrets.transit.decrypt_data(
                    self._key, ciphertext=ciphertext, associated_data=_b64(context), mount_point=self._mount
                )
            except hvac.exceptions.InvalidRequest as exc:
                if any("encryption key not found" in str(error) for error in exc.errors or ()):
                    raise BackendUnavailable(
                        f"Transit key {self._key!r} does not exist at {self._mount}/ (check key_name and mount)",
                        code="backend_misconfigured",
                    ) from None
                # Vault answers 400 for a failed GCM tag, a malformed ciphertext and a version it no longer
                # allows (min_decryption_version): the stored blob cannot be opened under this KEK either way.
                raise StoredKeyCorrupt("Transit could not decrypt a wrapped data key") from None
            return base64.b64decode(result["data"]["plaintext"])

        return self._session.call(f"update on {self._mount}/decrypt/{self._key}", decrypt)

    def prepare(self) -> None:
        def ensure(client: hvac.Client) -> None:
            try:
                client.secrets.transit.read_key(self._key, mount_point=self._mount)
            except hvac.exceptions.InvalidPath as exc:
                if not nothing_stored(exc):
                    raise  # no Transit engine at that mount: VaultSession.call reports it
                client.secrets.transit.create_key(
                    self._key, key_type="aes256-gcm96", exportable=False, mount_point=self._mount
                )

        self._session.call(f"create on {self._mount}/keys/{self._key}", ensure)

    def check(self) -> None:
        self._session.health()
        # A real round trip through the key: proves the policy allows encrypt and decrypt and the key exists.
        probe = b"\0" * 32
        if self.unwrap(self.wrap(probe, b"keybroker/check"), b"keybroker/check", self._kek_id) != probe:
            raise BackendUnavailable(f"Transit key {self._kek_id} did not round-trip")

    def renew_if_due(self) -> float | None:
        """``VaultSession.renew_if_due``, for the server's background task."""
        return self._session.renew_if_due()

    def close(self) -> None:
        self._session.close()
