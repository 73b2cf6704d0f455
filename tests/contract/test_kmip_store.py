"""``KmipKeyStore`` against the real PyKMIP server (``pykmip-server`` from the venv), over mutual TLS.

One server serves the module; the tests that take a server down start their own, so that the order of the tests
does not matter. Objects made "behind keybroker's back" are made with PyKMIP's own client.
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from keybroker.backends.base import Capability, GeneratingKeyStore, RegisteringKeyStore
from keybroker.backends.kmip import store as kmip_module
from keybroker.backends.kmip.store import KmipKeyStore
from keybroker.config import Settings
from keybroker.errors import (
    BackendUnavailable,
    BackendUnsupported,
    ConfigurationError,
    InvalidKeyMaterial,
    NotFound,
    StoredKeyCorrupt,
    UnknownReference,
)
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.material import generate
from keybroker.keys.models import Algorithm, Curve, KeyMaterial, KeySpec
from tests.peers.kmip import KmipServer, TestCa

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from kmip.core import enums
    from kmip.pie import objects
    from kmip.pie.client import ProxyKmipClient
    from kmip.pie.exceptions import KmipOperationFailure

AES128 = KeySpec(Algorithm.AES, 128)
AES256 = KeySpec(Algorithm.AES, 256)
RSA2048 = KeySpec(Algorithm.RSA, 2048)
SPECS = [
    AES128,
    KeySpec(Algorithm.AES, 192),
    AES256,
    RSA2048,
    KeySpec(Algorithm.RSA, 3072),
    KeySpec(Algorithm.EC, 256, Curve.P256),
    KeySpec(Algorithm.EC, 384, Curve.P384),
    KeySpec(Algorithm.EC, 521, Curve.P521),
]
_counter = iter(range(1_000_000))


def new_key_id() -> KeyId:
    return KeyId(f"key-{next(_counter)}-{time.monotonic_ns()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmipServer]:
    with KmipServer(tmp_path_factory.mktemp("kmip")) as kmip:
        yield kmip


@pytest.fixture(scope="module")
def materials() -> dict[KeySpec, KeyMaterial]:
    """One key per spec (RSA-3072 generation is the slow part of this module)."""
    return {spec: generate(spec) for spec in SPECS}


@pytest.fixture
def make_store(settings: Settings) -> Iterator[Any]:
    made: list[KmipKeyStore] = []

    def make(kmip: KmipServer, **changes: Any) -> KmipKeyStore:
        made.append(KmipKeyStore.from_settings("kmip", settings.secrets, kmip.settings(**changes)))
        return made[-1]

    yield make
    for store in made:  # before the server stops: open sessions slow its shutdown down
        store.close()


@pytest.fixture
def store(make_store: Any, server: KmipServer) -> KmipKeyStore:
    result: KmipKeyStore = make_store(server)
    return result


def server_names(server: KmipServer, uid: str) -> list[str]:
    with server.client() as client:
        _, attributes = client.get_attributes(uid, ["Name"])
    return [a.attribute_value.name_value.value for a in attributes]


def exists(server: KmipServer, uid: str) -> bool:
    with server.client() as client:
        try:
            client.get(uid)
        except KmipOperationFailure as exc:
            if exc.reason != enums.ResultReason.ITEM_NOT_FOUND:
                raise
            return False
    return True


def rsa_key_pair(client: Any) -> tuple[str, str]:
    """(public id, private id) of an RSA-2048 pair the server generates (it wants both usage masks)."""
    masks = enums.CryptographicUsageMask
    public, private = client.create_key_pair(
        enums.CryptographicAlgorithm.RSA, 2048, public_usage_mask=[masks.VERIFY], private_usage_mask=[masks.SIGN]
    )
    return str(public), str(private)


# -- round trips ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=KeySpec.describe)
def test_round_trip(
    store: KmipKeyStore, server: KmipServer, materials: dict[KeySpec, KeyMaterial], spec: KeySpec
) -> None:
    key_id, material = new_key_id(), materials[spec]
    ref = store.put(key_id, material)
    assert ref.isdigit()  # the KMIP unique identifier, nothing else

    got = store.get(key_id, ref, spec)
    assert got == material

    # Registered as the guide says: named for the key, a symmetric key (raw) or a PKCS#8 private key.
    assert server_names(server, ref) == [f"keybroker:{key_id}"]
    with server.client() as client:
        obj = client.get(ref)
    if spec.algorithm is Algorithm.AES:
        assert obj.object_type == enums.ObjectType.SYMMETRIC_KEY
        assert obj.key_format_type == enums.KeyFormatType.RAW
    else:
        assert obj.object_type == enums.ObjectType.PRIVATE_KEY
        assert obj.key_format_type == enums.KeyFormatType.PKCS_8
        assert obj.cryptographic_algorithm == enums.CryptographicAlgorithm[spec.algorithm.value]
    assert obj.cryptographic_length == spec.key_length
    assert obj.value == material.secret


def test_capabilities_and_repr(store: KmipKeyStore, server: KmipServer) -> None:
    assert store.capabilities == {Capability.STORE, Capability.REGISTER_EXISTING, Capability.GENERATE}
    assert isinstance(store, RegisteringKeyStore)
    assert isinstance(store, GeneratingKeyStore)
    assert store.supported_algorithms == {Algorithm.AES, Algorithm.RSA, Algorithm.EC}
    assert all(store.supports(spec) for spec in SPECS)
    text = repr(store)
    assert text == f"KmipKeyStore(name='kmip', server='127.0.0.1:{server.port}', connections=4)"
    assert "key" not in text.replace("KmipKeyStore", "")


def test_check(store: KmipKeyStore) -> None:
    store.check()


# -- generation in the server --------------------------------------------------------------------------------------
def named(server: KmipServer, key_id: KeyId) -> list[str]:
    """The ids of every object in the server named for ``key_id``."""
    with server.client() as client:
        name = client.attribute_factory.create_attribute(enums.AttributeType.NAME, f"keybroker:{key_id}")
        return sorted(str(uid) for uid in client.locate(attributes=[name]))


def test_what_the_server_can_generate(store: KmipKeyStore) -> None:
    # Honest capabilities: the PyKMIP server creates AES keys and RSA pairs, not EC keys (INVALID_FIELD), and
    # RSA-7680 takes it seconds; those are generated by keybroker and registered.
    every = (*SPECS, KeySpec(Algorithm.RSA, 4096), KeySpec(Algorithm.RSA, 7680))
    assert all(store.supports(spec) for spec in every)
    can = {spec.describe() for spec in every if store.can_generate(spec)}
    assert can == {"AES-128", "AES-192", "AES-256", "RSA-2048", "RSA-3072", "RSA-4096"}


def test_ec_is_not_generated_by_the_server(store: KmipKeyStore, server: KmipServer) -> None:
    with server.client() as client:  # why: what the PyKMIP server answers
        masks = enums.CryptographicUsageMask
        with pytest.raises(KmipOperationFailure, match="not a supported asymmetric key algorithm"):
            client.create_key_pair(
                enums.CryptographicAlgorithm.EC, 256, public_usage_mask=[masks.VERIFY], private_usage_mask=[masks.SIGN]
            )
    for curve in Curve:
        spec = KeySpec(Algorithm.EC, curve.bits, curve)
        assert store.supports(spec)  # stored (registered) all the same
        assert not store.can_generate(spec)
        key_id = new_key_id()
        with pytest.raises(BackendUnsupported, match=f"cannot have {spec.describe()} keys generated"):
            store.generate(key_id, spec)
        assert named(server, key_id) == []


@pytest.mark.parametrize("spec", [AES128, AES256, RSA2048, KeySpec(Algorithm.RSA, 3072)], ids=KeySpec.describe)
def test_generate_in_the_server(store: KmipKeyStore, server: KmipServer, spec: KeySpec) -> None:
    key_id = new_key_id()
    ref = store.generate(key_id, spec)
    assert ref.isdigit()
    assert server_names(server, ref) == [f"keybroker:{key_id}"]

    material = store.get(key_id, ref, spec)
    assert material.spec == spec
    with server.client() as client:
        obj = client.get(ref)
        assert obj.cryptographic_length == spec.key_length
        _, masks = client.get_attributes(ref, ["Cryptographic Usage Mask"])
    usage = masks[0].attribute_value.value
    if spec.algorithm is Algorithm.AES:
        assert named(server, key_id) == [ref]
        assert obj.object_type == enums.ObjectType.SYMMETRIC_KEY
        assert obj.key_format_type == enums.KeyFormatType.RAW
        assert material.secret == obj.value
        assert len(material.secret) * 8 == spec.key_length
        assert usage == enums.CryptographicUsageMask.ENCRYPT.value | enums.CryptographicUsageMask.DECRYPT.value
        return
    # RSA: a pair, both halves named for the key; the private key (the ref) is kept as PKCS#8, the public as PKCS#1.
    objects_of_key = named(server, key_id)
    assert len(objects_of_key) == 2
    assert ref in objects_of_key
    (public_uid,) = set(objects_of_key) - {ref}
    assert server_names(server, public_uid) == [f"keybroker:{key_id}"]
    with server.client() as client:
        public = client.get(public_uid)
    assert obj.object_type == enums.ObjectType.PRIVATE_KEY
    assert obj.key_format_type == enums.KeyFormatType.PKCS_8
    assert obj.cryptographic_algorithm == enums.CryptographicAlgorithm.RSA
    assert public.object_type == enums.ObjectType.PUBLIC_KEY
    assert public.key_format_type == enums.KeyFormatType.PKCS_1
    assert usage == enums.CryptographicUsageMask.SIGN.value | enums.CryptographicUsageMask.DECRYPT.value

    key = serialization.load_der_private_key(material.secret, password=None)  # PKCS#8, fully validated
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == spec.key_length
    assert key.private_numbers().public_numbers.e == 65537
    assert material.secret == key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert (
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1) == public.value
    )  # the pair's halves belong together


def test_a_generated_key_is_bound_to_its_id_and_spec(store: KmipKeyStore) -> None:
    key_id = new_key_id()
    ref = store.generate(key_id, RSA2048)
    with pytest.raises(StoredKeyCorrupt, match="not the material of key"):
        store.get(new_key_id(), ref, RSA2048)
    with pytest.raises(StoredKeyCorrupt, match="RSA-2048 key, not RSA-3072"):
        store.get(key_id, ref, KeySpec(Algorithm.RSA, 3072))
    with pytest.raises(InvalidKeyMaterial, match="keybroker stored itself"):
        store.register_existing(new_key_id(), ref, RSA2048)


def test_delete_and_purge_destroy_both_halves_of_a_generated_pair(store: KmipKeyStore, server: KmipServer) -> None:
    key_id = new_key_id()
    ref = store.generate(key_id, RSA2048)
    (public_uid,) = set(named(server, key_id)) - {ref}
    store.delete(ref)  # the private key, the key's ref
    assert not exists(server, ref)
    assert exists(server, public_uid)
    store.purge(key_id)  # what the service does after every delete: the public key too
    assert not exists(server, public_uid)
    assert named(server, key_id) == []
    with pytest.raises(NotFound):
        store.get(key_id, ref, RSA2048)


def test_purge_removes_what_a_failed_generate_left(
    make_store: Any, server: KmipServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server creates the pair, then the connection breaks before the reply is read: the caller sees
    # BackendUnavailable, and the objects the server made are found by their name.
    store: KmipKeyStore = make_store(server, connections=1)
    store.check()  # a pooled connection: a break on it is retried once, and breaks again
    created: list[str] = []
    real = ProxyKmipClient.create_key_pair

    def create_then_break(client: Any, *args: Any, **kwargs: Any) -> Any:
        created.extend(real(client, *args, **kwargs))
        raise ConnectionResetError("connection reset after the server acted")

    monkeypatch.setattr(ProxyKmipClient, "create_key_pair", create_then_break)
    key_id = new_key_id()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{server.port}"):
        store.generate(key_id, RSA2048)
    assert len(created) == 4  # tried again on a fresh connection: two pairs, all named for the key
    assert named(server, key_id) == sorted(created)
    store.purge(key_id)
    assert [exists(server, uid) for uid in created] == [False] * 4


def test_generation_waits_longer_and_the_connection_keeps_its_timeout(
    make_store: Any, server: KmipServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server generates before it answers (RSA-4096 in up to seconds): Create and CreateKeyPair wait for
    # GENERATE_TIMEOUT_SECONDS, then the connection goes back to the pool with timeout_seconds.
    store: KmipKeyStore = make_store(server, connections=1, timeout_seconds=2.5)
    seen: list[float | None] = []
    for name in ("create", "create_key_pair"):
        real = getattr(ProxyKmipClient, name)

        def spy(client: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(client.proxy.socket.gettimeout())
            return _real(client, *args, **kwargs)

        monkeypatch.setattr(ProxyKmipClient, name, spy)
    store.generate(new_key_id(), AES256)
    store.generate(new_key_id(), RSA2048)
    assert seen == [kmip_module.GENERATE_TIMEOUT_SECONDS] * 2
    (client,) = [c for c in store._pool._slots.queue if c is not None]
    assert client.proxy.socket.gettimeout() == 2.5  # every other call waits as long as before


# -- binding and spec checks ---------------------------------------------------------------------------------------
def test_get_with_another_keys_ref_is_refused(store: KmipKeyStore, materials: dict[KeySpec, KeyMaterial]) -> None:
    mine, theirs = new_key_id(), new_key_id()
    ref = store.put(theirs, materials[AES256])
    with pytest.raises(StoredKeyCorrupt, match=f"not the material of key {mine}") as caught:
        store.get(mine, ref, AES256)
    assert materials[AES256].secret.hex() not in str(caught.value)
    assert store.get(theirs, ref, AES256) == materials[AES256]


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        (AES256, AES128),
        (AES256, RSA2048),
        (RSA2048, KeySpec(Algorithm.RSA, 3072)),
        (RSA2048, KeySpec(Algorithm.EC, 256, Curve.P256)),
        (KeySpec(Algorithm.EC, 256, Curve.P256), KeySpec(Algorithm.EC, 384, Curve.P384)),
    ],
    ids=lambda spec: spec.describe(),
)
def test_get_with_the_wrong_spec_is_refused(
    store: KmipKeyStore, materials: dict[KeySpec, KeyMaterial], stored: KeySpec, asked: KeySpec
) -> None:
    key_id = new_key_id()
    ref = store.put(key_id, materials[stored])
    with pytest.raises(StoredKeyCorrupt, match=f"does not hold the {asked.describe()} key"):
        store.get(key_id, ref, asked)


def test_malformed_refs(store: KmipKeyStore, materials: dict[KeySpec, KeyMaterial]) -> None:
    # An empty identifier would be KMIP's "ID placeholder" (the object the session used last): never sent.
    key_id = new_key_id()
    store.put(key_id, materials[AES256])
    for ref in ("", " 1", "registered:"):
        with pytest.raises(StoredKeyCorrupt, match="malformed"):
            store.get(key_id, BackendRef(ref), AES256)
        store.delete(BackendRef(ref))  # nothing to delete


# -- delete and purge ----------------------------------------------------------------------------------------------
def test_delete_then_get_is_not_found_and_delete_is_idempotent(
    store: KmipKeyStore, server: KmipServer, materials: dict[KeySpec, KeyMaterial]
) -> None:
    key_id = new_key_id()
    ref = store.put(key_id, materials[RSA2048])
    store.delete(ref)
    assert not exists(server, ref)
    with pytest.raises(NotFound) as caught:
        store.get(key_id, ref, RSA2048)
    assert caught.value.instance_code == "key_material_missing"
    store.delete(ref)
    store.delete(BackendRef("999999"))  # never existed


def test_delete_revokes_an_active_object_first(
    store: KmipKeyStore, server: KmipServer, materials: dict[KeySpec, KeyMaterial]
) -> None:
    ref = store.put(new_key_id(), materials[AES256])
    with server.client() as client:
        client.activate(ref)
        with pytest.raises(KmipOperationFailure, match="active and cannot be destroyed"):
            client.destroy(ref)  # what PyKMIP says of an Active object
    store.delete(ref)
    assert not exists(server, ref)


def test_purge_destroys_every_object_named_for_the_key(
    store: KmipKeyStore, server: KmipServer, materials: dict[KeySpec, KeyMaterial]
) -> None:
    # Crash recovery: puts whose key records were never written, one of them activated meanwhile.
    key_id, other = new_key_id(), new_key_id()
    orphans = [store.put(key_id, materials[spec]) for spec in (AES256, RSA2048, AES128)]
    kept = store.put(other, materials[AES256])
    with server.client() as client:
        client.activate(orphans[0])

    store.purge(key_id)

    assert [exists(server, ref) for ref in orphans] == [False, False, False]
    assert store.get(other, kept, AES256) == materials[AES256]
    store.purge(key_id)  # idempotent
    store.purge(new_key_id())  # nothing was ever stored


# -- register_existing ---------------------------------------------------------------------------------------------
def test_register_existing_aes_and_rsa_created_outside_keybroker(store: KmipKeyStore, server: KmipServer) -> None:
    with server.client() as client:
        aes_uid = client.create(enums.CryptographicAlgorithm.AES, 256, name="made-elsewhere")
        _, rsa_uid = rsa_key_pair(client)
        aes_bytes, rsa_bytes = client.get(aes_uid).value, client.get(rsa_uid).value

    aes_ref = store.register_existing(new_key_id(), aes_uid, AES256)
    rsa_ref = store.register_existing(new_key_id(), rsa_uid, RSA2048)
    assert (aes_ref, rsa_ref) == (f"registered:{aes_uid}", f"registered:{rsa_uid}")

    # Any key id: the object is not keybroker's to name, so no binding is checked.
    assert store.get(new_key_id(), aes_ref, AES256).secret == aes_bytes
    rsa_material = store.get(new_key_id(), rsa_ref, RSA2048)
    assert rsa_material.secret == rsa_bytes  # the server keeps RSA private keys as PKCS#8
    serialization.load_der_private_key(rsa_material.secret, password=None)

    store.delete(aes_ref)
    store.delete(rsa_ref)
    assert exists(server, aes_uid)
    assert exists(server, rsa_uid)


def test_register_existing_accepts_an_ec_key_in_sec1_format(store: KmipKeyStore, server: KmipServer) -> None:
    # Another client may register an EC key as an ECPrivateKey (SEC1) rather than PKCS#8; keybroker hands out
    # PKCS#8 whatever the stored format.
    key = ec.generate_private_key(ec.SECP384R1())
    sec1 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    with server.client() as client:
        uid = client.register(
            objects.PrivateKey(enums.CryptographicAlgorithm.EC, 384, sec1, enums.KeyFormatType.PKCS_8)
        )
    spec = KeySpec(Algorithm.EC, 384, Curve.P384)
    ref = store.register_existing(new_key_id(), uid, spec)
    assert store.get(new_key_id(), ref, spec).secret == key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("object_id", ["424242", "", "no such object"])
def test_register_existing_of_a_missing_object(store: KmipKeyStore, object_id: str) -> None:
    with pytest.raises(UnknownReference) as caught:
        store.register_existing(new_key_id(), object_id, AES256)
    assert caught.value.instance_code == "kmip_object_not_found"


def test_register_existing_of_the_wrong_kind_of_object(store: KmipKeyStore, server: KmipServer) -> None:
    with server.client() as client:
        aes128 = client.create(enums.CryptographicAlgorithm.AES, 128)
        public_uid, private_uid = rsa_key_pair(client)
        secret = client.register(objects.SecretData(b"\x01" * 32, enums.SecretDataType.PASSWORD))
    cases = [
        (aes128, AES256, "128 bits long, not 256"),
        (aes128, RSA2048, "not a private key"),
        (private_uid, AES256, "not a symmetric key"),
        (private_uid, KeySpec(Algorithm.RSA, 3072), "RSA-2048 key, not RSA-3072"),
        (private_uid, KeySpec(Algorithm.EC, 256, Curve.P256), "algorithm is RSA, not EC"),
        (public_uid, RSA2048, "public key, not a private key"),
        (secret, AES256, "secret data, not a symmetric key"),
    ]
    for uid, spec, why in cases:
        with pytest.raises(InvalidKeyMaterial, match=why):
            store.register_existing(new_key_id(), uid, spec)


def test_a_registered_object_destroyed_elsewhere_is_not_found(store: KmipKeyStore, server: KmipServer) -> None:
    with server.client() as client:
        uid = client.create(enums.CryptographicAlgorithm.AES, 256)
    ref = store.register_existing(new_key_id(), uid, AES256)
    with server.client() as client:
        client.destroy(uid)
    with pytest.raises(NotFound) as caught:
        store.get(new_key_id(), ref, AES256)
    assert caught.value.instance_code == "key_material_missing"


# -- concurrency ---------------------------------------------------------------------------------------------------
def test_concurrent_puts_and_gets(make_store: Any, server: KmipServer, materials: dict[KeySpec, KeyMaterial]) -> None:
    store: KmipKeyStore = make_store(server, connections=4)
    jobs = [(new_key_id(), materials[SPECS[i % len(SPECS)]]) for i in range(8)]
    start = threading.Barrier(8)

    def put(job: tuple[KeyId, KeyMaterial]) -> BackendRef:
        start.wait()
        return store.put(*job)

    with ThreadPoolExecutor(8) as pool:
        refs = list(pool.map(put, jobs))
        got = list(pool.map(lambda pair: store.get(pair[0][0], pair[1], pair[0][1].spec), zip(jobs, refs, strict=True)))
    assert len(set(refs)) == 8
    assert got == [material for _, material in jobs]


# -- the server going away -----------------------------------------------------------------------------------------
def test_server_down_then_back(make_store: Any, tmp_path: Path, materials: dict[KeySpec, KeyMaterial]) -> None:
    kmip = KmipServer(tmp_path / "kmip")
    with kmip:
        store: KmipKeyStore = make_store(kmip, connections=2)
        key_id = new_key_id()
        ref = store.put(key_id, materials[AES256])
        assert store.get(key_id, ref, AES256) == materials[AES256]

        # The store keeps its connections open, and the server joins each session's thread for 10 s on SIGINT:
        # after 1 s the helper kills the server's process group instead (an outage all the same).
        kmip.stop(grace=1.0)
        for call in (
            store.check,
            lambda: store.put(new_key_id(), materials[AES256]),
            lambda: store.get(key_id, ref, AES256),
            lambda: store.delete(ref),
            lambda: store.purge(key_id),
        ):
            began = time.monotonic()
            with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{kmip.port}") as caught:
                call()
            assert caught.value.instance_code == "backend_unavailable"
            assert time.monotonic() - began < 2

        kmip.start()  # same port, same database
        store.check()
        assert store.get(key_id, ref, AES256) == materials[AES256]
        other = new_key_id()
        assert store.get(other, store.put(other, materials[RSA2048]), RSA2048) == materials[RSA2048]
        store.close()  # then the server stops at once


def test_a_connection_broken_mid_call_is_retried_on_a_fresh_one(
    make_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, materials: dict[KeySpec, KeyMaterial]
) -> None:
    kmip = KmipServer(tmp_path / "kmip")
    with kmip:
        store: KmipKeyStore = make_store(kmip, connections=1)
        key_id = new_key_id()
        ref = store.put(key_id, materials[AES256])
        kmip.restart(grace=1.0)  # see test_server_down_then_back
        # Blind the check that notices a closed connection before use: the call then fails on the old
        # connection, and must succeed on a new one.
        monkeypatch.setattr(kmip_module, "server_closed", lambda client: False)
        connects: list[int] = []
        real_connect = store._connect
        monkeypatch.setattr(store, "_connect", lambda: connects.append(1) or real_connect())
        assert store.get(key_id, ref, AES256) == materials[AES256]
        assert connects == [1]
        store.close()


def test_a_server_that_does_not_answer_times_out(make_store: Any, server: KmipServer) -> None:
    # A listener that accepts the TCP connection and then says nothing (not even the TLS handshake).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        store: KmipKeyStore = make_store(server, port=silent.getsockname()[1], timeout_seconds=0.3)
        began = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"did not answer within 0\.3 s"):
            store.check()
        assert time.monotonic() - began < 2


def test_closed_store(store: KmipKeyStore, materials: dict[KeySpec, KeyMaterial]) -> None:
    store.check()
    store.close()
    store.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        store.put(new_key_id(), materials[AES256])


# -- identity and configuration ------------------------------------------------------------------------------------
def test_a_client_certificate_from_another_ca_is_refused(make_store: Any, server: KmipServer, tmp_path: Path) -> None:
    # The server alone knows which CAs it trusts: the TLS handshake fails (alert unknown_ca) at the first call.
    # BackendUnavailable, not ConfigurationError, because keybroker cannot tell at start; the code says that
    # waiting will not help.
    stranger = TestCa(tmp_path / "other-ca").client()
    store: KmipKeyStore = make_store(server, cert_file=stranger.cert_file, key_file=stranger.key_file)
    with pytest.raises(BackendUnavailable, match="refused keybroker's client certificate") as caught:
        store.check()
    assert caught.value.instance_code == "backend_misconfigured"


def test_a_server_certificate_from_another_ca_is_refused(make_store: Any, server: KmipServer, tmp_path: Path) -> None:
    store: KmipKeyStore = make_store(server, ca_file=TestCa(tmp_path / "other-ca").cert_file)
    with pytest.raises(BackendUnavailable, match="does not verify against ca_file") as caught:
        store.check()
    assert caught.value.instance_code == "backend_misconfigured"


def test_the_server_host_name_is_checked(make_store: Any, server: KmipServer) -> None:
    # "localhost" reaches the same server, but its certificate names only IP:127.0.0.1 (PyKMIP's own client would
    # not notice).
    store: KmipKeyStore = make_store(server, host="localhost")
    with pytest.raises(BackendUnavailable, match="does not verify against ca_file") as caught:
        store.check()
    assert caught.value.instance_code == "backend_misconfigured"
    assert "ostname mismatch" in caught.value.detail


def test_another_identity_is_denied_keybrokers_objects(
    make_store: Any, store: KmipKeyStore, server: KmipServer, materials: dict[KeySpec, KeyMaterial]
) -> None:
    # Same CA, another CN: the PyKMIP server makes the CN the owner, and only the owner may use an object.
    key_id = new_key_id()
    ref = store.put(key_id, materials[AES256])
    someone = server.ca.client("someone", "someone-else")
    intruder: KmipKeyStore = make_store(server, cert_file=someone.cert_file, key_file=someone.key_file)
    intruder.check()
    for call in (
        lambda: intruder.get(key_id, ref, AES256),
        lambda: intruder.register_existing(key_id, ref, AES256),
        lambda: intruder.delete(ref),
    ):
        with pytest.raises(BackendUnavailable, match=f"object {ref}") as caught:
            call()
        assert caught.value.instance_code == "backend_misconfigured"
    assert store.get(key_id, ref, AES256) == materials[AES256]


def test_unusable_tls_files_are_a_configuration_error(settings: Settings, server: KmipServer, tmp_path: Path) -> None:
    server_only = server.ca.issue("server-only", "keybroker", ExtendedKeyUsageOID.SERVER_AUTH)
    other_key = server.ca.client("other-key").key_file
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cert_file": tmp_path / "missing.crt"}, "does not exist"),
        ({"ca_file": tmp_path / "missing-ca.crt"}, "does not exist"),
        ({"cert_file": server.ca_file.parent / "server.key"}, "not a PEM certificate"),
        ({"cert_file": server_only.cert_file, "key_file": server_only.key_file}, "lacks clientAuth"),
        ({"key_file": other_key}, "cannot use cert_file"),
    ]
    for changes, why in cases:
        with pytest.raises(ConfigurationError, match=why):
            KmipKeyStore.from_settings("kmip", settings.secrets, server.settings(**changes))


def test_relative_paths_are_taken_from_the_data_directory(settings: Settings, server: KmipServer) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for path in (server.cert_file, server.key_file, server.ca_file):
        (settings.data_dir / path.name).write_bytes(path.read_bytes())
    cfg = server.settings(
        cert_file=Path(server.cert_file.name), key_file=Path(server.key_file.name), ca_file=Path(server.ca_file.name)
    )
    store = KmipKeyStore.from_settings("kmip", settings.secrets, cfg)
    try:
        store.check()
    finally:
        store.close()
