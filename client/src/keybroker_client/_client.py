"""The workload client: nonce -> REPORTDATA = SHA-512(val ‖ iat ‖ public key) -> quote -> transfer -> unwrap.

A fresh RSA-3072 key pair per transfer by default; the private key never leaves this process. Errors carry the
server's ``code`` and ``reasons`` (``ProblemError``).
"""

from __future__ import annotations

import base64
import hashlib
import random
import ssl
import struct
import time
from collections.abc import Callable, Sequence
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
from keybroker_client._retry import Attempts, Retry
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
    """``Client("https://kbs:9443", ca="ca.pem")``; ``ca_fingerprint=`` pins the CA instead.

    Several replicas of one deployment: ``Client(["https://kbs-1:9443", "https://kbs-2:9443"], ...)`` (or one
    string, comma-separated). ``fetch_key`` starts at a random one and, when an exchange fails in a way another
    replica may not (``_retry``), starts over at the next with a fresh nonce, as ``retry`` allows. Behind one load
    balancer, give its URL alone: the retries then go through it. Not thread-safe: one Client per thread.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        ca: str | Path | None = None,
        ca_fingerprint: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retry: Retry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        self.urls = [url.strip().rstrip("/") for url in urls if url.strip()]
        if not self.urls:
            raise ValueError("give at least one keybroker URL")
        for url in self.urls:
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        self.base_url = self.urls[0]
        self.retry = retry or Retry()
        self._ca = str(ca) if ca else None
        self._fingerprint = ca_fingerprint
        self._pinned: ssl.SSLContext | None = None
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._transport = transport
        self._clock, self._sleep = clock, sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter and a starting replica, not a secret
        self._next = self._rng.randrange(len(self.urls))
        self._http: dict[str, httpx.Client] = {}
        if len(self.urls) == 1:
            self._connection(self.base_url)  # one server: a wrong pin or CA file shows at once, as before

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for http in self._http.values():
            http.close()
        self._http.clear()

    def _verify(self, url: str) -> ssl.SSLContext | bool:
        if not url.startswith("https://") or self._transport is not None:
            return True
        if self._fingerprint and not self._ca:
            if self._pinned is None:  # every replica has the deployment's CA: fetch and check it once
                self._pinned = ssl_context(url, None, self._fingerprint)
            return self._pinned
        return ssl_context(url, self._ca, None)

    def _connection(self, url: str) -> httpx.Client:
        http = self._http.get(url)
        if http is None:
            http = httpx.Client(
                base_url=url,
                verify=self._verify(url),
                timeout=self._timeout,
                headers=self._headers,
                transport=self._transport,
            )
            self._http[url] = http
        return http

    def _post(self, url: str, path: str, json: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
        try:
            response = self._connection(url).post(path, json=json, headers=headers)
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot reach {url}: {exc}") from None
        if response.status_code >= 400:
            problem = Problem.from_response(
                response.status_code, response.headers.get("content-type", ""), response.content
            )
            raise ProblemError(problem, _retry_after(response.headers.get("retry-after")))
        return response

    def fetch_key(
        self,
        key_id: str,
        evidence: EvidenceProvider,
        mode: Literal["background", "passport"] = "background",
        key_bits: int = 3072,
    ) -> ReleasedKey:
        """Attest and receive key ``key_id``. Raises ``ProblemError`` (server refusal: ``code``, ``reasons``),
        ``TransportError`` or ``UnwrapError`` (the last attempt's error, when every attempt failed)."""
        path = f"/kbs/v1/keys/{quote(key_id, safe='')}/transfer"
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)  # one per fetch_key
        attempts = Attempts(self.retry, self._clock, self._sleep, self._rng)
        while True:
            url = self.urls[self._next]
            try:
                return self._attempt(url, path, key_id, evidence, mode, private_key)
            except KeybrokerClientError as exc:
                self._next = (self._next + 1) % len(self.urls)
                if not attempts.again(exc):
                    raise

    def _attempt(
        self, url: str, path: str, key_id: str, evidence: EvidenceProvider, mode: str, private_key: rsa.RSAPrivateKey
    ) -> ReleasedKey:
        try:
            return self._fetch(url, path, key_id, evidence, mode, private_key)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, KeybrokerClientError):
                raise
            raise TransportError(f"unexpected answer from {url}: {type(exc).__name__}") from None

    def _fetch(
        self, url: str, path: str, key_id: str, evidence: EvidenceProvider, mode: str, private_key: rsa.RSAPrivateKey
    ) -> ReleasedKey:
        nonce = self._post(url, path, json={}).json()
        if not isinstance(nonce, dict) or not all(isinstance(nonce.get(k), str) for k in ("val", "iat", "signature")):
            raise TransportError(f"{url} did not answer with a nonce")
        user_data = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        report_data = hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + user_data)
        quote = evidence.quote(report_data.digest())
        if mode == "passport":
            token = self._post(
                url,
                "/appraisal/v1/attest",
                json={
                    "quote": base64.b64encode(quote).decode(),
                    "verifier_nonce": nonce,
                    "runtime_data": base64.b64encode(user_data).decode(),
                },
            ).json()["token"]
            released = self._post(url, path, json={"attestation_token": token}).json()
        else:
            released = self._post(
                url,
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


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by keybroker and is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None
