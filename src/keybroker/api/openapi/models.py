"""Documentation models: the shapes of responses (and of the transfer bodies) that the routes build by hand.

Nothing validates or serialises through these: the routes keep their own parsing and their own JSON, and these
models exist so that ``/openapi.json`` says what goes over the wire. The schemathesis test
(tests/api/test_openapi_fuzz.py) checks every response it provokes against them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

B64 = Annotated[str, Field(description="standard base64, with padding")]
Time = Annotated[datetime, Field(description="RFC 3339, UTC")]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- problem+json -------------------------------------------------------------------------------------------------


class FieldError(_Doc):
    loc: Annotated[str, Field(description="where: the field's dotted path, or query.NAME / path.NAME")]
    msg: str
    type: str


class Reason(_Doc):
    code: Annotated[str, Field(description="the specific cause, e.g. report_data_mismatch or mrenclave_mismatch")]
    detail: str


class Problem(_Doc):
    """RFC 9457: every refusal. ``code`` is stable (the error tables in docs/api.md); never key material."""

    model_config = ConfigDict(extra="forbid", title="Problem")

    type: Annotated[str, Field(description="urn:keybroker:problem:<code>", pattern=r"^urn:keybroker:problem:")]
    title: str
    status: Annotated[int, Field(ge=400, le=599)]
    detail: str
    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    request_id: Annotated[str | None, Field(description="also in the X-Request-Id header")] = None
    errors: Annotated[list[FieldError] | None, Field(description="400 schema errors: what failed, where")] = None
    reasons: Annotated[list[Reason] | None, Field(description="401/403 transfer refusals: every rule that failed")] = (
        None
    )


# --- operations ---------------------------------------------------------------------------------------------------


class Health(_Doc):
    status: Literal["ok"]


class Readiness(_Doc):
    status: Literal["ready", "unavailable"]
    checks: Annotated[
        dict[str, str],
        Field(description="database, schema, backend:<name>: 'ok' or the error code (e.g. backend_unavailable)"),
    ]


# --- transfer and attestation -------------------------------------------------------------------------------------


class NonceOut(_Doc):
    val: Annotated[str, Field(description="base64 of 32 random bytes")]
    iat: Annotated[str, Field(description="base64 of the RFC 3339 UTC issue time (ASCII)")]
    signature: Annotated[str, Field(description="base64; made over val and iat by the service's nonce key")]


class NonceRequest(_Doc):
    """Step 1: an empty body or ``{}`` (and no Attestation-Type header) asks for a nonce."""

    model_config = ConfigDict(extra="forbid", title="NonceRequest", json_schema_extra={"maxProperties": 0})


class BackgroundCheckRequest(_Doc):
    """Step 2a, with ``Attestation-Type: SGX`` or ``TDX``: the quote is verified by this service."""

    quote: Annotated[str, Field(description="base64 DCAP quote")]
    nonce: NonceOut
    user_data: Annotated[
        str, Field(description="base64 DER SubjectPublicKeyInfo of the workload's RSA 3072/4096-bit public key")
    ]


class PassportRequest(_Doc):
    """Step 2b: a token from an attestation service this deployment trusts (``POST /appraisal/v1/attest``)."""

    attestation_token: Annotated[str, Field(description="JWT (PS384 or ES384)")]


class WrappedKey(_Doc):
    wrapped_key: Annotated[
        str, Field(description="base64 of u32le 12 | u32le 16 | u32le n | iv(12) | AES-256-GCM(SWK) output (n bytes)")
    ]
    wrapped_swk: Annotated[str, Field(description="base64 RSA-OAEP(SHA-256) of the 32-byte SWK under user_data")]


class AttestationToken(_Doc):
    token: Annotated[str, Field(description="JWT; its claims use Intel Trust Authority's names")]


class Jwk(BaseModel):
    model_config = ConfigDict(extra="allow")

    kty: str
    kid: str
    alg: str
    use: Literal["sig"]


class Jwks(_Doc):
    keys: list[Jwk]


class SigningKey(_Doc):
    kid: str


class AppraisalPolicy(_Doc):
    id: str
    name: str
    policy: Annotated[str, Field(description="Rego text (package policy, rule allow)")]
    created_at: Time
    updated_at: Time


# --- administration -----------------------------------------------------------------------------------------------


class TokenInfo(_Doc):
    id: str
    name: str
    roles: list[str]
    context: list[str]
    created_at: Time
    expires_at: Time | None
    revoked_at: Time | None


class IssuedToken(TokenInfo):
    token: Annotated[str, Field(description="the bearer secret: in this response only (keybroker keeps a hash)")]


class Role(_Doc):
    name: str
    permissions: list[str]
    builtin: bool
    updated_at: Time


class AuditEntry(_Doc):
    seq: int
    at: Time
    action: Annotated[str, Field(description="e.g. key.create, key.transfer, auth.refused")]
    outcome: Annotated[str, Field(description="success, failure or denied; a transfer: allowed, denied or failure")]
    actor: str | None
    target: str | None
    request_id: str | None
    client: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: Annotated[str, Field(description="SHA-256 over prev_hash and this entry: the chain")]


class Replica(_Doc):
    id: str
    address: str
    version: str
    schema_revision: str
    started_at: Time
    heartbeat_at: Time
    alive: bool


class BackendCheck(_Doc):
    name: Annotated[str, Field(description="the backend's name in the configuration (backends.<name>)")]
    type: Annotated[str, Field(description="embedded, vault or kmip")]
    kek: Annotated[
        str | None, Field(description="an embedded backend's KEK holder: local, vault-transit or pkcs11; else null")
    ]
    default: Annotated[bool, Field(description="whether it is keys.default_backend")]
    ok: bool
    seconds: Annotated[float, Field(description="how long its check took")]
    code: Annotated[str | None, Field(description="when not ok: the error's code, e.g. backend_unavailable")] = None
    detail: Annotated[str | None, Field(description="when not ok: what failed, in a sentence")] = None


class BackendsReport(_Doc):
    replica: Annotated[str, Field(description="the replica that ran the checks (host:data-directory hash)")]
    checked_at: Time
    ok: Annotated[bool, Field(description="every backend is ok")]
    backends: list[BackendCheck]


class SignedCertificate(_Doc):
    certificate: Annotated[str, Field(description="PEM: the certificate, then the service CA")]


class KeyCertificate(_Doc):
    key_id: str
    serial: Annotated[str, Field(description="hexadecimal")]
    subject: Annotated[str, Field(description="RFC 4514")]
    san: Annotated[list[str], Field(description="DNS:<name> or IP:<address>")]
    not_before: Time
    not_after: Time
    sha384: Annotated[str, Field(description="fingerprint of the certificate")]
    public_key: Annotated[str, Field(description="PEM SubjectPublicKeyInfo")]
    certificate: Annotated[str, Field(description="PEM: the certificate, then the workload CA")]


# --- collateral ---------------------------------------------------------------------------------------------------


class CollateralItem(_Doc):
    key: Annotated[str, Field(description="tcb:SGX|TDX:<FMSPC>, qe:SGX|TDX, pckcrl:processor|platform, rootcacrl")]
    body: Annotated[str, Field(description="base64 of the item as Intel PCS serves it")]
    issuer_chain: Annotated[str, Field(description="PEM")]


class ImportResult(_Doc):
    received: int
    added: Annotated[int, Field(description="items that were not in the cache yet")]


class CollateralStatus(_Doc):
    key: str
    issue_date: Time
    next_update: Time
    source: str
    state: Literal["valid", "expired", "not_yet_valid"]
