"""keybroker_client: the workload-side library for keybroker. Light: depends on httpx and cryptography only,
never on the server's packages. Errors: ``_errors`` (one tree under ``KeybrokerClientError``)."""

from keybroker_client._client import Client, ReleasedKey, UnwrapError, unwrap
from keybroker_client._errors import (
    ConfigurationError,
    EvidenceError,
    KeybrokerClientError,
    ProblemError,
    TlsError,
    TransportError,
)
from keybroker_client._problem import Problem
from keybroker_client._retry import Retry
from keybroker_client._tls import PinMismatch, fetch_pinned_ca, normalise_fingerprint, ssl_context

__all__ = [
    "Client",
    "ConfigurationError",
    "EvidenceError",
    "KeybrokerClientError",
    "PinMismatch",
    "Problem",
    "ProblemError",
    "ReleasedKey",
    "Retry",
    "TlsError",
    "TransportError",
    "UnwrapError",
    "fetch_pinned_ca",
    "normalise_fingerprint",
    "ssl_context",
    "unwrap",
]
__version__ = "0.1.0"
