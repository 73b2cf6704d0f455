"""The workload client: nonce -> REPORTDATA = SHA-512(val ‖ iat ‖ public key) -> quote -> transfer -> unwrap.

A fresh RSA-3072 key pair per transfer by default; the private key never leaves this process. Errors carry the
server's ``code`` and ``reasons`` (``ProblemError``).
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker_client._errors import KeybrokerClientError, ProblemError, TransportError
from keybroker_client._problem import Problem
from keybroker_client._tls import ssl_context
from keybroker_client.evidence import EvidenceProvider

_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class UnwrapError(KeybrokerClientError):
    """The released key could not be unwrapped (not for this key pair, or tampered in transit)."""


@dataclass(frozen=True)
class ReleasedKey:
    """A key released to this workload. ``key`` is raw bytes (AES) or PKCS#8 DER (RSA, EC); never printed."""

    key_id: str
    key: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"ReleasedKey(key_id={self.key_id!r}, <{len(self.key)} bytes redacted>)"

    def pem(self) -> bytes:
        """RSA/EC keys as an unencrypted PKCS#8 PEM (for tools that want one)."""
        private = serialization.load_der_private_key(self.key, password=None)
        return private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def unwrap(wrapped_key: bytes, wrapped_swk: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Reverse PROTOCOL.md §3's wrapping."""
    try:
        swk = private_key.decrypt(wrapped_swk, _OAEP)
        iv_len, tag_len, n = struct.unpack_from("<III", wrapped_key, 0)
        if iv_len != 12 or tag_len != 16 or len(wrapped_key) != 12 + iv_len + n:
            raise ValueError("layout")
        iv = wrapped_key[12:24]
        return AESGCM(swk).decrypt(iv, wrapped_key[24:], None)
    except Exception:
        raise UnwrapError("the released key does not unwrap with this workload's key") from None


class Client:
    """``Client("https://kbs:9443", ca="ca.pem")``; ``ca_fingerprint=`` pins the CA instead."""

    def __init__(
        self,
        base_url: str,
        ca: str | Path | None = None,
        ca_fingerprint: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        verify: ssl.SSLContext | bool = True
        if self.base_url.startswith("https://") and transport is None:
            verify = ssl_context(self.base_url, str(ca) if ca else None, ca_fingerprint)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url, verify=verify, timeout=timeout, headers=headers, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
        try:
            response = self._http.post(path, json=json, headers=headers)
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot reach {self.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise ProblemError(
                Problem.from_response(response.status_code, response.headers.get("content-type", ""), response.content)
            )
        return response

    def fetch_key(
        self,
        key_id: str,
        evidence: EvidenceProvider,
        mode: Literal["background", "passport"] = "background",
        key_bits: int = 3072,
    ) -> ReleasedKey:
        """Attest and receive key ``key_id``. Raises ``ProblemError`` (server refusal: ``code``, ``reasons``),
        ``TransportError`` or ``UnwrapError``."""
        path = f"/kbs/v1/keys/{quote(key_id, safe='')}/transfer"
        try:
            return self._fetch(path, key_id, evidence, mode, key_bits)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, KeybrokerClientError):
                raise
            raise TransportError(f"unexpected answer from {self.base_url}: {type(exc).__name__}") from None

    def _fetch(self, path: str, key_id: str, evidence: EvidenceProvider, mode: str, key_bits: int) -> ReleasedKey:
        nonce = self._post(path, json={}).json()
        if not isinstance(nonce, dict) or not all(isinstance(nonce.get(k), str) for k in ("val", "iat", "signature")):
            raise TransportError(f"{self.base_url} did not answer with a nonce")
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
        user_data = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        report_data = hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + user_data)
        quote = evidence.quote(report_data.digest())
        if mode == "passport":
            token = self._post(
                "/appraisal/v1/attest",
                json={
                    "quote": base64.b64encode(quote).decode(),
                    "verifier_nonce": nonce,
                    "runtime_data": base64.b64encode(user_data).decode(),
                },
            ).json()["token"]
            released = self._post(path, json={"attestation_token": token}).json()
        else:
            released = self._post(
                path,
                headers={"Attestation-Type": evidence.tee_type},
                json={
                    "quote": base64.b64encode(quote).decode(),
                    "nonce": nonce,
                    "user_data": base64.b64encode(user_data).decode(),
                },
            ).json()
        key = unwrap(base64.b64decode(released["wrapped_key"]), base64.b64decode(released["wrapped_swk"]), private_key)
        return ReleasedKey(key_id, key)
