"""What each operation takes and answers, declared: the table ``/openapi.json`` is built from.

Routes parse their bodies themselves (``json_body``: strict JSON, duplicate members refused, keybroker's own
problem codes; the transfer route reads raw bytes), so FastAPI cannot see the bodies; and many build their JSON by
hand. This table names the request model, the response model and the error codes of every operation, keyed by
``METHOD /path``, independently of how a route is implemented (a test checks that it covers every route, and
schemathesis checks the responses against it). Permissions are not repeated here: they come from the routes'
``requires(...)``/``public()`` declarations (``keybroker.api.deps``).

The codes every operation of a kind can return are added by the builder (``keybroker.api.openapi``): bearer token
refusals on authenticated routes, body parsing on routes with a body, query parsing, rate limits, an unavailable
database or audit log. ``errors`` below lists what is particular to an operation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

import keybroker.api.openapi.models as m
from keybroker.api.routes.admin import RolePutRequest, TokenCreateRequest
from keybroker.api.routes.attestation import AttestRequest, PolicyRequest
from keybroker.api.routes.cms import CsrRequest
from keybroker.api.routes.collateral import ImportRequest
from keybroker.api.routes.keys import CertifyRequest
from keybroker.api.schemas import KeyCreateRequest, KeyOut, KeyUpdateRequest, VersionOut
from keybroker.policy.model import TransferPolicyDocument

Body = type[BaseModel] | tuple[type[BaseModel], ...]  # a tuple: one of these


@dataclass(frozen=True)
class Operation:
    summary: str
    response: Body | dict[str, Any] | None  # the success body (a schema for text); None: no body (204)
    status: int = 200
    media_type: str = "application/json"
    many: bool = False  # the success body is a JSON array of ``response``
    request: Body | None = None
    request_required: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)  # success response headers: name -> description
    errors: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # codes particular to this operation
    strict_query: bool = False  # unknown, repeated or empty query parameters are refused (``reject_unknown_query``)
    paged: bool = False  # ``limit``/``cursor`` pagination (``Link`` and ``X-Next-Cursor``)
    also: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # other media types of the success answer
    answers: Mapping[int, type[BaseModel]] = field(default_factory=dict)  # other statuses with a JSON body
    query: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # parameter schemas FastAPI cannot tell
    parameters: tuple[dict[str, Any], ...] = ()  # parameters the route reads by hand (headers)
    bearer_grants: str | None = None  # a public route that needs, in some cases, a token granting this
    database: bool = True  # answers need the database (else no 503 database_unavailable)


def _one_or_many(schema: dict[str, Any]) -> None:
    """``attestation_type`` is read as a list, and a single string is taken for a list of one."""
    listed = schema["properties"]["attestation_type"]
    schema["properties"]["attestation_type"] = {
        "anyOf": [listed["items"], {k: v for k, v in listed.items() if k != "title"}],
        "title": listed.get("title", "Attestation Type"),
        "description": "SGX, TDX, or a list of them",
    }


class TransferPolicyRequest(TransferPolicyDocument):
    """The body of POST/PUT /kbs/v1/key-transfer-policies: the parsed model, its JSON schema completed."""

    model_config = ConfigDict(json_schema_extra=_one_or_many)


class StoredTransferPolicy(TransferPolicyDocument):
    """A key transfer policy as stored and sent back: the document (defaults filled in, unset members left out),
    its id and its times."""

    id: str
    created_at: m.Time
    updated_at: m.Time


PEM = {"type": "string", "description": "PEM text"}
SIGNED_JSON = {"type": "object", "description": "Intel's signed JSON, byte for byte as the cache holds it"}
TEXT = {"type": "string"}
BINARY = {"type": "string", "format": "binary"}

_PAGE_HEADERS = {
    "Link": '<path?query&cursor=...>; rel="next": the next page, when there is one',
    "X-Next-Cursor": "the cursor of the next page, when there is one",
}
_KEY_CREATE = (
    "unsupported_algorithm",
    "unsupported_key_length",
    "unsupported_curve",
    "conflicting_key_source",
    "invalid_key_material",
    "unknown_transfer_policy",
    "unknown_backend",
    "backend_unsupported",
    "kmip_object_not_found",
    "kmip_object_managed",
)
_BACKEND = ("backend_unavailable",)
_ROLE_CHANGE = ("unknown_permission", "invalid_role_name")
_COLLATERAL_READ = {404: ("collateral_not_found",)}
_TRANSFER_REFUSALS: Mapping[int, tuple[str, ...]] = {
    400: ("invalid_request",),
    401: (
        "attestation_failed",
        "nonce_invalid",
        "nonce_expired",
        "unauthorized",
        "invalid_token",
        "token_expired",
        "token_revoked",
        "token_wrong_deployment",
    ),
    403: ("policy_denied",),
    404: ("key_not_found",),
    409: ("nonce_replayed",),
    413: ("payload_too_large",),
    415: ("unsupported_media_type",),
    503: (
        "backend_unavailable",
        "backend_not_configured",
        "collateral_unavailable",
        "attestation_unavailable",
        "server_busy",
        "audit_unavailable",
    ),
}

_ATTESTATION_TYPE = {
    "name": "Attestation-Type",
    "in": "header",
    "required": False,
    "description": "SGX or TDX: the evidence's TEE (steps 2a and 2b); absent with an empty body: the nonce step",
    "schema": {"type": "string", "enum": ["SGX", "TDX"]},
}

_TABLE: dict[str, Operation] = {
    # --- operations
    "GET /version": Operation("Service name and version", VersionOut, database=False),
    "GET /healthz": Operation("Liveness", m.Health, database=False),
    "GET /readyz": Operation(
        "Readiness: the database, its schema and every backend",
        m.Readiness,
        answers={503: m.Readiness},
        database=False,  # its own 503 says which check failed
    ),
    "GET /metrics": Operation("Prometheus metrics", TEXT, media_type=CONTENT_TYPE_LATEST, database=False),
    # --- attested key transfer
    "POST /kbs/v1/keys/{key_id}/transfer": Operation(
        "Attested key transfer: a nonce, then the key wrapped for the attested workload",
        (m.NonceOut, m.WrappedKey),
        request=(m.NonceRequest, m.BackgroundCheckRequest, m.PassportRequest),
        request_required=False,
        parameters=(_ATTESTATION_TYPE,),
        bearer_grants="keys:transfer",
        headers={"Attestation-Type": "nonce step only: SGX, TDX or SGX,TDX (the types the key's policy accepts)"},
        errors=_TRANSFER_REFUSALS,
    ),
    # --- keys
    "POST /kbs/v1/keys": Operation(
        "Create a key: generate, import (key_string) or register a KMIP object (kmip_key_id)",
        KeyOut,
        status=201,
        request=KeyCreateRequest,
        errors={
            400: _KEY_CREATE,
            409: ("key_exists", "kmip_object_in_use", "key_delete_pending"),
            503: ("server_busy", "key_write_interrupted", *_BACKEND),
        },
    ),
    "GET /kbs/v1/keys": Operation(
        "List keys (filters, pagination)",
        KeyOut,
        many=True,
        strict_query=True,
        paged=True,
        headers=_PAGE_HEADERS,
        errors={400: ("unsupported_algorithm", "unsupported_curve")},
    ),
    "GET /kbs/v1/keys/{key_id}": Operation(
        "A key's metadata (never its material)", KeyOut, errors={404: ("key_not_found",)}
    ),
    "PUT /kbs/v1/keys/{key_id}": Operation(
        "Assign another transfer policy to a key",
        KeyOut,
        request=KeyUpdateRequest,
        errors={400: ("unknown_transfer_policy",), 404: ("key_not_found",)},
    ),
    "DELETE /kbs/v1/keys/{key_id}": Operation(
        "Delete a key (and its backend object, unless registered by kmip_key_id)",
        None,
        status=204,
        errors={404: ("key_not_found",), 503: ("backend_not_configured",)},
    ),
    "POST /kbs/v1/keys/{key_id}/certificate": Operation(
        "Issue an X.509 certificate for an RSA/EC key, signed by the workload CA",
        m.KeyCertificate,
        status=201,
        request=CertifyRequest,
        errors={
            400: ("invalid_subject", "invalid_san", "invalid_days", "key_not_asymmetric"),
            404: ("key_not_found",),
            409: ("ca_expired",),
            503: _BACKEND,
        },
    ),
    "GET /kbs/v1/keys/{key_id}/certificate": Operation(
        "The newest certificate issued for a key",
        m.KeyCertificate,
        errors={404: ("key_not_found", "certificate_not_found")},
    ),
    # --- key transfer policies
    "POST /kbs/v1/key-transfer-policies": Operation(
        "Create a key transfer policy", StoredTransferPolicy, status=201, request=TransferPolicyRequest
    ),
    "GET /kbs/v1/key-transfer-policies": Operation(
        "List key transfer policies (pagination)",
        StoredTransferPolicy,
        many=True,
        strict_query=True,
        paged=True,
        headers=_PAGE_HEADERS,
    ),
    "GET /kbs/v1/key-transfer-policies/{policy_id}": Operation(
        "A key transfer policy", StoredTransferPolicy, errors={404: ("policy_not_found",)}
    ),
    "PUT /kbs/v1/key-transfer-policies/{policy_id}": Operation(
        "Replace a key transfer policy (not an immutable one)",
        StoredTransferPolicy,
        request=TransferPolicyRequest,
        errors={404: ("policy_not_found",), 409: ("policy_immutable",)},
    ),
    "DELETE /kbs/v1/key-transfer-policies/{policy_id}": Operation(
        "Delete a key transfer policy (not one in use, not an immutable one)",
        None,
        status=204,
        errors={404: ("policy_not_found",), 409: ("policy_in_use", "policy_immutable")},
    ),
    # --- administration
    "POST /kbs/v1/tokens": Operation(
        "Issue a bearer token (its secret is in this response only)",
        m.IssuedToken,
        status=201,
        request=TokenCreateRequest,
        errors={400: ("invalid_ttl", "invalid_context", "invalid_roles", "unknown_role")},
    ),
    "GET /kbs/v1/tokens": Operation("List tokens (never their secrets)", m.TokenInfo, many=True),
    "DELETE /kbs/v1/tokens/{token_id}": Operation(
        "Revoke a token",
        None,
        status=204,
        errors={404: ("token_not_found",), 409: ("role_lockout",)},
    ),
    "GET /kbs/v1/roles": Operation("List roles and what they grant", m.Role, many=True),
    "GET /kbs/v1/roles/{name}": Operation("A role", m.Role, errors={404: ("role_not_found",)}),
    "PUT /kbs/v1/roles/{name}": Operation(
        "Create or replace a role's permissions",
        m.Role,
        request=RolePutRequest,
        errors={400: _ROLE_CHANGE, 409: ("role_fixed", "role_lockout")},
    ),
    "DELETE /kbs/v1/roles/{name}": Operation(
        "Delete a role (not a built-in one, not one a token holds)",
        None,
        status=204,
        errors={404: ("role_not_found",), 409: ("role_builtin", "role_fixed", "role_in_use")},
    ),
    "GET /kbs/v1/audit": Operation(
        "Audit entries in order, from a sequence number",
        m.AuditEntry,
        many=True,
        strict_query=True,
        query={
            "since": {
                "anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
                "description": "entries at or after this time: RFC 3339 with a zone, or Unix seconds",
            }
        },
        headers={
            "X-Audit-Head": "the chain head, seq:hash (verify the whole chain with it)",
            "X-Next-Cursor": "the seq to pass as after= for the next page, when this page is full",
        },
    ),
    "GET /kbs/v1/cluster/replicas": Operation("The replicas serving this deployment", m.Replica, many=True),
    "GET /kbs/v1/backends": Operation("Check every backend now, from the replica that answers", m.BackendsReport),
    # --- service CA
    "GET /cms/v1/ca-certificates": Operation("The service CA certificate", PEM, media_type="application/x-pem-file"),
    "POST /cms/v1/certificates": Operation(
        "Sign a CSR with the service CA",
        m.SignedCertificate,
        status=201,
        request=CsrRequest,
        errors={400: ("invalid_csr", "invalid_days"), 409: ("ca_expired",)},
    ),
    # --- attestation service
    "GET /appraisal/v1/nonce": Operation("A signed nonce for attest", m.NonceOut, database=False),
    "POST /appraisal/v1/attest": Operation(
        "Verify a quote bound to a nonce and runtime data; a signed attestation token",
        m.AttestationToken,
        request=AttestRequest,
        errors={
            401: ("attestation_failed", "nonce_invalid", "nonce_expired"),
            403: ("policy_denied",),
            409: ("nonce_replayed",),
            503: ("collateral_unavailable",),
        },
    ),
    "GET /certs": Operation("JWKS of the attestation token signing keys", m.Jwks),
    "POST /appraisal/v1/keys/rotate": Operation("Rotate the token signing key", m.SigningKey),
    "POST /appraisal/v1/policies": Operation(
        "Create an appraisal policy (Rego)",
        m.AppraisalPolicy,
        status=201,
        request=PolicyRequest,
        errors={400: ("invalid_rego",), 503: ("server_busy",)},
    ),
    "GET /appraisal/v1/policies": Operation("List appraisal policies", m.AppraisalPolicy, many=True),
    "GET /appraisal/v1/policies/{policy_id}": Operation(
        "An appraisal policy", m.AppraisalPolicy, errors={404: ("appraisal_policy_not_found",)}
    ),
    "PUT /appraisal/v1/policies/{policy_id}": Operation(
        "Replace an appraisal policy",
        m.AppraisalPolicy,
        request=PolicyRequest,
        errors={400: ("invalid_rego",), 404: ("appraisal_policy_not_found",), 503: ("server_busy",)},
    ),
    "DELETE /appraisal/v1/policies/{policy_id}": Operation(
        "Delete an appraisal policy", None, status=204, errors={404: ("appraisal_policy_not_found",)}
    ),
    # --- collateral
    "POST /collateral/v1/items": Operation(
        "Import collateral items (all checked before any is stored)",
        m.ImportResult,
        request=ImportRequest,
        errors={
            400: ("collateral_invalid", "collateral_signature_invalid", "untrusted_root"),
            409: ("collateral_conflict",),
            503: ("server_busy",),
        },
    ),
    "GET /collateral/v1/items": Operation("Export the newest version of every item", m.CollateralItem, many=True),
    "GET /collateral/v1/status": Operation("Every cached item's validity", m.CollateralStatus, many=True),
    "GET /sgx/certification/v4/tcb": Operation(
        "SGX TCB info for an FMSPC (Intel PCS v4)",
        SIGNED_JSON,
        headers={"TCB-Info-Issuer-Chain": "URL-encoded PEM chain"},
        errors=_COLLATERAL_READ,
    ),
    "GET /tdx/certification/v4/tcb": Operation(
        "TDX TCB info for an FMSPC (Intel PCS v4)",
        SIGNED_JSON,
        headers={"TCB-Info-Issuer-Chain": "URL-encoded PEM chain"},
        errors=_COLLATERAL_READ,
    ),
    "GET /sgx/certification/v4/qe/identity": Operation(
        "SGX QE identity (Intel PCS v4)",
        SIGNED_JSON,
        headers={"SGX-Enclave-Identity-Issuer-Chain": "URL-encoded PEM chain"},
        errors=_COLLATERAL_READ,
    ),
    "GET /tdx/certification/v4/qe/identity": Operation(
        "TDX QE identity (Intel PCS v4)",
        SIGNED_JSON,
        headers={"SGX-Enclave-Identity-Issuer-Chain": "URL-encoded PEM chain"},
        errors=_COLLATERAL_READ,
    ),
    "GET /sgx/certification/v4/pckcrl": Operation(
        "A PCK CRL: PEM (default) or DER (encoding=der)",
        PEM,
        media_type="application/x-pem-file",
        headers={"SGX-PCK-CRL-Issuer-Chain": "URL-encoded PEM chain"},
        errors=_COLLATERAL_READ,
        also={"application/pkix-crl": BINARY},
    ),
    "GET /sgx/certification/v4/rootcacrl": Operation(
        "The Intel SGX Root CA CRL, DER in hexadecimal (as Intel's PCCS serves it)",
        TEXT,
        media_type="application/pkix-crl",
        errors=_COLLATERAL_READ,
    ),
}

OPERATIONS: Mapping[str, Operation] = MappingProxyType(_TABLE)
