"""Abuse limits: token buckets per client address (429 rate_limited with Retry-After), X-Forwarded-For believed
only from trusted proxies, and anonymous refusals audited in aggregate (red-team finding 6)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from keybroker.api.app import create_app
from keybroker.api.limits import ClientAddresses, TokenBuckets
from keybroker.audit.aggregate import AnonymousRefusals
from keybroker.audit.chain import verify_chain
from keybroker.audit.log import SYSTEM
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.services import Services, build_services, initialise
from tests.conftest import EXAMPLE_POLICY, assert_problem


def _world(tmp_path: Path, clock: FixedClock, **limits: Any) -> tuple[Services, str]:
    settings = load_settings(data_dir=tmp_path / "data", overrides={"limits": limits} if limits else None)
    token = initialise(settings, clock).admin_token
    assert token is not None
    return build_services(settings, clock), token


@pytest.fixture
def limited(tmp_path: Path, clock: FixedClock) -> Iterator[tuple[TestClient, Services, str]]:
    services, token = _world(tmp_path, clock, unauthenticated_rps=1, unauthenticated_burst=5, audit_window_seconds=60)
    with TestClient(create_app(services), raise_server_exceptions=False, client=("192.0.2.10", 4000)) as client:
        yield client, services, token
    services.close()


# --- token buckets -------------------------------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=3, now=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token in half a second
    assert buckets.take("b") == 0.0  # addresses have buckets of their own
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    now[0] += 100
    assert [buckets.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # never more than the burst saved up


def test_buckets_stay_bounded_in_memory() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=1.0, burst=1, max_clients=100, now=lambda: now[0])
    for i in range(1000):
        buckets.take(f"10.0.{i // 256}.{i % 256}")
    assert len(buckets._buckets) <= 100
    buckets.take("busy")
    assert buckets.take("busy") > 0  # the most recently used survive


# --- addresses -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "header", "trusted", "expected"),
    [
        ("203.0.113.5", "198.51.100.1", [], "203.0.113.5"),  # no trusted proxies: the header is ignored
        ("203.0.113.5", "198.51.100.1", ["10.0.0.0/8"], "203.0.113.5"),  # peer not a trusted proxy
        ("10.0.0.2", "198.51.100.1", ["10.0.0.0/8"], "198.51.100.1"),
        ("10.0.0.2", "198.51.100.9, 198.51.100.1, 10.0.0.7", ["10.0.0.0/8"], "198.51.100.1"),  # rightmost untrusted
        ("10.0.0.2", "10.1.1.1, 10.0.0.7", ["10.0.0.0/8"], "10.1.1.1"),  # all trusted: the farthest
        ("10.0.0.2", "not-an-ip, 10.0.0.7", ["10.0.0.0/8"], "10.0.0.7"),  # garbage beyond the proxies
        ("10.0.0.2", "", ["10.0.0.0/8"], "10.0.0.2"),
        ("::1", "2001:db8::1", ["::1"], "2001:db8::1"),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(
    peer: str, header: str, trusted: list[str], expected: str
) -> None:
    assert ClientAddresses(trusted).resolve(peer, header) == expected


def test_trusted_proxies_must_be_addresses(tmp_path: Path) -> None:
    from keybroker.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="not an IP address"):
        load_settings(data_dir=tmp_path, overrides={"limits": {"trusted_proxies": ["proxy.example"]}})


# --- over HTTP -----------------------------------------------------------------------------------------------


def test_anonymous_requests_over_the_limit_get_429(limited: tuple[TestClient, Services, str]) -> None:
    client, _, token = limited
    statuses = [client.get("/healthz").status_code for _ in range(8)]
    assert statuses == [200] * 5 + [429] * 3
    response = client.get("/version")
    body = assert_problem(response, 429, "rate_limited")
    assert "Retry-After" in body["detail"]
    assert response.headers["retry-after"] == "1"
    # A valid token is never limited, and other addresses have their own bucket.
    assert client.get("/kbs/v1/keys", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    other = TestClient(client.app, client=("192.0.2.11", 4000))
    assert other.get("/healthz").status_code == 200


def test_forged_tokens_are_charged_to_the_unauthenticated_bucket(limited: tuple[TestClient, Services, str]) -> None:
    client, _, token = limited
    forged = {"Authorization": f"Bearer {token[:-4]}AAAA"}
    codes = [client.get("/kbs/v1/keys", headers=forged).json()["code"] for _ in range(7)]
    assert codes == ["invalid_token"] * 5 + ["rate_limited"] * 2
    assert client.get("/kbs/v1/keys", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_transfers_have_their_own_higher_limit(limited: tuple[TestClient, Services, str]) -> None:
    """The anonymous bucket is empty, yet a workload's nonce and transfer requests from the same address pass."""
    client, _, token = limited
    for _ in range(6):
        client.get("/healthz")
    assert client.get("/healthz").status_code == 429
    admin = {"Authorization": f"Bearer {token}"}
    policy = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY, headers=admin).json()["id"]
    key = client.post(
        "/kbs/v1/keys",
        json={"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": policy},
        headers=admin,
    ).json()["id"]
    for _ in range(20):
        assert client.post(f"/kbs/v1/keys/{key}/transfer").status_code == 200
        assert client.get("/appraisal/v1/nonce").status_code == 200


