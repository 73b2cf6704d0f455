"""Where a transfer's evidence is verified: in this process (the default), or by a separate keybroker attestation
service (``attestation.url``; ``keybroker serve --role kbs`` beside ``--role attestation``). Either way the KBS
then binds the result to the nonce and the workload's key, uses the nonce up in its own database, and applies the
key's transfer policy itself."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from datetime import timedelta
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from keybroker.attestation.nonce import Nonce, NonceUse, issued_at, parse_nonce
from keybroker.attestation.service import AttestationService, check_binding
from keybroker.attestation.tokens import verify_token
from keybroker.clock import Clock
from keybroker.errors import AttestationFailed, BackendUnavailable, Conflict, InvalidRequest, KeybrokerError


class EvidenceVerifier(Protocol):
    """The verifier side of RATS for a transfer: issues the nonces workloads bind into their evidence and verifies
    that evidence (the workload is the attester).

    Thread-safety: every method may be called from many threads at once. Fail closed: anything the verifier
    cannot establish (an unreachable attestation service, a token key it cannot fetch, a claim it cannot read)
    raises, never returns claims; a caller that gets claims back may rely on every one of them."""

    local_nonces: bool  # issue_nonce does no I/O (an HMAC): it may run on the event loop

    def issue_nonce(self) -> Nonce: ...

    def check_nonce(self, nonce: Nonce) -> None:
        """Refuse a nonce that is not this deployment's or has expired (``nonce_invalid``/``nonce_expired``)."""
        ...

    def nonce_use(self, nonce: Nonce, *purposes: str) -> NonceUse:
        """The record that uses ``nonce`` up for ``purposes`` (each at most once, across replicas). The caller
        writes it in the same transaction as the decision it belongs to; a use already there is
        ``nonce_replayed`` (409). Only for a nonce ``check_nonce`` accepted."""
        ...

    def background(
        self, quote: bytes, nonce: Nonce, user_data: bytes, policy_ids: list[str]
    ) -> tuple[dict[str, Any], list[str]]:
        """Verified claims bound to ``nonce`` and ``user_data``, and the appraisal policies they match."""
        ...

    def passport(self, token: str, policy_ids: list[str]) -> tuple[dict[str, Any], list[str]]:
        """The claims of an attestation token (verified, unexpired), and the appraisal policies they match."""
        ...


class LocalVerifier:
    local_nonces = True

    def __init__(self, service: AttestationService) -> None:
        self._service = service

    def issue_nonce(self) -> Nonce:
        return self._service.nonces.issue()

    def check_nonce(self, nonce: Nonce) -> None:
        self._service.nonces.check(nonce)

    def nonce_use(self, nonce: Nonce, *purposes: str) -> NonceUse:
        return self._service.nonces.use(nonce, *purposes)

    def background(
        self, quote: bytes, nonce: Nonce, user_data: bytes, policy_ids: list[str]
    ) -> tuple[dict[str, Any], list[str]]:
        verified = self._service.verifier.verify(quote, self._service.clock.now())
        check_binding(verified, nonce, user_data)
        claims = verified.claims()
        return claims, self._matched(policy_ids, claims)

    def passport(self, token: str, policy_ids: list[str]) -> tuple[dict[str, Any], list[str]]:
        claims = self._service.tokens.verify(token)
        return claims, self._matched(policy_ids, claims)

    def _matched(self, policy_ids: list[str], claims: dict[str, Any]) -> list[str]:
        return self._service.policies.evaluate(policy_ids, claims)[0] if policy_ids else []


