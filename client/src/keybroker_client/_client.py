"""The workload client: nonce -> REPORTDATA = SHA-512(val ‖ iat ‖ public key) -> quote -> transfer -> unwrap.

A fresh RSA-3072 key pair per transfer by default; the private key never leaves this process. Errors carry the
server's ``code`` and ``reasons`` (``ProblemError``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import re
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker_client._errors import (
    ConfigurationError,
    EvidenceError,
    KeybrokerClientError,
    ProblemError,
    TransportError,
)
from keybroker_client._problem import Problem
from keybroker_client._retry import Attempts, Retry
from keybroker_client._tls import ca_file_context, normalise_fingerprints, ssl_context, transport_error
from keybroker_client.evidence import EvidenceProvider

_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_MODES = ("background", "passport")
_KEY_BITS = (3072, 4096)  # what the server accepts for user_data (PROTOCOL.md §3)
_TOKEN = re.compile(r"[\x21-\x7e]+")  # a bearer token: visible ASCII, no spaces


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
    """``Client("https://kbs:9443", ca="ca.pem")``; ``ca_fingerprint=`` pins the CA instead (several pins, a list
    or comma-separated, during a CA rotation: any certificate the server publishes that matches one is trusted).

    Several replicas of one deployment: ``Client(["https://kbs-1:9443", "https://kbs-2:9443"], ...)`` (or one
    string, comma-separated). ``fetch_key`` starts at a random one and, when an exchange fails in a way another
    replica may not (``_retry``), starts over at the next with a fresh nonce, as ``retry`` allows. Behind one load
    balancer, give its URL alone: the retries then go through it. Not thread-safe: one Client per thread.

    Wrong arguments (URLs, CA file, fingerprint, token, timeout) raise ``ConfigurationError`` here, before anything
    is sent.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        ca: str | Path | None = None,
        ca_fingerprint: str | Sequence[str] | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retry: Retry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.urls = _urls(base_url)
        self.base_url = self.urls[0]
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError("retry is a keybroker_client.Retry")
        self.retry = retry or Retry()
        if ca is not None and ca_fingerprint is not None:
            raise ConfigurationError("give ca (the CA file) or ca_fingerprint (its SHA-384), not both")
        if ca is not None or ca_fingerprint is not None:
            plain = [url for url in self.urls if url.startswith("http://")]
            if plain:
                raise ConfigurationError(
                    f"{plain[0]} is plain HTTP: the CA given would not be used; use https:// (or leave out the CA)"
                )
        self._ca = str(ca) if ca is not None else None
        # The CA file is read once, here: a missing or wrong file shows at once, for any number of replicas.
        self._ca_context = ca_file_context(ca) if ca is not None else None
        self._fingerprint = normalise_fingerprints(ca_fingerprint) if ca_fingerprint is not None else None
        self._pinned: ssl.SSLContext | None = None
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError("timeout is a number of seconds above 0")
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        if token and (not isinstance(token, str) or not _TOKEN.fullmatch(token)):  # "" or None: no token
            raise ConfigurationError("token: a bearer token is visible ASCII without spaces or line breaks")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._transport = transport
        self._clock, self._sleep = clock, sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter and a starting replica, not a secret
        self._next = self._rng.randrange(len(self.urls))
        self._http: dict[str, httpx.Client] = {}
        if len(self.urls) == 1:
            self._connection(self.base_url)  # one server: a wrong pin shows at once, as before

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
        if self._ca_context is not None:
            return self._ca_context
        if self._fingerprint is not None:
            if self._pinned is None:  # every replica has the deployment's CA: fetch and check it once
                self._pinned = ssl_context(url, None, self._fingerprint)
            return self._pinned
        return ssl_context(url)

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
            raise transport_error(exc, url, ca_file=self._ca, pinned=self._fingerprint is not None) from None
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
        """Attest and receive key ``key_id``. Raises ``ConfigurationError`` (a wrong argument, before anything is
        sent), ``ProblemError`` (server refusal: ``code``, ``reasons``), ``TransportError`` (the network or the
        server's answer), ``EvidenceError`` (no quote) or ``UnwrapError`` (the last attempt's error, when every
        attempt failed)."""
        if not isinstance(key_id, str) or not key_id.strip():
            raise ConfigurationError("key_id is the key's id (a non-empty string)")
        if mode not in _MODES:
            raise ConfigurationError(f"mode is 'background' or 'passport', not {mode!r}")
        if key_bits not in _KEY_BITS or isinstance(key_bits, bool):
            raise ConfigurationError(f"key_bits is 3072 or 4096 (the workload key keybroker accepts), not {key_bits!r}")
        tee_type = getattr(evidence, "tee_type", None)
        if tee_type not in ("SGX", "TDX") or not callable(getattr(evidence, "quote", None)):
            raise ConfigurationError(
                "evidence is an EvidenceProvider (tee_type 'SGX' or 'TDX', and quote(report_data)): e.g. "
                "keybroker_client.evidence.SimulatedEvidence, TdxEvidence or GramineSgxEvidence"
            )
        path = f"/kbs/v1/keys/{quote(key_id, safe='')}/transfer"
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)  # one per fetch_key
        attempts = Attempts(self.retry, self._clock, self._sleep, self._rng)
        while True:
            url = self.urls[self._next]
            try:
                return self._fetch(url, path, key_id, evidence, mode, private_key)
            except KeybrokerClientError as exc:
                self._next = (self._next + 1) % len(self.urls)
                if not attempts.again(exc):
                    raise

    def _fetch(
        self, url: str, path: str, key_id: str, evidence: EvidenceProvider, mode: str, private_key: rsa.RSAPrivateKey
    ) -> ReleasedKey:
        # Only what the server sent is checked into TransportError (_answer, _b64); the evidence, the unwrapping
        # and the arguments fail with their own errors, never blamed on the server.
        nonce = _answer(self._post(url, path, json={}), url, "a nonce", ("val", "iat", "signature"))
        user_data = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        bound = _b64(nonce, "val", url, "nonce") + _b64(nonce, "iat", url, "nonce") + user_data
        quote = _quote(evidence, hashlib.sha512(bound).digest())
        if mode == "passport":
            body = {
                "quote": base64.b64encode(quote).decode(),
                "verifier_nonce": nonce,
                "runtime_data": base64.b64encode(user_data).decode(),
            }
            token = _answer(self._post(url, "/appraisal/v1/attest", json=body), url, "a token", ("token",))
            released = _answer(
                self._post(url, path, json={"attestation_token": token["token"]}),
                url,
                "a released key",
                ("wrapped_key", "wrapped_swk"),
            )
        else:
            body = {
                "quote": base64.b64encode(quote).decode(),
                "nonce": nonce,
                "user_data": base64.b64encode(user_data).decode(),
            }
            released = _answer(
                self._post(url, path, headers={"Attestation-Type": evidence.tee_type}, json=body),
                url,
                "a released key",
                ("wrapped_key", "wrapped_swk"),
            )
        wrapped_key = _b64(released, "wrapped_key", url, "released key")
        wrapped_swk = _b64(released, "wrapped_swk", url, "released key")
        return ReleasedKey(key_id, unwrap(wrapped_key, wrapped_swk, private_key))


