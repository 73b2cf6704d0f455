"""The key policy engine: a pure function of (policy, verified claims, request context) that returns every
failing rule, never just the first (PROTOCOL.md §2). It fails closed: a claim that is missing fails its rule.

Semantics fixed against the anchors' defects: lists are any-of and unchecked when absent or empty; scalars are
exact, except ``isvsvn``, ``seamsvn`` and ``config_svn``, which are minimums; ``mrenclave`` is checked; debug and
``Revoked`` never pass; simulated evidence passes only with ``allow_simulated``; appraisal ``policy_ids`` must all
match and the attribute rules are still evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keybroker.policy.model import DEFAULT_ACCEPTED_TCB_STATUS, SgxPolicy, TdxPolicy, TransferPolicyDocument


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the transfer request carries beside the evidence."""

    client_permissions: frozenset[str] = frozenset()  # the bearer token's context values, if a token was given
    token_may_transfer: bool = False  # the bearer token grants keys:transfer
    policy_ids_matched: frozenset[str] = frozenset()  # appraisal policies that allowed these claims


@dataclass(frozen=True, slots=True)
class Decision:
    reasons: tuple[Reason, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return not self.reasons


def _any_of(reasons: list[Reason], code: str, name: str, allowed: Sequence[Any] | None, actual: Any) -> None:
    if allowed and actual not in allowed:
        reasons.append(Reason(code, f"{name} {actual} is not one of the {len(allowed)} the policy allows"))


def _exact(reasons: list[Reason], code: str, name: str, expected: Any | None, actual: Any) -> None:
    if expected is not None and actual != expected:
        reasons.append(Reason(code, f"{name} {actual} differs from the policy's {expected}"))


def _minimum(reasons: list[Reason], code: str, name: str, minimum: int | None, actual: Any) -> None:
    if minimum is not None and not (isinstance(actual, int) and actual >= minimum):
        reasons.append(Reason(code, f"{name} {actual} is below the policy's minimum {minimum}"))


def _tcb(reasons: list[Reason], attributes: Any, claims: Mapping[str, Any]) -> None:
    status = claims.get("attester_tcb_status")
    if status == "Revoked":
        reasons.append(Reason("tcb_revoked", "the platform's TCB is revoked"))
    elif attributes.enforce_tcb_upto_date:
        if status != "UpToDate":
            reasons.append(Reason("tcb_not_up_to_date", f"TCB status {status} is not UpToDate"))
    else:
        accepted = attributes.accepted_tcb_status or DEFAULT_ACCEPTED_TCB_STATUS
        if status not in {s.value for s in accepted}:
            reasons.append(Reason("tcb_status_not_accepted", f"TCB status {status} is not accepted by the policy"))
    if attributes.allowed_advisory_ids is not None:
        extra = sorted(set(claims.get("attester_advisory_ids") or []) - set(attributes.allowed_advisory_ids))
        if extra:
            reasons.append(Reason("advisory_not_allowed", f"advisories not allowed: {', '.join(extra)}"))


def _sgx(reasons: list[Reason], policy: SgxPolicy, claims: Mapping[str, Any]) -> None:
    a = policy.attributes
    _any_of(reasons, "mrsigner_mismatch", "MRSIGNER", a.mrsigner, claims.get("sgx_mrsigner"))
    _any_of(reasons, "mrenclave_mismatch", "MRENCLAVE", a.mrenclave, claims.get("sgx_mrenclave"))
    _any_of(reasons, "isvprodid_mismatch", "ISVPRODID", a.isvprodid, claims.get("sgx_isvprodid"))
    _minimum(reasons, "isvsvn_below_minimum", "ISVSVN", a.isvsvn, claims.get("sgx_isvsvn"))
    _exact(reasons, "config_id_mismatch", "CONFIGID", a.config_id, claims.get("sgx_config_id"))
    _minimum(reasons, "config_svn_below_minimum", "CONFIGSVN", a.config_svn, claims.get("sgx_config_svn"))
    _tcb(reasons, a, claims)
    if claims.get("sgx_is_debuggable") is not False:
        reasons.append(Reason("debug_not_allowed", "debug enclaves never receive keys"))


def _tdx(reasons: list[Reason], policy: TdxPolicy, claims: Mapping[str, Any]) -> None:
    a = policy.attributes
    _any_of(reasons, "mrsignerseam_mismatch", "MRSIGNERSEAM", a.mrsignerseam, claims.get("tdx_mrsignerseam"))
    _any_of(reasons, "mrseam_mismatch", "MRSEAM", a.mrseam, claims.get("tdx_mrseam"))
    _minimum(reasons, "seamsvn_below_minimum", "SEAMSVN", a.seamsvn, claims.get("tdx_seamsvn"))
    _any_of(reasons, "mrtd_mismatch", "MRTD", a.mrtd, claims.get("tdx_mrtd"))
    for i, expected in enumerate((a.rtmr0, a.rtmr1, a.rtmr2, a.rtmr3)):
        _exact(reasons, f"rtmr{i}_mismatch", f"RTMR{i}", expected, claims.get(f"tdx_rtmr{i}"))
    _exact(reasons, "mrconfigid_mismatch", "MRCONFIGID", a.mrconfigid, claims.get("tdx_mrconfigid"))
    _exact(reasons, "mrowner_mismatch", "MROWNER", a.mrowner, claims.get("tdx_mrowner"))
    _exact(reasons, "xfam_mismatch", "XFAM", a.xfam, claims.get("tdx_xfam"))
    _exact(reasons, "td_attributes_mismatch", "TDATTRIBUTES", a.td_attributes, claims.get("tdx_td_attributes"))
    _tcb(reasons, a, claims)
    if claims.get("tdx_is_debuggable") is not False:
        reasons.append(Reason("debug_not_allowed", "debug TDs never receive keys"))


def evaluate(
    policy: TransferPolicyDocument, claims: Mapping[str, Any], context: RequestContext, simulated_trusted: bool
) -> Decision:
    """Every rule of ``policy`` that ``claims`` (verified) and ``context`` fail, as reasons; none means allowed."""
    reasons: list[Reason] = []
    tee = claims.get("attester_type")
    allowed_types = {t.value for t in policy.attestation_type}
    if tee not in allowed_types:
        reasons.append(
            Reason("tee_type_not_allowed", f"{tee} evidence; the policy allows {', '.join(sorted(allowed_types))}")
        )
    elif tee == "SGX" and policy.sgx is not None:
        _sgx(reasons, policy.sgx, claims)
    elif tee == "TDX" and policy.tdx is not None:
        _tdx(reasons, policy.tdx, claims)
    else:  # the schema forbids this; the engine still refuses rather than skip every rule
        reasons.append(Reason("policy_section_missing", f"the policy has no {str(tee).lower()} section"))
    section = policy.sgx if tee == "SGX" else policy.tdx if tee == "TDX" else None
    for policy_id in (section.policy_ids or []) if section is not None else []:
        if policy_id not in context.policy_ids_matched:
            reasons.append(Reason("appraisal_policy_unmatched", f"appraisal policy {policy_id} did not match"))
    if claims.get("keybroker_simulated") is not False:
        if not policy.allow_simulated:
            reasons.append(Reason("simulated_evidence_not_allowed", "the evidence comes from the simulated TEE"))
        elif not simulated_trusted:
            reasons.append(Reason("simulated_evidence_not_allowed", "this service does not trust the simulated TEE"))
    required = policy.client_permissions_allof or []
    if required:
        missing = sorted(set(required) - context.client_permissions)
        if not context.token_may_transfer:
            reasons.append(
                Reason(
                    "client_permission_missing",
                    f"the policy needs a bearer token granting keys:transfer with context {', '.join(required)}",
                )
            )
        elif missing:
            reasons.append(Reason("client_permission_missing", f"the bearer token lacks {', '.join(missing)}"))
    return Decision(tuple(reasons))
