"""Wiring: builds the service objects from the settings, once, for the API and the CLI's local commands."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from keybroker.auth.tokens import ADMIN_ROLE, TokenStore
from keybroker.backends import build_key_stores
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.clock import Clock, SystemClock
from keybroker.config import EmbeddedBackendSettings, Settings
from keybroker.errors import ConfigurationError
from keybroker.keys.service import KeyService
from keybroker.policy.store import PolicyStore
from keybroker.storage.db import Database

ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name


@dataclass(frozen=True)
class Services:
    settings: Settings
    clock: Clock
    database: Database
    policies: PolicyStore
    keys: KeyService
    tokens: TokenStore

    def close(self) -> None:
        self.database.close()


def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    clock = clock or SystemClock()
    not_initialised = ConfigurationError(
        f"{settings.data_dir} is not initialised; run 'keybroker init --data-dir {settings.data_dir}'"
    )
    if not settings.data_dir.is_dir():
        raise not_initialised
    database = Database.from_url(settings.database_url)
    try:
        migrated = database.is_migrated()
    except SQLAlchemyError as exc:
        database.close()
        raise ConfigurationError(f"cannot open the database: {type(exc).__name__}") from None
    if not migrated:
        database.close()
        raise not_initialised
    database.migrate()
    policies = PolicyStore(database, clock)
    stores = build_key_stores(settings, database, clock)
    keys = KeyService(database, stores, settings.keys.default_backend, policies, clock)
    return Services(settings, clock, database, policies, keys, TokenStore(database, clock))


@dataclass(frozen=True)
class InitResult:
    data_dir: Path
    admin_token: str | None  # only on the run that created it
    created_master_key: bool


def initialise(settings: Settings, clock: Clock | None = None) -> InitResult:
    """Create the data directory, schema, master key and first admin token. Idempotent."""
    clock = clock or SystemClock()
    data_dir = settings.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    created_key = False
    for backend in settings.backends.values():
        if isinstance(backend, EmbeddedBackendSettings) and backend.wrapper.master_key is None:
            path = settings.resolve(backend.wrapper.master_key_file)
            if not path.exists():
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                LocalKeyWrapper.create_file(path)
                created_key = True
    database = Database.from_url(settings.database_url)
    try:
        database.migrate()
        tokens = TokenStore(database, clock)
        token_file = data_dir / ADMIN_TOKEN_FILE
        admin_token = None
        if tokens.count() == 0:
            admin_token = tokens.issue("bootstrap-admin", ADMIN_ROLE)
            _write_secret(token_file, admin_token + "\n")
    finally:
        database.close()
    return InitResult(data_dir, admin_token, created_key)


def _write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, replacing it atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)
    os.replace(tmp, path)
