from __future__ import annotations

import base64
import math
import secrets

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from keybroker.errors import InvalidKeyMaterial, InvalidRequest
from keybroker.keys.material import generate, parse_import, public_key_pem
from keybroker.keys.models import Algorithm, Curve, KeyMaterial, KeySpec
from keybroker.keys.service import build_spec

SPECS = [
    KeySpec(Algorithm.AES, 128),
    KeySpec(Algorithm.AES, 192),
    KeySpec(Algorithm.AES, 256),
    KeySpec(Algorithm.RSA, 2048),
    KeySpec(Algorithm.RSA, 3072),
    KeySpec(Algorithm.EC, 256, Curve.P256),
    KeySpec(Algorithm.EC, 384, Curve.P384),
    KeySpec(Algorithm.EC, 521, Curve.P521),
]


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> str:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_generate_produces_material_of_the_spec(spec: KeySpec) -> None:
    material = generate(spec)
    if spec.algorithm is Algorithm.AES:
        assert len(material.secret) * 8 == spec.key_length
        return
    key = serialization.load_der_private_key(material.secret, password=None)
    if spec.algorithm is Algorithm.RSA:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == spec.key_length
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == spec.curve
    assert public_key_pem(material) is not None


def test_generated_material_is_fresh_each_time() -> None:
    spec = KeySpec(Algorithm.AES, 256)
    assert generate(spec).secret != generate(spec).secret


def test_material_repr_never_shows_bytes() -> None:
    material = KeyMaterial(KeySpec(Algorithm.AES, 128), b"\x01" * 16)
    for text in (repr(material), str(material), f"{material}"):
        assert "01" not in text.replace("AES-128", "")
        assert "redacted" in text


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL], ids=["pkcs8", "trad"]
)
def test_import_rsa_pem_round_trips_to_pkcs8(fmt: serialization.PrivateFormat) -> None:
    key = rsa.generate_private_key(65537, 2048)
    material = parse_import(KeySpec(Algorithm.RSA, 2048), _pem(key, fmt))
    assert material.secret == key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_import_ec_and_aes() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    assert parse_import(KeySpec(Algorithm.EC, 384, Curve.P384), _pem(key, serialization.PrivateFormat.PKCS8))
    raw = bytes(range(32))
    assert parse_import(KeySpec(Algorithm.AES, 256), base64.b64encode(raw).decode()).secret == raw


_RSA = rsa.generate_private_key(65537, 2048)
_EC = ec.generate_private_key(ec.SECP256R1())


def _rejections() -> list[tuple[str, KeySpec, str, str]]:
    rsa_pem = _pem(_RSA, serialization.PrivateFormat.PKCS8)
    ec_pem = _pem(_EC, serialization.PrivateFormat.PKCS8)
    encrypted = _RSA.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    ).decode()
    public = (
        _RSA.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_pem = _pem(ed, serialization.PrivateFormat.PKCS8)
    dsa_pem = _pem(dsa.generate_private_key(2048), serialization.PrivateFormat.PKCS8)
    aes256 = KeySpec(Algorithm.AES, 256)
    rsa2048 = KeySpec(Algorithm.RSA, 2048)
    return [
        ("aes-not-base64", aes256, "not base64!!", "base64"),
        ("aes-urlsafe-base64", aes256, base64.urlsafe_b64encode(b"\xfb" * 32).decode(), "base64"),
        ("aes-wrong-length", aes256, base64.b64encode(b"x" * 16).decode(), "128 bits"),
        ("aes-empty", aes256, "", "0 bits"),
        ("rsa-wrong-size", KeySpec(Algorithm.RSA, 3072), rsa_pem, "RSA-2048"),
        ("rsa-given-ec", rsa2048, ec_pem, "not an RSA"),
        ("rsa-given-ed25519", rsa2048, ed_pem, "not an RSA"),
        ("rsa-given-dsa", rsa2048, dsa_pem, "not an RSA"),
        ("ec-wrong-curve", KeySpec(Algorithm.EC, 384, Curve.P384), ec_pem, "secp256r1"),
        ("ec-given-rsa", KeySpec(Algorithm.EC, 256, Curve.P256), rsa_pem, "not an EC"),
        ("encrypted-pem", rsa2048, encrypted, "encrypted"),
        ("public-key", rsa2048, public, "PEM private key"),
        ("garbage-pem", rsa2048, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "does not parse"),
        ("not-pem", rsa2048, base64.b64encode(b"x" * 32).decode(), "PEM private key"),
        ("non-ascii", rsa2048, "-----BEGIN PRIVATE KEY-----é", "PEM private key"),
    ]


@pytest.mark.parametrize(
    ("spec", "key_string", "reason"), [r[1:] for r in _rejections()], ids=[r[0] for r in _rejections()]
)
def test_import_rejections_name_the_reason(spec: KeySpec, key_string: str, reason: str) -> None:
    with pytest.raises(InvalidKeyMaterial) as caught:
        parse_import(spec, key_string)
    assert reason in caught.value.detail
    # The refusal never quotes the input.
    lines = key_string.strip().splitlines()
    body = lines[1] if len(lines) > 1 else key_string
    if len(body) >= 12:
        assert body[:12] not in caught.value.detail


def test_small_public_exponent_is_refused() -> None:
    key = rsa.generate_private_key(3, 2048)
    with pytest.raises(InvalidKeyMaterial, match="exponent"):
        parse_import(KeySpec(Algorithm.RSA, 2048), _pem(key, serialization.PrivateFormat.PKCS8))


@pytest.mark.parametrize(
    ("algorithm", "length", "curve", "code"),
    [
        ("DES", 56, None, "unsupported_algorithm"),
        ("AES", 512, None, "unsupported_key_length"),
        ("AES", None, None, "unsupported_key_length"),
        ("AES", 256, "secp256r1", "unsupported_curve"),
        ("RSA", 1024, None, "unsupported_key_length"),
        ("RSA", 8192, None, "unsupported_key_length"),
        ("RSA", 2048, "secp384r1", "unsupported_curve"),
        ("EC", None, None, "unsupported_curve"),
        ("EC", None, "secp256k1", "unsupported_curve"),
        ("EC", 384, "secp256r1", "unsupported_key_length"),
    ],
)
def test_build_spec_refuses_inconsistent_combinations(
    algorithm: str, length: int | None, curve: str | None, code: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        build_spec(algorithm, length, curve)
    assert caught.value.instance_code == code


@pytest.mark.parametrize(
    ("curve", "expected"), [("prime256v1", Curve.P256), ("secp256r1", Curve.P256), ("SECP521R1", Curve.P521)]
)
def test_curve_aliases(curve: str, expected: Curve) -> None:
    spec = build_spec("ec", None, curve)
    assert spec.curve is expected
    assert spec.key_length == expected.bits


def _numbers_pem(numbers: rsa.RSAPrivateNumbers) -> str:
    key = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    return _pem(key, serialization.PrivateFormat.PKCS8)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda n: {"dmp1": n.dmp1 ^ 2}, "CRT values disagree"),
        (lambda n: {"iqmp": n.iqmp + 1}, "CRT values disagree"),
        (lambda n: {"d": n.d + 2}, "private exponent does not invert"),
    ],
    ids=["dmp1", "iqmp", "d"],
)
def test_inconsistent_rsa_imports_are_refused_with_their_reason(change: object, reason: str) -> None:
    numbers = rsa.generate_private_key(65537, 2048).private_numbers()
    values = {"p": numbers.p, "q": numbers.q, "d": numbers.d, "dmp1": numbers.dmp1, "dmq1": numbers.dmq1}
    values["iqmp"] = numbers.iqmp
    values.update(change(numbers))
    pem = _numbers_pem(rsa.RSAPrivateNumbers(public_numbers=numbers.public_numbers, **values))
    with pytest.raises(InvalidKeyMaterial, match=reason):
        parse_import(KeySpec(Algorithm.RSA, 2048), pem)


