"""One check at a time, its answer reused for a short while: for the routes whose work is a round trip to every KMS
or HSM (``/readyz``, ``GET /kbs/v1/backends``).

The check runs in a small executor of its own, never on the request thread pool: a slow backend then holds one of
these threads, not the API's. A caller arriving while a check runs awaits that check (an asyncio wait on the event
loop, no thread held); a caller arriving within ``ttl()`` seconds of the last answer gets it at once. However many
callers, there is at most one round of checks per ``ttl``."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")

# Shared by every SingleFlight of a process: two checks (readiness, the report) can run side by side, no more.
_EXECUTOR = ThreadPoolExecutor(max_workers=2, thread_name_prefix="keybroker-checks")


class SingleFlight(Generic[T]):
    def __init__(
        self,
        run: Callable[[], T],
        ttl: Callable[[], float],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        executor: ThreadPoolExecutor = _EXECUTOR,
    ) -> None:
        self._run, self._ttl, self._monotonic, self._executor = run, ttl, monotonic, executor
        # (Held for a few instructions, never across the check; re-entrant: a check done at once calls _finished
        # from add_done_callback, under the lock.)
        self._lock = threading.RLock()
        self._answer: tuple[float, T] | None = None
        self._running: Future[T] | None = None
        self.rounds = 0  # how many checks were started (for tests and metrics)

    def _current(self) -> Future[T]:
        """A finished future with the cached answer, or the running check (started now if none runs)."""
        with self._lock:
            if self._answer is not None and self._monotonic() - self._answer[0] < self._ttl():
                done: Future[T] = Future()
                done.set_result(self._answer[1])
                return done
            running = self._running
            if running is None:
                self.rounds += 1
                running = self._running = self._executor.submit(self._run)
                running.add_done_callback(self._finished)
            return running

    def _finished(self, future: Future[T]) -> None:
        with self._lock:
            if not future.cancelled() and future.exception() is None:
                self._answer = (self._monotonic(), future.result())
            if self._running is future:
                self._running = None

    async def get(self, timeout: float | None = None) -> T:
        """The answer; asyncio.TimeoutError after ``timeout`` seconds (the check goes on, for the next caller)."""
        waiting = asyncio.wrap_future(self._current())
        return await asyncio.wait_for(asyncio.shield(waiting), timeout)
