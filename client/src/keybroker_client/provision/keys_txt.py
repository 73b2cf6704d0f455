"""The guide's ``keys.txt``: one RFC 7512 PKCS#11 URI per line, parsed strictly (line-numbered errors) before any
network call::

    pkcs11:token=KMS;id=<key id>;object=RSAKEY;type=private;pin-value=1234;
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote_to_bytes

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
LABEL_BYTES = 32  # CK_TOKEN_INFO.label


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
    if len(token.encode()) > LABEL_BYTES:
        raise ValueError(f"token label {token!r} is longer than {LABEL_BYTES} bytes")
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
