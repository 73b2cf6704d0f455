"""Abuse limits at the edge: who the client is, and token buckets per client address.

* ``ClientAddresses`` resolves a request's client address. ``X-Forwarded-For`` is believed only when the peer is
  one of ``limits.trusted_proxies``, and then only up to the first hop that is not a trusted proxy (walking the
  list from the right), so a client cannot choose its own address by sending the header itself.
* ``TokenBuckets`` holds one bucket per address: ``rate`` tokens per second up to ``burst``; a request takes one.
  Two classes of traffic have their own buckets (``RateClasses``): the attested endpoints (transfers, the appraisal
  nonce and attest, which a workload calls without a token, and which a whole cluster behind one NAT address may
  call at once) and every other request that carries no valid token. Requests with a valid token are not limited.

Limits hold per server process (``server.workers`` processes each keep their own) and per replica.
Thread-safe; memory is bounded (``max_clients`` buckets; full, idle ones are dropped first).
"""

from __future__ import annotations

import ipaddress
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keybroker.config import LimitsSettings
from keybroker.net import IPAddress, IPNetwork, normalise
from keybroker.net import parse_address as _address

MAX_FORWARDED_HOPS = 16  # X-Forwarded-For entries examined, from the right (a long header costs nothing more)


class ClientAddresses:
    def __init__(self, trusted_proxies: Sequence[str]) -> None:
        self._trusted: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    def is_trusted(self, address: str | None) -> bool:
        parsed = _address(address) if address is not None else None
        return parsed is not None and self._is_trusted(parsed)

    def resolve(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address: the peer's, or (peer a trusted proxy) the nearest untrusted hop it reports.
        ``forwarded_for`` is every X-Forwarded-For line joined with commas, in order (RFC 9110 §5.3)."""
        peer = normalise(peer)
        if peer is None or not self._trusted or not forwarded_for:
            return peer
        parsed = _address(peer)
        if parsed is None or not self._is_trusted(parsed):
            return peer
        candidate = peer
        for hop in reversed(forwarded_for.rsplit(",", MAX_FORWARDED_HOPS)[-MAX_FORWARDED_HOPS:]):
            address = _address(hop)
            if address is None:
                break  # garbage from beyond the trusted proxies: the last trusted hop is all that is known
            candidate = str(address)
            if not self._is_trusted(address):
                break
        return candidate


class TokenBuckets:
    """``rate`` tokens per second, at most ``burst`` saved up, per key."""

    def __init__(
        self, rate: float, burst: int, max_clients: int = 100_000, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._max_clients = max_clients
        self._now = now
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 if one was there, else the seconds until one will be."""
        now = self._now()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._store(key, tokens - 1.0, now)
                return 0.0
            self._store(key, tokens, now)
            return (1.0 - tokens) / self.rate

    def peek(self, key: str) -> bool:
        """Whether ``key`` has a token now (none is taken)."""
        now = self._now()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            return tokens + (now - at) * self.rate >= 1.0

    def _store(self, key: str, tokens: float, now: float) -> None:
        if len(self._buckets) >= self._max_clients:
            self._prune(now)
        self._buckets[key] = (tokens, now)  # re-inserted: the dict stays ordered by last use

    def _prune(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        while len(self._buckets) >= self._max_clients:  # all busy: forget the least recently used
            del self._buckets[next(iter(self._buckets))]


_ATTESTED_POST = re.compile(r"^/kbs/v1/(keys|secrets)/[^/]+/transfer$|^/appraisal/v1/attest$")
_ATTESTED_GET = frozenset({"/appraisal/v1/nonce"})

ATTESTED = "attested"
UNAUTHENTICATED = "unauthenticated"
DEFERRED = "deferred"  # carries a token: charged to UNAUTHENTICATED afterwards unless it proved valid


@dataclass(frozen=True)
class RateClasses:
    attested: TokenBuckets
    unauthenticated: TokenBuckets

    @classmethod
    def from_settings(cls, limits: LimitsSettings) -> RateClasses:
        return cls(
            TokenBuckets(limits.transfer_rps, limits.transfer_burst),
            TokenBuckets(limits.unauthenticated_rps, limits.unauthenticated_burst),
        )

    @staticmethod
    def classify(method: str, path: str) -> str | None:
        """``ATTESTED`` for the attested endpoints, else None (the caller decides by the token)."""
        if (method == "POST" and _ATTESTED_POST.match(path)) or (method == "GET" and path in _ATTESTED_GET):
            return ATTESTED
        return None

    def buckets(self, rate_class: str) -> TokenBuckets:
        return self.attested if rate_class == ATTESTED else self.unauthenticated


def retry_after(wait: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))
