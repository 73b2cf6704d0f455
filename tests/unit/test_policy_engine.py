"""The key policy engine as a pure function: a table of (policy, claims, context) -> the exact failing rules."""

from __future__ import annotations

from typing import Any

import pytest

from keybroker.policy.engine import RequestContext, evaluate
from keybroker.policy.model import TransferPolicyDocument

H32, H48 = "aa" * 32, "bb" * 48
SGX_CLAIMS: dict[str, Any] = {
    "attester_type": "SGX",
    "attester_tcb_status": "UpToDate",
    "attester_advisory_ids": [],
    "sgx_mrenclave": H32,
    "sgx_mrsigner": H32,
    "sgx_isvprodid": 1,
    "sgx_isvsvn": 5,
    "sgx_config_id": "00" * 64,
    "sgx_config_svn": 2,
    "sgx_is_debuggable": False,
    "keybroker_simulated": False,
}
TDX_CLAIMS: dict[str, Any] = {
    "attester_type": "TDX",
    "attester_tcb_status": "UpToDate",
    "attester_advisory_ids": [],
    "tdx_mrtd": H48,
    "tdx_mrseam": H48,
    "tdx_mrsignerseam": "00" * 48,
    "tdx_seamsvn": 3,
    "tdx_rtmr0": H48,
    "tdx_rtmr1": H48,
    "tdx_rtmr2": H48,
    "tdx_rtmr3": H48,
    "tdx_mrconfigid": H48,
    "tdx_mrowner": H48,
    "tdx_xfam": "e702060000000000",
    "tdx_td_attributes": "0000001000000000",
    "tdx_is_debuggable": False,
    "keybroker_simulated": False,
}
SGX_POLICY: dict[str, Any] = {
    "attestation_type": ["SGX"],
    "sgx": {
        "attributes": {
            "mrenclave": [H32],
            "mrsigner": [H32],
            "isvprodid": [1],
            "isvsvn": 5,
            "config_id": "00" * 64,
            "config_svn": 2,
        }
    },
}
TDX_POLICY: dict[str, Any] = {
    "attestation_type": ["TDX"],
    "tdx": {
        "attributes": {
            "mrtd": [H48],
            "mrseam": [H48],
            "mrsignerseam": ["00" * 48],
            "seamsvn": 3,
            "rtmr0": H48,
            "rtmr1": H48,
            "rtmr2": H48,
            "rtmr3": H48,
            "mrconfigid": H48,
            "mrowner": H48,
            "xfam": "e702060000000000",
            "td_attributes": "0000001000000000",
        }
    },
}


def _codes(
    policy: dict[str, Any],
    claims: dict[str, Any],
    context: RequestContext | None = None,
    simulated_trusted: bool = False,
) -> list[str]:
    document = TransferPolicyDocument.model_validate(policy)
    return [r.code for r in evaluate(document, claims, context or RequestContext(), simulated_trusted).reasons]


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


def _attrs(policy: dict[str, Any], tee: str, **changes: Any) -> dict[str, Any]:
    section = dict(policy[tee])
    section["attributes"] = {**section["attributes"], **changes}
    return {**policy, tee: section}


def test_matching_claims_pass() -> None:
    assert _codes(SGX_POLICY, SGX_CLAIMS) == []
    assert _codes(TDX_POLICY, TDX_CLAIMS) == []


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        (_with(SGX_CLAIMS, sgx_mrenclave="cc" * 32), ["mrenclave_mismatch"]),
        (_with(SGX_CLAIMS, sgx_mrsigner="cc" * 32), ["mrsigner_mismatch"]),
        (_with(SGX_CLAIMS, sgx_isvprodid=2), ["isvprodid_mismatch"]),
        (_with(SGX_CLAIMS, sgx_isvsvn=4), ["isvsvn_below_minimum"]),
        (_with(SGX_CLAIMS, sgx_isvsvn=9), []),  # a minimum, not an equality (anchors' defect 2)
        (_with(SGX_CLAIMS, sgx_config_id="01" * 64), ["config_id_mismatch"]),
        (_with(SGX_CLAIMS, sgx_config_svn=1), ["config_svn_below_minimum"]),
        (_with(SGX_CLAIMS, sgx_is_debuggable=True), ["debug_not_allowed"]),
        (_with(SGX_CLAIMS, sgx_is_debuggable=None), ["debug_not_allowed"]),  # missing claim: fail closed
        (_with(SGX_CLAIMS, attester_tcb_status="Revoked"), ["tcb_revoked"]),
        (_with(SGX_CLAIMS, attester_tcb_status="OutOfDate"), ["tcb_status_not_accepted"]),
        (_with(SGX_CLAIMS, attester_tcb_status="SWHardeningNeeded"), []),  # in the default accepted set
        (_with(SGX_CLAIMS, keybroker_simulated=True), ["simulated_evidence_not_allowed"]),
        (_with(SGX_CLAIMS, attester_type="TDX"), ["tee_type_not_allowed"]),
        (
            _with(SGX_CLAIMS, sgx_mrenclave="cc" * 32, sgx_isvsvn=0, attester_tcb_status="OutOfDate"),
            ["mrenclave_mismatch", "isvsvn_below_minimum", "tcb_status_not_accepted"],
        ),
    ],
)
def test_sgx_rules(claims: dict[str, Any], expected: list[str]) -> None:
    assert _codes(SGX_POLICY, claims) == expected


