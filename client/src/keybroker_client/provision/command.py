"""``keybroker-client provision``: the workload agent of Intel's SKC / Nginx flow.

Reads the guide's ``keys.txt`` (one RFC 7512 PKCS#11 URI per line)::

    pkcs11:token=KMS;id=<key id>;object=RSAKEY;type=private;pin-value=1234;

attests and fetches **every** key first, and only when all were released imports them into the token(s): RSA and
EC keys as a sensitive, non-extractable ``CKO_PRIVATE_KEY`` plus the matching ``CKO_PUBLIC_KEY`` (same ``CKA_LABEL``
and ``CKA_ID``), AES keys as a sensitive, non-extractable ``CKO_SECRET_KEY``. ``CKA_ID`` is the key id's bytes (the
UUID string, ASCII) and ``CKA_LABEL`` the URI's ``object``. Re-running replaces the objects with that label and id:
the new objects are created first, then the old handles destroyed. Key bytes stay in this process's memory (and then
in the token); nothing is written to disk by this module, and nothing printed but ids, labels and algorithms.

Needs the ``pkcs11`` extra (python-pkcs11). python-pkcs11 0.10 has no ``C_InitToken``; ``--init-token`` calls it
through the module's own ``CK_FUNCTION_LIST`` with ctypes (the library python-pkcs11 already initialised).
"""

from __future__ import annotations

import ctypes
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import unquote_to_bytes

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker_client._client import ReleasedKey
from keybroker_client._errors import KeybrokerClientError, ProblemError

OK, FAILED, USAGE = 0, 1, 2

# RFC 7512 §2.3: the attributes of the path and of the query. Only some are meaningful for provisioning.
_PATH_ATTRIBUTES = frozenset(
    {
        "token",
        "manufacturer",
        "serial",
        "model",
        "library-manufacturer",
        "library-description",
        "library-version",
        "object",
        "type",
        "id",
        "slot-description",
        "slot-manufacturer",
        "slot-id",
    }
)
_QUERY_ATTRIBUTES = frozenset({"pin-source", "pin-value", "module-name", "module-path"})
_SUPPORTED = frozenset({"token", "object", "type", "id", "pin-source", "pin-value"})
_TYPES: dict[str, Literal["private", "secret"]] = {"private": "private", "secret-key": "secret", "secret": "secret"}
# pk11-pchar / pk11-qchar of RFC 7512 (unreserved, the allowed reserved characters, pct-encoded). "/" and "|" are
# query characters; they are tolerated in the path too, where the guide puts pin-value.
_VALUE = re.compile(r"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=&/?|]|%[0-9A-Fa-f]{2})*")
_NAME = re.compile(r"[a-z][a-z0-9-]*")
_LABEL_BYTES = 32  # CK_TOKEN_INFO.label

# DER of the namedCurve OIDs (RFC 5480) for CKA_EC_PARAMS.
_EC_PARAMS = {
    "secp256r1": bytes.fromhex("06082a8648ce3d030107"),
    "secp384r1": bytes.fromhex("06052b81040022"),
    "secp521r1": bytes.fromhex("06052b81040023"),
}


class ProvisionError(KeybrokerClientError):
    """Provisioning failed (exit 1); the message says why, never with key bytes."""


class KeysFileError(ValueError):
    """``keys.txt`` is malformed (exit 2): ``problems`` are ``(line, message)``."""

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}:{line}: {message}" for line, message in problems))


@dataclass(frozen=True)
class KeyEntry:
    """One line of ``keys.txt``. ``pin`` is never shown by ``repr``."""

    line: int
    token: str
    key_id: str
    label: str
    kind: Literal["private", "secret"]
    pin: str = field(repr=False)

    @property
    def cka_id(self) -> bytes:
        return self.key_id.encode("ascii")


