"""The OpenAPI document and docs/api.md: valid, complete, equal to what is served, and saying what the routes do.

The document's bodies, security and errors come from a declared table (keybroker.api.openapi.operations); these
tests tie that table to the routes themselves: every route is in it, each documented body is the model the route
parses, each permission is the one the route declares. test_openapi_fuzz.py checks the answers against it.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from pydantic import BaseModel

from keybroker.api.app import api_routes, create_app
from keybroker.api.deps import route_permission
from keybroker.api.openapi import DocumentedAPI
from keybroker.api.openapi.__main__ import document, render
from keybroker.api.openapi.operations import OPERATIONS
from keybroker.services import Services
from tests.conftest import REPO, assert_problem

API_MD = REPO / "docs" / "api.md"
SHIPPED = REPO / "docs" / "openapi.json"
DOCUMENT = document()
ROUTES = [(method, route) for route in api_routes() for method in sorted(route.methods or ())]
IDS = [f"{method} {route.path}" for method, route in ROUTES]


def _operation(method: str, route: APIRoute) -> dict[str, Any]:
    operation: dict[str, Any] = DOCUMENT["paths"][route.path][method.lower()]
    return operation


def test_the_document_is_valid_openapi() -> None:
    validate(DOCUMENT)


def test_the_served_document_is_the_shipped_one(api: TestClient) -> None:
    served = api.get("/openapi.json", headers={"Authorization": ""})  # public: no token needed
    assert served.status_code == 200
    assert served.json() == DOCUMENT
    assert SHIPPED.read_text(encoding="utf-8") == render(DOCUMENT), (
        "docs/openapi.json is stale: .venv/bin/python -m keybroker.api.openapi docs/openapi.json"
    )


def test_a_role_documents_only_what_it_serves(services: Services) -> None:
    attestation = create_app(services, role="attestation").openapi()
    assert "/appraisal/v1/attest" in attestation["paths"]
    assert "/kbs/v1/keys" not in attestation["paths"]
    validate(attestation)


def test_the_table_documents_every_route_and_nothing_else() -> None:
    assert set(OPERATIONS) == set(IDS)
    documented = {f"{m.upper()} {path}" for path, item in DOCUMENT["paths"].items() for m in item}
    assert documented == set(IDS)
    assert len(IDS) >= 46


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=IDS)
def test_security_and_permission_are_the_routes(method: str, route: APIRoute) -> None:
    operation = _operation(method, route)
    permission = route_permission(route)
    if permission:
        assert operation["security"] == [{"bearer": []}]
        assert operation["x-permission"] == permission
        assert f"Requires a bearer token granting `{permission}`." in operation["description"]
        assert {"401", "403"} <= set(operation["responses"])
        assert "forbidden" in operation["responses"]["403"]["x-problem-codes"]
    else:
        assert "x-permission" not in operation
        assert {} in operation["security"] or operation["security"] == []
        assert "Public" in operation["description"]
    assert DOCUMENT["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": DOCUMENT["components"]["securitySchemes"]["bearer"]["description"],
    }


def _parsed_model(route: APIRoute) -> type[BaseModel] | None:
    """The model the route's ``json_body(Model)`` dependency parses, if it has one."""
    for dependency in route.dependant.dependencies:
        if getattr(dependency.call, "__qualname__", "") == "json_body.<locals>.parse":
            assert dependency.call is not None
            model: type[BaseModel] = inspect.getclosurevars(dependency.call).nonlocals["model"]
            return model
    return None


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=IDS)
def test_each_documented_body_is_the_one_the_route_parses(method: str, route: APIRoute) -> None:
    operation = _operation(method, route)
    model = _parsed_model(route)
    if model is None:
        # No json_body: only the transfer route reads a body (by hand), and it documents its three forms.
        body = operation.get("requestBody")
        assert body is None or route.path == "/kbs/v1/keys/{key_id}/transfer"
        return
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert operation["requestBody"]["required"] is True
    documented = OPERATIONS[f"{method} {route.path}"].request
    assert isinstance(documented, type)
    assert issubclass(documented, BaseModel)
    # The parsed model itself, or a subclass that only completes its JSON schema.
    assert documented is model or (
        issubclass(documented, model)
        and documented.model_fields.keys() == model.model_fields.keys()
        and not inspect.get_annotations(documented)  # declares no field of its own
    )
    assert schema == {"$ref": f"#/components/schemas/{documented.__name__}"}
    assert {"400", "413", "415"} <= set(operation["responses"])
    assert {"invalid_json", "duplicate_member"} <= set(operation["responses"]["400"]["x-problem-codes"])


