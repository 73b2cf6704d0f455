"""``/openapi.json``: FastAPI's paths and parameters, completed from the declared table (``operations.py``).

FastAPI contributes what it can see (paths, methods, path and query parameters, docstrings). The rest comes
from the table and from the routes' permission declarations, not from FastAPI's dependency solving: request and
response bodies, the bearer scheme on authenticated routes (none on public ones), each route's permission
(``x-permission`` and a sentence in its description), and its problem+json refusals with their codes
(``x-problem-codes``). The document is the one shipped as docs/openapi.json (a test keeps the two equal).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from keybroker.api.deps import route_permission
from keybroker.api.errors import PROBLEM_CONTENT_TYPE
from keybroker.api.openapi.models import Problem
from keybroker.api.openapi.operations import OPERATIONS, Body, Operation

DESCRIPTION = """\
keybroker releases keys to Intel SGX enclaves and TDX confidential VMs that prove with a DCAP quote what their
key's transfer policy demands. The reference, with every field and error code, is docs/api.md in the repository.

Authenticated operations take `Authorization: Bearer <token>`; each names the permission its token must grant
(`x-permission`). Bodies are JSON objects (`Content-Type: application/json`): unknown members and members given
twice are refused. Every refusal is an RFC 9457 `application/problem+json` body whose `code` is stable; each
response lists the codes it can carry (`x-problem-codes`).
"""

BEARER = "bearer"
_TOKEN_REFUSALS = ("unauthorized", "invalid_token", "token_expired", "token_revoked", "token_wrong_deployment")
_BODY_REFUSALS: Mapping[int, tuple[str, ...]] = {
    400: ("invalid_json", "duplicate_member", "invalid_request"),
    413: ("payload_too_large",),
    415: ("unsupported_media_type",),
}
_STATUS_TEXT = {
    400: "Malformed or inconsistent input",
    401: "No valid bearer token, or evidence that did not verify",
    403: "Authenticated but not allowed",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    415: "The body is not application/json",
    429: "Too many requests: retry after Retry-After seconds",
    503: "A backend, the database or the audit log is unavailable",
}


class DocumentedAPI(FastAPI):
    """FastAPI whose ``/openapi.json`` is ``build_document``'s, over the routes ``create_app`` served."""

    documented_routes: Sequence[APIRoute] = ()

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = build_document(self.title, self.version, self.documented_routes)
        return self.openapi_schema


def build_document(title: str, version: str, routes: Sequence[APIRoute]) -> dict[str, Any]:
    """The document of ``routes`` (their paths include their routers' prefixes)."""
    doc = get_openapi(title=title, version=version, description=DESCRIPTION, routes=routes)
    permissions = {
        f"{method} {route.path}": route_permission(route) for route in routes for method in route.methods or ()
    }
    keys = {f"{method.upper()} {path}": op for path, item in doc["paths"].items() for method, op in item.items()}
    missing = sorted(set(keys) - set(OPERATIONS))
    if missing:
        raise RuntimeError(f"not documented in keybroker.api.openapi.operations: {', '.join(missing)}")
    schemas = _Schemas(OPERATIONS[key] for key in keys)
    for key, operation in keys.items():
        _document(key, operation, OPERATIONS[key], permissions.get(key), schemas)
    doc["components"] = {
        "schemas": schemas.definitions(),
        "securitySchemes": {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": "a keybroker token (kb_...): keybroker token create, or the admin token of init",
            }
        },
        "headers": {
            "RequestId": {
                "description": "this request's id (the client's X-Request-Id if it is safe, else a new one)",
                "required": True,
                "schema": {"type": "string"},
            }
        },
    }
    return doc


def _document(key: str, operation: dict[str, Any], spec: Operation, permission: str | None, schemas: _Schemas) -> None:
    method = key.split(" ", 1)[0]
    operation["summary"] = spec.summary
    parameters = operation.setdefault("parameters", [])
    unknown = set(spec.query) - {parameter["name"] for parameter in parameters}
    if unknown:
        raise RuntimeError(f"{key}: the table gives schemas of parameters it does not have: {sorted(unknown)}")
    for parameter in parameters:
        parameter["schema"] = spec.query.get(parameter["name"]) or _without_null(parameter["schema"])
    parameters.extend(spec.parameters)
    if not parameters:
        del operation["parameters"]
    sentence = _access(operation, key, permission, spec.bearer_grants)
    described = operation.get("description", "").strip()
    operation["description"] = f"{described}\n\n{sentence}" if described else sentence

    if spec.request is not None:
        schema = schemas.one_of(spec.request, "validation")
        operation["requestBody"] = {
            "required": spec.request_required,
            "content": {"application/json": {"schema": schema}},
        }
    elif "requestBody" in operation:
        raise RuntimeError(f"{key}: FastAPI found a body the table does not declare")

    responses: dict[str, Any] = {str(spec.status): _success(spec, schemas)}
    for status, model in spec.answers.items():
        responses[str(status)] = _response(model.__name__, {"application/json": {"schema": schemas.ref(model)}})
    for status, codes in sorted(_codes(key, method, operation, spec, permission).items()):
        responses[str(status)] = _problem(status, codes, schemas)
    operation["responses"] = responses


