"""When a transfer is tried again: the replica failed (unreachable, reset, timed out, 502/503/504) or asked the
client to slow down (429). Never for a refusal (a policy, a quote, a nonce the server rejected: those would only
be refused again), never for a mismatched CA pin or a TLS set-up that cannot work (``TlsError``: an untrusted
certificate, TLS on an http:// URL), never for a local error (``ConfigurationError``, ``EvidenceError``,
``UnwrapError``). Each attempt starts over with a fresh nonce, at the next address.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from keybroker_client._errors import ConfigurationError, KeybrokerClientError, ProblemError, TlsError, TransportError
from keybroker_client._tls import PinMismatch

RETRIED_STATUS = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Retry:
    """``attempts`` exchanges (nonce step and transfer) at most, within ``budget_seconds`` in all; between two,
    a pause drawn uniformly from [0, min(max_backoff, first_backoff * 2**n)] (full jitter: a fleet of workloads
    that lost the same replica does not come back in step), or the server's Retry-After when it sent one (capped
    by the budget). ``Retry(attempts=1)`` never retries."""

    attempts: int = 4
    first_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0
    budget_seconds: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigurationError("attempts must be at least 1")
        times = (self.first_backoff_seconds, self.max_backoff_seconds, self.budget_seconds)
        if not all(_number(value) for value in times) or min(times[:2]) < 0 or self.budget_seconds <= 0:
            raise ConfigurationError("backoff and budget must be positive")

    def pauses(self, rng: random.Random) -> Iterator[float]:
        """The pauses before the 2nd, 3rd, ... attempt (jittered)."""
        for n in range(self.attempts - 1):
            yield rng.uniform(0.0, min(self.max_backoff_seconds, self.first_backoff_seconds * 2**n))


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def retried(exc: KeybrokerClientError) -> bool:
    """Whether ``exc`` is worth another attempt at another replica."""
    if isinstance(exc, PinMismatch | TlsError):
        return False
    if isinstance(exc, ProblemError):
        return exc.status in RETRIED_STATUS
    return isinstance(exc, TransportError)


def retry_after(exc: KeybrokerClientError) -> float | None:
    """The server's Retry-After (seconds), if it gave one."""
    return exc.retry_after if isinstance(exc, ProblemError) else None


class Attempts:
    """The retry loop's bookkeeping, with the clock and sleep injected (tests do not wait)."""

    def __init__(
        self, policy: Retry, clock: Callable[[], float], sleep: Callable[[float], None], rng: random.Random
    ) -> None:
        self._deadline = clock() + policy.budget_seconds
        self._clock = clock
        self._sleep = sleep
        self._pauses = policy.pauses(rng)

    def again(self, exc: KeybrokerClientError) -> bool:
        """After a failed attempt: pause and return True if another one is allowed, else False."""
        if not retried(exc):
            return False
        pause = next(self._pauses, None)
        if pause is None:
            return False
        hint = retry_after(exc)
        if hint is not None:
            pause = max(pause, hint)
        if self._clock() + pause >= self._deadline:
            return False
        self._sleep(pause)
        return True
