"""The key transfer policy document of PROTOCOL.md §2, validated strictly.

Unknown attribute names are refused (a typo must never weaken a policy), hex values are checked for length and
normalised to lowercase, and self-contradicting or match-anything policies are refused at upload.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from keybroker.ids import canonical_uuid


class TeeType(enum.StrEnum):
    SGX = "SGX"
    TDX = "TDX"


class TcbStatus(enum.StrEnum):
    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"


DEFAULT_ACCEPTED_TCB_STATUS = (TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED)


def _hex(n_chars: int) -> Callable[[str], str]:
    pattern = re.compile(rf"[0-9a-fA-F]{{{n_chars}}}")

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"must be {n_chars} hexadecimal characters ({n_chars // 2} bytes)")
        return value.lower()

    return check


def _uuid(value: str) -> str:
    lowered = value.lower()
    if canonical_uuid(lowered) is None:
        raise ValueError("must be a UUID in canonical form (8-4-4-4-12 hexadecimal digits)")
    return lowered


Hex16 = Annotated[str, Field(strict=True), AfterValidator(_hex(16))]
Hex64 = Annotated[str, Field(strict=True), AfterValidator(_hex(64))]
Hex96 = Annotated[str, Field(strict=True), AfterValidator(_hex(96))]
Hex128 = Annotated[str, Field(strict=True), AfterValidator(_hex(128))]
Uuid = Annotated[str, Field(strict=True), AfterValidator(_uuid)]
U16 = Annotated[int, Field(ge=0, le=0xFFFF, strict=True)]
U8 = Annotated[int, Field(ge=0, le=0xFF, strict=True)]
AdvisoryId = Annotated[str, Field(pattern=r"^INTEL-(SA|DOC)-[0-9]{5}$")]


def _unique(values: list[Any] | None) -> list[Any] | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError("contains duplicates")
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class _TcbRules(_Strict):
    enforce_tcb_upto_date: Annotated[bool, Field(strict=True)] = False
    accepted_tcb_status: Annotated[list[TcbStatus] | None, AfterValidator(_unique)] = None
    allowed_advisory_ids: Annotated[list[AdvisoryId] | None, AfterValidator(_unique)] = None

    @model_validator(mode="after")
    def _tcb_consistent(self) -> Self:
        accepted = self.accepted_tcb_status
        if accepted is not None:
            if TcbStatus.REVOKED in accepted:
                raise ValueError("accepted_tcb_status: Revoked never passes and cannot be accepted")
            if not accepted:
                raise ValueError("accepted_tcb_status: an empty list would refuse every quote; omit it instead")
            if self.enforce_tcb_upto_date and set(accepted) != {TcbStatus.UP_TO_DATE}:
                raise ValueError("enforce_tcb_upto_date is true but accepted_tcb_status allows more than UpToDate")
        return self


class SgxAttributes(_TcbRules):
    mrsigner: Annotated[list[Hex64] | None, AfterValidator(_unique)] = None
    isvprodid: Annotated[list[U16] | None, AfterValidator(_unique)] = None
    mrenclave: Annotated[list[Hex64] | None, AfterValidator(_unique)] = None
    isvsvn: U16 | None = None
    config_id: Hex128 | None = None
    config_svn: U16 | None = None


class TdxAttributes(_TcbRules):
    mrsignerseam: Annotated[list[Hex96] | None, AfterValidator(_unique)] = None
    mrseam: Annotated[list[Hex96] | None, AfterValidator(_unique)] = None
    seamsvn: U8 | None = None
    mrtd: Annotated[list[Hex96] | None, AfterValidator(_unique)] = None
    rtmr0: Hex96 | None = None
    rtmr1: Hex96 | None = None
    rtmr2: Hex96 | None = None
    rtmr3: Hex96 | None = None
    mrconfigid: Hex96 | None = None
    mrowner: Hex96 | None = None
    xfam: Hex16 | None = None
    td_attributes: Hex16 | None = None


PolicyIds = Annotated[list[Uuid] | None, AfterValidator(_unique)]


class SgxPolicy(_Strict):
    attributes: SgxAttributes
    policy_ids: PolicyIds = None

    @model_validator(mode="after")
    def _identifies_a_workload(self) -> Self:
        a = self.attributes
        if not (a.mrenclave or a.mrsigner or self.policy_ids):
            raise ValueError(
                "an SGX policy must name mrenclave or mrsigner values (or appraisal policy_ids); "
                "otherwise any enclave would receive the key"
            )
        return self


class TdxPolicy(_Strict):
    attributes: TdxAttributes
    policy_ids: PolicyIds = None

    @model_validator(mode="after")
    def _identifies_a_workload(self) -> Self:
        a = self.attributes
        if not (a.mrtd or a.rtmr0 or a.rtmr1 or a.rtmr2 or a.rtmr3 or a.mrconfigid or a.mrowner or self.policy_ids):
            raise ValueError(
                "a TDX policy must name mrtd, an rtmr, mrconfigid or mrowner (or appraisal policy_ids); "
                "otherwise any TD would receive the key"
            )
        return self


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# Printable ASCII without space or comma (the guide writes a context as PERMISSION="nginx,USA").
Permission = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[!-+\--~]+$")]


class TransferPolicyDocument(_Strict):
    """The body of POST/PUT /kbs/v1/key-transfer-policies (and the stored policy, minus its metadata)."""

    attestation_type: Annotated[list[TeeType], BeforeValidator(_as_list), AfterValidator(_unique), Field(min_length=1)]
    sgx: SgxPolicy | None = None
    tdx: TdxPolicy | None = None
    client_permissions_allof: Annotated[list[Permission] | None, AfterValidator(_unique)] = None
    allow_simulated: Annotated[bool, Field(strict=True)] = False
    immutable: Annotated[bool, Field(strict=True)] = False

    @model_validator(mode="after")
    def _sections_match_types(self) -> Self:
        for tee, section in ((TeeType.SGX, self.sgx), (TeeType.TDX, self.tdx)):
            if tee in self.attestation_type and section is None:
                raise ValueError(f"attestation_type includes {tee} but the policy has no '{tee.lower()}' section")
            if tee not in self.attestation_type and section is not None:
                raise ValueError(f"a '{tee.lower()}' section is given but attestation_type does not include {tee}")
        return self
