"""Trusting a keybroker server: by CA file, or by the SHA-384 fingerprint of its CA (the pin an operator reads
with ``keybroker ca fingerprint``). Standard library only.

During a CA rotation the server publishes two CAs (``GET /cms/v1/ca-certificates``: the old one first, then the
new one): a pin matches any certificate there, and only the matching certificates are trusted. Several pins (a
list, or comma-separated: ``"OLD,NEW"``) carry a client across the switch from the old CA to the new one.

When TLS fails the way a misconfiguration makes it fail (no CA given, the wrong CA file, an http:// URL on a
TLS port, https:// on a plain one), ``transport_error`` says what to give instead (a ``TlsError``)."""

from __future__ import annotations

import hashlib
import hmac
import re
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from keybroker_client._errors import ConfigurationError, KeybrokerClientError, TlsError, TransportError

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
# What OpenSSL says when the peer does not speak TLS (an https:// URL on a plain-HTTP port).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "record layer failure", "packet length too long", "HTTP_REQUEST")
_HOW_TO_TRUST = (
    "pass the deployment's CA certificate (keybroker's DATA_DIR/ca.pem: ca='ca.pem', or --ca ca.pem) or its "
    "SHA-384 fingerprint (ca_fingerprint=..., or --ca-fingerprint; 'keybroker ca fingerprint' prints it)"
)


class PinMismatch(KeybrokerClientError):
    """The server's CA does not have the pinned fingerprint: it is not the keybroker you meant."""


def normalise_fingerprint(value: str) -> str:
    pin = value.replace(":", "").strip().lower() if isinstance(value, str) else ""
    if not re.fullmatch(r"[0-9a-f]{96}", pin):
        raise ConfigurationError("a CA fingerprint is 96 hexadecimal digits (SHA-384), colons allowed")
    return pin


def normalise_fingerprints(value: str | Sequence[str]) -> tuple[str, ...]:
    """One pin or several: a list, or one string with the pins comma-separated (``KEYBROKER_CA_FINGERPRINT``)."""
    if isinstance(value, str):
        value = value.split(",")
    elif not isinstance(value, Sequence) or isinstance(value, bytes | bytearray):
        raise ConfigurationError("a CA fingerprint is 96 hexadecimal digits (SHA-384), colons allowed")
    pins = tuple(dict.fromkeys(normalise_fingerprint(pin) for pin in value))
    if not pins:
        raise ConfigurationError("give at least one CA fingerprint (96 hexadecimal digits, SHA-384)")
    return pins


def ca_file_context(ca_file: str | Path) -> ssl.SSLContext:
    """A context trusting the CA certificate(s) in ``ca_file`` only; ``ConfigurationError`` if it cannot be read
    or holds no certificate."""
    if not isinstance(ca_file, str | Path) or not str(ca_file):
        raise ConfigurationError("ca is the CA certificate file (PEM): the deployment's ca.pem")
    path = Path(ca_file)
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        raise ConfigurationError(f"ca: {path} holds no PEM certificate (give the deployment's ca.pem)") from None
    except OSError as exc:
        raise ConfigurationError(f"ca: cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def fetch_pinned_ca(base_url: str, fingerprint: str | Sequence[str], timeout: float = 10.0) -> str:
    """Download the server's CA certificates without trusting the connection, and keep those whose SHA-384 is one
    of the pins (``fingerprint``: one, a list, or comma-separated); ``PinMismatch`` if none is. Returns their PEM;
    later connections verify against them (and nothing else) as usual."""
    pins = normalise_fingerprints(fingerprint)
    try:
        # Unverified on purpose: what is fetched is checked against the pin before anything trusts it.
        response = httpx.get(f"{base_url.rstrip('/')}/cms/v1/ca-certificates", verify=False, timeout=timeout)  # noqa: S501 - pinned below
    except httpx.HTTPError as exc:
        raise transport_error(exc, base_url, "cannot fetch the CA certificate from", pinned=True) from None
    found = _PEM_CERT.findall(response.text) if response.status_code == 200 else []
    if not found:
        raise TransportError(f"{base_url} did not return a CA certificate (HTTP {response.status_code})")
    published: list[tuple[str, str]] = []
    for pem in found:
        try:
            der = ssl.PEM_cert_to_DER_cert(pem)
        except ValueError:  # what the server sent: its answer, not a local mistake
            raise TransportError(f"{base_url} returned a CA certificate that is not valid PEM") from None
        published.append((hashlib.sha384(der).hexdigest(), pem))
    trusted = [pem for digest, pem in published if any(hmac.compare_digest(digest, pin) for pin in pins)]
    if not trusted:
        digests = ", ".join(digest for digest, _ in published)
        if len(published) == 1 and len(pins) == 1:
            raise PinMismatch(f"the CA of {base_url} has fingerprint {digests}, not the pinned {pins[0]}")
        raise PinMismatch(
            f"the CA certificates of {base_url} have fingerprints {digests}; none is pinned ({', '.join(pins)})"
        )
    return "\n".join(trusted)


def ssl_context(
    base_url: str, ca_file: str | None = None, ca_fingerprint: str | Sequence[str] | None = None
) -> ssl.SSLContext:
    """The context to reach ``base_url`` with: the CA file, else the pinned CA(s), else the system's trust store."""
    if ca_file:
        return ca_file_context(ca_file)
    if ca_fingerprint:
        return ssl.create_default_context(cadata=fetch_pinned_ca(base_url, ca_fingerprint))
    return ssl.create_default_context()


def transport_error(
    exc: httpx.HTTPError,
    url: str,
    doing: str = "cannot reach",
    *,
    ca_file: str | None = None,
    pinned: bool = False,
) -> TransportError:
    """The error for a failed exchange with ``url``: a ``TlsError`` saying what to do when TLS failed as a
    misconfiguration makes it fail, else a plain ``TransportError``."""
    text = str(exc) or type(exc).__name__
    scheme, host, port = _where(url)
    if scheme == "https" and "CERTIFICATE_VERIFY_FAILED" in text:
        if "mismatch" in text:  # "Hostname mismatch", "IP address mismatch"
            hint = f"its certificate is not for {host}: use a name it was issued for (keybroker's tls.san)"
        elif ca_file:
            hint = f"its certificate does not chain to {ca_file}: is that this deployment's ca.pem?"
        elif pinned:
            hint = (
                "its certificate does not chain to the pinned CA: is it a replica of the same deployment? (During a "
                "CA rotation pin the old and the new CA: ca_fingerprint=[OLD, NEW], or --ca-fingerprint OLD,NEW)"
            )
        else:
            hint = f"no CA was given, and the system's trust store does not trust it: {_HOW_TO_TRUST}"
        return TlsError(f"{doing} {url}: {hint} ({text})")
    if scheme == "https" and any(marker in text for marker in _NOT_TLS):
        return TlsError(
            f"{doing} {url}: it does not speak TLS on port {port} ({text}); use http:// if it serves plain HTTP "
            "(keybroker's tls.enabled = false), else check the port"
        )
    if scheme == "http" and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError) and _speaks_tls(host, port):
        return TlsError(f"{doing} {url}: it speaks TLS on port {port}: use https://{_netloc(host, port)}")
    return TransportError(f"{doing} {url}: {text}")


def _where(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = 0
    return scheme, parts.hostname or "", port


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake: a ClientHello only, nothing is sent over it."""
    if not host or not port:
        return False
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE  # only asks whether TLS is spoken there: nothing is trusted or sent
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, probe.wrap_socket(raw):
            return True
    except (OSError, ValueError):
        return False
