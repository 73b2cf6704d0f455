"""A ``KeyWrapper`` whose KEK is a 32-byte master key from a file (mode 0600) or the environment.

Anyone who can read the master key and the database can read every key: keep the data directory on an
encrypted disk, or hold the KEK in Vault Transit (``backends/transit.py``) or an HSM (``backends/pkcs11.py``) instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from keybroker.crypto.aead import SealError, open_sealed, seal
from keybroker.errors import ConfigurationError, StoredKeyCorrupt

MASTER_KEY_BYTES = 32


class LocalKeyWrapper:
    name = "local"

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        self._key = master_key
        # A public, non-secret identifier of the KEK: lets a rotated deployment tell which KEK wrapped what.
        self._kek_id = "local:" + hashlib.sha256(b"keybroker kek id\0" + master_key).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"LocalKeyWrapper(kek_id={self._kek_id!r})"

    @classmethod
    def from_file(cls, path: Path) -> LocalKeyWrapper:
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError(f"master key file {path} does not exist; run 'keybroker init'") from None
        except ValueError:  # "embedded null byte": no file can have that name
            raise ConfigurationError(f"the master key file name {str(path)!r} holds a NUL byte") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(f"master key file {path} is readable by others; chmod 600 it")
        return cls(data)

    @classmethod
    def from_base64(cls, value: str) -> LocalKeyWrapper:
        try:
            return cls(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise ConfigurationError("the master key from the environment is not valid base64") from None

    @staticmethod
    def create_file(path: Path) -> str:
        """Write a fresh random master key with mode 0600 (never overwrites), make it durable (the file and its
        directory entry synced: a KEK that a power loss could take away must not wrap anything), read it back and
        check it. Returns its KEK id. On any failure the file is removed again (nothing was wrapped by it yet)."""
        key = os.urandom(MASTER_KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(key)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            expected = LocalKeyWrapper(key).kek_id
            try:
                found = LocalKeyWrapper.from_file(path).kek_id
            except ConfigurationError:
                found = None
            if found != expected:
                raise ConfigurationError(
                    f"the new master key file {path} does not read back as written (a full or failing disk?); it was "
                    "removed, nothing was wrapped by it"
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return expected

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        return seal(self._key, data_key, context)

    def prepare(self) -> None:
        """The master key file is created by ``keybroker init`` itself (``create_file``)."""

    def check(self) -> None:
        """A key in memory is always usable."""

    def close(self) -> None:
        """Nothing to release."""

    def unwrap(self, wrapped: bytes, context: bytes, kek_id: str) -> bytes:
        if kek_id != self._kek_id:
            raise StoredKeyCorrupt(f"the data key was wrapped by KEK {kek_id}, not by the configured {self._kek_id}")
        try:
            return open_sealed(self._key, wrapped, context)
        except SealError:
            raise StoredKeyCorrupt("a wrapped data key failed authentication") from None
