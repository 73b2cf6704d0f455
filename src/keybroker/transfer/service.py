"""TransferService: the only place a key leaves keybroker.

The route parses the request (``keybroker.transfer.requests``: a ``BackgroundTransfer`` or a ``PassportTransfer``,
form errors refused there and audited through ``refused``); ``transfer`` then decides, and returns one
``TransferOutcome``. Order of checks (each refusal audited with its reason before the response): the key and its
policy exist; the nonce is ours and fresh; the evidence verifies (quote, or our own attestation token); the TEE type
matches the header; REPORTDATA (or the token's held data) binds nonce and user_data; the policy engine passes. Only
then is the key read from its backend and wrapped; the decision's audit entry and the nonce's use (once, across
replicas: the verifier says what using it writes) are one write, and if it fails nothing is released.
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
from cryptography.hazmat.primitives.asymmetric import rsa

from keybroker.attestation.nonce import Nonce, parse_nonce
from keybroker.attestation.service import AttestationService
from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.auth.tokens import Principal
from keybroker.crypto.transfer import Wrapped, workload_public_key, wrap_for_workload
from keybroker.errors import AttestationFailed, BackendUnavailable, Conflict, KeybrokerError, PolicyDenied
from keybroker.ids import canonical_uuid
from keybroker.keys.models import KeyRecord
from keybroker.keys.service import KeyService
from keybroker.policy.engine import RequestContext, evaluate
from keybroker.policy.model import TransferPolicyDocument
from keybroker.policy.store import PolicyStore
from keybroker.storage import revision
from keybroker.storage.db import Database
from keybroker.transfer.requests import BackgroundTransfer, TransferRequest
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
            known = self._remembered(key_id, max_age)
            if known is not None:
                return known
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

    def _remembered(self, key_id: str, max_age: float) -> Lookup | None:
        """The key from memory if the database confirmed the revision within ``max_age`` seconds, else None."""
        cache = self.lookups
        with cache.lock:
            fresh = cache.monotonic() - cache.checked_at <= max_age
            if fresh and cache.local_changes == revision.local_changes():
                return cache.entries.get(key_id)
        return None

    def attestation_types(self, key_id: str, max_age: float = 0.0) -> tuple[KeyRecord, list[str]]:
        record, document = self.lookup(key_id, max_age)
        return record, [t.value for t in document.attestation_type]

    def nonce(self, key_id: str) -> tuple[Nonce, list[str]]:
        """Step 1: a fresh nonce, and the TEE types the key's policy accepts (the Attestation-Type header); what it
        knows of the key may be up to ``NONCE_STEP_STALENESS`` old (no database round trip under load)."""
        _, types = self.attestation_types(key_id, NONCE_STEP_STALENESS)
        return self.verifier.issue_nonce(), types

    def nonce_from_memory(self, key_id: str) -> tuple[Nonce, list[str]] | None:
        """``nonce`` without blocking, or None when it would block (the key not remembered recently enough, or a
        verifier whose nonces come over the network): the event loop calls this, and ``nonce`` in a thread."""
        if not self.verifier.local_nonces:
            return None
        known = self._remembered(key_id, NONCE_STEP_STALENESS)
        if known is None:
            return None
        return self.verifier.issue_nonce(), [t.value for t in known[1].attestation_type]

    def refused_before(self, key_id: str, error: KeybrokerError, audit: AuditContext) -> None:
        """Audit a transfer refused before its evidence was looked at (an invalid bearer token, a body that is not
        JSON, an unknown key). The target is the key id only if it is one (the path is the caller's text)."""
        self.audit.record(
            audit,
            AuditEvent("key.transfer", _outcome(error), canonical_uuid(key_id), {"status_code": error.instance_code}),
        )

    def refused(self, looked_up: Lookup, mode: str, error: KeybrokerError, audit: AuditContext) -> TransferOutcome:
        """A request about the key refused before verification (its body is not a transfer request), audited."""
        record = looked_up[0]
        details = {"transfer_policy_id": record.transfer_policy_id, "mode": mode}
        return self._refusal(audit, record.id, details, error)

    def transfer(
        self, looked_up: Lookup, request: TransferRequest, principal: Principal | None, audit: AuditContext
    ) -> TransferOutcome:
        """Step 2, for the key ``looked_up`` (this request's ``lookup``): the key wrapped for the workload, or the
        refusal; either way exactly one ``key.transfer`` audit entry has been written."""
        record, document = looked_up
        details: dict[str, Any] = {"transfer_policy_id": record.transfer_policy_id, "mode": request.mode}
        try:
            evidence = self._evidence(request, document)
            details.update(evidence.audit_details())
            if request.header is not None and request.header.upper() != evidence.tee:
                raise AttestationFailed(
                    f"Attestation-Type says {request.header} but the evidence is {evidence.tee}",
                    reason="attestation_type_mismatch",
                )
            context = RequestContext(
                client_permissions=frozenset(principal.context) if principal else frozenset(),
                token_may_transfer=principal is not None and "keys:transfer" in principal.permissions,
                policy_ids_matched=frozenset(evidence.matched),
            )
            decision = evaluate(document, evidence.claims, context, self.simulated_trusted)
            if decision.allowed:
                material = self.keys.load_material(record)  # read only now that everything agreed
                outcome = TransferOutcome(wrapped=wrap_for_workload(material.secret, evidence.public_key))
            else:
                reasons = [reason.as_dict() for reason in decision.reasons]
                denied = PolicyDenied(
                    f"{len(reasons)} rule(s) of the key's transfer policy failed",
                    code="policy_denied",
                    extra={"reasons": reasons},
                )
                details.update(status_code=denied.instance_code, reasons=reasons)
                outcome = TransferOutcome(refusal=denied)
        except KeybrokerError as exc:
            return self._refusal(audit, record.id, details, exc)
        # Audited before the response; if this write fails the key is not released (503 audit_unavailable).
        try:
            replayed = self._decided(audit, record.id, "allowed" if decision.allowed else "denied", details, evidence)
        except BackendUnavailable as exc:
            return TransferOutcome(refusal=exc)
        return replayed or outcome

    def _refusal(
        self, audit: AuditContext, key_id: str, details: dict[str, Any], error: KeybrokerError
    ) -> TransferOutcome:
        details.update(status_code=error.instance_code, reasons=error.extra.get("reasons"))
        self.audit.record(audit, AuditEvent("key.transfer", _outcome(error), key_id, details))
        return TransferOutcome(refusal=error)

    def _decided(
        self, audit: AuditContext, key_id: str, outcome: str, details: dict[str, Any], evidence: _Evidence
    ) -> TransferOutcome | None:
        """One write for the decision: the nonce used up and the audit entry, together. None when written; a nonce
        already used (also by a concurrent request that got here first) turns the decision into a 409, audited as
        such. A failed write raises (nothing of it stays)."""
        use = self.verifier.nonce_use(evidence.nonce, *evidence.purposes)
        if self.audit.append_transfer(audit, AuditEvent("key.transfer", outcome, key_id, details), use) is not None:
            return None
        replayed = Conflict("this nonce has already been used", code="nonce_replayed")
        details.update(status_code=replayed.instance_code, reasons=None)
        self.audit.record(audit, AuditEvent("key.transfer", "denied", key_id, details))
        return TransferOutcome(refusal=replayed)

    def _evidence(self, request: TransferRequest, document: TransferPolicyDocument) -> _Evidence:
        """The request's evidence verified and bound to its nonce and the workload's key."""
        if isinstance(request, BackgroundTransfer):
            self.verifier.check_nonce(request.nonce)
            claims, matched = self.verifier.background(
                request.quote(), request.nonce, request.user_data, _policy_ids(document, request.tee)
            )
            return _Evidence(claims, matched, request.nonce, request.public_key, ("attest", "transfer"))
        try:
            tee = str(jwt.decode(request.token, options={"verify_signature": False}).get("attester_type"))
        except jwt.PyJWTError:
            tee = ""
        claims, matched = self.verifier.passport(request.token, _policy_ids(document, tee))
        if "verifier_nonce" not in claims or "attester_held_data" not in claims:
            raise AttestationFailed(
                "the token binds no nonce and no held data; attest with a nonce", reason="token_not_bound"
            )
        nonce = parse_nonce(claims["verifier_nonce"])
        self.verifier.check_nonce(nonce)
        public_key = workload_public_key(base64.b64decode(str(claims["attester_held_data"])))
        return _Evidence(claims, matched, nonce, public_key, ("transfer",))


@dataclass(frozen=True, slots=True)
class TransferOutcome:
    """What a transfer request came to: the key wrapped for the workload, or the refusal (already audited)."""

    wrapped: Wrapped | None = None
    refusal: KeybrokerError | None = None

    @property
    def decision(self) -> str:
        """``released``, or the refusal's code (the metrics' label)."""
        return "released" if self.refusal is None else self.refusal.instance_code


@dataclass(frozen=True, slots=True)
class _Evidence:
    """Verified claims, bound to ``nonce`` and the workload's ``public_key``."""

    claims: dict[str, Any]
    matched: list[str]  # the appraisal policies the claims match
    nonce: Nonce
    public_key: rsa.RSAPublicKey
    purposes: tuple[str, ...]  # what the transfer uses the nonce up for

    @property
    def tee(self) -> Any:
        return self.claims.get("attester_type")

    def audit_details(self) -> dict[str, Any]:
        claims = self.claims
        return {
            "tee": claims.get("attester_type"),
            "tcb_status": claims.get("attester_tcb_status"),
            "advisory_ids": claims.get("attester_advisory_ids"),
            "simulated": claims.get("keybroker_simulated"),
            "measurements": {k: claims[k] for k in _MEASUREMENTS if k in claims},
        }


def _outcome(error: KeybrokerError) -> str:
    """``failure`` when keybroker could not decide (a backend, the collateral source or the audit log was
    unavailable), ``denied`` for every refusal of the request itself (PROTOCOL.md §10)."""
    return "failure" if isinstance(error, BackendUnavailable) else "denied"


def _policy_ids(document: TransferPolicyDocument, tee: str | None) -> list[str]:
    """The appraisal policies of the policy's section for ``tee`` (the engine checks the TEE type itself)."""
    section = document.sgx if (tee or "").upper() == "SGX" else document.tdx if (tee or "").upper() == "TDX" else None
    return list(section.policy_ids or []) if section is not None else []
