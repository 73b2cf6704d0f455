"""A transfer request (PROTOCOL.md §3 step 2) parsed into what it is, at the edge, before anything is verified.

``parse_transfer`` checks the form only: the members, their types, the workload's key and the nonce's shape (the
quote's base64 is decoded after the nonce is checked, as it always was: a forged or expired nonce is 401 whatever
the quote). Everything it refuses is ``InvalidRequest`` (400). Whether the nonce is this deployment's and fresh, and
whether the evidence verifies, is the service's to decide (401/403).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import rsa

from keybroker.attestation.nonce import Nonce, parse_nonce
from keybroker.attestation.service import b64decode
from keybroker.crypto.transfer import decode_user_data, workload_public_key
from keybroker.errors import InvalidRequest

_BACKGROUND_MEMBERS = frozenset({"quote", "nonce", "user_data"})
Mode = Literal["background", "passport"]


@dataclass(frozen=True, slots=True)
class BackgroundTransfer:
    """Background check: a quote whose REPORTDATA binds ``nonce`` and ``user_data`` (the workload's key)."""

    tee: str  # "SGX" or "TDX": the Attestation-Type header, upper case
    quote_b64: str  # decoded (``quote``) once the nonce has been checked: a bad nonce is 401 whatever the quote
    nonce: Nonce
    user_data: bytes  # DER SubjectPublicKeyInfo
    public_key: rsa.RSAPublicKey

    @property
    def mode(self) -> Mode:
        return "background"

    @property
    def header(self) -> str:
        return self.tee

    def quote(self) -> bytes:
        """The quote's bytes (``invalid_request`` if it is empty or not standard base64)."""
        return b64decode(self.quote_b64, "quote")


@dataclass(frozen=True, slots=True)
class PassportTransfer:
    """Passport: an attestation token (issued by keybroker's attestation service) that holds nonce and key."""

    token: str
    header: str | None  # Attestation-Type, if sent: it must then name the token's TEE

    @property
    def mode(self) -> Mode:
        return "passport"


TransferRequest = BackgroundTransfer | PassportTransfer


def mode_of(body: dict[str, Any]) -> Mode:
    """The mode a body asks for (what its audit entry says, even when it is malformed)."""
    return "passport" if "attestation_token" in body else "background"


def parse_transfer(header: str | None, body: dict[str, Any]) -> TransferRequest:
    if mode_of(body) == "passport":
        if set(body) != {"attestation_token"} or not isinstance(body["attestation_token"], str):
            raise InvalidRequest("a passport transfer body has exactly attestation_token", code="invalid_request")
        return PassportTransfer(body["attestation_token"], header)
    if set(body) != _BACKGROUND_MEMBERS:
        raise InvalidRequest(
            "a background-check transfer body has exactly quote, nonce and user_data", code="invalid_request"
        )
    if header is None or header.upper() not in ("SGX", "TDX"):
        raise InvalidRequest(
            "a transfer with evidence needs the header Attestation-Type: SGX or TDX", code="invalid_request"
        )
    if not isinstance(body["quote"], str) or not isinstance(body["user_data"], str):
        raise InvalidRequest("quote and user_data are base64 strings", code="invalid_request")
    user_data = decode_user_data(body["user_data"])
    public_key = workload_public_key(user_data)  # a bad key is refused before any costly verification
    nonce = parse_nonce(body["nonce"])
    return BackgroundTransfer(header.upper(), body["quote"], nonce, user_data, public_key)
