"""Between keybroker's key material and KMIP objects: names, references, and the checks that an object holds a key
of the expected spec (never its bytes in a message)."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.backends.kmip.vendor import kmip_enums, kmip_objects
from keybroker.errors import InvalidKeyMaterial
from keybroker.keys.material import check_rsa
from keybroker.keys.models import Algorithm, Curve, KeyMaterial, KeySpec

NAME_PREFIX = "keybroker:"
REGISTERED_PREFIX = "registered:"

CURVES: dict[str, Curve] = {"secp256r1": Curve.P256, "secp384r1": Curve.P384, "secp521r1": Curve.P521}
# What an EC private key may be tagged as when created outside keybroker; keybroker registers ``EC``.
EC_TAGS = frozenset({kmip_enums.CryptographicAlgorithm.EC, kmip_enums.CryptographicAlgorithm.ECDSA})


class Mismatch(Exception):
    """An object that does not hold a key of the expected spec (the message says how; never its bytes)."""


def parse_ref(ref: str) -> tuple[str, bool]:
    """``(object id, bound)``: ``bound`` is False for a ``registered:`` ref (an adopted object, not ours)."""
    if ref.startswith(REGISTERED_PREFIX):
        return ref[len(REGISTERED_PREFIX) :], False
    return ref, True


def valid_uid(uid: str) -> bool:
    # An empty identifier must never reach PyKMIP: KMIP reads it as "the ID placeholder", i.e. the object the
    # session touched last, which could be another key.
    return bool(uid) and uid == uid.strip() and len(uid) <= 256 and uid.isprintable()


def object_material(obj: Any, spec: KeySpec, *, validate: bool) -> bytes:
    """The key bytes of a PyKMIP object if it holds a ``spec`` key (AES raw, RSA/EC canonical PKCS#8), else
    ``Mismatch``. ``validate`` runs the full RSA consistency check (objects keybroker did not write)."""
    value = getattr(obj, "value", None)
    if not isinstance(value, bytes):
        raise Mismatch("it holds no key value")
    object_type = getattr(obj, "object_type", None)
    algorithm = getattr(obj, "cryptographic_algorithm", None)
    if spec.algorithm is Algorithm.AES:
        if object_type != kmip_enums.ObjectType.SYMMETRIC_KEY:
            raise Mismatch(f"it is a {type_name(object_type)}, not a symmetric key")
        if algorithm != kmip_enums.CryptographicAlgorithm.AES:
            raise Mismatch(f"its algorithm is {enum_name(algorithm)}, not AES")
        if getattr(obj, "key_format_type", None) != kmip_enums.KeyFormatType.RAW:
            raise Mismatch("its key format is not Raw")
        if len(value) * 8 != spec.key_length or getattr(obj, "cryptographic_length", None) != spec.key_length:
            raise Mismatch(f"it is {len(value) * 8} bits long, not {spec.key_length}")
        return value
    if object_type != kmip_enums.ObjectType.PRIVATE_KEY:
        raise Mismatch(f"it is a {type_name(object_type)}, not a private key")
    wanted = {kmip_enums.CryptographicAlgorithm.RSA} if spec.algorithm is Algorithm.RSA else EC_TAGS
    if algorithm not in wanted:
        raise Mismatch(f"its algorithm is {enum_name(algorithm)}, not {spec.algorithm}")
    return private_key_material(value, spec, validate=validate)


def private_key_material(value: bytes, spec: KeySpec, *, validate: bool) -> bytes:
    try:
        # PKCS#8 as keybroker registers it; PKCS#1 or SEC1 DER as other clients may have (all DER key formats).
        key = serialization.load_der_private_key(value, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise Mismatch("its key value does not parse as a DER private key") from None
    if spec.algorithm is Algorithm.RSA:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise Mismatch("its key value is not an RSA key")
        if key.key_size != spec.key_length:
            raise Mismatch(f"it is an RSA-{key.key_size} key, not RSA-{spec.key_length}")
        if validate:
            # The checks parse_import makes of an imported key; keybroker's own puts passed them already.
            if key.private_numbers().public_numbers.e < 65537:
                raise Mismatch("its RSA public exponent is below 65537")
            try:
                check_rsa(key)
            except InvalidKeyMaterial:
                raise Mismatch("its RSA key fails the consistency check") from None
    else:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise Mismatch("its key value is not an EC key")
        if CURVES.get(key.curve.name) is not spec.curve:
            raise Mismatch(f"it is on curve {key.curve.name}, not {spec.curve}")
    # Re-encoded so that what keybroker hands out is always PKCS#8, whatever DER format the object was stored in.
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def enum_name(value: object) -> str:
    return str(getattr(value, "name", value))


def type_name(value: object) -> str:
    return enum_name(value).replace("_", " ").lower()


def kmip_object(name: str, material: KeyMaterial) -> Any:
    """The PyKMIP object that registers ``material`` under ``name`` (``keybroker:<deployment>:<key id>``)."""
    spec = material.spec
    alg, mask = kmip_enums.CryptographicAlgorithm, kmip_enums.CryptographicUsageMask
    if spec.algorithm is Algorithm.AES:
        return kmip_objects.SymmetricKey(
            alg.AES, spec.key_length, material.secret, masks=[mask.ENCRYPT, mask.DECRYPT], name=name
        )
    algorithm, masks = (
        (alg.RSA, [mask.SIGN, mask.DECRYPT]) if spec.algorithm is Algorithm.RSA else (alg.EC, [mask.SIGN])
    )
    return kmip_objects.PrivateKey(
        algorithm, spec.key_length, material.secret, kmip_enums.KeyFormatType.PKCS_8, masks=masks, name=name
    )


def clip(text: object, limit: int = 200) -> str:
    value = str(text)
    return value if len(value) <= limit else value[:limit] + "..."
