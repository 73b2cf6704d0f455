"""keybroker_client: the workload-side library for keybroker. Light: depends on httpx only (and later on
``cryptography`` for unwrapping keys), never on the server's packages."""

from keybroker_client._errors import KeybrokerClientError, ProblemError, TransportError
from keybroker_client._problem import Problem

__all__ = ["KeybrokerClientError", "Problem", "ProblemError", "TransportError"]
__version__ = "0.1.0"
