"""Trusting a keybroker server: by CA file, or by the SHA-384 fingerprint of its CA (the pin an operator reads
with ``keybroker ca fingerprint``). Standard library only."""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl

import httpx

from keybroker_client._errors import KeybrokerClientError, TransportError

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class PinMismatch(KeybrokerClientError):
    """The server's CA does not have the pinned fingerprint: it is not the keybroker you meant."""


def normalise_fingerprint(value: str) -> str:
    pin = value.replace(":", "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{96}", pin):
        raise ValueError("a CA fingerprint is 96 hexadecimal digits (SHA-384), colons allowed")
    return pin


def fetch_pinned_ca(base_url: str, fingerprint: str, timeout: float = 10.0) -> str:
    """Download the server's CA certificate without trusting the connection, and accept it only if its SHA-384
    equals ``fingerprint``. Returns the PEM; later connections verify against it as usual."""
    pin = normalise_fingerprint(fingerprint)
    try:
        # Unverified on purpose: what is fetched is checked against the pin before anything trusts it.
        response = httpx.get(f"{base_url.rstrip('/')}/cms/v1/ca-certificates", verify=False, timeout=timeout)  # noqa: S501 - pinned below
    except httpx.HTTPError as exc:
        raise TransportError(f"cannot fetch the CA certificate from {base_url}: {exc}") from None
    match = _PEM_CERT.search(response.text) if response.status_code == 200 else None
    if match is None:
        raise TransportError(f"{base_url} did not return a CA certificate (HTTP {response.status_code})")
    pem = match.group(0)
    digest = hashlib.sha384(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    if not hmac.compare_digest(digest, pin):
        raise PinMismatch(f"the CA of {base_url} has fingerprint {digest}, not the pinned {pin}")
    return pem


def ssl_context(base_url: str, ca_file: str | None = None, ca_fingerprint: str | None = None) -> ssl.SSLContext:
    """The context to reach ``base_url`` with: the CA file, else the pinned CA, else the system's trust store."""
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    if ca_fingerprint:
        return ssl.create_default_context(cadata=fetch_pinned_ca(base_url, ca_fingerprint))
    return ssl.create_default_context()