def parse_uri(uri: str) -> dict[str, bytes]:
    """RFC 7512 ``pkcs11:`` URI → attribute name → percent-decoded bytes. Raises ``ValueError``."""
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() != "pkcs11":
        raise ValueError("not a pkcs11: URI")
    path, _, query = rest.partition("?")
    attributes: dict[str, bytes] = {}
    for part, separator in ((path, ";"), (query, "&")):
        if not part:
            continue
        items = part.split(separator)
        if items[-1] == "":  # one trailing separator, as in the guide's "...;pin-value=1234;"
            items.pop()
        for position, item in enumerate(items, start=1):
            name, equals, value = item.partition("=")
            if not equals or not name:  # (not echoed: it may be a PIN)
                raise ValueError(
                    f"attribute {position} of the {'query' if separator == '&' else 'path'} is not name=value"
                )
            if not _NAME.fullmatch(name):
                raise ValueError(f"bad attribute name {name!r}")
            if name not in _PATH_ATTRIBUTES | _QUERY_ATTRIBUTES and not name.startswith("x-"):
                raise ValueError(f"unknown attribute {name!r}")
            if not _VALUE.fullmatch(value):
                raise ValueError(f"attribute {name!r}: characters that must be percent-encoded, or a bad %-escape")
            if name in attributes:
                raise ValueError(f"attribute {name!r} appears twice")
            attributes[name] = unquote_to_bytes(value)
    return attributes