class RemoteVerifier:
    """A keybroker attestation service over HTTPS: its nonces, its verification (``/appraisal/v1/attest``) and its
    tokens, checked against its JWKS (``/certs``, re-read every minute and whenever an unknown key id appears)."""

    local_nonces = False

    def __init__(
        self, url: str, clock: Clock, nonce_ttl: timedelta, verify: ssl.SSLContext | bool = True, timeout: float = 10.0
    ) -> None:
        self._url = url.rstrip("/")
        self._clock = clock
        self._nonce_ttl = nonce_ttl
        self._http = httpx.Client(base_url=self._url, verify=verify, timeout=timeout)
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._keys_loaded = -1e9
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RemoteVerifier({self._url!r})"

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, json_body: Any = None) -> httpx.Response:
        try:
            response = self._http.request(method, path, json=json_body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"the attestation service is unreachable ({type(exc).__name__})", code="attestation_unavailable"
            ) from None
        if response.status_code >= 500:
            raise BackendUnavailable(
                f"the attestation service failed (HTTP {response.status_code})", code="attestation_unavailable"
            )
        return response

    def issue_nonce(self) -> Nonce:
        return parse_nonce(self._call("GET", "/appraisal/v1/nonce").json())

    def check_nonce(self, nonce: Nonce) -> None:
        # The signature is the attestation service's to check (it does, at attest); freshness is checked here too.
        if self._clock.now() >= issued_at(nonce) + self._nonce_ttl:
            raise AttestationFailed("the nonce has expired", reason="nonce_expired", code="nonce_expired")

    def nonce_use(self, nonce: Nonce, *purposes: str) -> NonceUse:
        # The attestation service records its own use ("attest"); the KBS records the transfer's in its database.
        return NonceUse(nonce.digest, purposes, self._clock.now() + self._nonce_ttl)

    def background(
        self, quote: bytes, nonce: Nonce, user_data: bytes, policy_ids: list[str]
    ) -> tuple[dict[str, Any], list[str]]:
        response = self._call(
            "POST",
            "/appraisal/v1/attest",
            {
                "quote": base64.b64encode(quote).decode(),
                "verifier_nonce": nonce.as_json(),
                "runtime_data": base64.b64encode(user_data).decode(),
                "policy_ids": policy_ids,
            },
        )
        if response.status_code != 200:
            raise _remote_refusal(response)
        claims, matched = self.passport(str(response.json()["token"]), policy_ids)
        # The attestation service bound them; the KBS checks that the token says so for this very request.
        if (
            claims.get("verifier_nonce") != nonce.as_json()
            or claims.get("attester_held_data") != base64.b64encode(user_data).decode()
        ):
            raise AttestationFailed("the attestation token is not bound to this request", reason="token_not_bound")
        return claims, matched

    def passport(self, token: str, policy_ids: list[str]) -> tuple[dict[str, Any], list[str]]:
        claims = verify_token(token, self._key, self._clock)
        matched = [p for p in claims.get("policy_ids_matched", []) if p in policy_ids]
        return claims, matched

    def _key(self, kid: str) -> ec.EllipticCurvePublicKey:
        with self._lock:
            if kid not in self._keys or time.monotonic() - self._keys_loaded > 60:
                keys = {}
                for jwk in self._call("GET", "/certs").json().get("keys", []):
                    public = ECAlgorithm.from_jwk(json.dumps(jwk))
                    if isinstance(public, ec.EllipticCurvePublicKey):
                        keys[str(jwk["kid"])] = public
                self._keys, self._keys_loaded = keys, time.monotonic()
            key = self._keys.get(kid)
        if key is None:
            raise AttestationFailed("the attestation token was signed by an unknown key", reason="token_unknown_key")
        return key


def _remote_refusal(response: httpx.Response) -> KeybrokerError:
    """The attestation service's refusal, passed on with its status class, code and reasons."""
    try:
        problem = response.json()
        code, detail = str(problem.get("code", "attestation_failed")), str(problem.get("detail", ""))
        reasons = problem.get("reasons") or [{"code": code, "detail": detail}]
        first = reasons[0]
    except (ValueError, AttributeError, IndexError, TypeError):
        return AttestationFailed(
            f"the attestation service refused (HTTP {response.status_code})", reason="verification_failed"
        )
    if response.status_code == 409:
        return Conflict(detail, code=code)
    if response.status_code == 400:
        return InvalidRequest(detail, code=code)
    return AttestationFailed(str(first.get("detail")), reason=str(first.get("code")), code=code)
