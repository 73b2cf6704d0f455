"""``GET /kbs/v1/backends``: every backend checked now, each ok or its error's code and sentence, for a token with
``backends:read`` only (tests/integration/test_cli_backends.py runs it through the CLI against a server process)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from keybroker.api.app import create_app
from keybroker.audit.log import SYSTEM
from keybroker.backends.checks import check_backends
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.errors import BackendUnavailable
from keybroker.services import Services, build_services, initialise
from tests.conftest import NOW, assert_problem


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[TestClient, Services, str]]:
    """The embedded backend (default) and an OpenBao KV backend where nothing listens."""
    (tmp_path / "vault-token").write_text("s.not-a-real-token\n")
    (tmp_path / "vault-token").chmod(0o600)
    backends = {
        "embedded": {"type": "embedded"},
        "vault": {
            "type": "vault",
            "url": f"http://127.0.0.1:{_closed_port()}",
            "auth": {"token": {"file": str(tmp_path / "vault-token")}},
        },
    }
    settings = load_settings(data_dir=tmp_path / "data", overrides={"backends": backends})
    clock = FixedClock(NOW)
    admin = initialise(settings, clock).admin_token
    assert admin is not None
    services = build_services(settings, clock)
    try:
        with TestClient(create_app(services), raise_server_exceptions=False) as client:
            client.headers["Authorization"] = f"Bearer {admin}"
            yield client, services, admin
    finally:
        services.close()


def test_every_backend_is_reported_with_its_failure(deployment: tuple[TestClient, Services, str]) -> None:
    client, services, _ = deployment
    response = client.get("/kbs/v1/backends")
    assert response.status_code == 200, response.text  # (the report is the answer, even when a backend fails)
    body = response.json()
    assert body["replica"] == services.replica_id
    assert body["checked_at"] == "2026-11-27T12:00:00Z"  # the injected clock
    assert body["ok"] is False
    embedded, vault = body["backends"]
    seconds = [embedded.pop("seconds"), vault.pop("seconds")]
    assert all(isinstance(value, float) and value >= 0 for value in seconds)
    assert embedded == {"name": "embedded", "type": "embedded", "kek": "local", "default": True, "ok": True}
    assert vault.pop("detail").startswith("Vault at http://127.0.0.1:")
    assert vault == {"name": "vault", "type": "vault", "kek": None, "default": False, "ok": False,
                     "code": "backend_unavailable"}  # fmt: skip
    assert "not-a-real-token" not in response.text


def test_the_report_needs_backends_read(deployment: tuple[TestClient, Services, str]) -> None:
    client, services, _ = deployment
    year = timedelta(days=365)
    auditor, _ = services.tokens.issue("auditor", ["auditor"], [], year, SYSTEM)
    body = assert_problem(
        client.get("/kbs/v1/backends", headers={"Authorization": f"Bearer {auditor}"}), 403, "forbidden"
    )
    assert "backends:read" in body["detail"]
    assert_problem(client.get("/kbs/v1/backends", headers={"Authorization": ""}), 401, "unauthorized")
    services.roles.put("operator", ["backends:read"], SYSTEM)
    operator, _ = services.tokens.issue("operator", ["operator"], [], year, SYSTEM)
    assert client.get("/kbs/v1/backends", headers={"Authorization": f"Bearer {operator}"}).status_code == 200


class _Store:
    """A store whose check fails the way a given exception makes it fail (the real stores run above)."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, name: str, failure: Exception | None) -> None:
        self.name = name
        self._failure = failure

    def check(self) -> None:
        if self._failure is not None:
            raise self._failure


def test_a_check_that_breaks_is_reported_without_its_text(tmp_path: Path) -> None:
    """An exception that is not keybroker's could hold anything (a URL with a password, a repr): its text stays
    in the server's log; the report says only that the check failed."""
    settings = load_settings(data_dir=tmp_path)
    stores: dict[str, Any] = {
        "embedded": _Store("embedded", RuntimeError("secret-token-in-a-repr")),
        "other": _Store("other", BackendUnavailable("the KMS answered 503", code="backend_unavailable")),
    }
    broken, unavailable = check_backends(stores, settings)
    assert broken["ok"] is False
    assert broken["code"] == "check_failed"
    assert "secret-token" not in str(broken)
    assert (unavailable["type"], unavailable["default"]) == ("_Store", False)  # (not in the configuration)
    assert (unavailable["code"], unavailable["detail"]) == ("backend_unavailable", "the KMS answered 503")
