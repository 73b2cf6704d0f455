"""The KeyStore contract, run against every backend started for real (conftest.BACKENDS): embedded, OpenBao KV v1
and v2, embedded + Transit KEK, embedded + PKCS#11 KEK (SoftHSM2), and KMIP (PyKMIP server)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.audit.log import SYSTEM
from keybroker.backends.base import Capability, GeneratingKeyStore, KeyStore, RegisteringKeyStore
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.errors import BackendUnsupported, KeybrokerError, NotFound, StoredKeyCorrupt
from keybroker.ids import KeyId, PolicyId
from keybroker.keys.models import Algorithm, Curve, KeyMaterial, KeySpec
from keybroker.keys.service import NewKey
from keybroker.policy.model import TransferPolicyDocument
from keybroker.services import Services, build_services, initialise
from tests.conftest import NOW, sgx_policy

UNDER_TEST = "under-test"
NO_PASSWORD = serialization.NoEncryption()


@cache
def _rsa(bits: int) -> bytes:
    key = rsa.generate_private_key(65537, bits)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ec(curve: Curve) -> bytes:
    classes = {Curve.P256: ec.SECP256R1, Curve.P384: ec.SECP384R1, Curve.P521: ec.SECP521R1}
    key = ec.generate_private_key(classes[curve]())
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


SPECS: dict[str, KeySpec] = {
    "AES-128": KeySpec(Algorithm.AES, 128),
    "AES-192": KeySpec(Algorithm.AES, 192),
    "AES-256": KeySpec(Algorithm.AES, 256),
    "RSA-2048": KeySpec(Algorithm.RSA, 2048),
    "RSA-3072": KeySpec(Algorithm.RSA, 3072),
    "EC-P256": KeySpec(Algorithm.EC, 256, Curve.P256),
    "EC-P384": KeySpec(Algorithm.EC, 384, Curve.P384),
    "EC-P521": KeySpec(Algorithm.EC, 521, Curve.P521),
}


def material(spec: KeySpec) -> KeyMaterial:
    if spec.algorithm is Algorithm.AES:
        return KeyMaterial(spec, os.urandom(spec.key_length // 8))
    if spec.algorithm is Algorithm.RSA:
        return KeyMaterial(spec, _rsa(spec.key_length))
    assert spec.curve is not None
    return KeyMaterial(spec, _ec(spec.curve))


def new_id() -> KeyId:
    return KeyId(str(uuid.uuid4()))


@pytest.fixture
def services(
    tmp_path: Path, backend_config: dict[str, Any], database_settings: Callable[[Path], dict[str, Any]]
) -> Iterator[Services]:
    """The store under test inside a whole deployment, on SQLite and on PostgreSQL (``database_kind``)."""
    backends = {"backends": {"embedded": {}, UNDER_TEST: backend_config}, "keys": {"default_backend": UNDER_TEST}}
    settings = load_settings(data_dir=tmp_path / "data", overrides={**backends, **database_settings(tmp_path / "data")})
    clock = FixedClock(NOW)
    initialise(settings, clock)
    built = build_services(settings, clock)
    yield built
    built.close()


@pytest.fixture
def store(services: Services) -> KeyStore:
    return services.keys.backends[UNDER_TEST]


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_round_trip_of_each_key_type(store: KeyStore, spec_name: str) -> None:
    spec = SPECS[spec_name]
    assert store.supports(spec)  # every backend here holds every key type keybroker has (capability honesty)
    key_id, stored = new_id(), material(spec)
    ref = store.put(key_id, stored)
    got = store.get(key_id, ref, spec)
    assert got.secret == stored.secret
    assert got.spec == spec


def test_delete_then_get_is_not_found_and_delete_is_idempotent(store: KeyStore) -> None:
    spec = SPECS["AES-256"]
    key_id = new_id()
    ref = store.put(key_id, material(spec))
    store.delete(ref)
    with pytest.raises(NotFound):
        store.get(key_id, ref, spec)
    store.delete(ref)  # already gone: not an error


def test_purge_removes_what_was_stored_for_a_key_id(store: KeyStore) -> None:
    spec = SPECS["AES-256"]
    key_id = new_id()
    ref = store.put(key_id, material(spec))
    store.purge(key_id)
    with pytest.raises(NotFound):
        store.get(key_id, ref, spec)
    store.purge(key_id)
    store.purge(new_id())  # never stored: not an error


def test_material_is_bound_to_its_key_id_and_spec(store: KeyStore) -> None:
    spec = SPECS["AES-256"]
    key_id = new_id()
    ref = store.put(key_id, material(spec))
    with pytest.raises((StoredKeyCorrupt, NotFound)):
        store.get(new_id(), ref, spec)  # a record of another key pointed at this material
    with pytest.raises((StoredKeyCorrupt, NotFound)):
        store.get(key_id, ref, SPECS["AES-128"])


def test_put_never_overwrites(store: KeyStore) -> None:
    spec = SPECS["AES-256"]
    key_id = new_id()
    first = material(spec)
    ref = store.put(key_id, first)
    outcome = ""
    try:
        second_ref = store.put(key_id, material(spec))
    except KeybrokerError as exc:
        outcome = exc.instance_code
    else:
        outcome = "kept both" if second_ref != ref else "overwritten"  # distinct refs are fine
    assert outcome in {"key_exists", "kept both"}
    assert store.get(key_id, ref, spec).secret == first.secret


def test_concurrent_creates(store: KeyStore) -> None:
    spec = SPECS["AES-256"]
    results: list[tuple[KeyId, Any, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(4):
                key_id, stored = new_id(), material(spec)
                ref = store.put(key_id, stored)
                with lock:
                    results.append((key_id, ref, stored.secret))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({ref for _, ref, _ in results}) == 32
    for key_id, ref, secret in results:
        assert store.get(key_id, ref, spec).secret == secret


def test_capabilities_are_honest(services: Services, store: KeyStore) -> None:
    registering = Capability.REGISTER_EXISTING in store.capabilities
    assert registering == isinstance(store, RegisteringKeyStore)
    assert (Capability.GENERATE in store.capabilities) == isinstance(store, GeneratingKeyStore)
    policy = services.policies.create(TransferPolicyDocument.model_validate(sgx_policy()), SYSTEM)
    new = NewKey(SPECS["AES-256"], PolicyId(policy.id), kmip_key_id="1")
    if registering:
        services.keys.check_new(new)  # accepted up to the backend's own look at the object
    else:
        with pytest.raises(BackendUnsupported):
            services.keys.check_new(new)


def test_check_passes_and_repr_shows_no_secret(
    store: KeyStore, backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.check()
    shown = repr(store) + str(store)
    assert "root" not in shown  # the OpenBao token (ROOT_TOKEN)
    if backend_name == "embedded-pkcs11":
        assert os.environ["KB_TEST_HSM_PIN"] not in shown
    assert "secret" not in shown.lower()
