"""Client errors: one base, and a branch per place a failure comes from.

::

    KeybrokerClientError
    ├── ConfigurationError   (also a ValueError) a wrong argument or local file: refused before anything is sent
    ├── EvidenceError        the TEE (or the evidence provider) could not produce a quote
    │   └── NoTeeError       ``auto`` found neither TDX nor Gramine SGX (evidence.py)
    ├── UnwrapError          the released key does not unwrap with this workload's key (_client.py)
    ├── TransportError       the network, or an answer that is not what PROTOCOL.md says; retried at the next replica
    │   └── TlsError         TLS could not be set up as asked (an untrusted certificate, TLS on an http:// URL, none
    │                        on an https:// one): says what to pass instead; never retried
    ├── PinMismatch          the server's CA does not have the pinned fingerprint (_tls.py); never retried
    └── ProblemError         the server refused: its problem details (``code``, ``reasons``)

Only the last three branches come from the server; a local mistake is never reported as a ``TransportError``.
"""

from __future__ import annotations

from keybroker_client._problem import Problem


class KeybrokerClientError(Exception):
    """Base of every error raised by keybroker_client."""


class ConfigurationError(KeybrokerClientError, ValueError):
    """A wrong argument (a measurement that is not hex or has the wrong length, an unknown TEE, a missing
    simulated-TEE directory, an unreadable CA file...): refused at construction, before anything is sent."""


class EvidenceError(KeybrokerClientError):
    """The TEE could not produce a quote."""


class TransportError(KeybrokerClientError):
    """The server could not be reached, the connection failed, or its answer is not what the protocol says."""


class TlsError(TransportError):
    """TLS could not be established as configured; the message says what to give instead."""


class ProblemError(KeybrokerClientError):
    """The server refused the request; ``problem`` has its stable ``code`` and any ``reasons``."""

    def __init__(self, problem: Problem, retry_after: float | None = None) -> None:
        super().__init__(problem.describe())
        self.problem = problem
        self.retry_after = retry_after  # seconds, from the server's Retry-After header (429, 503)

    @property
    def code(self) -> str:
        return self.problem.code

    @property
    def status(self) -> int:
        return self.problem.status
