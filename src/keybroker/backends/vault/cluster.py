"""Which node of a Vault / OpenBao cluster (``addresses``) keybroker's requests go to, and how they follow a leader
change without a restart.

Every request goes to the node believed active. It is found by asking the configured nodes' ``sys/health`` (200
is the active node, 429 a standby, 503 sealed, 501 not initialised), and, when none of them is active, a standby's
``sys/leader`` for the leader's address (a cluster given by one of its nodes, or a node that was not listed). A
standby is never sent requests: OpenBao 2.x standbys answer reads from their own copy of the data, which lags the
active node (a read right after a write returned 404 there), so a listed standby, even the first address, only
points the way. The active node is confirmed again (its ``sys/health``) before a request once ``CONFIRM_EVERY``
has passed since the last confirmation, so keybroker leaves a leader that stepped down but stays reachable within
about that time.

``run`` sends one operation. When the node fails with an outage (the caller's predicate says which errors are:
refused, reset or timed out, sealed, "local node not active", a redirect to a dead leader), the active node is
looked for again, with short jittered backoff while the cluster elects one, and the operation is sent to it; once
``budget`` seconds have passed since the operation began, ``NoActiveNode`` is raised. No new try or probe round
starts after that, so an operation takes at most the budget plus the timeout of the request under way. The
operation is sent again only after an outage, so it must be idempotent (the KV store's writes and Transit are).

Threads: one ``Cluster`` serves every thread of its session. ``run`` may be called from any number of threads;
one thread at a time probes the nodes (the others wait for its answer, no longer than their own budget), and which
node is active is switched under that lock. A request already under way finishes on the node it was sent to.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import requests
import structlog

from keybroker.config.sections import check_url

T = TypeVar("T")
log = structlog.get_logger("keybroker.backends")

# Confirm that the node requests go to is still the active one when it was last confirmed this long ago.
CONFIRM_EVERY = 1.0
# A probe (sys/health, sys/leader) is a small request: this much at most, never more than timeout_seconds.
PROBE_TIMEOUT = 2.0
# Backoff between probe rounds while the cluster elects a leader: doubling from FIRST up to LAST, times 0.5-1.5.
FIRST_BACKOFF, LAST_BACKOFF = 0.05, 0.25
# What each sys/health status says about the node (anything else: "status N").
_HEALTH = {200: "active", 429: "standby", 473: "standby", 472: "a DR secondary", 501: "not initialised", 503: "sealed"}


class NoActiveNode(requests.RequestException):
    """No node served the operation within its budget. Its text names the nodes and their states only (never a
    response body); the session's error table turns it into ``BackendUnavailable``."""

    def __init__(self, states: dict[str, str], budget: float, last: Exception | None) -> None:
        super().__init__("no active node")
        self.states = dict(states)
        self.budget = budget
        self.last = last

    def describe(self) -> str:
        nodes = ", ".join(f"{node}: {state}" for node, state in self.states.items()) or "not probed"
        if self.budget <= 0:
            return f"no active node ({nodes})"
        return f"no active node served keybroker within {self.budget:g} s ({nodes})"


