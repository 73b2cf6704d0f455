"""Backends by name: builds the configured ``KeyStore`` objects. Optional dependencies load only when chosen."""

from __future__ import annotations

from collections.abc import Mapping

from keybroker.backends.base import Capability, KeyStore, KeyWrapper
from keybroker.backends.embedded import EmbeddedKeyStore
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.clock import Clock
from keybroker.config import EmbeddedBackendSettings, LocalWrapperSettings, Settings
from keybroker.errors import ConfigurationError
from keybroker.storage.db import Database

__all__ = ["Capability", "KeyStore", "KeyWrapper", "build_key_stores", "service_wrapper"]


def build_key_stores(settings: Settings, database: Database, clock: Clock) -> Mapping[str, KeyStore]:
    stores: dict[str, KeyStore] = {}
    for name, backend in settings.backends.items():
        if isinstance(backend, EmbeddedBackendSettings):
            stores[name] = EmbeddedKeyStore(name, database, _build_wrapper(settings, backend.wrapper), clock)
    return stores


def _build_wrapper(settings: Settings, wrapper: LocalWrapperSettings) -> KeyWrapper:
    if wrapper.master_key is not None:
        return LocalKeyWrapper.from_base64(wrapper.master_key.get_secret_value())
    return LocalKeyWrapper.from_file(settings.resolve(wrapper.master_key_file))


def service_wrapper(settings: Settings) -> KeyWrapper:
    """The KEK holder that also protects keybroker's own secrets on disk (the CA and TLS private keys): the
    default backend's wrapper, else the first embedded backend's."""
    candidates = [settings.backends[settings.keys.default_backend], *settings.backends.values()]
    for backend in candidates:
        if isinstance(backend, EmbeddedBackendSettings):
            return _build_wrapper(settings, backend.wrapper)
    raise ConfigurationError("no backend with a key wrapper is configured to protect the service's own keys")
