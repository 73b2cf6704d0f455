"""The bounded pool for costly requests: at most ``keygen_workers`` run, ``costly_queue`` wait, the rest get 503
server_busy with Retry-After at once and change nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from keybroker.api.app import create_app
from keybroker.api.costly import CostlyPool
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.errors import ServerBusy
from keybroker.keys.service import KeyService
from keybroker.services import Services, build_services, initialise
from tests.conftest import EXAMPLE_POLICY, assert_problem, snapshot


def test_the_pool_admits_workers_plus_queue_then_refuses() -> None:
    release = threading.Event()

    async def scenario() -> list[Any]:
        pool = CostlyPool(workers=1, queue=1)
        running = [asyncio.ensure_future(pool.run(release.wait, 10)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert pool.admitted == 2
        with pytest.raises(ServerBusy):
            await pool.run(release.wait, 10)
        release.set()
        done = await asyncio.gather(*running)
        assert pool.admitted == 0
        assert await pool.run(lambda: "again") == "again"
        pool.shutdown()
        return done

    assert asyncio.run(scenario()) == [True, True]


@pytest.fixture
def busy(tmp_path: Path, clock: FixedClock) -> Iterator[tuple[TestClient, Services]]:
    settings = load_settings(data_dir=tmp_path / "data", overrides={"server": {"keygen_workers": 1, "costly_queue": 1}})
    token = initialise(settings, clock).admin_token
    services = build_services(settings, clock)
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, services
    services.close()


def test_a_full_pool_answers_503_server_busy(
    busy: tuple[TestClient, Services], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, services = busy
    policy = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY).json()["id"]
    release, entered = threading.Event(), threading.Semaphore(0)
    real = KeyService.make_material

    def slow(new: Any) -> Any:
        entered.release()
        release.wait(30)
        return real(new)

    monkeypatch.setattr(KeyService, "make_material", staticmethod(slow))
    body = {"key_information": {"algorithm": "RSA", "key_length": 2048}, "transfer_policy_id": policy}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(client.post("/kbs/v1/keys", json=body).status_code))]
    threads.append(threading.Thread(target=lambda: results.append(client.post("/kbs/v1/keys", json=body).status_code)))
    for thread in threads:
        thread.start()
    assert entered.acquire(timeout=10)
    deadline = time.monotonic() + 10
    while client.app.state.costly.admitted < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # one runs, one waits
    before = snapshot(services)
    refused = client.post("/kbs/v1/keys", json=body)
    assert_problem(refused, 503, "server_busy")
    assert refused.headers["retry-after"] == "1"
    assert client.get("/healthz").status_code == 200  # cheap requests are not held up
    assert snapshot(services) == before
    release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [201, 201]
