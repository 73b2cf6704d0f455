"""Generate key material, and parse imported ``key_string`` values strictly against a declared spec."""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keybroker.errors import InvalidKeyMaterial
from keybroker.keys.models import KEY_LENGTHS, Algorithm, Curve, KeyMaterial, KeySpec
from keybroker.keys.primes import all_probably_prime

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
    return (
        stored_private_key(material)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def stored_private_key(material: KeyMaterial) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The private key of keybroker's own RSA/EC material, which was checked when it was generated or imported (and
    is authenticated by its store), so OpenSSL's costly RSA re-check is skipped."""
    key = serialization.load_der_private_key(material.secret, password=None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise InvalidKeyMaterial("stored material is not an RSA or EC private key")
    return key


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
        # ``from None``: the parser's message could describe the bytes it choked on. OpenSSL's own RSA check
        # re-proves both primes: 4.7 s for RSA-7680, holding the GIL (every other request waits); check_rsa does the
        # checks that matter for a key someone imports in a fraction of that.
        key = serialization.load_pem_private_key(text, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidKeyMaterial("key_string does not parse as a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size > max(KEY_LENGTHS[Algorithm.RSA]):
            raise InvalidKeyMaterial(f"RSA keys larger than {max(KEY_LENGTHS[Algorithm.RSA])} bits are refused")
        check_rsa(key)
    return key


def check_rsa(key: rsa.RSAPrivateKey) -> None:
    """An imported RSA key is consistent: n = p·q with distinct factors, e·d ≡ 1 modulo p-1 and q-1, the CRT values
    agree with d, p and q, p and q pass Miller-Rabin rounds with random bases (in a helper process: ``primes``), and
    a signature made with the private key verifies with the public one.

    Raises ``InvalidKeyMaterial`` naming the failed check, never a value."""
    numbers = key.private_numbers()
    n, e = numbers.public_numbers.n, numbers.public_numbers.e
    p, q, d = numbers.p, numbers.q, numbers.d
    checks = (
        ("its factors do not multiply to the modulus", 1 < p < n and 1 < q < n and p * q == n and p != q),
        ("its public exponent is even or not below the modulus", e % 2 == 1 and 1 < e < n),
        ("its private exponent does not invert the public one", (d * e) % (p - 1) == 1 and (d * e) % (q - 1) == 1),
        (
            "its CRT values disagree with its private exponent",
            numbers.dmp1 == d % (p - 1) and numbers.dmq1 == d % (q - 1) and (numbers.iqmp * q) % p == 1,
        ),
    )
    for failure, passed in checks:
        if not passed:
            raise InvalidKeyMaterial(f"key_string is not a consistent RSA key: {failure}")
    if not all_probably_prime(p, q):
        raise InvalidKeyMaterial("key_string is not a consistent RSA key: a factor of its modulus is not prime")
    message = os.urandom(32)
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)
    try:
        key.public_key().verify(key.sign(message, pss, hashes.SHA256()), message, pss, hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise InvalidKeyMaterial(
            "key_string is not a consistent RSA key: a signature made with it does not verify"
        ) from None