def _text(attributes: dict[str, bytes], name: str) -> str | None:
    raw = attributes.get(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not UTF-8") from None


def _read_pin_source(source: str, base: Path) -> str:
    # RFC 7512: pin-source is a URI; "file:" URIs and plain paths are accepted (relative to the keys file).
    path = source
    if path.startswith("file://"):
        path = path[len("file://") :]
        if not path.startswith("/"):
            raise ValueError("pin-source: only local file: URIs (file:///path or file:path)")
    elif path.startswith("file:"):
        path = path[len("file:") :]
    elif ":" in path.split("/", 1)[0]:
        raise ValueError("pin-source: only file: URIs are supported")
    file = base / path
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"pin-source: cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    pin = text.removesuffix("\n").removesuffix("\r")
    if not pin:
        raise ValueError(f"pin-source: {file} is empty")
    return pin


def parse_entry(uri: str, line: int, base: Path) -> KeyEntry:
    """One ``keys.txt`` URI → ``KeyEntry``. Raises ``ValueError`` with a message for the user."""
    attributes = parse_uri(uri)
    unsupported = sorted(set(attributes) - _SUPPORTED)
    if unsupported:
        raise ValueError(
            f"attribute(s) {', '.join(unsupported)} not supported here "
            "(provision selects the token by token= and the module by --pkcs11-module)"
        )
    token, label, kind_text, key_id = (_text(attributes, n) for n in ("token", "object", "type", "id"))
    for name, value in (("token", token), ("object", label), ("type", kind_text), ("id", key_id)):
        if not value:
            raise ValueError(f"{name}= is required")
    if not (token and label and kind_text and key_id):  # (for the type checker)
        raise ValueError("token=, object=, type= and id= are required")
    if len(token.encode()) > _LABEL_BYTES:
        raise ValueError(f"token label {token!r} is longer than {_LABEL_BYTES} bytes")
    kind = _TYPES.get(kind_text)
    if kind is None:
        raise ValueError(f"type={kind_text}: use type=private (RSA, EC) or type=secret-key / secret (AES)")
    try:
        canonical = str(uuid.UUID(key_id))
    except ValueError:
        canonical = ""
    if canonical != key_id.lower():
        raise ValueError(f"id={key_id!r} is not a keybroker key id (a UUID, e.g. {uuid.UUID(int=0)})")
    pin_value, pin_source = _text(attributes, "pin-value"), _text(attributes, "pin-source")
    if pin_value is not None and pin_source is not None:
        raise ValueError("give pin-value or pin-source, not both")
    if pin_source is not None:
        pin = _read_pin_source(pin_source, base)
    elif pin_value:
        pin = pin_value
    else:
        raise ValueError("no PIN: add pin-value=... or pin-source=file:...")
    return KeyEntry(line, token, key_id, label, kind, pin)


def parse_keys_file(text: str, path: str = "keys.txt", base: Path | None = None) -> list[KeyEntry]:
    """All entries of a keys file, or ``KeysFileError`` listing every malformed line."""
    base = base if base is not None else Path(path).resolve().parent
    entries: list[KeyEntry] = []
    problems: list[tuple[int, str]] = []
    used: dict[tuple[str, str], int] = {}
    pins: dict[str, tuple[str, int]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            entry = parse_entry(stripped, number, base)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        where = (entry.token, entry.label)
        if where in used:
            problems.append(
                (number, f"token {entry.token} object {entry.label} is already provisioned by line {used[where]}")
            )
            continue
        used[where] = number
        if entry.token in pins and pins[entry.token][0] != entry.pin:
            problems.append((number, f"another PIN for token {entry.token} than line {pins[entry.token][1]}"))
            continue
        pins.setdefault(entry.token, (entry.pin, number))
        entries.append(entry)
    if not entries and not problems:
        problems.append((0, "no keys (one pkcs11: URI per line)"))
    if problems:
        raise KeysFileError(path, problems)
    return entries


# ---------------------------------------------------------------------------------------------------------------
# Released bytes -> PKCS#11 templates


@dataclass(frozen=True)
class _Material:
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


def _material(entry: KeyEntry, key: bytes) -> _Material:
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
        return _Material(f"AES-{len(key) * 8}", (secret,))
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
        return _Material(f"RSA-{private.key_size}", (private_template, public_template))
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
        return _Material(f"EC-{private.curve.name}", (private_template, public_template))
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


def _describe(exc: BaseException) -> str:
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
    padded = label.encode("utf-8").ljust(_LABEL_BYTES, b" ")  # blank-padded, not NUL-padded
    rv = prototype(address)(slot_id, pin, len(pin), padded)
    if rv != 0:
        raise ProvisionError(f"C_InitToken on slot {slot_id} failed: {_CKR_NAMES.get(rv, hex(rv))}")


def _find_token(lib: Any, label: str) -> Any | None:
    from pkcs11.exceptions import MultipleTokensReturned, NoSuchToken

    try:
        return lib.get_token(token_label=label)
    except NoSuchToken:
        return None
    except MultipleTokensReturned:
        raise ProvisionError(f"more than one token is labelled {label}") from None


def _free_slot(lib: Any) -> Any | None:
    from pkcs11 import TokenFlag

    for slot in lib.get_slots(token_present=True):
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED:
            return slot
    return None


def _initialise_token(lib: Any, module: str, label: str, so_pin: str, user_pin: str) -> int:
    slot = _free_slot(lib)
    if slot is None:
        raise ProvisionError(f"no free slot to initialise token {label} in")
    c_init_token(module, slot.slot_id, so_pin, label)
    token = _find_token(lib, label)
    if token is None:
        raise ProvisionError(f"token {label} was initialised but is not listed")
    with token.open(rw=True, so_pin=so_pin) as session:
        session.init_pin(user_pin)
    return int(slot.slot_id)


@contextmanager
def _session(token: Any, pin: str) -> Iterator[Any]:
    from pkcs11.exceptions import PinIncorrect, PinLocked, PKCS11Error

    try:
        session = token.open(rw=True, user_pin=pin)
    except PinIncorrect:
        raise ProvisionError(f"wrong PIN for token {token.label}") from None
    except PinLocked:
        raise ProvisionError(f"the PIN of token {token.label} is locked") from None
    except PKCS11Error as exc:
        raise ProvisionError(f"cannot log in to token {token.label}: {_describe(exc)}") from None
    with session:
        yield session


def _replace(session: Any, entry: KeyEntry, material: _Material) -> tuple[int, int]:
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


def provision(
    entries: Sequence[KeyEntry],
    module: str,
    fetch: Callable[[str], ReleasedKey],
    out: TextIO,
    err: TextIO,
    so_pin: str | None = None,
) -> int:
    """Check the tokens, fetch every key, then import them all. ``so_pin`` set = initialise missing tokens.
    Returns the exit code; messages go to ``out``/``err``."""
    pkcs11 = None
    try:
        pkcs11 = load_pkcs11()
        # python-pkcs11 caches libraries by path string: one module under two names (SoftHSM installs a symlink)
        # would be C_Initialize'd twice in a process that also loads it elsewhere.
        module = os.path.realpath(module)
        try:
            lib = pkcs11.lib(module)
        except (pkcs11.exceptions.PKCS11Error, OSError, RuntimeError) as exc:
            raise ProvisionError(f"cannot load the PKCS#11 module {module}: {_describe(exc)}") from None
        missing = _preflight(lib, module, entries, so_pin)
        materials = _fetch_all(entries, fetch, err)
        if materials is None:
            return FAILED
        for label in missing:
            slot_id = _initialise_token(lib, module, label, so_pin or "", _pins(entries)[label])
            print(f"initialised token {label} (slot {slot_id})", file=out)
        return _import_all(lib, entries, materials, out, err)
    except ProvisionError as exc:
        print(f"error: {exc}", file=err)
        return FAILED
    except Exception as exc:
        if pkcs11 is not None and isinstance(exc, pkcs11.exceptions.PKCS11Error):
            print(f"error: {module}: {_describe(exc)}", file=err)
            return FAILED
        raise


def _pins(entries: Sequence[KeyEntry]) -> dict[str, str]:
    return {e.token: e.pin for e in entries}


def _preflight(lib: Any, module: str, entries: Sequence[KeyEntry], so_pin: str | None) -> list[str]:
    """Before any network call: every token exists (or can be initialised) and its PIN works. Returns the labels
    of the tokens to initialise."""
    missing: list[str] = []
    for label, pin in _pins(entries).items():
        token = _find_token(lib, label)
        if token is not None:
            with _session(token, pin):
                pass
        elif so_pin is None:
            raise ProvisionError(
                f"no token labelled {label} in {module}; create it (e.g. softhsm2-util --init-token --free "
                f"--label {label}) or pass --init-token --so-pin-file FILE"
            )
        else:
            missing.append(label)
    if missing and _free_slot(lib) is None:
        raise ProvisionError(f"no free slot to initialise token(s) {', '.join(missing)} in")
    return missing


def _fetch_all(entries: Sequence[KeyEntry], fetch: Callable[[str], ReleasedKey], err: TextIO) -> list[_Material] | None:
    """Attest and fetch every key, and check each is what keys.txt says; one refusal = None (nothing imported)."""
    released: dict[str, ReleasedKey] = {}
    for entry in entries:
        if entry.key_id in released:
            continue
        try:
            released[entry.key_id] = fetch(entry.key_id)
        except ProblemError as exc:
            print(f"refused: key {entry.key_id} (line {entry.line}): {exc.problem.describe()}", file=err)
        except (KeybrokerClientError, ValueError, OSError) as exc:
            print(f"error: key {entry.key_id} (line {entry.line}): {exc}", file=err)
        else:
            continue
        print(f"nothing was imported ({len(released)} of {len(entries)} key(s) had been fetched)", file=err)
        return None
    try:
        return [_material(entry, released[entry.key_id].key) for entry in entries]
    finally:
        released.clear()


def _import_all(lib: Any, entries: Sequence[KeyEntry], materials: Sequence[_Material], out: TextIO, err: TextIO) -> int:
    from pkcs11.exceptions import PKCS11Error

    failed = False
    for label, pin in _pins(entries).items():
        token = _find_token(lib, label)
        if token is None:
            raise ProvisionError(f"token {label} disappeared")
        with _session(token, pin) as session:
            for entry, material in zip(entries, materials, strict=True):
                if entry.token != label:
                    continue
                try:
                    replaced, others = _replace(session, entry, material)
                except PKCS11Error as exc:
                    print(
                        f"error: key {entry.key_id} (line {entry.line}): import into token {label} "
                        f"failed: {_describe(exc)}",
                        file=err,
                    )
                    failed = True
                    continue
                kinds = "private key + public key" if len(material.templates) == 2 else "secret key"
                note = f"; replaced {replaced} old object(s)" if replaced else ""
                print(
                    f"imported {entry.key_id}: token {label}, object {entry.label}, {material.algorithm} "
                    f"({kinds}{note})",
                    file=out,
                )
                if others:
                    print(
                        f"warning: token {label} also holds {others} object(s) labelled {entry.label} with "
                        "another id; tools that select by label alone (nginx's URI) may pick either",
                        file=err,
                    )
    return FAILED if failed else OK


__all__ = [
    "FAILED",
    "OK",
    "USAGE",
    "KeyEntry",
    "KeysFileError",
    "ProvisionError",
    "c_init_token",
    "parse_entry",
    "parse_keys_file",
    "parse_uri",
    "provision",
]
