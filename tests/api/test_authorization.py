"""Every role against every route: allowed gets past authorisation (2xx, or 4xx from validation), not allowed gets
403, and no, expired, revoked, forged or foreign tokens get 401 with their own code. Every refusal is audited."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from keybroker.api.app import api_routes, create_app
from keybroker.api.deps import route_permission
from keybroker.audit.log import SYSTEM
from keybroker.auth.permissions import BUILTIN_ROLES
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.services import Services, build_services, initialise
from tests.conftest import NOW

ROUTES = [(route, method) for route in api_routes() for method in sorted(route.methods)]
ROLES = sorted(BUILTIN_ROLES)


@dataclass
class World:
    client: TestClient
    services: Services
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data_dir: Path = tmp_path_factory.mktemp("authz") / "data"
    clock = FixedClock(NOW)
    # Hundreds of anonymous requests from one client: lift the unauthenticated rate limit (tested on its own).
    unlimited = {"limits": {"unauthenticated_rps": 1e6, "unauthenticated_burst": 10**6}}
    settings = load_settings(data_dir=data_dir, overrides=unlimited)
    initialise(settings, clock)
    services = build_services(settings, clock)
    year = timedelta(days=365)
    tokens = {role: services.tokens.issue(role, [role], [], year, SYSTEM)[0] for role in ROLES}
    tokens["expired"] = services.tokens.issue("short", ["admin"], [], timedelta(seconds=1), SYSTEM)[0]
    revoked, info = services.tokens.issue("revoked", ["admin"], [], year, SYSTEM)
    services.tokens.revoke(info.id, SYSTEM)
    tokens["revoked"] = revoked
    tokens["forged"] = tokens["admin"][:-4] + "AAAA"
    tokens["other-deployment"] = "kb_0123456789ab_" + tokens["admin"][-43:]
    clock.advance(timedelta(seconds=5))
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        yield World(client, services, tokens)
    services.close()


def _path(route: APIRoute) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: "x" if m.group(0) == "{name}" else str(uuid.uuid4()), route.path)


def _call(world: World, route: APIRoute, method: str, token: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs: dict[str, object] = {"headers": headers}
    if method in ("POST", "PUT"):
        kwargs["json"] = {}
    response = world.client.request(method, _path(route), **kwargs)
    is_json = response.headers.get("content-type", "").endswith("json")
    body = response.json() if is_json and response.content else {}
    return response.status_code, body if isinstance(body, dict) else {}


def _last_audit(world: World) -> dict[str, object]:
    return world.services.audit.entries(after_seq=world.services.audit.head()[0] - 1)[0]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("route", "method"), ROUTES, ids=[f"{m} {r.path}" for r, m in ROUTES])
def test_role_against_route(world: World, route: APIRoute, method: str, role: str) -> None:
    permission = route_permission(route)
    status, body = _call(world, route, method, world.tokens[role])
    if permission == "" or permission in BUILTIN_ROLES[role]:
        assert status not in (401, 403), body
        assert status < 500, body
    else:
        assert (status, body.get("code")) == (403, "forbidden")
        entry = _last_audit(world)
        assert (entry["action"], entry["outcome"]) == ("auth.refused", "denied")
        assert entry["details"] == {"status": 403, "code": "forbidden", "path": _path_of(entry)}
        assert str(entry["actor"]).endswith(f"({role})")


def _path_of(entry: dict[str, object]) -> object:
    return entry["details"]["path"]


REFUSED = [
    (None, "unauthorized"),
    ("expired", "token_expired"),
    ("revoked", "token_revoked"),
    ("forged", "invalid_token"),
    ("other-deployment", "token_wrong_deployment"),
]


@pytest.mark.parametrize(("token", "code"), REFUSED, ids=[c for _, c in REFUSED])
@pytest.mark.parametrize(("route", "method"), ROUTES, ids=[f"{m} {r.path}" for r, m in ROUTES])
def test_unauthenticated_against_route(
    world: World, route: APIRoute, method: str, token: str | None, code: str
) -> None:
    refusals = world.client.app.state.refusals
    head, pending = world.services.audit.head()[0], refusals.pending()
    status, body = _call(world, route, method, world.tokens[token] if token else None)
    if route_permission(route) == "":
        assert status not in (401, 403)
        return
    assert (status, body.get("code")) == (401, code)
    # Refusals without a valid token are audited in aggregate (test_anonymous_audit.py), not one entry each.
    assert world.services.audit.head()[0] == head
    assert refusals.pending() == pending + 1


def test_a_role_that_loses_a_permission_stops_its_tokens(world: World) -> None:
    token = world.services.tokens.issue("temp", ["key-manager"], [], timedelta(days=1), SYSTEM)[0]
    headers = {"Authorization": f"Bearer {token}"}
    assert world.client.get("/kbs/v1/keys", headers=headers).status_code == 200
    manager = sorted(BUILTIN_ROLES["key-manager"])
    world.services.roles.put("key-manager", [p for p in manager if p != "keys:search"], SYSTEM)
    try:
        response = world.client.get("/kbs/v1/keys", headers=headers)
        assert (response.status_code, response.json()["code"]) == (403, "forbidden")
        assert world.client.get(f"/kbs/v1/keys/{uuid.uuid4()}", headers=headers).status_code == 404
    finally:
        world.services.roles.put("key-manager", manager, SYSTEM)
    assert world.client.get("/kbs/v1/keys", headers=headers).status_code == 200
