"""keybroker_client: the workload-side library for keybroker. Light: depends on httpx only (and later on
``cryptography`` for unwrapping keys), never on the server's packages."""

from keybroker_client._client import Client, ReleasedKey, UnwrapError, unwrap
from keybroker_client._errors import KeybrokerClientError, ProblemError, TransportError
from keybroker_client._problem import Problem
from keybroker_client._retry import Retry
from keybroker_client._tls import PinMismatch, fetch_pinned_ca, normalise_fingerprint, ssl_context

__all__ = [
    "Client",
    "KeybrokerClientError",
    "PinMismatch",
    "Problem",
    "ProblemError",
    "ReleasedKey",
    "Retry",
    "TransportError",
    "UnwrapError",
    "fetch_pinned_ca",
    "normalise_fingerprint",
    "ssl_context",
    "unwrap",
]
__version__ = "0.1.0"
