"""Domain errors: one small hierarchy, no HTTP inside.

Every error carries a stable snake_case ``code`` (part of the wire contract, PROTOCOL.md) and a client-safe
``detail``. Messages never contain key material, tokens or request bodies. The API maps each class to an HTTP
status exactly once, in ``keybroker.api.errors``.

    KeybrokerError
    ├── InvalidRequest           400  malformed or inconsistent input
    │   ├── InvalidKeyMaterial   400  key_string does not parse or does not match the declared algorithm/length
    │   ├── CollateralInvalid    400  collateral offered for import failed its checks
    │   ├── UnknownReference     400  a body names a policy/backend that does not exist
    │   ├── BackendUnsupported   400  the request needs a capability no configured backend has
    │   └── UnsupportedMediaType 415  a body that is not application/json
    ├── Unauthenticated          401  missing, unknown, expired or revoked bearer token
    ├── AttestationFailed        401  evidence did not verify (``reasons`` says why); nonce problems too
    ├── Forbidden                403  authenticated but not allowed
    │   └── PolicyDenied         403  a transfer policy refused verified evidence (``reasons``)
    ├── NotFound                 404  unknown (or invisible) key or policy
    ├── Conflict                 409  policy in use, immutable policy, duplicate id
    ├── BackendUnavailable       503  the KMS backend holding the key cannot be reached
    │   ├── ServerBusy           503  too many costly requests (key generation, imports) are waiting already
    │   └── CollateralUnavailable 503 Intel collateral needed for a quote is neither cached nor fetchable
    ├── StoredKeyCorrupt         500  stored material failed authentication (tampering, wrong KEK)
    ├── ConfigurationError       --   invalid settings; raised at start, never at request time
    └── CopyFailed               --   ``keybroker db migrate/backup`` could not finish (nothing written)

Raising one from another exception (the rule every module follows):

* ``raise ... from None`` is the default at every translation of a library's or a vendor's exception (a parser, a
  KMS client, a TLS error, a JSON decoder): their messages and tracebacks may quote the input, a path with a
  token in it, a response body or key bytes, and nothing of that may travel further.
* ``raise ... from exc`` only where the cause is known to carry none of that and an operator needs it: the
  database (SQLAlchemy's errors never carry bound parameters, ``hide_parameters``), the audit write built on it,
  and PKCS#11 return codes. Even then only the cause's type reaches a log line (``keybroker.logs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class KeybrokerError(Exception):
    """Base of every error keybroker raises on purpose."""

    code: ClassVar[str] = "error"
    title: ClassVar[str] = "Error"

    def __init__(self, detail: str, *, code: str | None = None, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        # Instances may refine the class code (for example ``invalid_json`` under InvalidRequest).
        self.instance_code = code or self.code
        self.extra: dict[str, Any] = dict(extra or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.instance_code!r}, detail={self.detail!r})"


class InvalidRequest(KeybrokerError):
    code = "invalid_request"
    title = "Invalid request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail, code=code, extra={"errors": list(errors)} if errors else None)


class InvalidKeyMaterial(InvalidRequest):
    code = "invalid_key_material"
    title = "Key material does not match the declared key"


class CollateralInvalid(InvalidRequest):
    """Collateral offered for import failed its checks (signature, issuer chain, identity, format)."""

    code = "collateral_invalid"
    title = "Collateral refused"


class UnknownReference(InvalidRequest):
    code = "unknown_reference"
    title = "The request refers to something that does not exist"


class BackendUnsupported(InvalidRequest):
    code = "backend_unsupported"
    title = "Not supported by the configured backends"


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"
    title = "Unsupported media type"


class Unauthenticated(KeybrokerError):
    code = "unauthorized"
    title = "Authentication required"


class AttestationFailed(KeybrokerError):
    """Evidence was refused. ``reason`` is the specific cause (``quote_signature_invalid``, ``debug_enclave``, ...),
    sent as ``reasons: [{code, detail}]`` beside the stable ``code``."""

    code = "attestation_failed"
    title = "Attestation failed"

    def __init__(self, detail: str, *, reason: str = "verification_failed", code: str | None = None) -> None:
        super().__init__(detail, code=code, extra={"reasons": [{"code": reason, "detail": detail}]})
        self.reason = reason


class Forbidden(KeybrokerError):
    code = "forbidden"
    title = "Not allowed"


class PolicyDenied(Forbidden):
    """The key's transfer policy refused verified evidence; ``reasons`` lists every failing rule."""

    code = "policy_denied"
    title = "The key's transfer policy refused the request"


class NotFound(KeybrokerError):
    code = "not_found"
    title = "Not found"


class Conflict(KeybrokerError):
    code = "conflict"
    title = "Conflict"


class BackendUnavailable(KeybrokerError):
    code = "backend_unavailable"
    title = "Key backend unavailable"


class ServerBusy(BackendUnavailable):
    """The pool for costly requests is full; retry after ``Retry-After`` seconds."""

    code = "server_busy"
    title = "Server busy"


class CollateralUnavailable(BackendUnavailable):
    code = "collateral_unavailable"
    title = "Collateral unavailable"


class StoredKeyCorrupt(KeybrokerError):
    """Stored key material failed authentication. Not the caller's fault; an operator must look."""

    code = "stored_key_corrupt"
    title = "Stored key material failed authentication"


class ConfigurationError(KeybrokerError):
    code = "configuration_error"
    title = "Invalid configuration"


class CopyFailed(KeybrokerError):
    """A copy or backup that could not be completed (nothing was written to its target). CLI only."""

    code = "copy_failed"
    title = "Copy failed"
