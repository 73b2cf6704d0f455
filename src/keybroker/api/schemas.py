"""Request and response bodies of PROTOCOL.md §1-2. Responses never carry key material."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from keybroker.errors import InvalidRequest
from keybroker.ids import KeyId, PolicyId, is_uuid4
from keybroker.keys.models import KeyRecord
from keybroker.keys.service import NewKey, build_spec
from keybroker.policy.model import Uuid
from keybroker.policy.store import PolicyRecord

# Free text for people: no control characters (they break logs, terminals and some databases).
Text = Annotated[str, Field(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")]
StrictInt = Annotated[int, Field(strict=True)]


def _uuid4(value: str) -> str:
    if not is_uuid4(value):
        raise ValueError("must be a UUIDv4 in canonical lowercase form")
    return value


Uuid4 = Annotated[str, Field(strict=True), AfterValidator(_uuid4)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyInformationIn(_Body):
    algorithm: Annotated[str, Field(min_length=1, max_length=16)]
    key_length: StrictInt | None = None
    curve_type: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    # 10,000 characters hold any accepted key (an RSA-7680 PEM is about 5,900); a larger input is refused before
    # any parsing, so nobody can make the service validate a huge RSA key.
    key_string: Annotated[SecretStr, Field(min_length=1, max_length=10_000)] | None = None
    kmip_key_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    id: Uuid4 | None = None  # the guide's body lets the caller choose the key id


class KeyCreateRequest(_Body):
    key_information: KeyInformationIn
    label: Text | None = None
    usage: Text | None = None
    transfer_policy_id: Uuid
    backend: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    def to_new_key(self) -> NewKey:
        info = self.key_information
        if info.key_string is not None and info.kmip_key_id is not None:
            raise InvalidRequest(
                "give key_string (import) or kmip_key_id (register), not both", code="conflicting_key_source"
            )
        spec = build_spec(info.algorithm, info.key_length, info.curve_type)
        return NewKey(
            spec=spec,
            transfer_policy_id=PolicyId(self.transfer_policy_id),
            label=self.label,
            usage=self.usage,
            backend=self.backend,
            key_id=KeyId(info.id) if info.id else None,
            key_string=info.key_string.get_secret_value() if info.key_string is not None else None,
            kmip_key_id=info.kmip_key_id,
        )


class KeyUpdateRequest(_Body):
    transfer_policy_id: Uuid


class KeyInformationOut(BaseModel):
    algorithm: str
    key_length: int
    curve_type: str | None
    kmip_key_id: str | None


class KeyOut(BaseModel):
    id: str
    key_information: KeyInformationOut
    label: str | None
    usage: str | None
    transfer_policy_id: str
    backend: str
    created_at: datetime
    transfer_link: str

    @classmethod
    def of(cls, record: KeyRecord, base_url: str) -> KeyOut:
        return cls(
            id=record.id,
            key_information=KeyInformationOut(
                algorithm=record.spec.algorithm.value,
                key_length=record.spec.key_length,
                curve_type=record.spec.curve.value if record.spec.curve else None,
                kmip_key_id=record.kmip_key_id,
            ),
            label=record.label,
            usage=record.usage,
            transfer_policy_id=record.transfer_policy_id,
            backend=record.backend,
            created_at=record.created_at,
            transfer_link=f"{base_url}/kbs/v1/keys/{record.id}/transfer",
        )


def policy_out(record: PolicyRecord) -> dict[str, Any]:
    """The stored policy as sent: its document (defaults filled in) plus id and timestamps."""
    return {
        "id": record.id,
        **record.document.model_dump(mode="json", exclude_none=True),
        "created_at": record.created_at.isoformat().replace("+00:00", "Z"),
        "updated_at": record.updated_at.isoformat().replace("+00:00", "Z"),
    }


class VersionOut(BaseModel):
    name: str
    version: str
    api: str