def _urls(base_url: str | Sequence[str]) -> list[str]:
    if isinstance(base_url, str):
        items: list[object] = list(base_url.split(","))
    elif isinstance(base_url, Sequence):
        items = list(base_url)
    else:
        raise ConfigurationError("base_url is a URL, a comma-separated list of them, or a list")
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(f"{item!r} is not a URL (a string)")
        url = item.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("https://", "http://")):
            raise ConfigurationError(f"{url!r} is not an http(s) URL")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - parsing the port is the check: "https://kbs:x" raises ValueError
        except ValueError:
            raise ConfigurationError(f"{url!r} is not a valid URL (its host or port)") from None
        if not parts.hostname:
            raise ConfigurationError(f"{url!r} names no host")
        if not _valid_host(parts.hostname):
            raise ConfigurationError(f"{url!r} is not a valid URL: {parts.hostname!r} is not a host name or address")
        try:
            httpx.URL(url)  # ("https://[::1]x:9443": what urlsplit lets through and httpx would refuse later)
        except httpx.InvalidURL:
            raise ConfigurationError(f"{url!r} is not a valid URL (its host or port)") from None
        urls.append(url)
    if not urls:
        raise ConfigurationError("give at least one keybroker URL")
    return urls


def _valid_host(host: str) -> bool:
    """An IPv6 address, or a name or IPv4 address that IDNA encodes (no empty label, none over 63 characters): the
    others would raise UnicodeError from the socket layer at the first request."""
    if ":" in host:
        import ipaddress

        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return False
        return True
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _answer(response: httpx.Response, url: str, what: str, fields: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object the server answered with, holding string ``fields``; else a ``TransportError``."""
    try:
        data = response.json()
    except ValueError:
        raise TransportError(f"{url} did not answer with {what}: the body is not JSON") from None
    if not isinstance(data, dict):
        raise TransportError(f"{url} did not answer with {what}: not a JSON object")
    missing = [name for name in fields if not isinstance(data.get(name), str)]
    if missing:
        raise TransportError(f"{url} did not answer with {what}: no {', '.join(missing)}")
    return data


def _b64(data: dict[str, Any], name: str, url: str, what: str) -> bytes:
    try:
        return base64.b64decode(data[name], validate=True)
    except (binascii.Error, ValueError):
        raise TransportError(f"{url} answered with a {what} whose {name} is not base64") from None


def _quote(evidence: EvidenceProvider, report_data: bytes) -> bytes:
    """The provider's quote; its failures are local (``EvidenceError``), never the server's."""
    try:
        quote = evidence.quote(report_data)
    except KeybrokerClientError:
        raise
    except Exception as exc:  # a provider's own failure, whatever it is: reported as such, with its cause
        name = type(evidence).__name__
        raise EvidenceError(f"the evidence provider {name} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(quote, bytes | bytearray) or not quote:
        raise EvidenceError(f"the evidence provider {type(evidence).__name__} returned no quote")
    return bytes(quote)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by keybroker and is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None
