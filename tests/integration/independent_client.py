"""A workload written only from PROTOCOL.md §3, with httpx and cryptography and nothing of keybroker's.

``quote_for(report_data) -> bytes`` is the TEE (on hardware: configfs-tsm or Gramine; in tests: the simulator).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def fetch_key(http: httpx.Client, key_id: str, tee: str, quote_for: Callable[[bytes], bytes]) -> bytes:
    path = f"/kbs/v1/keys/{key_id}/transfer"
    # Step 1: the nonce (empty JSON object, no Attestation-Type header).
    step1 = http.post(path, json={})
    step1.raise_for_status()
    nonce = step1.json()
    assert tee.upper() in step1.headers["Attestation-Type"].split(",")
    # A fresh RSA-3072 key; its DER SubjectPublicKeyInfo is user_data.
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    user_data = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # REPORTDATA = SHA-512(nonce.val ‖ nonce.iat ‖ user_data), with val and iat base64-decoded.
    report_data = hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + user_data).digest()
    quote = quote_for(report_data)
    # Step 2a: background check.
    step2 = http.post(
        path,
        headers={"Attestation-Type": tee.upper()},
        json={
            "quote": base64.b64encode(quote).decode(),
            "nonce": nonce,
            "user_data": base64.b64encode(user_data).decode(),
        },
    )
    step2.raise_for_status()
    released = step2.json()
    # wrapped_swk: RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) of the 32-byte SWK.
    swk = private_key.decrypt(
        base64.b64decode(released["wrapped_swk"]),
        padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    # wrapped_key: u32le 12 ‖ u32le 16 ‖ u32le n ‖ iv(12) ‖ AES-256-GCM(ciphertext ‖ tag), no AAD.
    wrapped = base64.b64decode(released["wrapped_key"])
    iv_length, tag_length, n = struct.unpack("<III", wrapped[:12])
    assert (iv_length, tag_length, len(wrapped)) == (12, 16, 24 + n)
    return AESGCM(swk).decrypt(wrapped[12:24], wrapped[24:], None)
