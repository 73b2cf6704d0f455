"""The ``KeyWrapper`` contract, run against every KEK holder: the local master key, Vault/OpenBao Transit and a
PKCS#11 token (SoftHSM2), each built from its settings as a deployment builds it (``build_wrapper``)."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keybroker.backends.base import KeyWrapper
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.backends.registry import build_wrapper
from keybroker.clock import FixedClock
from keybroker.config import EmbeddedBackendSettings, load_settings
from keybroker.errors import StoredKeyCorrupt
from tests.conftest import NOW
from tests.contract.conftest import BAO_TOKEN_ENV, HSM_PIN_ENV

WRAPPERS = ("embedded", "embedded-transit", "embedded-pkcs11")
UNDER_TEST = "under-test"


@pytest.fixture(params=WRAPPERS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def wrapper(tmp_path: Path, backend_config: dict[str, Any]) -> Iterator[KeyWrapper]:
    overrides = {"backends": {UNDER_TEST: backend_config}, "keys": {"default_backend": UNDER_TEST}}
    settings = load_settings(data_dir=tmp_path, overrides=overrides)
    backend = settings.backends[UNDER_TEST]
    assert isinstance(backend, EmbeddedBackendSettings)
    if backend_config.get("wrapper") is None:
        LocalKeyWrapper.create_file(settings.resolve(backend.wrapper.master_key_file))
    built = build_wrapper(settings, backend.wrapper, FixedClock(NOW))
    built.prepare()
    yield built
    built.close()


def test_round_trip(wrapper: KeyWrapper) -> None:
    for size in (16, 24, 32, 64):
        data_key = os.urandom(size)
        wrapped = wrapper.wrap(data_key, b"context")
        assert data_key not in wrapped
        assert wrapper.unwrap(wrapped, b"context", wrapper.kek_id) == data_key


def test_wrapping_is_randomised(wrapper: KeyWrapper) -> None:
    data_key = os.urandom(32)
    assert wrapper.wrap(data_key, b"c") != wrapper.wrap(data_key, b"c")


def test_another_context_is_refused(wrapper: KeyWrapper) -> None:
    wrapped = wrapper.wrap(os.urandom(32), b"key-1")
    with pytest.raises(StoredKeyCorrupt):
        wrapper.unwrap(wrapped, b"key-2", wrapper.kek_id)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_tampered_blob_is_refused(wrapper: KeyWrapper, where: str) -> None:
    wrapped = bytearray(wrapper.wrap(os.urandom(32), b"c"))
    index = {"first": 0, "middle": len(wrapped) // 2, "last": len(wrapped) - 1}[where]
    wrapped[index] ^= 0x01
    with pytest.raises(StoredKeyCorrupt):
        wrapper.unwrap(bytes(wrapped), b"c", wrapper.kek_id)


def test_a_blob_of_another_kek_is_refused(wrapper: KeyWrapper) -> None:
    wrapped = wrapper.wrap(os.urandom(32), b"c")
    with pytest.raises(StoredKeyCorrupt):
        wrapper.unwrap(wrapped, b"c", "local:0000000000000000")
    with pytest.raises(StoredKeyCorrupt):
        wrapper.unwrap(b"", b"c", wrapper.kek_id)


def test_prepare_again_never_replaces_the_kek(wrapper: KeyWrapper) -> None:
    wrapped = wrapper.wrap(b"k" * 32, b"c")
    kek_id = wrapper.kek_id
    wrapper.prepare()
    assert wrapper.kek_id == kek_id
    assert kek_id.split(":")[0] in {"local", "transit", "pkcs11"}
    assert wrapper.unwrap(wrapped, b"c", kek_id) == b"k" * 32


def test_no_credential_in_repr_or_errors(wrapper: KeyWrapper, tmp_path: Path) -> None:
    secrets = {os.environ[BAO_TOKEN_ENV], os.environ[HSM_PIN_ENV]} - {"unused"}
    master = tmp_path / "master.key"
    if master.exists():
        raw = master.read_bytes()
        secrets |= {raw.hex(), base64.b64encode(raw).decode()}
    with pytest.raises(StoredKeyCorrupt) as refused:
        wrapper.unwrap(b"\x01" + b"\x00" * 40, b"c", wrapper.kek_id)
    shown = f"{wrapper!r} {wrapper} {refused.value} {refused.value!r}"
    assert secrets
    assert not [secret for secret in secrets if secret in shown]


def test_check_passes(wrapper: KeyWrapper) -> None:
    wrapper.check()


def test_concurrent_use(wrapper: KeyWrapper) -> None:
    """Many threads at once (every implementation is shared by the server's threads)."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                data_key = os.urandom(32)
                context = os.urandom(8)
                assert wrapper.unwrap(wrapper.wrap(data_key, context), context, wrapper.kek_id) == data_key
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []


def test_close_is_idempotent(wrapper: KeyWrapper) -> None:
    wrapper.close()
    wrapper.close()
