"""Shared fixtures: an initialised data directory, the services built from it, and an in-process API client."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from keybroker.api.app import create_app
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.clock import FixedClock
from keybroker.config import Settings, load_settings
from keybroker.services import Services, build_services, initialise
from keybroker.storage.db import Database
from keybroker.storage.tables import ApiTokenRow, EmbeddedMaterialRow, KeyRow, RoleRow, TransferPolicyRow
from tests.peers.postgres import Postgres
from tests.peers.softhsm import SoftHsm

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_POLICY = json.loads((REPO / "examples" / "transfer-policy.json").read_text())
NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


# The backends of the contract suite that need a real peer (OpenBao, the PyKMIP server, a SoftHSM2 token made with
# softhsm2-util); "embedded" runs in-process.
PEER_BACKENDS = frozenset({"vault-kv1", "vault-kv2", "embedded-transit", "embedded-pkcs11", "kmip"})
# Modules whose every test starts a peer or a process.
PROCESS_MODULES = frozenset(
    {
        "test_kmip_store.py",
        "test_pkcs11_wrapper.py",
        "test_vault_auth.py",
        "test_vault_tls.py",
        "test_kmip_generation.py",
    }
)


def _starts_processes(item: pytest.Item) -> bool:
    if "integration" in item.path.parts or item.path.name in PROCESS_MODULES:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("database_kind") == "postgresql":
        return True
    if "backend_name" in params:  # the contract suite starts its peers lazily, for the backends that need them
        return params["backend_name"] in PEER_BACKENDS
    names = getattr(item, "fixturenames", ())
    return "softhsm" in names or "peers" in names or "postgres" in names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``integration``: every test that starts a process (a server, a peer, a command). ``pytest -m "not
    integration"`` is then the fast run, and ``_no_processes`` proves it starts none."""
    for item in items:
        if item.get_closest_marker("integration") is None and _starts_processes(item):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _no_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test without the integration marker may not start a process (keybroker's own helper processes, made by
    multiprocessing, are not started through subprocess and stay allowed)."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{request.node.nodeid} starts a process ({args[:1]}) but is not marked integration")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.fixture(autouse=True)
def _no_keybroker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's KEYBROKER_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("KEYBROKER_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _pinned_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich and click read COLUMNS: tests see the same width on every terminal (a CLI test once passed only at 80+
    columns). Narrow terminals are tested on purpose (test_cli.py), with their own COLUMNS."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("LINES", raising=False)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """One SoftHSM2 token directory for the whole run: SoftHSM reads SOFTHSM2_CONF once per C_Initialize and
    python-pkcs11 keeps one library per path, so every in-process user shares it (tests make tokens by label)."""
    return SoftHsm(tmp_path_factory.mktemp("softhsm"))


PG_PASSWORD_ENV = "KB_TEST_PG_PASSWORD"


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL cluster for the run; each test that uses it gets a database of its own."""
    server = Postgres(tmp_path_factory.mktemp("postgres")).init()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database(database_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database of the kind under test (SQLite in a temp dir, or a fresh PostgreSQL database)."""
    if database_kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'kb.db'}"
    else:
        server: Postgres = request.getfixturevalue("postgres")
        url = server.url_for(server.create_database(), password=True).replace("postgresql://", "postgresql+psycopg://")
    migrated = Database.from_url(url)
    migrated.migrate()
    yield migrated
    migrated.close()


@pytest.fixture
def database_settings(
    database_kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Path], dict[str, Any]]:
    """For a data directory: the settings overrides of the database under test (none for SQLite). On PostgreSQL a
    fresh database, its password from the environment, and a master key file given to the data directory (as a
    replica of a PostgreSQL deployment must be given the deployment's KEK)."""

    def prepare(data_dir: Path) -> dict[str, Any]:
        if database_kind == "sqlite":
            return {}
        server: Postgres = request.getfixturevalue("postgres")
        monkeypatch.setenv(PG_PASSWORD_ENV, server.password)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (data_dir / "master.key").exists():
            LocalKeyWrapper.create_file(data_dir / "master.key")
        url = server.url_for(server.create_database())
        return {"database": {"url": url, "password": {"env": PG_PASSWORD_ENV}}}

    return prepare


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data")


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
def admin_token(settings: Settings, clock: FixedClock) -> str:
    result = initialise(settings, clock)
    assert result.admin_token is not None
    return result.admin_token


@pytest.fixture
def services(settings: Settings, clock: FixedClock, admin_token: str) -> Iterator[Services]:
    built = build_services(settings, clock)
    yield built
    built.close()


@pytest.fixture
def api(services: Services, admin_token: str) -> Iterator[TestClient]:
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {admin_token}"
        yield client


def sgx_policy(**changes: Any) -> dict[str, Any]:
    policy = copy.deepcopy(EXAMPLE_POLICY)
    policy.update(changes)
    return policy


@pytest.fixture
def policy_id(api: TestClient) -> str:
    response = api.post("/kbs/v1/key-transfer-policies", json=sgx_policy())
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def snapshot(services: Services) -> dict[str, list[tuple[Any, ...]]]:
    """Every row keybroker stores, to prove that a refused request changed nothing."""
    with services.database.transaction() as session:
        return {
            "keys": sorted(
                (r.id, r.transfer_policy_id, r.backend_ref, r.label, r.usage, r.created_at, r.algorithm, r.key_length)
                for r in session.scalars(select(KeyRow))
            ),
            "policies": sorted(
                (r.id, json.dumps(r.document, sort_keys=True), r.immutable)
                for r in session.scalars(select(TransferPolicyRow))
            ),
            "material": sorted(
                (r.ref, r.kek_id, r.wrapped_dek, r.ciphertext) for r in session.scalars(select(EmbeddedMaterialRow))
            ),
            "tokens": sorted((r.id, r.revoked_at, tuple(r.roles)) for r in session.scalars(select(ApiTokenRow))),
            "roles": sorted((r.name, tuple(r.permissions)) for r in session.scalars(select(RoleRow))),
        }


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert body["type"].endswith(code)
    assert body["title"]
    assert body["detail"]
    return body
