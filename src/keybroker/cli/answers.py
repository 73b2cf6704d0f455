"""The shapes of the server's answers that the CLI reads (docs/openapi.json: the fields a command uses, with their
JSON types). An answer of another shape, such as another service's 200 (``{"data": ...}``) at the address, is one
line, "unexpected answer from URL: is it a keybroker?", never a KeyError or a TypeError from deep in a table.

A shape is a type (``str``, ``bool``, ``int``, ``float``, ``dict``, ``list``, ``None``), a tuple of them (any one),
a one-element list (a JSON array of that shape) or a dict (a JSON object with at least these members)."""

from __future__ import annotations

from typing import Any

Shape = Any

_TEXT = (str, None)
NUMBER = (int, float)

KEY: Shape = {"id": str, "key_information": dict, "label": _TEXT, "transfer_policy_id": _TEXT, "backend": _TEXT}
KEYS: Shape = [KEY]
POLICY: Shape = {"id": str, "attestation_type": [str]}
POLICIES: Shape = [POLICY]
TOKENS: Shape = [{"id": str, "name": str, "roles": [str], "context": [str]}]
ROLES: Shape = [{"name": str, "builtin": bool, "permissions": [str]}]
REPLICAS: Shape = [
    {
        "id": str,
        "address": str,
        "version": str,
        "schema_revision": _TEXT,
        "started_at": str,
        "heartbeat_at": str,
        "alive": bool,
    }
]
AUDIT_ENTRIES: Shape = [
    {
        "seq": int,
        "at": str,
        "action": str,
        "outcome": str,
        "target": _TEXT,
        "actor": _TEXT,
        "client": _TEXT,
        "prev_hash": str,
        "hash": str,
    }
]
BACKENDS_REPORT: Shape = {
    "replica": str,
    "checked_at": str,
    "ok": bool,
    "backends": [{"name": str, "type": str, "default": bool, "ok": bool, "seconds": NUMBER}],
}


def fits(value: Any, shape: Shape) -> bool:
    """Whether the JSON ``value`` has ``shape``."""
    if isinstance(shape, list):
        return isinstance(value, list) and all(fits(item, shape[0]) for item in value)
    if isinstance(shape, dict):
        return isinstance(value, dict) and all(name in value and fits(value[name], of) for name, of in shape.items())
    if isinstance(shape, tuple):
        return any(fits(value, one) for one in shape)
    if shape is None:
        return value is None
    if shape is int or shape is float:  # (JSON has no bool among its numbers)
        return isinstance(value, shape) and not isinstance(value, bool)
    return isinstance(value, shape)


def checked(value: Any, shape: Shape, where: str) -> Any:
    """``value`` if it has ``shape``; else a one-line TransportError naming ``where``."""
    if not fits(value, shape):
        from keybroker_client import TransportError

        raise TransportError(f"unexpected answer from {where}: is it a keybroker? (--addr/KEYBROKER_ADDR)")
    return value
