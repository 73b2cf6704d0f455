"""The CAs live in the database: processes (or replicas) creating one at the same moment end with one CA whose key
matches its certificate; a data directory of an earlier version is imported; another KEK is refused."""

from __future__ import annotations

import base64
import json
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.ca import PASSPHRASE_FILE, ServiceCA
from keybroker.errors import ConfigurationError
from keybroker.storage.db import Database

MASTER = b"m" * 32


def _database(directory: Path) -> Database:
    directory.mkdir(parents=True, exist_ok=True)
    return Database.from_url(f"sqlite:///{directory / 'keybroker.db'}")


def _create(directory: str, replica: str) -> None:
    database = _database(Path(directory))
    try:
        data = Path(directory) / replica
        ServiceCA.workload(database, LocalKeyWrapper(MASTER), data).create(datetime.now(UTC), "keybroker workload CA")
    finally:
        database.close()


def _matches(ca: ServiceCA) -> bool:
    cert, key = ca._load()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def test_concurrent_creation_leaves_one_consistent_ca(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for attempt in range(3):
        directory = tmp_path / f"data{attempt}"
        _database(directory).migrate()
        workers = [context.Process(target=_create, args=(str(directory), f"replica{i}")) for i in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        database = _database(directory)
        ca = ServiceCA.workload(database, LocalKeyWrapper(MASTER), directory / "replica0")
        assert _matches(ca)
        published = {(directory / f"replica{i}" / "workload-ca.pem").read_bytes() for i in range(4)}
        assert published == {ca.certificate_pem()}  # every replica published the one CA
        database.close()


def test_a_data_directory_of_an_earlier_version_is_imported(tmp_path: Path) -> None:
    """Before 0008 the CA key was a file, encrypted under a passphrase wrapped by the KEK."""
    wrapper = LocalKeyWrapper(MASTER)
    data = tmp_path / "data"
    data.mkdir()
    fresh = ServiceCA(_database(tmp_path / "scratch"), wrapper, tmp_path / "scratch")
    cert_pem, key = fresh._new(datetime.now(UTC), "old CA")
    passphrase = b"old-passphrase"
    record = {
        "kek_id": wrapper.kek_id,
        "wrapped": base64.b64encode(wrapper.wrap(passphrase, b"keybroker/tls-passphrase/v1")).decode(),
    }
    (data / PASSPHRASE_FILE).write_text(json.dumps(record))
    (data / "ca.pem").write_bytes(cert_pem)
    (data / "ca-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    database = _database(data)
    database.migrate()
    ca = ServiceCA(database, wrapper, data)
    ca.create(datetime.now(UTC), "a new CA would be wrong")
    assert ca.certificate_pem() == cert_pem
    assert x509.load_pem_x509_certificate(cert_pem).subject.rfc4514_string().endswith("CN=old CA")
    assert _matches(ca)
    database.close()


def test_another_kek_is_refused(tmp_path: Path) -> None:
    database = _database(tmp_path)
    database.migrate()
    ServiceCA(database, LocalKeyWrapper(MASTER), tmp_path).create(datetime.now(UTC), "CA")
    other = ServiceCA(database, LocalKeyWrapper(b"o" * 32), tmp_path)
    with pytest.raises(ConfigurationError, match="deployment's KEK"):
        other.check_kek()
    ServiceCA(database, LocalKeyWrapper(MASTER), tmp_path).check_kek()
    database.close()
