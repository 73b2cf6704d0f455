"""The hash chain, pure and shared by the server (appending) and the CLI (verifying what the API returns).

Entry ``n`` stores ``prev_hash`` (the hash of entry ``n-1``; 64 zeros for the first) and
``hash = SHA-256(prev_hash ‖ "\\n" ‖ canonical(entry))``, where ``canonical`` is the entry's content as compact,
key-sorted JSON. Editing, deleting, inserting or reordering entries breaks the chain at the first changed place;
the chain head (seq and hash of the newest entry) is kept apart, so removing entries at the end shows too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
CONTENT_FIELDS = ("seq", "at", "action", "outcome", "actor", "target", "request_id", "client", "details")


def canonical(entry: Mapping[str, Any]) -> bytes:
    content = {name: entry.get(name) for name in CONTENT_FIELDS}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_around_seq(entry: Mapping[str, Any]) -> tuple[str, str]:
    """``(before, after)`` with ``canonical(entry with seq = n) == before + str(n) + after`` for every n: the
    canonical form built around a sequence number the database assigns (``AuditLog.append_transfer`` on
    PostgreSQL). Compact key-sorted JSON is the sorted ``"key":value`` pairs joined by commas, and "seq" sorts among
    the others."""

    def pair(name: str) -> str:
        value = json.dumps(entry.get(name), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return f"{json.dumps(name)}:{value}"

    names = sorted(name for name in CONTENT_FIELDS if name != "seq")
    before = "{" + "".join(pair(name) + "," for name in names if name < "seq") + '"seq":'
    after = "".join("," + pair(name) for name in names if name > "seq") + "}"
    return before, after


def entry_hash(prev_hash: str, entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(entry)).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None


def verify_chain(entries: Iterable[Mapping[str, Any]], head_seq: int, head_hash: str) -> ChainReport:
    """Check ``entries`` (in ``seq`` order, from seq 1) against each other and against the head."""
    expected_prev = GENESIS
    expected_seq = 1
    checked = 0
    for entry in entries:
        seq = entry.get("seq")
        if seq != expected_seq:
            return ChainReport(False, checked, expected_seq, f"entry {expected_seq} is missing (found {seq} instead)")
        if entry.get("prev_hash") != expected_prev:
            return ChainReport(False, checked, seq, f"entry {seq} does not follow entry {seq - 1} (prev_hash differs)")
        if entry_hash(expected_prev, entry) != entry.get("hash"):
            return ChainReport(False, checked, seq, f"entry {seq} was altered (its content does not match its hash)")
        expected_prev = str(entry["hash"])
        expected_seq += 1
        checked += 1
    if checked != head_seq:
        missing = checked + 1
        return ChainReport(False, checked, missing, f"the chain ends at {checked} but the head says {head_seq}")
    if expected_prev != head_hash:
        return ChainReport(False, checked, checked, f"entry {checked} does not match the chain head")
    return ChainReport(True, checked)