def test_the_transfer_body_has_its_three_forms() -> None:
    operation = DOCUMENT["paths"]["/kbs/v1/keys/{key_id}/transfer"]["post"]
    body = operation["requestBody"]
    assert body["required"] is False
    refs = [one["$ref"].rsplit("/", 1)[1] for one in body["content"]["application/json"]["schema"]["oneOf"]]
    assert refs == ["NonceRequest", "BackgroundCheckRequest", "PassportRequest"]
    assert [p["name"] for p in operation["parameters"]] == ["key_id", "Attestation-Type"]
    assert operation["security"] == [{}, {"bearer": []}]


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=IDS)
def test_every_refusal_is_problem_json_with_its_codes(method: str, route: APIRoute) -> None:
    responses = _operation(method, route)["responses"]
    assert "422" not in responses  # FastAPI's default: keybroker answers 400 invalid_request instead
    assert "429" in responses
    errors = {status: r for status, r in responses.items() if int(status) >= 400}
    for status, response in errors.items():
        if route.path == "/readyz" and status == "503":
            assert "application/json" in response["content"]  # readiness says which check failed
            continue
        assert response["content"] == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        codes = response["x-problem-codes"]
        assert codes
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", code) for code in codes)
        assert all(f"`{code}`" in response["description"] for code in codes)


def test_interactive_pages_are_gone(api: TestClient) -> None:
    """They would load Swagger UI / ReDoc from a CDN: blank pages on an air-gapped site."""
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert_problem(api.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/kbs/v1/keys", "GET, POST"),
        ("POST", "/kbs/v1/keys/abc", "GET, PUT, DELETE"),
        ("DELETE", "/version", "GET"),
        ("GET", "/kbs/v1/keys/abc/transfer", "POST"),
    ],
)
def test_method_not_allowed_names_every_method_of_the_path(
    api: TestClient, method: str, path: str, allowed: str
) -> None:
    """Found by schemathesis: Starlette's Allow named only the methods of the first route matching the path."""
    response = api.request(method, path)
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed


def test_the_app_class_serves_the_document(services: Services) -> None:
    app = create_app(services)
    assert isinstance(app, DocumentedAPI)
    assert app.docs_url is None
    assert app.redoc_url is None
    assert app.openapi() is app.openapi()  # built once


# --- docs/api.md ----------------------------------------------------------------------------------------------------

_MENTION = re.compile(r"`(GET|POST|PUT|DELETE|PATCH) (/[A-Za-z0-9_./{}-]*)")


def _mentioned() -> set[str]:
    return {f"{method} {path}" for method, path in _MENTION.findall(API_MD.read_text(encoding="utf-8"))}


def test_api_md_has_every_route() -> None:
    missing = sorted(set(IDS) - _mentioned())
    assert missing == [], f"docs/api.md does not describe: {missing}"


def test_every_endpoint_of_api_md_exists() -> None:
    served = {*IDS, "GET /openapi.json"}
    unknown = sorted(_mentioned() - served)
    assert unknown == [], f"docs/api.md describes endpoints the service does not have: {unknown}"


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=IDS)
def test_api_md_names_each_routes_permission(method: str, route: APIRoute) -> None:
    """Each endpoint's heading line says who may call it: its permission, or public."""
    text = API_MD.read_text(encoding="utf-8")
    heading = re.search(rf"^#+ .*`{method} {re.escape(route.path)}`.*$", text, re.M)
    assert heading, f"docs/api.md has no heading for {method} {route.path}"
    permission = route_permission(route)
    assert (f"`{permission}`" if permission else "public") in heading.group(0)


def test_api_md_lists_every_documented_code() -> None:
    text = API_MD.read_text(encoding="utf-8")
    codes = {
        code
        for item in DOCUMENT["paths"].values()
        for operation in item.values()
        for response in operation["responses"].values()
        for code in response.get("x-problem-codes", ())
    }
    missing = sorted(code for code in codes if f"`{code}`" not in text)
    assert missing == []


def test_api_md_names_every_field_of_every_body() -> None:
    """Request and response fields (the top-level members of every body and of the objects in them)."""
    text = API_MD.read_text(encoding="utf-8")
    missing = sorted(
        f"{name}.{member}"
        for name, component in DOCUMENT["components"]["schemas"].items()
        for member in component.get("properties", {})
        if not re.search(rf"\b{re.escape(member)}\b", text)
    )
    assert missing == []


def test_what_api_md_says_is_not_served_is_not(api: TestClient) -> None:
    section = API_MD.read_text(encoding="utf-8").split("## Not served by this version", 1)[1]
    prefixes = re.findall(r"`(/kbs/v[01](?:/[a-z]+)?)`", section)
    assert prefixes == ["/kbs/v1/secrets", "/kbs/v0"]
    assert not [path for path in DOCUMENT["paths"] if path.startswith(tuple(prefixes))]
    assert_problem(api.get("/kbs/v1/secrets"), 404, "not_found")


def test_the_readme_points_at_api_md() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "](docs/api.md)" in readme
    assert "/docs`" not in readme.replace("docs/api.md", "")


def test_shipped_document_parses() -> None:
    assert json.loads(SHIPPED.read_text(encoding="utf-8"))["info"]["title"] == "keybroker"
