"""Anonymous refusals, audited in aggregate: one entry per client address and window instead of one per request.

Every request refused for want of a valid token (no token, a malformed, forged, expired, revoked or foreign one)
or for exceeding an unauthenticated rate limit would otherwise append an audit entry of its own, and since a full
disk stops every key release (audit-or-fail), anyone could fill it. Here such refusals are counted in memory and
written as one ``auth.refused`` entry per address and window, ``details`` holding ``count``, ``routes`` and
``codes``, at the latest one window after the window's first refusal (``flush_due``, called by the server every
second). N refusals therefore add O(windows) entries, not O(N).

What stays individual: refusals of authenticated callers (403) and every transfer request, whatever its token
(the transfer service audits those itself, PROTOCOL.md §10).

Thread-safe (one lock around the counters; the audit writes happen outside it). Memory is bounded: at most
``max_clients`` addresses per window (so at most that many entries), further addresses are counted under
``client = "*"``. If an entry cannot be
written (audit outage) its counts are kept and written with the next flush.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog, format_time
from keybroker.clock import Clock
from keybroker.net import client_key

OVERFLOW_CLIENT = "*"


@dataclass
class _Window:
    first: datetime
    last: datetime
    count: int = 0
    routes: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)


class AnonymousRefusals:
    def __init__(self, audit: AuditLog, clock: Clock, window: timedelta, max_clients: int = 1_000) -> None:
        self._audit = audit
        self._clock = clock
        self._window = window
        self._max_clients = max_clients
        self._lock = threading.Lock()
        self._open: dict[str, _Window] = {}
        self._flush_lock = threading.Lock()  # one flush at a time: entries leave in window order

    def add(self, client: str | None, route: str, code: str) -> None:
        """Count one refusal of ``client`` (an address) on ``route`` (a route template, never a raw path). Counted
        by ``client_key``: an IPv6 client by its /64, which is then the entry's ``client``."""
        now = self._clock.now()
        key = client_key(client)
        with self._lock:
            window = self._open.get(key)
            if window is None:
                if len(self._open) >= self._max_clients:
                    key = OVERFLOW_CLIENT
                    window = self._open.get(key)
                if window is None:
                    window = self._open[key] = _Window(first=now, last=now)
            window.count += 1
            window.last = now
            window.routes[route] = window.routes.get(route, 0) + 1
            window.codes[code] = window.codes.get(code, 0) + 1

    def pending(self) -> int:
        """Refusals counted and not yet written."""
        with self._lock:
            return sum(window.count for window in self._open.values())

    def flush_due(self) -> int:
        """Write the entries of every window that has closed; returns how many were written."""
        return self._flush(self._clock.now() - self._window)

    def flush_all(self) -> int:
        """Write every open window now (shutdown)."""
        return self._flush(None)

    def _flush(self, closed_before: datetime | None) -> int:
        with self._flush_lock:
            with self._lock:
                due = {
                    key: window
                    for key, window in self._open.items()
                    if closed_before is None or window.first <= closed_before
                }
                for key in due:
                    del self._open[key]
            written = 0
            for index, (key, window) in enumerate(due.items()):
                try:
                    self._audit.record(AuditContext(client=None if key == "-" else key), _event(window, self._window))
                except Exception:
                    self._keep(dict(list(due.items())[index:]))
                    raise
                written += 1
            return written

    def _keep(self, unwritten: dict[str, _Window]) -> None:
        """Put back what could not be written, merged with anything counted since."""
        with self._lock:
            for key, old in unwritten.items():
                new = self._open.get(key)
                if new is None:
                    self._open[key] = old
                    continue
                new.first, new.count = old.first, new.count + old.count
                for name, count in old.routes.items():
                    new.routes[name] = new.routes.get(name, 0) + count
                for name, count in old.codes.items():
                    new.codes[name] = new.codes.get(name, 0) + count


def _event(window: _Window, length: timedelta) -> AuditEvent:
    return AuditEvent(
        action="auth.refused",
        outcome="denied",
        target=None,
        details={
            "aggregate": True,
            "count": window.count,
            "routes": dict(sorted(window.routes.items())),
            "codes": dict(sorted(window.codes.items())),
            "first_at": format_time(window.first),
            "last_at": format_time(window.last),
            "window_seconds": int(length.total_seconds()),
        },
    )
