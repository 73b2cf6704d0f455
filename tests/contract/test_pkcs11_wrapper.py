"""The PKCS#11 KEK wrapper against a real SoftHSM2 token: format, tamper detection, KEK checks, PIN handling,
threads, and recovery when the token or the library goes away.

One SoftHSM configuration (token directory) serves the whole pytest process (SoftHSM reads SOFTHSM2_CONF only at
C_Initialize); each test makes its own token by label. A token created after the library was loaded is invisible
until the library is re-initialised; building a wrapper does that (NoSuchToken → re-initialise → look again), so the
``token`` fixture builds and closes one.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import exceptions as p11
from pkcs11.constants import Attribute, ObjectClass
from pkcs11.mechanisms import KeyType, Mechanism
from sqlalchemy import select

from keybroker.backends.embedded import EmbeddedKeyStore
from keybroker.backends.pkcs11.wrapper import Pkcs11KeyWrapper
from keybroker.backends.registry import build_wrapper
from keybroker.clock import SystemClock
from keybroker.config import EmbeddedBackendSettings, Pkcs11WrapperSettings, SecretSource, Settings, load_settings
from keybroker.errors import BackendUnavailable, ConfigurationError, StoredKeyCorrupt
from keybroker.ids import KeyId
from keybroker.keys.material import generate
from keybroker.keys.models import Algorithm, KeySpec
from keybroker.services import Services
from keybroker.storage.tables import EmbeddedMaterialRow
from tests.peers.softhsm import SoftHsm, Token, module_path

PIN_ENV = "KB_TEST_PKCS11_PIN"  # not KEYBROKER_*: load_settings refuses unknown KEYBROKER_ variables
KEK = "keybroker-kek"
CONTEXT = b"keybroker/test\0k1"


@dataclass(frozen=True)
class HsmToken:
    token: Token
    directory: Path  # the token's own directory inside the SoftHSM token directory

    @property
    def label(self) -> str:
        return self.token.label

    @property
    def pin(self) -> str:
        return self.token.pin


@pytest.fixture
def hsm(softhsm: SoftHsm) -> SoftHsm:
    return softhsm  # the run's shared token directory (tests/conftest.py)


def _wrapper(settings: Settings, token: Token, **changes: Any) -> Pkcs11KeyWrapper:
    values: dict[str, Any] = {
        "type": "pkcs11",
        "module": Path(token.module),
        "token_label": token.label,
        "key_label": KEK,
        "pin": SecretSource(env=PIN_ENV),
        "sessions": 4,
    }
    values.update(changes)
    return Pkcs11KeyWrapper.from_settings(settings.secrets, Pkcs11WrapperSettings(**values))


@pytest.fixture
def token(hsm: SoftHsm, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> HsmToken:
    before = set(hsm.tokendir.iterdir())
    made = hsm.token()
    (directory,) = set(hsm.tokendir.iterdir()) - before
    monkeypatch.setenv(PIN_ENV, made.pin)
    _wrapper(settings, made).close()  # makes the library see the new token (module docstring)
    return HsmToken(made, directory)


@pytest.fixture
def make_wrapper(settings: Settings, token: HsmToken) -> Iterator[Callable[..., Pkcs11KeyWrapper]]:
    made: list[Pkcs11KeyWrapper] = []

    def make(**changes: Any) -> Pkcs11KeyWrapper:
        wrapper = _wrapper(settings, token.token, **changes)
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        wrapper.close()


@pytest.fixture
def wrapper(make_wrapper: Callable[..., Pkcs11KeyWrapper]) -> Pkcs11KeyWrapper:
    made = make_wrapper()
    made.prepare()
    return made


def _lib() -> Any:
    # The wrapper loads the module by its real path: this is the same object, from python-pkcs11's cache.
    return pkcs11.lib(os.path.realpath(module_path()))


@contextmanager
def raw_session(token: HsmToken) -> Iterator[Any]:
    """A session of the test's own, beside the wrapper's."""
    found = _lib().get_token(token_label=token.label)
    try:
        session = found.open(rw=True, user_pin=token.pin)
    except p11.UserAlreadyLoggedIn:  # a wrapper holds this process's login on the token
        session = found.open(rw=True)
    try:
        yield session
    finally:
        session.close()


def _kek_objects(session: Any) -> list[Any]:
    return list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: KEK}))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


# -- format and round trip ----------------------------------------------------------------------------------------


def test_round_trip_and_blob_format(wrapper: Pkcs11KeyWrapper, token: HsmToken) -> None:
    data_key = os.urandom(32)
    blob = wrapper.wrap(data_key, CONTEXT)
    assert blob[0] == 1
    assert len(blob) == 1 + 12 + 32 + 16
    assert wrapper.unwrap(blob, CONTEXT, wrapper.kek_id) == data_key
    assert wrapper.wrap(data_key, CONTEXT)[1:13] != blob[1:13]  # a fresh IV each time
    assert wrapper.unwrap(wrapper.wrap(b"", b""), b"", wrapper.kek_id) == b""
    assert wrapper.kek_id == f"pkcs11:{token.label}/{KEK}"
    wrapper.check()


def test_without_a_kek_it_builds_but_asks_for_init(make_wrapper: Callable[..., Pkcs11KeyWrapper]) -> None:
    wrapper = make_wrapper()
    for call in (lambda: wrapper.wrap(b"k" * 32, CONTEXT), wrapper.check):
        with pytest.raises(ConfigurationError, match="run 'keybroker init'"):
            call()


def test_prepare_creates_the_kek_once_and_never_replaces_it(
    make_wrapper: Callable[..., Pkcs11KeyWrapper], token: HsmToken
) -> None:
    first = make_wrapper()
    first.prepare()
    blob = first.wrap(b"d" * 32, CONTEXT)
    first.prepare()
    first.close()
    second = make_wrapper()  # a new process would see the same
    second.prepare()
    assert second.unwrap(blob, CONTEXT, second.kek_id) == b"d" * 32
    with raw_session(token) as session:
        assert len(_kek_objects(session)) == 1


def test_the_created_kek_is_sensitive_and_never_leaves_the_token(wrapper: Pkcs11KeyWrapper, token: HsmToken) -> None:
    with raw_session(token) as session:
        (kek,) = _kek_objects(session)
        with pytest.raises(p11.AttributeSensitive):
            kek[Attribute.VALUE]
        attrs = kek.get_attributes(
            [
                Attribute.KEY_TYPE,
                Attribute.VALUE_LEN,
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SENSITIVE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.WRAP,
                Attribute.UNWRAP,
            ]
        )
        assert attrs == {
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE_LEN: 32,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.ALWAYS_SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.NEVER_EXTRACTABLE: True,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
        }
        # Not even wrapped under another key of the token.
        other = session.generate_key(KeyType.AES, 256, template={Attribute.WRAP: True, Attribute.EXTRACTABLE: True})
        with pytest.raises(p11.KeyUnextractable):
            other.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP)


# -- tampering ------------------------------------------------------------------------------------------------------


def test_another_context_does_not_open(wrapper: Pkcs11KeyWrapper) -> None:
    blob = wrapper.wrap(b"d" * 32, CONTEXT)
    for context in (CONTEXT + b"x", CONTEXT[:-1], b""):
        with pytest.raises(StoredKeyCorrupt, match="failed authentication"):
            wrapper.unwrap(blob, context, wrapper.kek_id)
    assert wrapper.unwrap(blob, CONTEXT, wrapper.kek_id) == b"d" * 32  # the sessions are still good


def test_a_flipped_bit_anywhere_is_detected(wrapper: Pkcs11KeyWrapper) -> None:
    blob = wrapper.wrap(os.urandom(32), CONTEXT)
    for index in range(len(blob)):
        for bit in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[index] ^= bit
            with pytest.raises(StoredKeyCorrupt):
                wrapper.unwrap(bytes(tampered), CONTEXT, wrapper.kek_id)


@pytest.mark.parametrize("cut", [b"", b"\x01", b"\x01" + bytes(27)])
def test_malformed_blobs(wrapper: Pkcs11KeyWrapper, cut: bytes) -> None:
    with pytest.raises(StoredKeyCorrupt, match="malformed"):
        wrapper.unwrap(cut, CONTEXT, wrapper.kek_id)
    blob = wrapper.wrap(b"d" * 32, CONTEXT)
    with pytest.raises(StoredKeyCorrupt):
        wrapper.unwrap(blob[:-1], CONTEXT, wrapper.kek_id)  # a short tag
    with pytest.raises(StoredKeyCorrupt, match="malformed"):
        wrapper.unwrap(b"\x02" + blob[1:], CONTEXT, wrapper.kek_id)


def test_another_kek_id_does_not_open(wrapper: Pkcs11KeyWrapper, token: HsmToken) -> None:
    blob = wrapper.wrap(b"d" * 32, CONTEXT)
    with pytest.raises(StoredKeyCorrupt, match="wrapped by KEK"):
        wrapper.unwrap(blob, CONTEXT, f"pkcs11:{token.label}/other-kek")


# -- configuration --------------------------------------------------------------------------------------------------


def test_a_wrong_pin_is_a_configuration_error_that_does_not_show_it(
    settings: Settings, token: HsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "wrong-pin-48151623"
    monkeypatch.setenv(PIN_ENV, secret)
    with pytest.raises(ConfigurationError, match=rf"token '{token.label}' refused the PIN") as caught:
        _wrapper(settings, token.token)
    for exc in _chain(caught.value):
        assert secret not in str(exc)
        assert secret not in repr(exc)


def test_a_pin_that_differs_from_the_logged_in_one_is_refused(
    wrapper: Pkcs11KeyWrapper, settings: Settings, token: HsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The token is logged in already (by ``wrapper``): C_Login cannot check this PIN, the wrapper compares it.
    monkeypatch.setenv(PIN_ENV, "not-the-pin")
    with pytest.raises(ConfigurationError, match="refused the PIN") as caught:
        _wrapper(settings, token.token)
    assert "not-the-pin" not in str(caught.value)
    assert wrapper.unwrap(wrapper.wrap(b"d" * 32, CONTEXT), CONTEXT, wrapper.kek_id) == b"d" * 32


def test_an_unknown_token_or_module_is_a_configuration_error(
    settings: Settings, token: HsmToken, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="has no token labelled 'no-such-token'"):
        _wrapper(settings, token.token, token_label="no-such-token")
    with pytest.raises(ConfigurationError, match=r"PKCS#11 module /nonexistent/libpkcs11\.so does not exist"):
        _wrapper(settings, token.token, module=Path("/nonexistent/libpkcs11.so"))
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a shared object")
    with pytest.raises(ConfigurationError, match=rf"cannot load the PKCS#11 module {junk}"):
        _wrapper(settings, token.token, module=junk)


def test_pin_from_a_file(settings: Settings, token: HsmToken, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PIN_ENV)
    with pytest.raises(ConfigurationError, match=f"PKCS#11 PIN: environment variable {PIN_ENV} is not set"):
        _wrapper(settings, token.token)
    pin_file = settings.data_dir / "hsm.pin"
    pin_file.parent.mkdir(parents=True, exist_ok=True)
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o600)
    wrapper = _wrapper(settings, token.token, pin=SecretSource(file=Path("hsm.pin")))  # relative to the data dir
    try:
        wrapper.prepare()
        wrapper.check()
    finally:
        wrapper.close()
    pin_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others") as caught:
        _wrapper(settings, token.token, pin=SecretSource(file=pin_file))
    assert token.pin not in str(caught.value)


def test_repr_shows_where_but_not_the_pin(wrapper: Pkcs11KeyWrapper, token: HsmToken) -> None:
    text = repr(wrapper) + str(wrapper)
    assert token.label in text
    assert KEK in text
    assert "libsofthsm2.so" in text
    assert token.pin not in text


def test_built_from_the_settings_of_an_embedded_backend(token: HsmToken, tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path / "configured",
        overrides={
            "backends": {
                "hsm": {
                    "type": "embedded",
                    "wrapper": {
                        "type": "pkcs11",
                        "module": token.token.module,
                        "token_label": token.label,
                        "pin": {"env": PIN_ENV},
                        "sessions": 2,
                    },
                }
            },
            "keys": {"default_backend": "hsm"},
        },
    )
    backend = settings.backends["hsm"]
    assert isinstance(backend, EmbeddedBackendSettings)
    wrapper = build_wrapper(settings, backend.wrapper, SystemClock())
    try:
        assert isinstance(wrapper, Pkcs11KeyWrapper)
        assert wrapper.kek_id == f"pkcs11:{token.label}/{KEK}"
    finally:
        wrapper.close()


def _add_key(token: HsmToken, bits: int = 256, key_type: KeyType = KeyType.AES, **template: bool) -> None:
    attributes = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True}
    attributes.update({Attribute[name]: value for name, value in template.items()})
    with raw_session(token) as session:
        session.generate_key(key_type, bits, label=KEK, store=True, template=attributes)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda t: _add_key(t, EXTRACTABLE=True), "it is extractable"),
        (lambda t: _add_key(t, SENSITIVE=False), "it is not sensitive"),
        (lambda t: _add_key(t, bits=128), "not an AES-256 key"),
        (lambda t: _add_key(t, bits=256, key_type=KeyType.GENERIC_SECRET), "not an AES-256 key"),
        (lambda t: _add_key(t, key_type=KeyType.DES3), "not an AES-256 key"),
        (lambda t: _add_key(t, DECRYPT=False), "may not encrypt and decrypt"),
        (lambda t: (_add_key(t), _add_key(t)), "ambiguous"),
    ],
    ids=["extractable", "not-sensitive", "aes-128", "generic-secret", "des3", "no-decrypt", "two-keys"],
)
def test_an_unfit_kek_is_refused(
    settings: Settings, token: HsmToken, make: Callable[[HsmToken], object], problem: str
) -> None:
    make(token)
    with pytest.raises(ConfigurationError, match=problem):
        _wrapper(settings, token.token)


def test_a_closed_wrapper_refuses_work(make_wrapper: Callable[..., Pkcs11KeyWrapper]) -> None:
    wrapper = make_wrapper()
    wrapper.prepare()
    wrapper.close()
    wrapper.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        wrapper.wrap(b"d" * 32, CONTEXT)


# -- threads and failures -------------------------------------------------------------------------------------------


def test_eight_threads_share_four_sessions(make_wrapper: Callable[..., Pkcs11KeyWrapper]) -> None:
    wrapper = make_wrapper(sessions=4)
    wrapper.prepare()
    start = threading.Barrier(8)

    def work(worker: int) -> int:
        start.wait()
        for round_ in range(50):
            data_key, context = os.urandom(32), f"worker {worker} round {round_}".encode()
            assert wrapper.unwrap(wrapper.wrap(data_key, context), context, wrapper.kek_id) == data_key
        return worker

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(work, range(8))) == list(range(8))
    assert wrapper._idle.qsize() <= 4


def test_recovers_when_the_library_was_reinitialised_behind_its_back(wrapper: Pkcs11KeyWrapper) -> None:
    blob = wrapper.wrap(b"d" * 32, CONTEXT)
    epoch = wrapper._module.epoch
    _lib().reinitialize()  # every session and login of the process is gone
    assert wrapper.unwrap(blob, CONTEXT, wrapper.kek_id) == b"d" * 32  # transparently: reconnect and retry once
    assert wrapper._module.epoch == epoch + 1
    _lib().finalize()  # C_Finalize: the library is not even initialised now
    assert wrapper.unwrap(wrapper.wrap(b"e" * 32, CONTEXT), CONTEXT, wrapper.kek_id) == b"e" * 32
    wrapper.check()


def test_a_token_that_goes_away_is_unavailable_until_it_is_back(
    wrapper: Pkcs11KeyWrapper, token: HsmToken, tmp_path: Path
) -> None:
    blob = wrapper.wrap(b"d" * 32, CONTEXT)
    away = tmp_path / "away"
    shutil.move(token.directory, away)  # SoftHSM: the key's handle becomes invalid, then the token is missing
    try:
        for call in (
            lambda: wrapper.wrap(b"d" * 32, CONTEXT),
            lambda: wrapper.unwrap(blob, CONTEXT, wrapper.kek_id),
            wrapper.check,
        ):
            with pytest.raises(BackendUnavailable, match=token.label) as caught:
                call()
            assert caught.value.instance_code == "backend_unavailable"
    finally:
        shutil.move(away, token.directory)
    # The same wrapper object works again: no rebuild.
    assert wrapper.unwrap(blob, CONTEXT, wrapper.kek_id) == b"d" * 32
    wrapper.check()


# -- in the embedded store ------------------------------------------------------------------------------------------


class _Spy:
    """Delegates to the PKCS#11 wrapper and remembers the data keys it was given."""

    def __init__(self, inner: Pkcs11KeyWrapper) -> None:
        self.inner = inner
        self.name = inner.name
        self.data_keys: list[bytes] = []

    @property
    def kek_id(self) -> str:
        return self.inner.kek_id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        self.data_keys.append(data_key)
        return self.inner.wrap(data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes, kek_id: str) -> bytes:
        return self.inner.unwrap(wrapped, context, kek_id)

    def prepare(self) -> None:
        self.inner.prepare()

    def check(self) -> None:
        self.inner.check()

    def close(self) -> None:
        self.inner.close()