def _access(operation: dict[str, Any], key: str, permission: str | None, optional: str | None) -> str:
    """Security and ``x-permission`` of an operation, and the sentence that says them."""
    if permission is None:
        raise RuntimeError(f"{key} declares no permission")
    if permission:
        operation["security"] = [{BEARER: []}]
        operation["x-permission"] = permission
        return f"Requires a bearer token granting `{permission}`."
    if optional:
        operation["security"] = [{}, {BEARER: []}]
        return (
            "Public: attestation is the credential. A bearer token is needed only when the key's transfer policy "
            f"names `client_permissions_allof`: one granting `{optional}` whose context holds every one of them; "
            "a token that is sent but not valid is refused either way."
        )
    operation["security"] = []
    return "Public: no token needed."


def _success(spec: Operation, schemas: _Schemas) -> dict[str, Any]:
    headers: dict[str, Any] = {name: _header(text) for name, text in spec.headers.items()}
    if spec.response is None:
        return _response("No content", None, headers)
    schema = dict(spec.response) if isinstance(spec.response, dict) else schemas.one_of(spec.response)
    if spec.many:
        schema = {"type": "array", "items": schema}
    content = {spec.media_type: {"schema": schema}, **{media: {"schema": s} for media, s in spec.also.items()}}
    return _response(spec.summary, content, headers)


def _codes(
    key: str, method: str, operation: dict[str, Any], spec: Operation, permission: str | None
) -> dict[int, list[str]]:
    """Every status and code the operation can refuse with: the common ones of its kind, then its own."""
    found: dict[int, list[str]] = defaultdict(list)

    def add(status: int, codes: Iterable[str]) -> None:
        found[status].extend(code for code in codes if code not in found[status])

    if spec.request is not None:
        for status, codes in _BODY_REFUSALS.items():
            add(status, codes)
    if any(parameter["in"] == "query" for parameter in operation.get("parameters", ())):
        add(400, ["invalid_request"])
    if spec.strict_query:
        add(400, ["unknown_query_parameter", "duplicate_query_parameter", "invalid_request"])
    if spec.paged:
        add(400, ["invalid_limit", "invalid_cursor"])
    if permission:
        add(401, _TOKEN_REFUSALS)
        add(403, ["forbidden"])
    for status, codes in spec.errors.items():
        add(status, codes)
    add(429, ["rate_limited"])
    if spec.database:
        add(503, ["database_unavailable"])
    if permission and method != "GET":
        add(503, ["audit_unavailable"])
    return found


def _problem(status: int, codes: list[str], schemas: _Schemas) -> dict[str, Any]:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = _header('Bearer realm="keybroker"')
    if status == 429 or "server_busy" in codes:
        headers["Retry-After"] = _header("seconds" + (" (429, and 503 server_busy)" if status == 503 else ""))
    text = f"{_STATUS_TEXT.get(status, 'Refused')}: " + ", ".join(f"`{code}`" for code in codes)
    response = _response(text, {PROBLEM_CONTENT_TYPE: {"schema": schemas.ref(Problem)}}, headers)
    response["x-problem-codes"] = codes
    return response


def _response(
    description: str, content: dict[str, Any] | None, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    response["headers"] = {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}, **(headers or {})}
    if content is not None:
        response["content"] = content
    return response


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's ``X | None`` is X: a query string has no null (absent is the default)."""
    options = schema.get("anyOf")
    if options and len(options) == 2 and {"type": "null"} in options:
        kept = dict(next(option for option in options if option != {"type": "null"}))
        return {**{k: v for k, v in schema.items() if k != "anyOf"}, **kept}
    return schema


class _Schemas:
    """The models the document refers to, rendered together into ``components/schemas``."""

    def __init__(self, specs: Iterable[Operation]) -> None:
        wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Problem, "serialization"): None}
        for spec in specs:
            wanted.update(dict.fromkeys((model, "validation") for model in _models(spec.request)))
            responses = [*spec.answers.values(), *_models(None if isinstance(spec.response, dict) else spec.response)]
            wanted.update(dict.fromkeys((model, "serialization") for model in responses))
        self._refs, rendered = models_json_schema(list(wanted), ref_template="#/components/schemas/{model}")
        self._definitions: dict[str, Any] = dict(rendered.get("$defs", {}))

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
        return dict(self._refs[(model, mode)])

    def one_of(self, body: Body, mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
        refs = [self.ref(model, mode) for model in _models(body)]
        return refs[0] if len(refs) == 1 else {"oneOf": refs}

    def definitions(self) -> dict[str, Any]:
        return self._definitions


def _models(body: Body | None) -> tuple[type[BaseModel], ...]:
    return () if body is None else body if isinstance(body, tuple) else (body,)
