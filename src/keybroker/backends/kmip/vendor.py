"""PyKMIP, imported once for the package, and how its exceptions read: the one table from vendor errors to what
the store does with them (a broken connection is discarded, a garbled reply means no working KMIP server, some
TLS alerts mean keybroker's certificate is refused)."""

from __future__ import annotations

import warnings

from cryptography.utils import CryptographyDeprecationWarning

# PyKMIP pulls in deprecated ciphers from cryptography and SQLAlchemy 1.x APIs at import; the warnings say nothing
# about keybroker and would fail a ``-W error`` run. Only this import is silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    from kmip.core import enums as kmip_enums
    from kmip.core import exceptions as kmip_core_exceptions
    from kmip.pie import objects as kmip_objects
    from kmip.pie.client import ProxyKmipClient
    from kmip.pie.exceptions import KmipOperationFailure
    from kmip.services.kmip_protocol import KMIPProtocol, RequestLengthMismatch


# A connection that raised one of these is in an unknown state: it is discarded, never returned to the pool.
BROKEN = (OSError, EOFError, RequestLengthMismatch, kmip_core_exceptions.ConnectionClosed)
# Replies that do not decode: not a (working) KMIP server at the other end.
GARBLED = (
    kmip_core_exceptions.InvalidKmipEncoding,
    kmip_core_exceptions.InvalidPrimitiveLength,
    kmip_core_exceptions.ReadValueError,
    kmip_core_exceptions.StreamNotEmptyError,
    kmip_core_exceptions.InvalidMessage,
)
# TLS alerts by which the server rejects keybroker's client certificate: a configuration problem, not an outage.
CERT_REFUSED = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)


__all__ = [
    "BROKEN",
    "CERT_REFUSED",
    "GARBLED",
    "KMIPProtocol",
    "KmipOperationFailure",
    "ProxyKmipClient",
    "RequestLengthMismatch",
    "kmip_core_exceptions",
    "kmip_enums",
    "kmip_objects",
]