@pytest.mark.parametrize(
    ("claim", "value", "expected"),
    [
        ("tdx_mrtd", "cc" * 48, "mrtd_mismatch"),
        ("tdx_mrseam", "cc" * 48, "mrseam_mismatch"),
        ("tdx_mrsignerseam", "cc" * 48, "mrsignerseam_mismatch"),
        ("tdx_seamsvn", 2, "seamsvn_below_minimum"),
        ("tdx_rtmr0", "cc" * 48, "rtmr0_mismatch"),
        ("tdx_rtmr3", "cc" * 48, "rtmr3_mismatch"),
        ("tdx_mrconfigid", "cc" * 48, "mrconfigid_mismatch"),
        ("tdx_mrowner", "cc" * 48, "mrowner_mismatch"),
        ("tdx_xfam", "ff" * 8, "xfam_mismatch"),
        ("tdx_td_attributes", "01" * 8, "td_attributes_mismatch"),
        ("tdx_is_debuggable", True, "debug_not_allowed"),
    ],
)
def test_tdx_rules(claim: str, value: Any, expected: str) -> None:
    assert _codes(TDX_POLICY, _with(TDX_CLAIMS, **{claim: value})) == [expected]


def test_tcb_rules() -> None:
    outdated = _with(SGX_CLAIMS, attester_tcb_status="OutOfDate", attester_advisory_ids=["INTEL-SA-00615"])
    accept = _attrs(SGX_POLICY, "sgx", accepted_tcb_status=["UpToDate", "OutOfDate"])
    assert _codes(accept, outdated) == []  # advisories unchecked without allowed_advisory_ids
    assert _codes(_attrs(accept, "sgx", allowed_advisory_ids=["INTEL-SA-00615"]), outdated) == []
    assert _codes(_attrs(accept, "sgx", allowed_advisory_ids=[]), outdated) == ["advisory_not_allowed"]
    enforce = _attrs(SGX_POLICY, "sgx", enforce_tcb_upto_date=True)
    assert _codes(enforce, _with(SGX_CLAIMS, attester_tcb_status="SWHardeningNeeded")) == ["tcb_not_up_to_date"]


def test_simulated_needs_both_policy_and_service() -> None:
    claims = _with(SGX_CLAIMS, keybroker_simulated=True)
    allowing = _with(SGX_POLICY, allow_simulated=True)
    assert _codes(allowing, claims, simulated_trusted=True) == []
    assert _codes(allowing, claims, simulated_trusted=False) == ["simulated_evidence_not_allowed"]


def test_appraisal_policies_and_attributes_both_apply() -> None:
    pid = "0b5a4c3e-7d2f-4a51-9a5e-1c2d3e4f5a6b"
    policy = {**SGX_POLICY, "sgx": {**SGX_POLICY["sgx"], "policy_ids": [pid]}}
    assert _codes(policy, SGX_CLAIMS) == ["appraisal_policy_unmatched"]
    matched = RequestContext(policy_ids_matched=frozenset({pid}))
    assert _codes(policy, SGX_CLAIMS, matched) == []
    # A matched appraisal policy does not excuse the attribute rules (ITA skips them; keybroker does not).
    assert _codes(policy, _with(SGX_CLAIMS, sgx_mrenclave="cc" * 32), matched) == ["mrenclave_mismatch"]


def test_client_permissions() -> None:
    policy = _with(SGX_POLICY, client_permissions_allof=["nginx", "USA"])
    assert _codes(policy, SGX_CLAIMS) == ["client_permission_missing"]
    ok = RequestContext(client_permissions=frozenset({"nginx", "USA", "x"}), token_may_transfer=True)
    assert _codes(policy, SGX_CLAIMS, ok) == []
    lacking = RequestContext(client_permissions=frozenset({"nginx"}), token_may_transfer=True)
    assert _codes(policy, SGX_CLAIMS, lacking) == ["client_permission_missing"]
    no_right = RequestContext(client_permissions=frozenset({"nginx", "USA"}), token_may_transfer=False)
    assert _codes(policy, SGX_CLAIMS, no_right) == ["client_permission_missing"]


def test_a_missing_section_fails_closed() -> None:
    document = TransferPolicyDocument.model_validate(SGX_POLICY).model_copy(update={"sgx": None})
    reasons = evaluate(document, SGX_CLAIMS, RequestContext(), False).reasons
    assert [r.code for r in reasons] == ["policy_section_missing"]
