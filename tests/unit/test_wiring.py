"""Structural guarantees: every domain error maps to HTTP, every route declares a permission, the workload
library stays light."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute

from keybroker import errors
from keybroker.api.app import api_routes, create_app
from keybroker.api.deps import check_routes_declare_permissions, requires, route_permission
from keybroker.api.errors import STATUS_BY_ERROR, status_for
from keybroker.auth.permissions import PERMISSIONS
from keybroker.services import Services


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def test_every_error_class_has_a_status_row() -> None:
    import keybroker.api.deps
    import keybroker.services  # noqa: F401 - imported for its side effect: every error class is defined

    # deliberately 500: never the caller's fault (CopyFailed is the CLI's only)
    server_side = {errors.ConfigurationError, errors.StoredKeyCorrupt, errors.CopyFailed}
    for cls in _all_subclasses(errors.KeybrokerError):
        assert cls.__module__ == "keybroker.errors", f"{cls} belongs in keybroker.errors"
        assert cls in STATUS_BY_ERROR, cls
        assert (status_for(cls("x")) == 500) == (cls in server_side), cls


def test_every_route_declares_a_known_permission(services: Services) -> None:
    declared = {route.path: route_permission(route) for route in api_routes()}
    assert all(permission == "" or permission in PERMISSIONS for permission in declared.values())
    # Every declared route is really served by the app (no router left out of create_app), and vice versa.
    assert set(declared) == set(create_app(services).openapi()["paths"])


def test_an_unknown_permission_refuses_to_start() -> None:
    with pytest.raises(RuntimeError, match="unknown permission 'keys:steal'"):
        requires("keys:steal")


def test_a_route_without_a_permission_refuses_to_start() -> None:
    router = APIRouter()

    @router.get("/open")
    def open_route() -> None:
        return None

    with pytest.raises(RuntimeError, match="routes without a declared permission: \\['GET'\\] /open"):
        check_routes_declare_permissions([r for r in router.routes if isinstance(r, APIRoute)])


@pytest.mark.integration  # a fresh interpreter: this one has the server's packages loaded already
def test_keybroker_client_does_not_load_server_packages() -> None:
    code = (
        "import sys, keybroker_client;"
        "heavy = {'fastapi', 'starlette', 'sqlalchemy', 'alembic', 'pydantic', 'typer', 'uvicorn', 'keybroker'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_keybroker_client_is_its_own_light_distribution() -> None:
    import tomllib

    from tests.conftest import REPO

    client = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())
    requirements = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower() for r in client["project"]["dependencies"]}
    assert requirements <= {"httpx", "cryptography"}
    server = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "keybroker-client" in server["project"]["dependencies"]
