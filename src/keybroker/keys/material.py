"""Generate key material, and parse imported ``key_string`` values strictly against a declared spec."""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.errors import InvalidKeyMaterial
from keybroker.keys.models import KEY_LENGTHS, Algorithm, Curve, KeyMaterial, KeySpec

_EC_CURVES: dict[Curve, type[ec.EllipticCurve]] = {
    Curve.P256: ec.SECP256R1,
    Curve.P384: ec.SECP384R1,
    Curve.P521: ec.SECP521R1,
}
_CURVE_BY_NAME: dict[str, Curve] = {"secp256r1": Curve.P256, "secp384r1": Curve.P384, "secp521r1": Curve.P521}


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate(spec: KeySpec) -> KeyMaterial:
    """Fresh key material for ``spec``. RSA-7680 takes seconds: call this off the event loop."""
    if spec.algorithm is Algorithm.AES:
        return KeyMaterial(spec, os.urandom(spec.key_length // 8))
    if spec.algorithm is Algorithm.RSA:
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=spec.key_length)
        return KeyMaterial(spec, _pkcs8(rsa_key))
    assert spec.curve is not None
    ec_key = ec.generate_private_key(_EC_CURVES[spec.curve]())
    return KeyMaterial(spec, _pkcs8(ec_key))


def parse_import(spec: KeySpec, key_string: str) -> KeyMaterial:
    """Parse a ``key_string`` (base64 raw bytes for AES, an unencrypted PEM private key for RSA/EC).

    Raises ``InvalidKeyMaterial`` when it does not parse or does not match ``spec``. The message never quotes
    the input.
    """
    if spec.algorithm is Algorithm.AES:
        return KeyMaterial(spec, _parse_aes(spec, key_string))
    private_key = _load_pem_private_key(key_string)
    if spec.algorithm is Algorithm.RSA:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise InvalidKeyMaterial("key_string is not an RSA private key")
        if private_key.key_size != spec.key_length:
            raise InvalidKeyMaterial(
                f"key_string is an RSA-{private_key.key_size} key, but key_length is {spec.key_length}"
            )
        if private_key.private_numbers().public_numbers.e < 65537:
            raise InvalidKeyMaterial("RSA keys with a public exponent below 65537 are refused")
    else:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise InvalidKeyMaterial("key_string is not an EC private key")
        curve = _CURVE_BY_NAME.get(private_key.curve.name)
        if curve is not spec.curve:
            raise InvalidKeyMaterial(f"key_string is on curve {private_key.curve.name}, not {spec.curve}")
    return KeyMaterial(spec, _pkcs8(private_key))


def public_key_pem(material: KeyMaterial) -> bytes | None:
    """The SubjectPublicKeyInfo PEM of an RSA/EC key; ``None`` for AES."""
    if material.spec.algorithm is Algorithm.AES:
        return None
    private_key = serialization.load_der_private_key(material.secret, password=None)
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _parse_aes(spec: KeySpec, key_string: str) -> bytes:
    try:
        raw = base64.b64decode(key_string.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyMaterial("key_string is not valid standard base64") from None
    if len(raw) * 8 != spec.key_length:
        raise InvalidKeyMaterial(f"key_string decodes to {len(raw) * 8} bits, but key_length is {spec.key_length}")
    return raw


def _load_pem_private_key(key_string: str) -> object:
    text = key_string.strip().encode("ascii", errors="strict") if key_string.isascii() else None
    if not text or not text.startswith(b"-----BEGIN ") or b"PRIVATE KEY-----" not in text:
        raise InvalidKeyMaterial("key_string must be a PEM private key (PKCS#8 or traditional RSA/EC)")
    if b"ENCRYPTED" in text:
        raise InvalidKeyMaterial("encrypted PEM private keys are not accepted; decrypt it first")
    try:
        # ``from None``: the parser's message could describe the bytes it choked on. The RSA consistency checks
        # are costly for large moduli, so they run only once the size is known to be one keybroker accepts.
        key = serialization.load_pem_private_key(text, password=None, unsafe_skip_rsa_key_validation=True)
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size > max(KEY_LENGTHS[Algorithm.RSA]):
                raise InvalidKeyMaterial(f"RSA keys larger than {max(KEY_LENGTHS[Algorithm.RSA])} bits are refused")
            key = serialization.load_pem_private_key(text, password=None)
        return key
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidKeyMaterial("key_string does not parse as a PEM private key") from None