def test_embedded_store_with_the_hsm_kek(services: Services, wrapper: Pkcs11KeyWrapper, settings: Settings) -> None:
    spy = _Spy(wrapper)
    store = EmbeddedKeyStore("hsm", services.database, spy, services.clock)
    spec = KeySpec(Algorithm.RSA, 2048)
    material = generate(spec)
    ref = store.put(KeyId("k1"), material)
    assert store.get(KeyId("k1"), ref, spec) == material
    store.check()

    (data_key,) = spy.data_keys
    with services.database.transaction() as session:
        row = session.scalars(select(EmbeddedMaterialRow).where(EmbeddedMaterialRow.ref == ref)).one()
        assert row.kek_id == wrapper.kek_id
        assert row.wrapped_dek[:1] == b"\x01"
        stored = [row.wrapped_dek, row.ciphertext]
    services.database.close()  # checkpoint: everything is in the database files now
    files = [path.read_bytes() for path in settings.data_dir.glob("keybroker.db*")]
    assert files
    # No 8 consecutive bytes of the data key are in the database, nor any of the RSA key's private exponent (the
    # whole PKCS#8 is not compared window by window: its header and public modulus are not secret).
    private_key = serialization.load_der_private_key(material.secret, None)
    assert isinstance(private_key, rsa.RSAPrivateKey)
    exponent = private_key.private_numbers().d.to_bytes(256, "big")
    for secret in (data_key, exponent):
        for start in range(len(secret) - 7):
            window = secret[start : start + 8]
            assert not any(window in blob for blob in stored + files)
    assert not any(material.secret in blob for blob in files)
