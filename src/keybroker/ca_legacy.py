"""The CAs of a data directory from before 0008, when their private keys were files: ``ca-key.pem`` and
``workload-ca-key.pem``, encrypted under a passphrase that ``tls-passphrase.wrapped`` keeps wrapped by the KEK.

``keybroker init`` imports them into the database once (``read``). From then on the files are only a danger: with
the data directory and the KEK anyone could read the CA's private key from them, even after ``keybroker ca retire``
or a KEK rotation (which never moves them). So they are removed (``remove``) as soon as the database holds the CA
and its key opens there: by that ``init``, else by the next start of anything that opens the deployment (``serve``
and the local commands, ``ca.forget_legacy_files``) or by ``keybroker kek rotate`` before it begins.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.backends.base import KeyWrapper
from keybroker.errors import ConfigurationError

PASSPHRASE_FILE = "tls-passphrase.wrapped"  # noqa: S105 - a file name
KEY_FILES = {"service": "ca-key.pem", "workload": "workload-ca-key.pem"}
_CONTEXT = b"keybroker/tls-passphrase/v1"


@dataclass(frozen=True, slots=True)
class Leftovers:
    """The legacy files of a data directory: which there are, and the KEK the passphrase record names."""

    files: tuple[Path, ...]
    key_files: int
    kek_id: str | None


def _record(data_dir: Path) -> dict[str, object] | None:
    try:
        record = json.loads((data_dir / PASSPHRASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def passphrase_kek(data_dir: Path) -> str | None:
    """The KEK that wraps the legacy passphrase (what a data directory from before 0008 was initialised with)."""
    record = _record(data_dir)
    kek_id = record.get("kek_id") if record is not None else None
    return kek_id if isinstance(kek_id, str) else None


def leftovers(data_dir: Path) -> Leftovers | None:
    """The legacy files in ``data_dir``, None if there are none."""
    keys = [data_dir / name for name in KEY_FILES.values() if (data_dir / name).is_file()]
    found = [*keys, *([data_dir / PASSPHRASE_FILE] if (data_dir / PASSPHRASE_FILE).is_file() else [])]
    return Leftovers(tuple(found), len(keys), passphrase_kek(data_dir)) if found else None


def read(
    data_dir: Path, name: str, cert_file: str, wrapper: KeyWrapper
) -> tuple[bytes, ec.EllipticCurvePrivateKey] | None:
    """The CA ``name`` of a data directory from before 0008 (its certificate and decrypted key), if it has one."""
    cert_path, key_path, record = data_dir / cert_file, data_dir / KEY_FILES[name], _record(data_dir)
    if not (cert_path.is_file() and key_path.is_file()) or record is None:
        return None
    try:
        wrapped = base64.b64decode(str(record["wrapped"]), validate=True)
        passphrase = wrapper.unwrap(wrapped, _CONTEXT, str(record["kek_id"]))
    except (KeyError, binascii.Error):
        raise ConfigurationError(f"{data_dir / PASSPHRASE_FILE} is not a passphrase record") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase)
    except (ValueError, TypeError):
        raise ConfigurationError(f"{key_path} does not open with the passphrase of {PASSPHRASE_FILE}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{key_path} does not hold an EC key")
    return cert_path.read_bytes(), key


def remove(data_dir: Path, imported: Collection[str]) -> tuple[Path, ...]:
    """Remove the key file of each CA in ``imported`` (those the database holds, their keys opening there), then
    the passphrase record once no key file is left and the service CA is imported (until then the deployment's
    KEK is read from it: ``ca.recorded_kek_id``). The directory is synced. Returns what was removed."""
    removed = []
    for name in imported:
        path = data_dir / KEY_FILES[name]
        if path.is_file():
            path.unlink()
            removed.append(path)
    record = data_dir / PASSPHRASE_FILE
    no_keys = not any((data_dir / name).exists() for name in KEY_FILES.values())
    if "service" in imported and no_keys and record.is_file():
        record.unlink()
        removed.append(record)
    if removed:
        directory = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return tuple(removed)