def test_the_transfer_limit_applies_too(tmp_path: Path, clock: FixedClock) -> None:
    services, _ = _world(tmp_path, clock, transfer_rps=1, transfer_burst=3)
    try:
        with TestClient(create_app(services), raise_server_exceptions=False) as client:
            statuses = [client.post(f"/kbs/v1/keys/{'0' * 8}/transfer").status_code for _ in range(4)]
            assert statuses[-1] == 429
            assert 429 not in statuses[:3]
    finally:
        services.close()


def test_forwarded_for_from_a_trusted_proxy_selects_the_bucket(tmp_path: Path, clock: FixedClock) -> None:
    services, _ = _world(tmp_path, clock, unauthenticated_rps=1, unauthenticated_burst=2, trusted_proxies=["10.0.0.1"])
    try:
        with TestClient(create_app(services), client=("10.0.0.1", 1)) as proxy:
            for address in ("198.51.100.1", "198.51.100.2"):
                statuses = [proxy.get("/healthz", headers={"X-Forwarded-For": address}).status_code for _ in range(3)]
                assert statuses == [200, 200, 429]
        with TestClient(create_app(services), client=("203.0.113.9", 1)) as direct:
            # Not a trusted proxy: its header is ignored, so rotating it buys nothing.
            statuses = [
                direct.get("/healthz", headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(3)
            ]
            assert statuses == [200, 200, 429]
    finally:
        services.close()


# --- bounded audit growth ------------------------------------------------------------------------------------


def test_anonymous_refusals_are_audited_in_aggregate(tmp_path: Path, clock: FixedClock) -> None:
    """400 anonymous or forged-token requests add at most 40 entries, and the aggregate entries carry their count."""
    services, token = _world(
        tmp_path, clock, unauthenticated_rps=1000, unauthenticated_burst=1000, audit_window_seconds=60
    )
    try:
        app = create_app(services)
        with TestClient(app, raise_server_exceptions=False, client=("192.0.2.20", 1)) as client:
            head = services.audit.head()[0]
            forged = f"Bearer {token[:-4]}AAAA"
            for i in range(400):
                clock.advance(timedelta(seconds=0.5))  # 200 s in all: the requests span four windows
                headers = {"Authorization": forged} if i % 2 else {}
                assert client.get("/kbs/v1/keys", headers=headers).status_code == 401
                app.state.refusals.flush_due()
            app.state.refusals.flush_all()
            added = services.audit.entries(after_seq=head)
        assert 1 <= len(added) <= 40
        assert all(e["action"] == "auth.refused" and e["details"]["aggregate"] for e in added)
        assert sum(e["details"]["count"] for e in added) == 400
        assert {e["client"] for e in added} == {"192.0.2.20"}
        first = added[0]["details"]
        assert first["routes"] == {"GET /kbs/v1/keys": first["count"]}
        assert set(first["codes"]) == {"unauthorized", "invalid_token"}
        assert verify_chain(services.audit.entries(), *services.audit.head()).ok
    finally:
        services.close()


def test_an_aggregate_is_written_within_one_window(
    limited: tuple[TestClient, Services, str], clock: FixedClock
) -> None:
    client, services, _ = limited
    head = services.audit.head()[0]
    client.get("/kbs/v1/keys")
    client.get("/kbs/v1/tokens")
    refusals: AnonymousRefusals = client.app.state.refusals
    assert refusals.flush_due() == 0  # the window is still open
    clock.advance(timedelta(seconds=60))
    assert refusals.flush_due() == 1
    (entry,) = services.audit.entries(after_seq=head)
    assert entry["details"]["count"] == 2
    assert entry["details"]["routes"] == {"GET /kbs/v1/keys": 1, "GET /kbs/v1/tokens": 1}


def test_the_server_flushes_aggregates_on_its_own(limited: tuple[TestClient, Services, str], clock: FixedClock) -> None:
    import time

    client, services, _ = limited
    head = services.audit.head()[0]
    client.get("/kbs/v1/keys")
    clock.advance(timedelta(seconds=61))
    deadline = time.monotonic() + 5
    while not services.audit.entries(after_seq=head) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert services.audit.entries(after_seq=head)[0]["details"]["count"] == 1


def test_aggregates_are_kept_through_an_audit_outage(services: Services, clock: FixedClock) -> None:
    refusals = AnonymousRefusals(services.audit, clock, timedelta(seconds=60))
    refusals.add("192.0.2.1", "GET /kbs/v1/keys", "unauthorized")
    clock.advance(timedelta(seconds=61))
    original = services.audit.record

    def broken(*_: Any) -> int:
        raise RuntimeError("disk full")

    services.audit.record = broken
    with pytest.raises(RuntimeError):
        refusals.flush_due()
    refusals.add("192.0.2.1", "GET /kbs/v1/keys", "invalid_token")
    services.audit.record = original
    head = services.audit.head()[0]
    assert refusals.flush_due() == 1
    (entry,) = services.audit.entries(after_seq=head)
    assert entry["details"]["count"] == 2


def test_aggregates_are_bounded_by_address_count(services: Services, clock: FixedClock) -> None:
    refusals = AnonymousRefusals(services.audit, clock, timedelta(seconds=60), max_clients=10)
    for i in range(50):
        refusals.add(f"192.0.2.{i}", "GET /kbs/v1/keys", "unauthorized")
    head = services.audit.head()[0]
    assert refusals.flush_all() == 11
    entries = services.audit.entries(after_seq=head)
    assert {e["client"] for e in entries} >= {"*"}
    assert sum(e["details"]["count"] for e in entries) == 50


def test_authenticated_refusals_stay_individual(api: TestClient, services: Services) -> None:
    auditor = services.tokens.issue("auditor", ["auditor"], [], timedelta(days=1), SYSTEM)[0]
    head = services.audit.head()[0]
    response = api.post(
        "/kbs/v1/tokens", json={"name": "x", "roles": ["admin"]}, headers={"Authorization": f"Bearer {auditor}"}
    )
    assert_problem(response, 403, "forbidden")
    (entry,) = services.audit.entries(after_seq=head)
    assert (entry["action"], entry["outcome"]) == ("auth.refused", "denied")
    assert "aggregate" not in entry["details"]


def test_a_made_up_authorization_header_buys_nothing(limited: tuple[TestClient, Services, str]) -> None:
    """Public routes do not look at the header; the limit does: unless its token proves valid it is charged."""
    client, _, token = limited
    bogus = {"Authorization": "x"}
    statuses = [client.get("/version", headers=bogus).status_code for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    assert client.get("/no-such-route", headers=bogus).status_code == 429
    assert client.get("/version", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_every_forwarded_for_line_counts(tmp_path: Path, clock: FixedClock) -> None:
    """A client behind a proxy that adds its own header line cannot choose its address with a line of its own."""
    services, _ = _world(
        tmp_path, clock, unauthenticated_rps=0.001, unauthenticated_burst=2, trusted_proxies=["10.0.0.0/8"]
    )
    try:
        with TestClient(create_app(services), client=("10.0.0.2", 1)) as proxy:
            statuses = []
            for i in range(4):
                headers = [("X-Forwarded-For", f"198.51.100.{i}"), ("X-Forwarded-For", "203.0.113.7")]
                statuses.append(proxy.get("/healthz", headers=headers).status_code)
            assert statuses == [200, 200, 429, 429]
    finally:
        services.close()


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("192.0.2.7", "192.0.2.7"),
    ],
)
def test_clients_are_counted_by_ipv4_address_or_ipv6_64(peer: str, key: str) -> None:
    from keybroker.net import client_key, normalise

    assert client_key(peer) == key
    assert normalise("::ffff:192.0.2.7") == "192.0.2.7"
    assert ClientAddresses(["192.0.2.0/24"]).resolve("::ffff:192.0.2.1", "198.51.100.5") == "198.51.100.5"


def test_one_ipv6_64_is_one_client(tmp_path: Path, clock: FixedClock) -> None:
    services, _ = _world(tmp_path, clock, unauthenticated_rps=0.001, unauthenticated_burst=3, audit_window_seconds=60)
    try:
        app = create_app(services)
        head = services.audit.head()[0]
        statuses = []
        for i in range(6):  # each client leaves through the lifespan, which writes what was counted
            with TestClient(app, client=(f"2001:db8::{i + 1:x}", 1)) as client:
                statuses.append(client.get("/kbs/v1/keys").status_code)
        assert statuses == [401] * 3 + [429] * 3
        entries = services.audit.entries(after_seq=head)
        assert {e["client"] for e in entries} == {"2001:db8::/64"}
        assert sum(e["details"]["count"] for e in entries) == 6
        entry = entries[0]
        assert entry["details"]["codes"].keys() <= {"unauthorized", "rate_limited"}
    finally:
        services.close()


def test_forwarded_for_walks_a_bounded_number_of_hops() -> None:
    addresses = ClientAddresses(["10.0.0.0/8"])
    long_chain = ", ".join(["10.1.1.1"] * 10_000)
    assert addresses.resolve("10.0.0.2", "198.51.100.1, " + long_chain) == "10.1.1.1"
