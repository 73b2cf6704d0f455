"""Importing released keys into a PKCS#11 token (python-pkcs11): RSA and EC keys as a sensitive, non-extractable
``CKO_PRIVATE_KEY`` plus the matching ``CKO_PUBLIC_KEY``, AES keys as a sensitive, non-extractable
``CKO_SECRET_KEY``; ``C_InitToken`` through ctypes (python-pkcs11 0.10 has none)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker_client._errors import KeybrokerClientError
from keybroker_client.provision.keys_txt import LABEL_BYTES, KeyEntry

# DER of the namedCurve OIDs (RFC 5480) for CKA_EC_PARAMS.
_EC_PARAMS = {
    "secp256r1": bytes.fromhex("06082a8648ce3d030107"),
    "secp384r1": bytes.fromhex("06052b81040022"),
    "secp521r1": bytes.fromhex("06052b81040023"),
}


class ProvisionError(KeybrokerClientError):
    """Provisioning failed (exit 1); the message says why, never with key bytes."""


@dataclass(frozen=True)
class Material:
    algorithm: str  # "RSA-3072", "EC-secp256r1", "AES-256"
    templates: tuple[dict[Any, Any], ...] = field(repr=False)  # key first, then the public key


def _unsigned(value: int, length: int | None = None) -> bytes:
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


def _der_octet_string(data: bytes) -> bytes:
    n = len(data)
    if n < 0x80:
        return b"\x04" + bytes([n]) + data
    size = _unsigned(n)
    return b"\x04" + bytes([0x80 | len(size)]) + size + data


def material_for(entry: KeyEntry, key: bytes) -> Material:
    from pkcs11 import Attribute as A
    from pkcs11 import KeyType, ObjectClass

    common = {A.TOKEN: True, A.LABEL: entry.label, A.ID: entry.cka_id}
    locked = {A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False}
    if entry.kind == "secret":
        if len(key) not in (16, 24, 32):
            raise ProvisionError(
                f"key {entry.key_id} (line {entry.line}): {len(key)} bytes are not an AES key, "
                "but keys.txt says type=secret"
            )
        secret = {
            A.CLASS: ObjectClass.SECRET_KEY,
            A.KEY_TYPE: KeyType.AES,
            A.VALUE: key,
            A.ENCRYPT: True,
            A.DECRYPT: True,
            **common,
            **locked,
        }
        return Material(f"AES-{len(key) * 8}", (secret,))
    try:
        private = serialization.load_der_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ProvisionError(
            f"key {entry.key_id} (line {entry.line}): the released bytes are not a PKCS#8 private key, "
            "but keys.txt says type=private"
        ) from None
    if isinstance(private, rsa.RSAPrivateKey):
        numbers = private.private_numbers()
        public = numbers.public_numbers
        shared = {
            A.KEY_TYPE: KeyType.RSA,
            A.MODULUS: _unsigned(public.n),
            A.PUBLIC_EXPONENT: _unsigned(public.e),
            **common,
        }
        private_template = {
            A.CLASS: ObjectClass.PRIVATE_KEY,
            **shared,
            **locked,
            A.SIGN: True,
            A.DECRYPT: True,
            A.PRIVATE_EXPONENT: _unsigned(numbers.d),
            A.PRIME_1: _unsigned(numbers.p),
            A.PRIME_2: _unsigned(numbers.q),
            A.EXPONENT_1: _unsigned(numbers.dmp1),
            A.EXPONENT_2: _unsigned(numbers.dmq1),
            A.COEFFICIENT: _unsigned(numbers.iqmp),
        }
        public_template = {A.CLASS: ObjectClass.PUBLIC_KEY, **shared, A.PRIVATE: False, A.VERIFY: True, A.ENCRYPT: True}
        return Material(f"RSA-{private.key_size}", (private_template, public_template))
    if isinstance(private, ec.EllipticCurvePrivateKey):
        params = _EC_PARAMS.get(private.curve.name)
        if params is None:
            raise ProvisionError(
                f"key {entry.key_id} (line {entry.line}): curve {private.curve.name} is not supported "
                f"({', '.join(_EC_PARAMS)})"
            )
        point = private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        shared = {A.KEY_TYPE: KeyType.EC, A.EC_PARAMS: params, **common}
        scalar = _unsigned(private.private_numbers().private_value, (private.curve.key_size + 7) // 8)
        private_template = {A.CLASS: ObjectClass.PRIVATE_KEY, **shared, **locked, A.SIGN: True, A.VALUE: scalar}
        public_template = {
            A.CLASS: ObjectClass.PUBLIC_KEY,
            **shared,
            A.PRIVATE: False,
            A.VERIFY: True,
            A.EC_POINT: _der_octet_string(point),
        }
        return Material(f"EC-{private.curve.name}", (private_template, public_template))
    raise ProvisionError(
        f"key {entry.key_id} (line {entry.line}): {type(private).__name__} keys are not supported (RSA, EC, AES)"
    )


# ---------------------------------------------------------------------------------------------------------------
# PKCS#11


def load_pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise ProvisionError("provision needs python-pkcs11: pip install 'keybroker-client[pkcs11]'") from None
    return pkcs11


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_CKR_NAMES = {
    0x03: "CKR_SLOT_ID_INVALID",
    0x05: "CKR_GENERAL_ERROR",
    0x06: "CKR_FUNCTION_FAILED",
    0x07: "CKR_ARGUMENTS_BAD",
    0x54: "CKR_FUNCTION_NOT_SUPPORTED",
    0xA0: "CKR_PIN_INCORRECT",
    0xA1: "CKR_PIN_INVALID",
    0xA2: "CKR_PIN_LEN_RANGE",
    0xA4: "CKR_PIN_LOCKED",
    0xB3: "CKR_SESSION_EXISTS",
    0xE0: "CKR_TOKEN_NOT_PRESENT",
    0xE2: "CKR_TOKEN_WRITE_PROTECTED",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
}

# The first entries of CK_FUNCTION_LIST (PKCS#11 v2.40 §5, unchanged in 3.x): C_InitToken is the tenth pointer.
_FUNCTION_NAMES = (
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
)


class _FunctionList(ctypes.Structure):
    # Unix PKCS#11 headers use the platform's natural alignment (only Windows packs to 1).
    _fields_ = [("version", ctypes.c_ubyte * 2), *((name, ctypes.c_void_p) for name in _FUNCTION_NAMES)]


def c_init_token(module: str, slot_id: int, so_pin: str, label: str) -> None:
    """``C_InitToken`` on ``slot_id``, in the module instance python-pkcs11 has already ``C_Initialize``d (the
    same shared object: ``dlopen`` of the same path returns the same handle)."""
    dll = ctypes.CDLL(module)
    get_function_list = dll.C_GetFunctionList
    get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
    get_function_list.restype = ctypes.c_ulong
    functions = ctypes.POINTER(_FunctionList)()
    rv = get_function_list(ctypes.byref(functions))
    if rv != 0 or not functions:
        raise ProvisionError(f"{module}: C_GetFunctionList failed ({_CKR_NAMES.get(rv, hex(rv))})")
    prototype = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    address = functions.contents.C_InitToken
    if not address:
        raise ProvisionError(f"{module} has no C_InitToken")
    pin = so_pin.encode("utf-8")
    padded = label.encode("utf-8").ljust(LABEL_BYTES, b" ")  # blank-padded, not NUL-padded
    rv = prototype(address)(slot_id, pin, len(pin), padded)
    if rv != 0:
        raise ProvisionError(f"C_InitToken on slot {slot_id} failed: {_CKR_NAMES.get(rv, hex(rv))}")


def find_token(lib: Any, label: str) -> Any | None:
    from pkcs11.exceptions import MultipleTokensReturned, NoSuchToken

    try:
        return lib.get_token(token_label=label)
    except NoSuchToken:
        return None
    except MultipleTokensReturned:
        raise ProvisionError(f"more than one token is labelled {label}") from None


def free_slot(lib: Any) -> Any | None:
    from pkcs11 import TokenFlag

    for slot in lib.get_slots(token_present=True):
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED:
            return slot
    return None


def initialise_token(lib: Any, module: str, label: str, so_pin: str, user_pin: str) -> int:
    slot = free_slot(lib)
    if slot is None:
        raise ProvisionError(f"no free slot to initialise token {label} in")
    c_init_token(module, slot.slot_id, so_pin, label)
    token = find_token(lib, label)
    if token is None:
        raise ProvisionError(f"token {label} was initialised but is not listed")
    with token.open(rw=True, so_pin=so_pin) as session:
        session.init_pin(user_pin)
    return int(slot.slot_id)


@contextmanager
def session_of(token: Any, pin: str) -> Iterator[Any]:
    from pkcs11.exceptions import PinIncorrect, PinLocked, PKCS11Error

    try:
        session = token.open(rw=True, user_pin=pin)
    except PinIncorrect:
        raise ProvisionError(f"wrong PIN for token {token.label}") from None
    except PinLocked:
        raise ProvisionError(f"the PIN of token {token.label} is locked") from None
    except PKCS11Error as exc:
        raise ProvisionError(f"cannot log in to token {token.label}: {describe(exc)}") from None
    with session:
        yield session


def replace_objects(session: Any, entry: KeyEntry, material: Material) -> tuple[int, int]:
    """Create the new objects, then destroy the old ones with this label+id. Returns (replaced, same-label others)."""
    from pkcs11 import Attribute as A

    old = list(session.get_objects({A.LABEL: entry.label, A.ID: entry.cka_id}))
    created: list[Any] = []
    try:
        for template in material.templates:
            created.append(session.create_object(template))
    except BaseException:
        for obj in created:
            obj.destroy()
        raise
    for obj in old:
        obj.destroy()
    others = [o for o in session.get_objects({A.LABEL: entry.label}) if o[A.ID] != entry.cka_id]
    return len(old), len(others)


# ---------------------------------------------------------------------------------------------------------------