class Cluster:
    """The nodes of one cluster and the one requests go to (module docstring)."""

    def __init__(
        self,
        nodes: Sequence[str],
        http: requests.Session,
        switch: Callable[[str], None],
        *,
        verify: str | bool,
        timeout: float,
        budget: float,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.nodes = tuple(nodes)
        self._http = http
        self._switch = switch
        self._verify = verify
        self._probe_timeout = min(timeout, PROBE_TIMEOUT)
        self._budget = budget
        self._sleep = sleep
        self._monotonic = monotonic
        self._jitter = jitter
        self._lock = threading.Lock()
        self._active: str | None = None  # None: not known (not looked for yet, or it failed)
        self._generation = 0  # counts the times the active node was found; a failure only voids its own one
        self._confirmed_at = 0.0
        self._states: dict[str, str] = {}

    @property
    def active(self) -> str | None:
        return self._active

    def run(self, attempt: Callable[[], T], outage: Callable[[Exception], bool], budget: float | None = None) -> T:
        """``attempt()`` on the active node; after an ``outage`` of it, again on the active node found anew, until
        ``budget`` (default: the cluster's) seconds have passed since this call began; then ``NoActiveNode``."""
        budget = self._budget if budget is None else budget
        deadline = self._monotonic() + budget
        failures = 0
        last: Exception | None = None
        while True:
            self._confirm_if_due()
            generation = self._generation
            if self._active is None:
                self._locate(deadline, budget, last)
                generation = self._generation
            try:
                return attempt()
            except Exception as exc:
                if not outage(exc):
                    raise
                last = exc
            failures += 1
            self._void(generation)
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                raise NoActiveNode(self._states, budget, last) from None
            if failures > 1:  # the node found again failed again: wait before the next round
                self._sleep(min(self._backoff(failures - 2), remaining))

    def check(self) -> str:
        """For /readyz: the active node, probed now (one round, no waiting); ``NoActiveNode`` if there is none, or
        if another thread is looking for it right now."""
        node = self._active
        if node is not None and self._health(node) == "active":
            return node
        if node is not None:
            self._void(self._generation)
        return self._locate(self._monotonic(), 0.0, None)

    def _void(self, generation: int) -> None:
        """The active node found in ``generation`` failed: look for it again (unless another thread already has)."""
        with self._lock:
            if self._generation == generation:
                self._active = None

    def _confirm_if_due(self) -> None:
        if self._active is None or self._monotonic() - self._confirmed_at < CONFIRM_EVERY:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is probing right now
        try:
            node = self._active
            if node is not None and self._monotonic() - self._confirmed_at >= CONFIRM_EVERY:
                if self._health(node) == "active":
                    self._confirmed_at = self._monotonic()
                else:
                    self._active = None
        finally:
            self._lock.release()

    def _locate(self, deadline: float, budget: float, last: Exception | None) -> str:
        """Find the active node (rounds of probes with backoff between them) or raise ``NoActiveNode`` once
        ``deadline`` has passed. One thread probes; the others wait for it, at most until their deadline."""
        known = self._active
        if known is not None:
            return known
        if not self._lock.acquire(timeout=max(0.0, deadline - self._monotonic())):
            raise NoActiveNode(self._states, budget, last)
        try:
            rounds = 0
            while True:
                known = self._active
                if known is not None:
                    return known  # found by the thread this one waited for
                found = self._round()
                if found is not None:
                    if self._generation:  # not the first look: the leader changed, or its node came back
                        log.info("vault_active_node", node=found, nodes=dict(self._states))
                    self._switch(found)
                    self._active = found
                    self._generation += 1
                    self._confirmed_at = self._monotonic()
                    return found
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    raise NoActiveNode(self._states, budget, last)
                self._sleep(min(self._backoff(rounds), remaining))
                rounds += 1
        finally:
            self._lock.release()

    def _round(self) -> str | None:
        """One probe of every node; the active one, else the leader a standby names (if it is active)."""
        states: dict[str, str] = {}
        self._states = states
        for node in self.nodes:
            states[node] = self._health(node)
            if states[node] == "active":
                return node
        for node in [node for node, state in states.items() if state == "standby"]:
            leader = self._leader_of(node)
            if leader is not None and leader not in states:
                states[leader] = self._health(leader)
                if states[leader] == "active":
                    return leader
        return None

    def _health(self, node: str) -> str:
        try:
            response = self._http.get(
                f"{node}/v1/sys/health", timeout=self._probe_timeout, verify=self._verify, allow_redirects=False
            )
        except requests.exceptions.SSLError:
            return "TLS failed"
        except requests.Timeout:
            return "did not answer"
        except requests.RequestException:
            return "unreachable"
        return _HEALTH.get(response.status_code, f"status {response.status_code}")

    def _leader_of(self, node: str) -> str | None:
        """The leader address a standby names (``sys/leader``), if it is a URL keybroker may send its token to."""
        try:
            body = self._http.get(
                f"{node}/v1/sys/leader", timeout=self._probe_timeout, verify=self._verify, allow_redirects=False
            ).json()
        except (requests.RequestException, ValueError):
            return None
        address = body.get("leader_address") if isinstance(body, dict) else None
        if not isinstance(address, str) or not address:
            return None
        try:
            check_url(address)  # https, or http on loopback only: as for a configured address
        except ValueError:
            return None
        return address.rstrip("/")

    def _backoff(self, rounds: int) -> float:
        return float(min(LAST_BACKOFF, FIRST_BACKOFF * 2**rounds) * (0.5 + self._jitter()))