def test_a_composite_factor_is_refused() -> None:
    """Every structural check passes (they are made of p-1 as given), and OpenSSL's signing falls back to d when
    its CRT result is wrong, so a signature round trip passes too; Miller-Rabin finds that p is not prime."""
    e = 65537
    while True:
        p1 = rsa.generate_private_key(e, 1024).private_numbers().p
        p2 = rsa.generate_private_key(e, 1024).private_numbers().q
        q = rsa.generate_private_key(e, 2048).private_numbers().p
        p = p1 * p2
        if (p * q).bit_length() == 2048:
            break
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    d = pow(e, -1, lam)
    public = rsa.RSAPublicNumbers(e, p * q)
    pem = _numbers_pem(rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public))
    with pytest.raises(InvalidKeyMaterial, match="not prime"):
        parse_import(KeySpec(Algorithm.RSA, 2048), pem)


def _prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (1 << (bits - 1)) | 1
        if all(pow(a, candidate - 1, candidate) == 1 for a in (2, 3, 5, 7, 11, 13)):
            return candidate


def test_many_small_factors_are_refused() -> None:
    """p a product of six 171-bit primes (a modulus that elliptic-curve factoring breaks; accepted before)."""
    e = 65537
    while True:
        p = math.prod(_prime(171) for _ in range(6))
        q = rsa.generate_private_key(e, 2048).private_numbers().p
        if (p * q).bit_length() == 2048 and math.gcd(e, (p - 1) * (q - 1)) == 1:
            break
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    d = pow(e, -1, lam)
    public = rsa.RSAPublicNumbers(e, p * q)
    pem = _numbers_pem(rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public))
    with pytest.raises(InvalidKeyMaterial, match="not prime"):
        parse_import(KeySpec(Algorithm.RSA, 2048), pem)


def test_a_consistent_rsa_import_is_accepted_without_openssls_slow_check() -> None:
    key = rsa.generate_private_key(65537, 2048)
    material = parse_import(KeySpec(Algorithm.RSA, 2048), _pem(key, serialization.PrivateFormat.PKCS8))
    assert serialization.load_der_private_key(material.secret, None).private_numbers() == key.private_numbers()


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    length = len(body)
    encoded = bytes([length]) if length < 128 else bytes([0x80 | 2]) + length.to_bytes(2, "big")
    return b"\x02" + encoded + body


def test_factors_that_do_not_multiply_to_the_modulus_are_refused() -> None:
    """A PKCS#1 key whose p·q is not n (cryptography will not build one, so the DER is written here)."""
    n = rsa.generate_private_key(65537, 2048).private_numbers()
    fields = [0, n.public_numbers.n, n.public_numbers.e, n.d, n.p + 2, n.q, n.dmp1, n.dmq1, n.iqmp]
    body = b"".join(_der_integer(v) for v in fields)
    der = b"\x30\x82" + len(body).to_bytes(2, "big") + body
    text = base64.encodebytes(der).decode()
    pem = f"-----BEGIN RSA PRIVATE KEY-----\n{text}-----END RSA PRIVATE KEY-----\n"
    with pytest.raises(InvalidKeyMaterial, match=r"factors do not multiply|does not parse"):
        parse_import(KeySpec(Algorithm.RSA, 2048), pem)
