"""Identifiers: UUIDv4 strings in canonical lowercase form (PROTOCOL.md conventions), and the id types that cross
the layers (keys, policies, backend references)."""

from __future__ import annotations

import uuid
from typing import NewType

KeyId = NewType("KeyId", str)  # a key's id (UUIDv4)
PolicyId = NewType("PolicyId", str)  # a key transfer policy's id (UUIDv4)
BackendRef = NewType("BackendRef", str)  # where a backend keeps a key's material (a Vault path, a KMIP uid, ...)


def canonical_uuid(value: str) -> str | None:
    """``value`` if it is a canonical lowercase UUID string, else None. Ids that are not can match nothing, so
    lookups skip the database and refusals need not echo them."""
    if len(value) != 36:
        return None
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return value if str(parsed) == value else None


def is_uuid4(value: str) -> bool:
    return canonical_uuid(value) is not None and uuid.UUID(value).version == 4


def new_id() -> str:
    return str(uuid.uuid4())
