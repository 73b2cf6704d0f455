"""The transfer policy schema refuses every malformed or weakening document with a reason."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from keybroker.policy.model import TcbStatus, TeeType, TransferPolicyDocument

H64 = "ab" * 32
H96 = "cd" * 48
H128 = "ef" * 64

TDX_POLICY: dict[str, Any] = {
    "attestation_type": "TDX",
    "tdx": {
        "attributes": {
            "mrsignerseam": [H96],
            "mrseam": [H96],
            "seamsvn": 3,
            "mrtd": [H96],
            "rtmr0": H96,
            "rtmr1": H96,
            "rtmr2": H96,
            "rtmr3": H96,
            "mrconfigid": H96,
            "mrowner": H96,
            "xfam": "e718060000000000",
            "td_attributes": "0000001000000000",
            "enforce_tcb_upto_date": False,
            "accepted_tcb_status": ["UpToDate"],
            "allowed_advisory_ids": [],
        },
        "policy_ids": ["0b5a4c3e-7d2f-4a51-9a5e-1c2d3e4f5a6b"],
    },
}
SGX_POLICY: dict[str, Any] = {
    "attestation_type": ["SGX"],
    "sgx": {
        "attributes": {
            "mrsigner": [H64.upper()],
            "isvprodid": [1],
            "mrenclave": [H64],
            "isvsvn": 2,
            "config_id": H128,
            "config_svn": 0,
            "enforce_tcb_upto_date": False,
            "accepted_tcb_status": ["UpToDate", "SWHardeningNeeded"],
            "allowed_advisory_ids": ["INTEL-SA-00615"],
        }
    },
    "client_permissions_allof": ["nginx", "USA"],
    "allow_simulated": False,
    "immutable": False,
}


def test_full_policies_of_protocol_section_2_are_accepted() -> None:
    sgx = TransferPolicyDocument.model_validate(SGX_POLICY)
    assert sgx.attestation_type == [TeeType.SGX]
    assert sgx.sgx is not None
    assert sgx.sgx.attributes.mrsigner == [H64]  # normalised to lowercase
    tdx = TransferPolicyDocument.model_validate(TDX_POLICY)
    assert tdx.attestation_type == [TeeType.TDX]  # a string is accepted for a list
    both = TransferPolicyDocument.model_validate(
        {"attestation_type": ["SGX", "TDX"], "sgx": SGX_POLICY["sgx"], "tdx": TDX_POLICY["tdx"]}
    )
    assert both.tdx is not None
    assert both.tdx.attributes.accepted_tcb_status == [TcbStatus.UP_TO_DATE]


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    target = changed
    *parents, last = path.split(".")
    for part in parents:
        target = target[part]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return changed


_DELETE = object()

REJECTIONS = [
    ("unknown-attribute", SGX_POLICY, "sgx.attributes.mr_enclave", [H64], "extra"),
    ("unknown-top-level", SGX_POLICY, "allow_debug", True, "extra"),
    ("unknown-section-field", SGX_POLICY, "sgx.policy_id", "x", "extra"),
    ("mrenclave-short", SGX_POLICY, "sgx.attributes.mrenclave", ["ab" * 31], "64 hexadecimal"),
    ("mrenclave-not-hex", SGX_POLICY, "sgx.attributes.mrenclave", ["zz" * 32], "64 hexadecimal"),
    ("mrenclave-scalar", SGX_POLICY, "sgx.attributes.mrenclave", H64, "list"),
    ("mrenclave-duplicates", SGX_POLICY, "sgx.attributes.mrenclave", [H64, H64.upper()], "duplicates"),
    ("config-id-short", SGX_POLICY, "sgx.attributes.config_id", H64, "128 hexadecimal"),
    ("isvsvn-negative", SGX_POLICY, "sgx.attributes.isvsvn", -1, "greater than or equal"),
    ("isvsvn-too-big", SGX_POLICY, "sgx.attributes.isvsvn", 65536, "less than or equal"),
    ("isvsvn-string", SGX_POLICY, "sgx.attributes.isvsvn", "2", "integer"),
    ("isvsvn-hex-string", SGX_POLICY, "sgx.attributes.isvsvn", "0x2", "integer"),
    ("isvprodid-bool", SGX_POLICY, "sgx.attributes.isvprodid", [True], "integer"),
    ("revoked-accepted", SGX_POLICY, "sgx.attributes.accepted_tcb_status", ["Revoked"], "Revoked never passes"),
    ("unknown-tcb-status", SGX_POLICY, "sgx.attributes.accepted_tcb_status", ["OK"], "Input should be"),
    ("empty-accepted", SGX_POLICY, "sgx.attributes.accepted_tcb_status", [], "refuse every quote"),
    ("enforce-contradiction", SGX_POLICY, "sgx.attributes.enforce_tcb_upto_date", True, "allows more than UpToDate"),
    ("enforce-string", SGX_POLICY, "sgx.attributes.enforce_tcb_upto_date", "true", "boolean"),
    ("advisory-malformed", SGX_POLICY, "sgx.attributes.allowed_advisory_ids", ["SA-615"], "pattern"),
    ("matches-any-enclave", SGX_POLICY, "sgx.attributes", {"isvsvn": 1}, "any enclave"),
    ("sgx-section-missing", SGX_POLICY, "sgx", _DELETE, "no 'sgx' section"),
    ("section-without-type", SGX_POLICY, "tdx", TDX_POLICY["tdx"], "does not include TDX"),
    ("unknown-tee", SGX_POLICY, "attestation_type", ["SEV"], "Input should be"),
    ("empty-tee-list", SGX_POLICY, "attestation_type", [], "at least 1"),
    ("duplicate-tee", SGX_POLICY, "attestation_type", ["SGX", "SGX"], "duplicates"),
    ("attestation-type-missing", SGX_POLICY, "attestation_type", _DELETE, "Field required"),
    ("permission-with-comma", SGX_POLICY, "client_permissions_allof", ["nginx,USA"], "pattern"),
    ("allow-simulated-string", SGX_POLICY, "allow_simulated", "yes", "boolean"),
    ("immutable-int", SGX_POLICY, "immutable", 1, "boolean"),
    ("mrtd-sgx-length", TDX_POLICY, "tdx.attributes.mrtd", [H64], "96 hexadecimal"),
    ("rtmr-list", TDX_POLICY, "tdx.attributes.rtmr0", [H96], "string"),
    ("xfam-long", TDX_POLICY, "tdx.attributes.xfam", H64, "16 hexadecimal"),
    ("seamsvn-too-big", TDX_POLICY, "tdx.attributes.seamsvn", 256, "less than or equal"),
    ("policy-id-not-uuid", TDX_POLICY, "tdx.policy_ids", ["abc"], "UUID"),
    ("tdx-attribute-from-sgx", TDX_POLICY, "tdx.attributes.mrenclave", [H64], "extra"),
    ("matches-any-td", TDX_POLICY, "tdx", {"attributes": {"seamsvn": 1}}, "any TD"),
]


@pytest.mark.parametrize(
    ("document", "path", "value", "reason"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejections(document: dict[str, Any], path: str, value: Any, reason: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TransferPolicyDocument.model_validate(_set(document, path, value))
    assert reason in str(caught.value)


def test_policy_ids_alone_identify_a_workload() -> None:
    document = _set(TDX_POLICY, "tdx", {"attributes": {}, "policy_ids": ["0b5a4c3e-7d2f-4a51-9a5e-1c2d3e4f5a6b"]})
    assert TransferPolicyDocument.model_validate(document).tdx is not None
