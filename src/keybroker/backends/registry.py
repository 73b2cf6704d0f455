"""Backends by name: builds the configured ``KeyStore`` and ``KeyWrapper`` objects once. The optional vendor
libraries (hvac, PyKMIP, python-pkcs11) are imported only when a backend that needs them is configured."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from keybroker.backends.base import Capability, KeyStore, KeyWrapper, RegisteringKeyStore
from keybroker.backends.embedded import EmbeddedKeyStore
from keybroker.backends.kek_records import unheld_service_kek
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.ca import recorded_kek_id
from keybroker.clock import Clock
from keybroker.config import (
    EmbeddedBackendSettings,
    KmipBackendSettings,
    LocalWrapperSettings,
    Pkcs11WrapperSettings,
    Settings,
    TransitWrapperSettings,
    VaultBackendSettings,
    WrapperSettings,
)
from keybroker.errors import ConfigurationError
from keybroker.storage.db import Database
from keybroker.storage.deployment import deployment_id

__all__ = [
    "Backends",
    "Capability",
    "KeyStore",
    "KeyWrapper",
    "RegisteringKeyStore",
    "build_backends",
    "build_wrapper",
]


@dataclass(frozen=True)
class Backends:
    """The configured stores by name, and the wrapper that also protects keybroker's own secrets (CA and TLS
    private keys, the nonce key): the default backend's wrapper if it is embedded, else the first embedded
    backend's, else the local master key file of the data directory."""

    stores: Mapping[str, KeyStore]
    service_wrapper: KeyWrapper
    wrappers: tuple[KeyWrapper, ...]

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        for wrapper in self.wrappers:
            wrapper.close()


def build_backends(settings: Settings, database: Database, clock: Clock) -> Backends:
    wrappers: dict[str, KeyWrapper] = {}
    stores: dict[str, KeyStore] = {}
    try:
        for name, backend in settings.backends.items():
            if isinstance(backend, EmbeddedBackendSettings):
                wrappers[name] = build_wrapper(settings, backend.wrapper, clock)
                stores[name] = EmbeddedKeyStore(name, database, wrappers[name], clock)
            elif isinstance(backend, VaultBackendSettings):
                from keybroker.backends.vault.store import VaultKvStore

                stores[name] = VaultKvStore.from_settings(name, settings.secrets, backend, clock)
            elif isinstance(backend, KmipBackendSettings):
                from keybroker.backends.kmip.store import KmipKeyStore

                stores[name] = KmipKeyStore.from_settings(name, settings.secrets, backend, _deployment(database))
        extra: tuple[KeyWrapper, ...] = ()
        service = _service_wrapper(settings, database, wrappers)
        if service is None:
            service = build_wrapper(settings, LocalWrapperSettings(), clock)
            extra = (service,)
    except BaseException:
        for store in stores.values():
            store.close()
        for wrapper in wrappers.values():
            wrapper.close()
        raise
    return Backends(stores, service, (*wrappers.values(), *extra))


def _deployment(database: Database) -> Callable[[], str]:
    """The deployment id, read when first needed (``init`` builds the backends before it exists)."""
    cached: list[str] = []

    def read() -> str:
        if not cached:
            cached.append(deployment_id(database))
        return cached[0]

    return read


def _service_wrapper(settings: Settings, database: Database, wrappers: Mapping[str, KeyWrapper]) -> KeyWrapper | None:
    """The wrapper of keybroker's own secrets: the one whose KEK protected them at ``init`` (recorded beside the
    CA), so that changing ``keys.default_backend`` later does not lock the service out of its own keys; before
    ``init``, the default backend's, else the first embedded backend's."""
    recorded = recorded_kek_id(database, settings.data_dir)
    if recorded is not None:
        for wrapper in wrappers.values():
            if wrapper.kek_id == recorded:
                return wrapper
        if recorded.startswith("local:") and settings.resolve(LocalWrapperSettings().master_key_file).exists():
            return None  # the data directory's master key file (the fallback wrapper) may hold it
        held = [wrapper.kek_id for wrapper in wrappers.values()]
        raise ConfigurationError(unheld_service_kek(database, recorded, held))  # (names an unfinished kek rotate)
    return wrappers.get(settings.keys.default_backend) or next(iter(wrappers.values()), None)


def build_wrapper(settings: Settings, wrapper: WrapperSettings, clock: Clock) -> KeyWrapper:
    if isinstance(wrapper, LocalWrapperSettings):
        if wrapper.master_key is not None:
            return LocalKeyWrapper.from_base64(wrapper.master_key.get_secret_value())
        return LocalKeyWrapper.from_file(settings.resolve(wrapper.master_key_file))
    if isinstance(wrapper, TransitWrapperSettings):
        from keybroker.backends.transit import TransitKeyWrapper

        return TransitKeyWrapper.from_settings(settings.secrets, wrapper, clock)
    if isinstance(wrapper, Pkcs11WrapperSettings):
        from keybroker.backends.pkcs11.wrapper import Pkcs11KeyWrapper

        return Pkcs11KeyWrapper.from_settings(settings.secrets, wrapper)
    raise ConfigurationError(f"unknown wrapper type {wrapper!r}")  # pragma: no cover - the union is exhaustive
