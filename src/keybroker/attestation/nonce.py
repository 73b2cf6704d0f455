"""Verifier nonces (PROTOCOL.md §3 step 1): ``val`` 32 random bytes, ``iat`` the RFC 3339 issue time, and an
HMAC-SHA256 over ``val ‖ iat`` with the deployment's nonce key, so any replica can check one without shared
state. A nonce is valid for ``ttl`` and usable once per purpose: use is recorded in the database (a primary key),
so two replicas, or two requests at once, cannot both use it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from keybroker.clock import Clock
from keybroker.errors import AttestationFailed, Conflict, InvalidRequest
from keybroker.storage.db import Database
from keybroker.storage.tables import UsedNonceRow


@dataclass(frozen=True, slots=True)
class Nonce:
    val: bytes
    iat: bytes  # ASCII RFC 3339, e.g. b"2026-11-27T12:00:00Z"
    signature: bytes

    def as_json(self) -> dict[str, str]:
        return {name: base64.b64encode(getattr(self, name)).decode() for name in ("val", "iat", "signature")}

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.val + b"\0" + self.iat).hexdigest()


@dataclass(frozen=True, slots=True)
class NonceUse:
    """What using a nonce up writes: one ``used_nonces`` row per purpose, kept until ``expires_at`` (when the
    nonce would be refused as expired anyway). The row's primary key is what makes a second use fail."""

    digest: str
    purposes: tuple[str, ...]
    expires_at: datetime


def _invalid(detail: str) -> AttestationFailed:
    return AttestationFailed(detail, reason="nonce_invalid", code="nonce_invalid")


def parse_nonce(value: Any) -> Nonce:
    """A nonce object from a request. A malformed one is bad input (400); a well-formed one that this deployment
    did not sign is refused later, by ``check`` (401 ``nonce_invalid``)."""
    fields = ("val", "iat", "signature")
    if not isinstance(value, dict) or set(value) != set(fields) or not all(isinstance(value[f], str) for f in fields):
        raise InvalidRequest("the nonce must be an object with val, iat and signature strings", code="invalid_request")
    try:
        parts = {name: base64.b64decode(value[name], validate=True) for name in fields}
    except (binascii.Error, ValueError):
        raise InvalidRequest("the nonce's fields must be standard base64", code="invalid_request") from None
    return Nonce(parts["val"], parts["iat"], parts["signature"])


_IAT = re.compile(rb"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)Z")


def issued_at(nonce: Nonce) -> datetime:
    """The nonce's ``iat``, exactly as ``issue`` writes it (``YYYY-MM-DDTHH:MM:SSZ``), else ``nonce_invalid``.
    (``datetime.strptime`` would take 40 µs of every transfer, and it accepts single-digit fields.)"""
    match = _IAT.fullmatch(nonce.iat)
    try:
        if match is None:
            raise ValueError
        year, month, day, hour, minute, second = (int(field) for field in match.groups())
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise _invalid("the nonce's iat is not an RFC 3339 UTC time") from None


class NonceService:
    def __init__(self, key: bytes, database: Database, clock: Clock, ttl: timedelta) -> None:
        self._key = key
        self._db = database
        self._clock = clock
        self._ttl = ttl

    def __repr__(self) -> str:
        return f"NonceService(ttl={self._ttl})"

    def issue(self) -> Nonce:
        val = os.urandom(32)
        iat = self._clock.now().strftime("%Y-%m-%dT%H:%M:%SZ").encode()
        return Nonce(val, iat, self._sign(val, iat))

    def _sign(self, val: bytes, iat: bytes) -> bytes:
        return hmac.new(self._key, b"keybroker-nonce-v1\0" + val + b"\0" + iat, hashlib.sha256).digest()

    def check(self, nonce: Nonce) -> None:
        """Signature and freshness (``nonce_invalid``, ``nonce_expired``); does not consume it."""
        if len(nonce.val) != 32 or not hmac.compare_digest(self._sign(nonce.val, nonce.iat), nonce.signature):
            raise _invalid("the nonce was not issued by this deployment (bad signature)")
        issued = issued_at(nonce)
        now = self._clock.now()
        if now >= issued + self._ttl:
            raise AttestationFailed("the nonce has expired", reason="nonce_expired", code="nonce_expired")
        if issued > now + timedelta(seconds=5):
            raise _invalid("the nonce was issued in the future")

    def use(self, nonce: Nonce, *purposes: str) -> NonceUse:
        """The use of ``nonce`` for ``purposes``, for the caller to write with what it decides."""
        return NonceUse(nonce.digest, purposes, self._clock.now() + self._ttl)

    def consume(self, nonce: Nonce, *purposes: str) -> None:
        """Check, then mark used for every one of ``purposes`` at once; a nonce already used for any of them is
        ``nonce_replayed`` (409). An attested token's nonce is used once for "attest" and once for "transfer";
        a background-check transfer uses both at once, so its nonce cannot be attested with afterwards (nor
        before)."""
        self.check(nonce)
        expires = self._clock.now() + self._ttl
        try:
            with self._db.transaction(write=True) as session:
                for purpose in purposes:
                    session.add(UsedNonceRow(digest=nonce.digest, purpose=purpose, expires_at=expires))
        except IntegrityError:
            raise Conflict("this nonce has already been used", code="nonce_replayed") from None

    def purge(self) -> int:
        """Forget used nonces that have expired anyway."""
        with self._db.transaction(write=True) as session:
            result = session.execute(delete(UsedNonceRow).where(UsedNonceRow.expires_at < self._clock.now()))
            return int(getattr(result, "rowcount", 0) or 0)
