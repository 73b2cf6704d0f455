"""A bounded pool for requests that cost more than a few milliseconds of CPU.

RSA key generation (seconds for 7680 bits), the consistency check of an imported RSA key, collateral import
(signature and chain checks of every item) and Rego compilation run here, never in the thread pool that serves
transfers: at most ``server.keygen_workers`` of them run at once, whatever arrives, so they cannot take the cores
the attested transfers need. At most ``server.costly_queue`` more wait; beyond that a request is refused at once
with 503 ``server_busy`` and ``Retry-After`` (a queue without bound would only turn overload into timeouts).

Used from the event loop only (the counter needs no lock).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from starlette.requests import Request

from keybroker.errors import ServerBusy

P = ParamSpec("P")
R = TypeVar("R")


class CostlyPool:
    def __init__(self, workers: int, queue: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="costly")
        self._capacity = workers + queue
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Calls running or waiting now."""
        return self._admitted

    async def run(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        if self._admitted >= self._capacity:
            raise ServerBusy(
                f"{self._admitted} costly requests (key generation, imports) are already running or waiting; "
                "retry shortly",
                code="server_busy",
            )
        self._admitted += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, functools.partial(func, *args, **kwargs))
        finally:
            self._admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def costly_pool(request: Request) -> CostlyPool:
    """The application's pool (made by its lifespan)."""
    pool: CostlyPool = request.app.state.costly
    return pool
