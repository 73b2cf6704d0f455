"""Red-team finding 1: no role change, role deletion or token revocation may leave the deployment without an active
token that can manage roles and tokens; the built-in admin role is fixed; ``init --new-admin-token`` recovers."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from keybroker.audit.log import SYSTEM
from keybroker.auth.permissions import BUILTIN_ROLES, PERMISSIONS
from keybroker.clock import FixedClock
from keybroker.config import Settings
from keybroker.services import Services, initialise
from keybroker.storage.tables import RoleRow
from tests.conftest import assert_problem, snapshot

ROLES = "/kbs/v1/roles"


def _token_id(api: TestClient) -> str:
    (only,) = [token for token in api.get("/kbs/v1/tokens").json() if token["revoked_at"] is None]
    return str(only["id"])


def test_emptying_the_admin_role_is_refused(api: TestClient, services: Services) -> None:
    before = snapshot(services)
    body = assert_problem(api.put(f"{ROLES}/admin", json={"permissions": []}), 409, "role_lockout")
    assert "tokens:manage" in body["detail"]
    assert snapshot(services) == before
    assert api.get("/kbs/v1/tokens").status_code == 200


def test_the_admin_role_is_fixed_even_when_another_token_could_manage(api: TestClient, services: Services) -> None:
    services.roles.put("operators", ["tokens:manage"], SYSTEM)
    services.tokens.issue("operator", ["operators"], [], timedelta(days=1), SYSTEM)
    before = snapshot(services)
    fewer = sorted(PERMISSIONS - {"keys:delete"})
    assert_problem(api.put(f"{ROLES}/admin", json={"permissions": fewer}), 409, "role_fixed")
    assert snapshot(services) == before
    same = sorted(PERMISSIONS)
    response = api.put(f"{ROLES}/admin", json={"permissions": same})  # no change: accepted
    assert response.status_code == 200, response.text


def test_taking_tokens_manage_from_the_last_managing_role_is_refused(api: TestClient, services: Services) -> None:
    services.roles.put("operators", ["tokens:manage", "audit:read"], SYSTEM)
    operator, _ = services.tokens.issue("operator", ["operators"], [], timedelta(days=1), SYSTEM)
    api.delete(f"/kbs/v1/tokens/{_admin_id(api)}")  # the operator is now the only manager
    as_operator = {"Authorization": f"Bearer {operator}"}
    before = snapshot(services)
    response = api.put(f"{ROLES}/operators", json={"permissions": ["audit:read"]}, headers=as_operator)
    assert_problem(response, 409, "role_lockout")
    assert snapshot(services) == before
    # Another manager first, then the change is fine.
    services.tokens.issue("second", ["admin"], [], timedelta(days=1), SYSTEM)
    response = api.put(f"{ROLES}/operators", json={"permissions": ["audit:read"]}, headers=as_operator)
    assert response.status_code == 200, response.text


def _admin_id(api: TestClient) -> str:
    tokens = [t for t in api.get("/kbs/v1/tokens").json() if t["revoked_at"] is None and "admin" in t["roles"]]
    return str(tokens[0]["id"])


def test_revoking_the_last_managing_token_is_refused(api: TestClient, services: Services) -> None:
    before = snapshot(services)
    assert_problem(api.delete(f"/kbs/v1/tokens/{_token_id(api)}"), 409, "role_lockout")
    assert snapshot(services) == before
    _, other = services.tokens.issue("second-admin", ["admin"], [], timedelta(days=1), SYSTEM)
    assert api.delete(f"/kbs/v1/tokens/{other.id}").status_code == 204


def test_expired_managers_do_not_count(api: TestClient, services: Services, clock: FixedClock) -> None:
    """A managing token that has expired cannot manage anything: it does not keep the deployment open."""
    services.roles.put("operators", ["tokens:manage"], SYSTEM)
    _, short = services.tokens.issue("short", ["operators"], [], timedelta(seconds=10), SYSTEM)
    clock.advance(timedelta(seconds=11))
    assert_problem(api.delete(f"/kbs/v1/tokens/{_admin_id(api)}"), 409, "role_lockout")
    assert short.id  # the expired manager is still listed, just not counted


def test_deleting_a_role_is_refused_when_it_would_lock_out(api: TestClient, services: Services) -> None:
    """A role held by unrevoked tokens cannot be deleted anyway (role_in_use); a role held only by expired tokens can,
    and that never locks anyone out because expired tokens manage nothing."""
    services.roles.put("spare", ["tokens:manage"], SYSTEM)
    assert api.delete(f"{ROLES}/spare").status_code == 204
    assert_problem(api.delete(f"{ROLES}/admin"), 409, "role_builtin")


def test_new_admin_token_restores_a_changed_admin_role(
    settings: Settings, services: Services, clock: FixedClock
) -> None:
    """A database edited (or damaged by an older version) so that admin grants nothing: init recovers it."""
    with services.database.transaction(write=True) as session:
        session.execute(update(RoleRow).where(RoleRow.name == "admin").values(permissions=[]))
    assert services.roles.get("admin").permissions == ()
    result = initialise(settings, clock, new_admin_token=True)
    assert result.admin_token is not None
    assert set(services.roles.get("admin").permissions) == set(BUILTIN_ROLES["admin"])
    principal = services.tokens.authenticate(result.admin_token)
    assert "tokens:manage" in principal.permissions
    restored = [e for e in services.audit.entries() if e["action"] == "role.restore"]
    assert restored
    assert restored[-1]["details"]["after"] == sorted(BUILTIN_ROLES["admin"])
