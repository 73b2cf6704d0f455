"""Wrapping a released key for the workload (PROTOCOL.md §3): a fresh 256-bit SWK per transfer,
RSA-OAEP(SHA-256, MGF1-SHA-256, no label) of the SWK under the workload's public key, and the key under the SWK
as ``u32le 12 ‖ u32le 16 ‖ u32le n ‖ iv(12) ‖ AES-256-GCM(ciphertext ‖ tag)`` with no AAD."""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.errors import InvalidRequest

ACCEPTED_RSA_BITS = (3072, 4096)
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass(frozen=True, slots=True)
class Wrapped:
    wrapped_key: bytes
    wrapped_swk: bytes

    def as_json(self) -> dict[str, str]:
        return {
            "wrapped_key": base64.b64encode(self.wrapped_key).decode(),
            "wrapped_swk": base64.b64encode(self.wrapped_swk).decode(),
        }


def workload_public_key(user_data: bytes) -> rsa.RSAPublicKey:
    """The workload's key from ``user_data``: a DER SubjectPublicKeyInfo of an RSA 3072/4096-bit key."""
    try:
        key = serialization.load_der_public_key(user_data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidRequest("user_data is not a DER SubjectPublicKeyInfo", code="invalid_request") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size not in ACCEPTED_RSA_BITS:
        raise InvalidRequest("user_data must be an RSA public key of 3072 or 4096 bits", code="invalid_request")
    if key.public_numbers().e != 65537:
        raise InvalidRequest("user_data's RSA public exponent must be 65537", code="invalid_request")
    return key


def decode_user_data(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("user_data must be standard base64", code="invalid_request") from None


def wrap_for_workload(key_bytes: bytes, public_key: rsa.RSAPublicKey) -> Wrapped:
    swk = AESGCM.generate_key(bit_length=256)
    iv = os.urandom(12)
    sealed = AESGCM(swk).encrypt(iv, key_bytes, None)
    wrapped_key = struct.pack("<III", 12, 16, len(sealed)) + iv + sealed
    return Wrapped(wrapped_key, public_key.encrypt(swk, _OAEP))
