"""Typed, frozen key structures. ``KeyMaterial`` never shows its bytes in a repr, str or log."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from keybroker.ids import BackendRef, KeyId, PolicyId


class Algorithm(enum.StrEnum):
    AES = "AES"
    RSA = "RSA"
    EC = "EC"


class Curve(enum.StrEnum):
    P256 = "secp256r1"
    P384 = "secp384r1"
    P521 = "secp521r1"

    @property
    def bits(self) -> int:
        return {Curve.P256: 256, Curve.P384: 384, Curve.P521: 521}[self]


CURVE_ALIASES: dict[str, Curve] = {
    "secp256r1": Curve.P256,
    "prime256v1": Curve.P256,
    "p-256": Curve.P256,
    "secp384r1": Curve.P384,
    "p-384": Curve.P384,
    "secp521r1": Curve.P521,
    "p-521": Curve.P521,
}

KEY_LENGTHS: dict[Algorithm, tuple[int, ...]] = {
    Algorithm.AES: (128, 192, 256),
    Algorithm.RSA: (2048, 3072, 4096, 7680),
    Algorithm.EC: (256, 384, 521),
}


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a key is: algorithm with its length (AES, RSA) or curve (EC). Always consistent once built."""

    algorithm: Algorithm
    key_length: int
    curve: Curve | None = None

    def __post_init__(self) -> None:
        if self.key_length not in KEY_LENGTHS[self.algorithm]:
            raise ValueError(f"{self.algorithm} does not support length {self.key_length}")
        if (self.algorithm is Algorithm.EC) != (self.curve is not None):
            raise ValueError("a curve is required for EC keys and only for them")
        if self.curve is not None and self.curve.bits != self.key_length:
            raise ValueError("EC key length must be the curve size")

    def describe(self) -> str:
        return f"EC-{self.curve}" if self.curve else f"{self.algorithm}-{self.key_length}"


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """Secret key bytes: raw for AES, PKCS#8 DER for RSA and EC (the transfer format of PROTOCOL.md §3).

    The bytes are excluded from ``repr``/``str`` so that they cannot leak through logs or tracebacks.
    """

    spec: KeySpec
    secret: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"KeyMaterial({self.spec.describe()}, <redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What keybroker knows about a key; the material lives in ``backend`` under ``backend_ref``."""

    id: KeyId
    spec: KeySpec
    label: str | None
    usage: str | None
    transfer_policy_id: PolicyId
    backend: str
    backend_ref: BackendRef
    kmip_key_id: str | None
    created_at: datetime
