"""The embedded store: envelope encryption, authenticated context, KEK checks, nothing readable at rest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import update

from keybroker.backends.embedded import EmbeddedKeyStore
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.clock import FixedClock
from keybroker.config import Settings
from keybroker.errors import ConfigurationError, NotFound, StoredKeyCorrupt
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import Algorithm, Curve, KeyMaterial, KeySpec
from keybroker.services import Services, build_services, initialise
from keybroker.storage.tables import EmbeddedMaterialRow

AES = KeySpec(Algorithm.AES, 256)


def _store(services: Services, master_key: bytes | None = None) -> EmbeddedKeyStore:
    return EmbeddedKeyStore("embedded", services.database, LocalKeyWrapper(master_key or b"k" * 32), services.clock)


def test_round_trip_and_idempotent_delete(services: Services) -> None:
    store = _store(services)
    material = KeyMaterial(AES, os.urandom(32))
    ref = store.put(KeyId("k1"), material)
    assert store.get(KeyId("k1"), ref, AES) == material
    store.delete(ref)
    store.delete(ref)
    with pytest.raises(NotFound):
        store.get(KeyId("k1"), ref, AES)


def test_a_different_kek_cannot_open_it(services: Services) -> None:
    ref = _store(services, b"a" * 32).put(KeyId("k1"), KeyMaterial(AES, os.urandom(32)))
    with pytest.raises(StoredKeyCorrupt, match="wrapped by KEK"):
        _store(services, b"b" * 32).get(KeyId("k1"), ref, AES)


def test_ciphertext_moved_to_another_row_does_not_open(services: Services) -> None:
    store = _store(services)
    first = store.put(KeyId("k1"), KeyMaterial(AES, b"1" * 32))
    second = store.put(KeyId("k2"), KeyMaterial(AES, b"2" * 32))
    with services.database.transaction() as session:
        row = session.get(EmbeddedMaterialRow, first)
        assert row is not None
        wrapped, ciphertext = row.wrapped_dek, row.ciphertext
        session.execute(
            update(EmbeddedMaterialRow)
            .where(EmbeddedMaterialRow.ref == second)
            .values(wrapped_dek=wrapped, ciphertext=ciphertext)
        )
    with pytest.raises(StoredKeyCorrupt):
        store.get(KeyId("k2"), BackendRef(second), AES)


@pytest.mark.parametrize("column", ["wrapped_dek", "ciphertext"])
def test_flipped_bit_is_detected(services: Services, column: str) -> None:
    store = _store(services)
    ref = store.put(KeyId("k1"), KeyMaterial(AES, b"1" * 32))
    with services.database.transaction() as session:
        row = session.get(EmbeddedMaterialRow, ref)
        assert row is not None
        value = bytearray(getattr(row, column))
        value[-1] ^= 1
        setattr(row, column, bytes(value))
    with pytest.raises(StoredKeyCorrupt):
        store.get(KeyId("k1"), ref, AES)


def test_material_is_bound_to_its_key_id(services: Services) -> None:
    store = _store(services)
    ref_a = store.put(KeyId("a"), KeyMaterial(AES, b"A" * 32))
    store.put(KeyId("b"), KeyMaterial(AES, b"B" * 32))
    # A key record for "b" pointed at "a"'s material (a database edit) must not yield "a"'s bytes.
    with pytest.raises(StoredKeyCorrupt):
        store.get(KeyId("b"), ref_a, AES)
    assert store.get(KeyId("a"), ref_a, AES).secret == b"A" * 32


def test_spec_is_authenticated_too(services: Services) -> None:
    store = _store(services)
    ref = store.put(KeyId("k1"), KeyMaterial(AES, b"1" * 32))
    with pytest.raises(StoredKeyCorrupt):
        store.get(KeyId("k1"), ref, KeySpec(Algorithm.EC, 256, Curve.P256))


def test_master_key_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    LocalKeyWrapper.create_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert LocalKeyWrapper.from_file(path).kek_id.startswith("local:")
    with pytest.raises(FileExistsError):
        LocalKeyWrapper.create_file(path)  # never overwrites a master key
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        LocalKeyWrapper.from_file(path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        LocalKeyWrapper.from_file(tmp_path / "absent")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(ConfigurationError, match="32 bytes"):
        LocalKeyWrapper.from_file(short)
    with pytest.raises(ConfigurationError, match="base64"):
        LocalKeyWrapper.from_base64("***")


def test_wrapper_repr_has_no_key() -> None:
    wrapper = LocalKeyWrapper(b"\x07" * 32)
    assert "\\x07" not in repr(wrapper)
    assert "kek_id" in repr(wrapper)


def test_store_uses_the_injected_clock(services: Services) -> None:
    clock = services.clock
    assert isinstance(clock, FixedClock)
    ref = _store(services).put(KeyId("k1"), KeyMaterial(AES, b"1" * 32))
    with services.database.transaction() as session:
        row = session.get(EmbeddedMaterialRow, ref)
        assert row is not None
        assert row.created_at == clock.now()


def test_init_never_replaces_a_lost_master_key(settings: Settings, services: Services) -> None:
    (settings.data_dir / "master.key").unlink()
    with pytest.raises(ConfigurationError, match=r"master key file .* is missing but the deployment exists already"):
        initialise(settings)
    assert not (settings.data_dir / "master.key").exists()


def test_the_service_refuses_to_start_with_another_master_key(settings: Settings, services: Services) -> None:
    _store_default = services.keys.backends["embedded"]
    _store_default.put(KeyId("k1"), KeyMaterial(AES, b"1" * 32))
    path = settings.data_dir / "master.key"
    path.unlink()
    LocalKeyWrapper.create_file(path)
    with pytest.raises(ConfigurationError, match="refusing to start with the wrong KEK"):
        build_services(settings)
