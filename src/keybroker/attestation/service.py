"""The attestation service: nonce -> verify -> bind -> appraise -> token (PROTOCOL.md §4)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from keybroker.attestation.appraisal import AppraisalPolicies
from keybroker.attestation.nonce import Nonce, NonceService
from keybroker.attestation.tokens import TokenIssuer
from keybroker.attestation.verifier import QuoteVerifier, VerifiedQuote
from keybroker.clock import Clock
from keybroker.errors import AttestationFailed, InvalidRequest


def b64decode(value: str, what: str) -> bytes:
    if not value:
        raise InvalidRequest(f"{what} is empty", code="invalid_request")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} must be standard base64", code="invalid_request") from None


def check_binding(verified: VerifiedQuote, nonce: Nonce | None, held_data: bytes) -> None:
    """REPORTDATA must be SHA-512(val ‖ iat ‖ held data) (without a nonce: SHA-512(held data)); for SGX,
    SHA-256(…) ‖ 32 zero bytes is accepted too."""
    message = (nonce.val + nonce.iat if nonce is not None else b"") + held_data
    expected = [hashlib.sha512(message).digest()]
    if verified.quote.tee == "SGX":
        expected.append(hashlib.sha256(message).digest() + bytes(32))
    if not any(hmac.compare_digest(verified.quote.report_data, candidate) for candidate in expected):
        raise AttestationFailed(
            "the quote's REPORTDATA is not bound to this nonce and data", reason="report_data_mismatch"
        )


@dataclass(frozen=True)
class AttestationService:
    verifier: QuoteVerifier
    nonces: NonceService
    tokens: TokenIssuer
    policies: AppraisalPolicies
    clock: Clock

    def attest(self, quote: bytes, nonce: Nonce | None, runtime_data: bytes, policy_ids: list[str]) -> str:
        """Verify, bind and appraise; returns a signed token. The nonce is consumed only by evidence that
        verified and is bound to it. Without a nonce (and without runtime data) nothing is bound: the token then
        carries no ``verifier_nonce`` and cannot be used for a key transfer, but shows the verified claims."""
        if nonce is not None:
            self.nonces.check(nonce)
        verified = self.verifier.verify(quote, self.clock.now())
        if nonce is not None or runtime_data:
            check_binding(verified, nonce, runtime_data)
        if nonce is not None:
            self.nonces.consume(nonce, "attest")
        claims: dict[str, Any] = verified.claims()
        claims["attester_held_data"] = base64.b64encode(runtime_data).decode()
        if nonce is not None:
            claims["verifier_nonce"] = nonce.as_json()
        matched, unmatched = self.policies.evaluate(policy_ids, claims)
        claims["policy_ids_matched"] = matched
        claims["policy_ids_unmatched"] = unmatched
        return self.tokens.sign(claims)
