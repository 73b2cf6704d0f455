"""Client errors: one base; the server's refusals carry its problem details (code, reasons)."""

from __future__ import annotations

from keybroker_client._problem import Problem


class KeybrokerClientError(Exception):
    """Base of every error raised by keybroker_client."""


class TransportError(KeybrokerClientError):
    """The server could not be reached, or the connection failed."""


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
