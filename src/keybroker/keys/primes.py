"""Primality of imported RSA factors, checked in a separate process.

Miller-Rabin on a 3840-bit factor (RSA-7680) is about 0.1 s of big-integer arithmetic per round. In the server's
own interpreter that holds the GIL (in one call, or in 5 ms slices that every other thread must queue for): a
benchmark with four RSA-7680 imports in flight took transfers' p99 from 84 to 823 ms. In a process of its own it
only takes a core for that long. One such process is spawned on first use and kept; calls are serialised (the
callers are the bounded pool for costly requests, ``keybroker.api.costly``).

The factors cross to it through a pipe (memory, never a file). Thread-safe.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

MILLER_RABIN_ROUNDS = 2  # per factor, random bases; a composite passes both with probability below 1/16 (far less
# in practice, and OpenSSL's loader refuses what slips through); OpenSSL's own check runs dozens of rounds


class _Helper:
    """The helper process, spawned on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def run(self, numbers: tuple[int, ...]) -> bool:
        with self._lock:
            for attempt in (1, 2):
                if self._executor is None:
                    context = multiprocessing.get_context("spawn")  # never fork a threaded server
                    self._executor = ProcessPoolExecutor(max_workers=1, mp_context=context)
                try:
                    return self._executor.submit(_all_prime, numbers).result(timeout=120)
                except BrokenProcessPool:  # the helper died (killed, out of memory): once more with a new one
                    self._executor = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")


_helper = _Helper()


def all_probably_prime(*numbers: int) -> bool:
    """Whether every one of ``numbers`` passes ``MILLER_RABIN_ROUNDS`` rounds, computed in the helper process."""
    return _helper.run(numbers)


def _all_prime(numbers: tuple[int, ...]) -> bool:
    if os.getppid() == 1:  # the server is gone (killed): nobody waits for this answer
        os._exit(0)
    return all(probably_prime(n) for n in numbers)


def probably_prime(n: int) -> bool:
    """Miller-Rabin with ``MILLER_RABIN_ROUNDS`` random bases (in the calling process)."""
    if n < 5 or n % 2 == 0:
        return n in (2, 3)
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(MILLER_RABIN_ROUNDS):
        x = pow(2 + secrets.randbelow(n - 3), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True
