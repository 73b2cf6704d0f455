"""TransferService: the only place a key leaves keybroker.

Order of checks (each refusal audited with its reason before the response): the key and its policy exist; the
request is well formed (Attestation-Type, user_data an RSA 3072/4096 SPKI); the nonce is ours and fresh; the
evidence verifies (quote, or our own attestation token); the TEE type matches the header; REPORTDATA (or the
token's held data) binds nonce and user_data; the nonce is consumed (once, across replicas); the policy engine
passes. Only then is the key read from its backend, wrapped, the decision audited, and the response sent: if the
audit write fails, nothing is released.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt

from keybroker.attestation.nonce import Nonce, parse_nonce
from keybroker.attestation.service import AttestationService, b64decode
from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.auth.tokens import Principal
from keybroker.crypto.transfer import Wrapped, decode_user_data, workload_public_key, wrap_for_workload
from keybroker.errors import (
    AttestationFailed,
    BackendUnavailable,
    Conflict,
    InvalidRequest,
    KeybrokerError,
    PolicyDenied,
)
from keybroker.ids import canonical_uuid
from keybroker.keys.models import KeyRecord
from keybroker.keys.service import KeyService
from keybroker.policy.engine import RequestContext, evaluate
from keybroker.policy.model import TransferPolicyDocument
from keybroker.policy.store import PolicyStore
from keybroker.storage import revision
from keybroker.storage.db import Database
from keybroker.transfer.verifiers import EvidenceVerifier

_MEASUREMENTS = (
    "sgx_mrenclave",
    "sgx_mrsigner",
    "sgx_isvprodid",
    "sgx_isvsvn",
    "tdx_mrtd",
    "tdx_mrseam",
    "tdx_rtmr0",
    "tdx_rtmr1",
    "tdx_rtmr2",
    "tdx_rtmr3",
    "tdx_seamsvn",
)


@dataclass
class _Use:
    """The nonce a transfer will use up, once everything about it is decided."""

    nonce: Nonce | None = None
    purposes: tuple[str, ...] = ()


@dataclass
class _Lookups:
    lock: threading.Lock = field(default_factory=threading.Lock)
    revision: int = -1
    checked_at: float = -math.inf  # (monotonic) when the database last confirmed ``revision``
    local_changes: int = 0  # revision.local_changes() then: a change made here is seen at once
    entries: dict[str, tuple[KeyRecord, TransferPolicyDocument]] = field(default_factory=dict)
    monotonic: Callable[[], float] = time.monotonic


Lookup = tuple[KeyRecord, TransferPolicyDocument]
NONCE_STEP_STALENESS = 1.0  # seconds: how old the nonce step's knowledge of keys and policies may be


@dataclass(frozen=True)
class TransferService:
    keys: KeyService
    policies: PolicyStore
    attestation: AttestationService
    audit: AuditLog
    database: Database
    simulated_trusted: bool
    verifier: EvidenceVerifier
    lookups: _Lookups = field(default_factory=_Lookups)

    def lookup(self, key_id: str, max_age: float = 0.0) -> Lookup:
        """The key's record and its policy, from memory while the key/policy revision counter is unchanged: one
        single-statement round trip instead of two queries; any change to any key or policy, in any replica,
        bumps the counter and clears the cache. ``max_age`` > 0 also trusts a revision the database confirmed
        that recently without asking again (the nonce step: a nonce releases nothing, and the transfer that
        uses it always checks); a key this replica does not know yet is always looked up."""
        cache = self.lookups
        if max_age > 0:
            with cache.lock:
                fresh = cache.monotonic() - cache.checked_at <= max_age
                if fresh and cache.local_changes == revision.local_changes() and key_id in cache.entries:
                    return cache.entries[key_id]
        checked, local = cache.monotonic(), revision.local_changes()
        current = revision.read(self.database)
        with cache.lock:
            if current > cache.revision:  # the counter only grows: a slower reader never takes it back
                cache.entries.clear()
                cache.revision = current
            if current == cache.revision:
                cache.checked_at = max(cache.checked_at, checked)
                cache.local_changes = max(cache.local_changes, local)
                if key_id in cache.entries:
                    return cache.entries[key_id]
        record = self.keys.get(key_id)
        document = self.policies.get(record.transfer_policy_id).document
        with cache.lock:
            if cache.revision == current and len(cache.entries) < 4096:  # fetched under the cache's revision
                cache.entries[key_id] = (record, document)
        return record, document

    def attestation_types(self, key_id: str, max_age: float = 0.0) -> tuple[KeyRecord, list[str]]:
        record, document = self.lookup(key_id, max_age)
        return record, [t.value for t in document.attestation_type]

    def nonce(self, key_id: str) -> tuple[Nonce, list[str]]:
        """Step 1: a fresh nonce, and the TEE types the key's policy accepts (the Attestation-Type header); what it
        knows of the key may be up to ``NONCE_STEP_STALENESS`` old (no database round trip under load)."""
        _, types = self.attestation_types(key_id, NONCE_STEP_STALENESS)
        return self.verifier.issue_nonce(), types

    def refused_before(self, key_id: str, error: KeybrokerError, audit: AuditContext) -> None:
        """Audit a transfer refused before its evidence was looked at (an invalid bearer token, a body that is not
        JSON, an unknown key). The target is the key id only if it is one (the path is the caller's text)."""
        self.audit.record(
            audit,
            AuditEvent("key.transfer", _outcome(error), canonical_uuid(key_id), {"status_code": error.instance_code}),
        )

    def transfer(
        self,
        key_id: str,
        header_type: str | None,
        body: dict[str, Any],
        principal: Principal | None,
        audit: AuditContext,
        looked_up: Lookup | None = None,
    ) -> Wrapped:
        """Step 2. ``looked_up``: this request's ``lookup`` of the key, if the caller made it already."""
        try:
            record, document = looked_up or self.lookup(key_id)
        except KeybrokerError as exc:
            self.refused_before(key_id, exc, audit)
            raise
        details: dict[str, Any] = {
            "transfer_policy_id": record.transfer_policy_id,
            "mode": "passport" if "attestation_token" in body else "background",
        }
        use = _Use()
        try:
            wrapped = self._transfer(record, document, header_type, body, principal, details, use)
        except PolicyDenied as exc:
            details.update(status_code=exc.instance_code, reasons=exc.extra.get("reasons"))
            self._finish(audit, key_id, "denied", details, use)
            raise
        except KeybrokerError as exc:
            details.update(status_code=exc.instance_code, reasons=exc.extra.get("reasons"))
            self.audit.record(audit, AuditEvent("key.transfer", _outcome(exc), key_id, details))
            raise
        # Audited before the response; if this write fails the key is not released (503 audit_unavailable).
        self._finish(audit, key_id, "allowed", details, use)
        return wrapped

    def _finish(self, audit: AuditContext, key_id: str, outcome: str, details: dict[str, Any], use: _Use) -> None:
        """One write for the decision: the nonce used up and the audit entry, together. A nonce already used
        (also by a concurrent request that got here first) turns the decision into a 409, audited as such."""
        assert use.nonce is not None
        event = AuditEvent("key.transfer", outcome, key_id, details)
        try:
            if self.database.is_sqlite:
                with self.database.transaction(write=True) as session:
                    self.attestation.nonces.consume_in(session, use.nonce, *use.purposes)
                    self.audit.append(session, audit, event)
            else:  # PostgreSQL: both in one statement, one round trip (storage.guard)
                guard = self.attestation.nonces.consume_guard(use.nonce, *use.purposes)
                if self.audit.append_guarded(audit, event, guard) is None:
                    raise Conflict("this nonce has already been used", code="nonce_replayed")
        except Conflict as exc:
            details.update(status_code=exc.instance_code, reasons=None)
            self.audit.record(audit, AuditEvent("key.transfer", "denied", key_id, details))
            raise

    def _transfer(
        self,
        record: KeyRecord,
        document: TransferPolicyDocument,
        header_type: str | None,
        body: dict[str, Any],
        principal: Principal | None,
        details: dict[str, Any],
        use: _Use,
    ) -> Wrapped:
        allowed_types = {t.value for t in document.attestation_type}
        if "attestation_token" in body:
            claims, nonce, user_data, matched = self._passport(body, document)
        else:
            claims, nonce, user_data, matched = self._background(body, header_type, allowed_types, document)
        details.update(
            tee=claims.get("attester_type"),
            tcb_status=claims.get("attester_tcb_status"),
            advisory_ids=claims.get("attester_advisory_ids"),
            simulated=claims.get("keybroker_simulated"),
            measurements={k: claims[k] for k in _MEASUREMENTS if k in claims},
        )
        if header_type is not None and header_type.upper() != claims.get("attester_type"):
            raise AttestationFailed(
                f"Attestation-Type says {header_type} but the evidence is {claims.get('attester_type')}",
                reason="attestation_type_mismatch",
            )
        public_key = workload_public_key(user_data)
        use.nonce = nonce
        use.purposes = ("transfer",) if "attestation_token" in body else ("attest", "transfer")
        context = RequestContext(
            client_permissions=frozenset(principal.context) if principal else frozenset(),
            token_may_transfer=principal is not None and "keys:transfer" in principal.permissions,
            policy_ids_matched=frozenset(matched),
        )
        decision = evaluate(document, claims, context, self.simulated_trusted)
        if not decision.allowed:
            reasons = [reason.as_dict() for reason in decision.reasons]
            raise PolicyDenied(
                f"{len(reasons)} rule(s) of the key's transfer policy failed",
                code="policy_denied",
                extra={"reasons": reasons},
            )
        material = self.keys.load_material(record)  # read only now that everything agreed
        return wrap_for_workload(material.secret, public_key)

    def _background(
        self, body: dict[str, Any], header_type: str | None, allowed_types: set[str], document: TransferPolicyDocument
    ) -> tuple[dict[str, Any], Nonce, bytes, list[str]]:
        unknown = set(body) - {"quote", "nonce", "user_data"}
        if unknown or not {"quote", "nonce", "user_data"} <= set(body):
            raise InvalidRequest(
                "a background-check transfer body has exactly quote, nonce and user_data", code="invalid_request"
            )
        if header_type is None or header_type.upper() not in ("SGX", "TDX"):
            raise InvalidRequest(
                "a transfer with evidence needs the header Attestation-Type: SGX or TDX", code="invalid_request"
            )
        if not isinstance(body["quote"], str) or not isinstance(body["user_data"], str):
            raise InvalidRequest("quote and user_data are base64 strings", code="invalid_request")
        user_data = decode_user_data(body["user_data"])
        workload_public_key(user_data)  # refuse a bad key before any costly verification
        nonce = parse_nonce(body["nonce"])
        self.verifier.check_nonce(nonce)
        quote = b64decode(body["quote"], "quote")
        claims, matched = self.verifier.background(quote, nonce, user_data, _policy_ids(document, header_type))
        return claims, nonce, user_data, matched

    def _passport(
        self, body: dict[str, Any], document: TransferPolicyDocument
    ) -> tuple[dict[str, Any], Nonce, bytes, list[str]]:
        if set(body) != {"attestation_token"} or not isinstance(body["attestation_token"], str):
            raise InvalidRequest("a passport transfer body has exactly attestation_token", code="invalid_request")
        token = body["attestation_token"]
        try:
            tee = str(jwt.decode(token, options={"verify_signature": False}).get("attester_type"))
        except jwt.PyJWTError:
            tee = ""
        claims, matched = self.verifier.passport(token, _policy_ids(document, tee))
        if "verifier_nonce" not in claims or "attester_held_data" not in claims:
            raise AttestationFailed(
                "the token binds no nonce and no held data; attest with a nonce", reason="token_not_bound"
            )
        nonce = parse_nonce(claims["verifier_nonce"])
        self.verifier.check_nonce(nonce)
        user_data = base64.b64decode(str(claims["attester_held_data"]))
        workload_public_key(user_data)
        return claims, nonce, user_data, matched


def _outcome(error: KeybrokerError) -> str:
    """``failure`` when keybroker could not decide (a backend, the collateral source or the audit log was
    unavailable), ``denied`` for every refusal of the request itself (PROTOCOL.md §10)."""
    return "failure" if isinstance(error, BackendUnavailable) else "denied"


def _policy_ids(document: TransferPolicyDocument, tee: str | None) -> list[str]:
    """The appraisal policies of the policy's section for ``tee`` (the engine checks the TEE type itself)."""
    section = document.sgx if (tee or "").upper() == "SGX" else document.tdx if (tee or "").upper() == "TDX" else None
    return list(section.policy_ids or []) if section is not None else []
