"""Attestation tokens: ES384 JWTs with ITA's claim names, signed by a key that can be rotated. The private keys
are wrapped by the KEK in the database; JWKS (``GET /certs``) lists the current key and retired keys until every
token they signed has expired."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from jwt.types import Options
from sqlalchemy import select, update

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.backends.base import KeyWrapper
from keybroker.clock import Clock
from keybroker.errors import AttestationFailed
from keybroker.storage.db import Database
from keybroker.storage.tables import SigningKeyRow

ALGORITHM = "ES384"
_RELOAD_SECONDS = 5.0


def _context(kid: str) -> bytes:
    return f"keybroker/token-signing-key/v1\0{kid}".encode()


class TokenIssuer:
    def __init__(
        self, database: Database, wrapper: KeyWrapper, audit: AuditLog, clock: Clock, ttl: timedelta, issuer: str
    ) -> None:
        self._db = database
        self._wrapper = wrapper
        self._audit = audit
        self._clock = clock
        self.ttl = ttl
        self.issuer = issuer
        self._lock = threading.Lock()
        self._current: tuple[str, ec.EllipticCurvePrivateKey] | None = None
        self._current_checked = 0.0
        self._public: dict[str, ec.EllipticCurvePublicKey] = {}
        self._public_loaded = -1e9

    def __repr__(self) -> str:
        return f"TokenIssuer(issuer={self.issuer!r}, ttl={self.ttl})"

    def _new_key(self, session: Any) -> tuple[str, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP384R1())
        kid = uuid.uuid4().hex
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid=kid, alg=ALGORITHM, use="sig")
        session.add(
            SigningKeyRow(
                kid=kid,
                algorithm=ALGORITHM,
                wrapped_key=self._wrapper.wrap(der, _context(kid)),
                kek_id=self._wrapper.kek_id,
                public_jwk=jwk,
                created_at=self._clock.now(),
                retired_at=None,
            )
        )
        return kid, key

    def _signing_key(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        with self._lock:
            # Another replica may have rotated: look again every few seconds.
            if self._current is not None and time.monotonic() - self._current_checked < _RELOAD_SECONDS:
                return self._current
            self._current_checked = time.monotonic()
            self._current = None
            with self._db.transaction(write=True) as session:
                row = session.scalar(
                    select(SigningKeyRow)
                    .where(SigningKeyRow.retired_at.is_(None))
                    .order_by(SigningKeyRow.created_at.desc())
                )
                if row is None:
                    self._current = self._new_key(session)
                else:
                    der = self._wrapper.unwrap(row.wrapped_key, _context(row.kid), row.kek_id)
                    key = serialization.load_der_private_key(der, password=None)
                    assert isinstance(key, ec.EllipticCurvePrivateKey)
                    self._current = (row.kid, key)
            return self._current

    def sign(self, claims: dict[str, Any]) -> str:
        kid, key = self._signing_key()
        now = self._clock.now()
        payload = {
            **claims,
            "iss": self.issuer,
            "iat": int(now.timestamp()),
            "exp": int((now + self.ttl).timestamp()),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(payload, key, algorithm=ALGORITHM, headers={"kid": kid})

    def rotate(self, audit: AuditContext) -> str:
        """A new signing key from now on; the old one stays in the JWKS until its tokens expire."""
        with self._lock, self._db.transaction(write=True) as session:
            session.execute(
                update(SigningKeyRow).where(SigningKeyRow.retired_at.is_(None)).values(retired_at=self._clock.now())
            )
            kid, key = self._new_key(session)
            self._audit.append(session, audit, AuditEvent("token_key.rotate", "success", kid, {}))
            self._current, self._current_checked = (kid, key), time.monotonic()
            self._public_loaded = -1e9
        return kid

    def jwks(self) -> dict[str, Any]:
        horizon = self._clock.now() - self.ttl
        with self._db.transaction() as session:
            rows = session.scalars(select(SigningKeyRow).order_by(SigningKeyRow.created_at))
            keys = [row.public_jwk for row in rows if row.retired_at is None or row.retired_at > horizon]
        return {"keys": keys}

    def verify(self, token: str) -> dict[str, Any]:
        """Claims of a token this deployment issued and that has not expired; ``AttestationFailed`` otherwise."""
        return verify_token(token, self._public_key, self._clock, self.issuer)

    def _public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        """The verification key of ``kid`` if it is in the JWKS now (current, or retired less than a token lifetime
        ago). The set is re-read every few seconds, so a retired key stops verifying everywhere."""
        with self._lock:
            if kid not in self._public or time.monotonic() - self._public_loaded > _RELOAD_SECONDS:
                keys: dict[str, ec.EllipticCurvePublicKey] = {}
                for jwk in self.jwks()["keys"]:
                    public = ECAlgorithm.from_jwk(json.dumps(jwk))
                    if isinstance(public, ec.EllipticCurvePublicKey):
                        keys[str(jwk["kid"])] = public
                self._public, self._public_loaded = keys, time.monotonic()
            key = self._public.get(kid)
        if key is None:
            raise AttestationFailed("the attestation token was signed by an unknown key", reason="token_unknown_key")
        return key


def token_kid(token: str) -> str:
    try:
        return str(jwt.get_unverified_header(token).get("kid"))
    except jwt.PyJWTError:
        raise AttestationFailed("the attestation token is malformed", reason="token_malformed") from None


def verify_token(
    token: str, key_for: Callable[[str], ec.EllipticCurvePublicKey], clock: Clock, issuer: str | None = None
) -> dict[str, Any]:
    """An ES384 attestation token's claims: signature by the key ``key_for(kid)`` gives, issuer (if given), and
    times checked against ``clock`` (never the library's wall clock). ``AttestationFailed`` with the reason."""
    key = key_for(token_kid(token))
    options: Options = {
        "require": ["exp", "iat", "iss", "jti"],
        "verify_aud": False,
        "verify_exp": False,
        "verify_iat": False,
        "verify_nbf": False,
        "verify_iss": issuer is not None,
    }
    try:
        claims: dict[str, Any] = jwt.decode(token, key, algorithms=[ALGORITHM], issuer=issuer, options=options)
    except jwt.PyJWTError as exc:
        raise AttestationFailed(f"the attestation token does not verify: {exc}", reason="token_invalid") from None
    now = clock.now().timestamp()
    if not isinstance(claims["exp"], int) or now >= claims["exp"]:
        raise AttestationFailed("the attestation token has expired", reason="token_expired")
    if not isinstance(claims["iat"], int) or claims["iat"] > now + 5:
        raise AttestationFailed("the attestation token was issued in the future", reason="token_invalid")
    return claims
