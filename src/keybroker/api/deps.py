"""Request dependencies: the services, the authenticated principal, and strict JSON bodies.

Every route declares what it needs with ``requires(permission)`` or ``public()``; ``create_app`` refuses to start
if any route declares neither. Authentication runs before the body is parsed, so an unauthenticated caller
learns nothing about the schema.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from keybroker.api.errors import describe_validation_errors
from keybroker.auth.permissions import PERMISSIONS
from keybroker.auth.tokens import Principal
from keybroker.errors import Forbidden, InvalidRequest, Unauthenticated, UnsupportedMediaType
from keybroker.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


class _Permission:
    """Dependency that authenticates the bearer token and checks one permission."""

    def __init__(self, permission: str) -> None:
        if permission not in PERMISSIONS:
            raise RuntimeError(f"route declares an unknown permission {permission!r}")
        self.permission = permission

    def __call__(self, request: Request) -> Principal:
        services = get_services(request)
        header = request.headers.get("authorization")
        if not header:
            raise Unauthenticated("this endpoint needs 'Authorization: Bearer <token>'", code="unauthorized")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'", code="unauthorized")
        principal = services.tokens.authenticate(token.strip())
        request.state.principal = principal
        if self.permission not in principal.permissions:
            raise Forbidden(f"this token does not grant {self.permission}", code="forbidden")
        return principal


class _Public:
    """Marks a route that needs no authentication (health, version)."""

    def __call__(self) -> None:
        return None


def requires(permission: str) -> DependsParam:
    dependency: DependsParam = Depends(_Permission(permission))
    return dependency


def public() -> DependsParam:
    dependency: DependsParam = Depends(_Public())
    return dependency


def route_permission(route: APIRoute) -> str | None:
    """The permission a route declares, ``""`` for public routes, ``None`` if it declares nothing."""
    for dependency in route.dependant.dependencies:
        if isinstance(dependency.call, _Permission):
            return dependency.call.permission
        if isinstance(dependency.call, _Public):
            return ""
    return None


def check_routes_declare_permissions(routes: Iterable[APIRoute]) -> None:
    missing = [f"{sorted(route.methods or ())} {route.path}" for route in routes if route_permission(route) is None]
    if missing:
        raise RuntimeError(f"routes without a declared permission: {', '.join(missing)}")


_JSON_TYPES = ("application/json",)


M = TypeVar("M", bound=BaseModel)


def json_object_of(request: Request, body: bytes) -> dict[str, Any] | None:
    """``body`` (the request's) as a JSON object (same rules as ``json_body``), or None when it is empty."""
    if not body.strip():
        return None
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
        raise UnsupportedMediaType("the request body must be application/json")
    value = _reject_duplicate_members(body)  # one parse: the duplicate check returns the document
    if not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_request")
    return value


def optional_principal(request: Request) -> Principal | None:
    """The bearer token's principal if the request carries one (refused if it is not valid), else None."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'", code="unauthorized")
    principal = get_services(request).tokens.authenticate(token.strip())
    request.state.principal = principal
    return principal


def json_body(model: type[M]) -> Callable[[Request], Coroutine[Any, Any, M]]:
    """A dependency that parses the body as ``model`` strictly: JSON content type, no unknown fields."""

    async def parse(request: Request) -> M:
        body = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if body and content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            raise UnsupportedMediaType("the request body must be application/json")
        if not body.strip():
            raise InvalidRequest("a JSON request body is required", code="invalid_json")
        _reject_duplicate_members(body)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            found = describe_validation_errors(exc.errors(include_input=False, include_url=False))
            if any(error["type"] == "json_invalid" for error in found):
                raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
            raise InvalidRequest("the request body does not match the schema", errors=found) from None

    return parse


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise _DuplicateMember(duplicate)
    return dict(pairs)


class _DuplicateMember(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _reject_duplicate_members(body: bytes) -> Any:
    """Parse ``body``, refusing a member given twice: two readers of one document would see two different requests
    (the last one wins in most parsers, the first in others)."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateMember as exc:
        name = exc.name if len(exc.name) <= 64 and exc.name.isprintable() else "(a member)"
        raise InvalidRequest(f"the JSON member {name!r} appears more than once", code="duplicate_member") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
