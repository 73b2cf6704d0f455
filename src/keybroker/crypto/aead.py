"""AES-256-GCM sealing with the nonce carried in the blob: ``version(1) ‖ nonce(12) ‖ ciphertext ‖ tag(16)``."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"
_NONCE_LEN = 12


class SealError(Exception):
    """A sealed blob failed authentication (wrong key, wrong context, or tampered). Says nothing more."""

    def __init__(self) -> None:
        super().__init__("sealed data failed authentication")


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    nonce = os.urandom(_NONCE_LEN)
    return _VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, _VERSION + context)


def open_sealed(key: bytes, blob: bytes, context: bytes) -> bytes:
    if len(blob) < 1 + _NONCE_LEN + 16 or blob[:1] != _VERSION:
        raise SealError
    nonce = blob[1 : 1 + _NONCE_LEN]
    try:
        return AESGCM(key).decrypt(nonce, blob[1 + _NONCE_LEN :], _VERSION + context)
    except InvalidTag:
        raise SealError from None
