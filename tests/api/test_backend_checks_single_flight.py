"""``/readyz`` and ``GET /kbs/v1/backends`` against a backend whose check is slow: any number of concurrent callers
cost one round of checks, they wait without holding the request thread pool (``GET /kbs/v1/keys`` answers at once
meanwhile), and readiness answers 503 ``check_timeout`` when the checks take longer than its bound."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from keybroker.services import Services

CALLERS = 48  # more than the request thread pool's 40 threads


class _SlowCheck:
    """The embedded backend's check, made slow and counted."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0
        self._lock = threading.Lock()
        self.release = threading.Event()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1
        self.release.wait(self.seconds)


@pytest.fixture
def slow(services: Services, monkeypatch: pytest.MonkeyPatch) -> _SlowCheck:
    check = _SlowCheck(3.0)
    monkeypatch.setattr(services.keys.backends["embedded"], "check", check)
    return check


def _concurrently(api: TestClient, path: str, slow: _SlowCheck) -> tuple[list[Any], float]:
    """``CALLERS`` GETs of ``path`` at once, and how long ``GET /kbs/v1/keys`` took while they waited."""
    with ThreadPoolExecutor(CALLERS + 1) as pool:
        answers = [pool.submit(api.get, path) for _ in range(CALLERS)]
        time.sleep(0.5)  # (they are all waiting on the slow check by now)
        started = time.monotonic()
        keys = api.get("/kbs/v1/keys")
        took = time.monotonic() - started
        assert keys.status_code == 200, keys.text
        slow.release.set()
        return [answer.result(timeout=30) for answer in answers], took


def test_concurrent_reports_cost_one_round_and_do_not_block_the_api(api: TestClient, slow: _SlowCheck) -> None:
    answers, took = _concurrently(api, "/kbs/v1/backends", slow)
    assert took < 1.0, f"GET /kbs/v1/keys waited {took:.1f} s behind the backend checks"
    assert all(answer.status_code == 200 for answer in answers)
    assert slow.calls == 1, f"{slow.calls} rounds of checks for {CALLERS} callers"
    assert len({answer.json()["checked_at"] for answer in answers}) == 1  # (one report, shared)


def test_concurrent_readiness_costs_one_round_and_does_not_block_the_api(api: TestClient, slow: _SlowCheck) -> None:
    answers, took = _concurrently(api, "/readyz", slow)
    assert took < 1.0, f"GET /kbs/v1/keys waited {took:.1f} s behind the readiness checks"
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers if a.status_code != 200]
    assert slow.calls == 1, f"{slow.calls} rounds of checks for {CALLERS} callers"


def test_readiness_is_bounded_in_time(api: TestClient, slow: _SlowCheck, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keybroker.api.routes.ops.READY_TIMEOUT_SECONDS", 0.3)
    started = time.monotonic()
    response = api.get("/readyz")
    assert time.monotonic() - started < 2.0
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "schema": "ok", "backend:embedded": "check_timeout"},
    }
    slow.release.set()
    # The round went on: once done, its answer is the next caller's (no second round within the cache's time).
    deadline = time.monotonic() + 5
    while (again := api.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert again.status_code == 200
    assert slow.calls == 1


def test_a_check_that_breaks_unexpectedly_is_check_failed_in_readiness_and_the_report(
    api: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness and the report share one check (``check_store``): a backend check raising something that is not
    keybroker's makes both say ``check_failed``, without the exception's text, instead of failing the request."""

    def broken() -> None:
        raise RuntimeError("vendor detail that must not reach a client")

    monkeypatch.setattr(services.keys.backends["embedded"], "check", broken)
    ready = api.get("/readyz")
    assert (ready.status_code, ready.json()["checks"]["backend:embedded"]) == (503, "check_failed")
    report = api.get("/kbs/v1/backends")
    assert report.status_code == 200
    assert [(b["name"], b["code"]) for b in report.json()["backends"]] == [("embedded", "check_failed")]
    assert "vendor detail" not in ready.text + report.text
