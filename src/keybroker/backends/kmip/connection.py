"""Connections to the KMIP server: the mutual-TLS context, the pool of PyKMIP clients, and how a pooled connection
is found dead before use."""

from __future__ import annotations

import contextlib
import queue
import select
import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography import x509

from keybroker.errors import ConfigurationError


def ssl_reason(exc: ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or exc.__class__.__name__)


def tls_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """The client side of the mutual TLS session. Raises ``ConfigurationError`` for unusable files."""
    for what, path in (("cert_file", cert_file), ("key_file", key_file), ("ca_file", ca_file)):
        if not path.is_file():
            raise ConfigurationError(f"KMIP backend: {what} {path} does not exist")
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        raise ConfigurationError(f"KMIP backend: cert_file {cert_file} is not a PEM certificate") from None
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    except ValueError:
        raise ConfigurationError(f"KMIP backend: cert_file {cert_file} has malformed extensions") from None
    if usages is not None and x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        # KMIP servers (PyKMIP included) refuse such a certificate on every request; say so at start instead.
        raise ConfigurationError(
            f"KMIP backend: cert_file {cert_file} is not for client authentication (its extended key usage lacks "
            "clientAuth)"
        )
    try:
        # PROTOCOL_TLS_CLIENT: certificate and host name verification on; only ca_file is trusted.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as exc:
        raise ConfigurationError(
            f"KMIP backend: cannot use cert_file {cert_file} / key_file {key_file} / ca_file {ca_file}: "
            f"{ssl_reason(exc)}"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"KMIP backend: cannot read the TLS files: {exc.strerror}") from None
    return context


class Pool:
    """``size`` slots, each an open PyKMIP client or ``None`` (to be opened on demand). LIFO, so that a burst
    reuses the connections that are warm and the rest stay unopened."""

    def __init__(self, size: int, wait_seconds: float) -> None:
        self._slots: queue.LifoQueue[Any] = queue.LifoQueue()
        for _ in range(size):
            self._slots.put(None)
        self._wait = wait_seconds
        self._lock = threading.Lock()
        self.closed = False

    def take(self) -> Any:
        """A slot (an open client, or ``None``); raises ``queue.Empty`` after ``wait_seconds``."""
        return self._slots.get(timeout=self._wait)

    def give(self, client: Any) -> None:
        """Return a slot; ``None`` for a connection that was discarded. A closed pool closes what comes back."""
        with self._lock:
            if self.closed and client is not None:
                close_quietly(client)
                client = None
            self._slots.put(client)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle: list[Any] = []
            while True:
                try:
                    idle.append(self._slots.get_nowait())
                except queue.Empty:
                    break
            for client in idle:
                if client is not None:
                    close_quietly(client)
                self._slots.put(None)


def close_quietly(client: Any) -> None:
    sock = getattr(client.proxy, "socket", None)
    with contextlib.suppress(Exception):  # closing a broken connection may fail; there is nothing left to release
        client.close()
    if sock is not None:
        # KMIPProxy.close() skips close() when shutdown() fails, as it does on a connection the server dropped,
        # and would leak the descriptor until garbage collection.
        with contextlib.suppress(OSError):
            sock.close()


def server_closed(client: Any) -> bool:
    """True if a pooled connection cannot carry a request: no socket, or bytes (or EOF) waiting while it is idle.
    Nothing but TLS housekeeping (a TLS 1.3 session ticket, say) may arrive on an idle KMIP connection: the server
    closed it, sent an alert, or the stream is out of step."""
    sock = getattr(client.proxy, "socket", None)
    if sock is None:
        return True
    try:
        if sock.fileno() < 0 or sock.pending():
            return True
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        if not poller.poll(0):
            return False
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            sock.recv(1)  # b"" at EOF, or a stray byte: unusable either way
        except ssl.SSLWantReadError:
            return False  # only a TLS record for OpenSSL itself, now consumed
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return True
    return True
