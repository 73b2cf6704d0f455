"""The workload client's retries across replicas: which failures are retried (and which never are), a fresh nonce
for every attempt, the next address each time, jittered and bounded pauses, the budget, Retry-After.

The replicas here are httpx.MockTransport handlers that speak PROTOCOL.md §3 (a nonce, then a key wrapped for the
workload's public key); the same client runs against real replicas behind nginx in tests/integration/test_ha.py.
"""

from __future__ import annotations

import base64
import json
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker_client import Client, PinMismatch, ProblemError, Retry, TransportError, UnwrapError
from keybroker_client._retry import retried

KEY = os.urandom(32)
OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class Evidence:
    tee_type = "SGX"

    def __init__(self) -> None:
        self.report_data: list[bytes] = []

    def quote(self, report_data: bytes) -> bytes:
        self.report_data.append(report_data)
        return b"quote"


def _released(body: dict[str, str], key: bytes = KEY) -> dict[str, str]:
    public = serialization.load_der_public_key(base64.b64decode(body["user_data"]))
    assert isinstance(public, rsa.RSAPublicKey)
    swk, iv = os.urandom(32), os.urandom(12)
    sealed = AESGCM(swk).encrypt(iv, key, None)
    wrapped = struct.pack("<III", 12, 16, len(sealed)) + iv + sealed
    return {
        "wrapped_key": base64.b64encode(wrapped).decode(),
        "wrapped_swk": base64.b64encode(public.encrypt(swk, OAEP)).decode(),
    }


Behaviour = Callable[[str, dict[str, object]], httpx.Response | None]  # (step, body) -> a failure, or None


@dataclass
class Replicas:
    """Two (or more) replicas by host name; ``fail[host]`` decides a failure per step ("nonce"/"transfer")."""

    fail: dict[str, Behaviour] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    nonces: list[str] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        body = json.loads(request.content or b"{}")
        step = "nonce" if body == {} else "transfer"
        self.calls.append((host, step))
        failure = self.fail.get(host)
        if failure is not None:
            answer = failure(step, body)
            if answer is not None:
                return answer
        if step == "nonce":
            val = base64.b64encode(os.urandom(16)).decode()
            self.nonces.append(val)
            return httpx.Response(200, json={"val": val, "iat": base64.b64encode(b"iat").decode(), "signature": "s"})
        assert body["nonce"]["val"] == self.nonces[-1]  # body: the test's own JSON (Any)
        return httpx.Response(200, json=_released(body))


def down(step: str, body: dict[str, object]) -> httpx.Response | None:
    raise httpx.ConnectError("connection refused")


def status(code: int, when: str = "transfer", headers: dict[str, str] | None = None) -> Behaviour:
    def failure(step: str, body: dict[str, object]) -> httpx.Response | None:
        if step != when:
            return None
        problem = {"status": code, "code": f"code_{code}", "title": "t", "detail": "d"}
        extra = {"content-type": "application/problem+json", **(headers or {})}
        return httpx.Response(code, json=problem, headers=extra)

    return failure


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def _client(replicas: Replicas, time: FakeTime, urls: str | list[str] = "http://a,http://b", **kw: object) -> Client:
    return Client(
        urls,
        transport=httpx.MockTransport(replicas.handle),
        clock=time.clock,
        sleep=time.sleep,
        rng=random.Random(0),
        **kw,  # type: ignore[arg-type]  # retry= only
    )


def _start_at_a(client: Client) -> None:
    client._next = 0  # the tests read more easily from a fixed first replica


def test_a_replica_that_is_down_costs_one_retry_at_the_next() -> None:
    replicas, time = Replicas(fail={"a": down}), FakeTime()
    with _client(replicas, time) as client:
        _start_at_a(client)
        assert client.fetch_key("k", Evidence()).key == KEY
    assert replicas.calls == [("a", "nonce"), ("b", "nonce"), ("b", "transfer")]
    assert len(time.pauses) == 1
    assert 0 <= time.pauses[0] <= 0.1


@pytest.mark.parametrize("code", [502, 503, 504])
def test_a_failed_transfer_starts_over_with_a_fresh_nonce_at_the_next_replica(code: int) -> None:
    replicas, time, evidence = Replicas(fail={"a": status(code)}), FakeTime(), Evidence()
    with _client(replicas, time) as client:
        _start_at_a(client)
        assert client.fetch_key("k", evidence).key == KEY
    assert replicas.calls == [("a", "nonce"), ("a", "transfer"), ("b", "nonce"), ("b", "transfer")]
    assert len(set(replicas.nonces)) == 2  # the second attempt did not reuse the first nonce
    assert len(evidence.report_data) == 2
    assert evidence.report_data[0] != evidence.report_data[1]


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 422])
def test_a_refusal_is_never_retried(code: int) -> None:
    replicas, time = Replicas(fail={"a": status(code), "b": status(code)}), FakeTime()
    with _client(replicas, time) as client:
        _start_at_a(client)
        with pytest.raises(ProblemError) as refused:
            client.fetch_key("k", Evidence())
    assert refused.value.status == code
    assert replicas.calls == [("a", "nonce"), ("a", "transfer")]
    assert time.pauses == []


def test_every_replica_down_gives_the_last_error_after_the_attempts_with_bounded_jittered_pauses() -> None:
    replicas, time = Replicas(fail={"a": down, "b": down}), FakeTime()
    policy = Retry(attempts=6, first_backoff_seconds=0.5, max_backoff_seconds=1.5, budget_seconds=100)
    with _client(replicas, time, retry=policy) as client:
        _start_at_a(client)
        with pytest.raises(TransportError, match="cannot reach http://b"):
            client.fetch_key("k", Evidence())
    assert [host for host, _ in replicas.calls] == ["a", "b", "a", "b", "a", "b"]
    caps = [0.5, 1.0, 1.5, 1.5, 1.5]
    assert len(time.pauses) == 5
    assert all(0 <= pause <= cap for pause, cap in zip(time.pauses, caps, strict=True))
    assert len(set(time.pauses)) == 5  # jittered, not a fixed schedule


def test_the_budget_ends_the_retries_before_the_attempts_do() -> None:
    replicas, time = Replicas(fail={"a": down, "b": down}), FakeTime()
    policy = Retry(attempts=50, first_backoff_seconds=1.0, max_backoff_seconds=1.0, budget_seconds=3.0)
    with _client(replicas, time, retry=policy) as client, pytest.raises(TransportError):
        client.fetch_key("k", Evidence())
    assert time.now < 3.0
    assert 2 <= len(replicas.calls) < 50


def test_retry_after_is_honoured_within_the_budget() -> None:
    replicas, time = Replicas(fail={"a": status(429, "nonce", {"Retry-After": "2"})}), FakeTime()
    with _client(replicas, time) as client:
        _start_at_a(client)
        assert client.fetch_key("k", Evidence()).key == KEY
    assert time.pauses == [2.0]
    replicas, time = Replicas(fail={"a": status(503, "nonce", {"Retry-After": "60"})}), FakeTime()
    with _client(replicas, time) as client:
        _start_at_a(client)
        with pytest.raises(ProblemError) as busy:
            client.fetch_key("k", Evidence())  # 60 s is past the 30 s budget: give up now, not sleep past it
    assert busy.value.status == 503
    assert busy.value.retry_after == 60.0
    assert time.pauses == []


def test_no_retry_with_one_attempt() -> None:
    replicas, time = Replicas(fail={"a": down}), FakeTime()
    with _client(replicas, time, retry=Retry(attempts=1)) as client:
        _start_at_a(client)
        with pytest.raises(TransportError):
            client.fetch_key("k", Evidence())
    assert replicas.calls == [("a", "nonce")]


def test_a_key_that_does_not_unwrap_is_not_retried() -> None:
    def tampered(step: str, body: dict[str, object]) -> httpx.Response | None:
        if step != "transfer":
            return None
        released = _released(body)  # type: ignore[arg-type]  # the test's own JSON
        released["wrapped_swk"] = base64.b64encode(b"\0" * 384).decode()
        return httpx.Response(200, json=released)

    replicas, time = Replicas(fail={"a": tampered, "b": tampered}), FakeTime()
    with _client(replicas, time) as client, pytest.raises(UnwrapError):
        client.fetch_key("k", Evidence())
    assert len(replicas.calls) == 2


def test_an_answer_that_is_not_a_nonce_is_retried_elsewhere() -> None:
    not_a_nonce: Behaviour = lambda step, body: httpx.Response(200, json=["not", "a", "nonce"])  # noqa: E731 - one line
    replicas, time = Replicas(fail={"a": not_a_nonce}), FakeTime()
    with _client(replicas, time) as client:
        _start_at_a(client)
        assert client.fetch_key("k", Evidence()).key == KEY


def test_a_mismatched_pin_is_never_retried() -> None:
    assert not retried(PinMismatch("the CA of https://a has fingerprint x, not the pinned y"))
    assert retried(TransportError("cannot reach"))


def test_clients_start_at_different_replicas() -> None:
    rng = random.Random(7)
    starts = [Client(["http://a", "http://b", "http://c"], rng=rng)._next for _ in range(60)]
    assert set(starts) == {0, 1, 2}


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ("", "at least one keybroker URL"),
        (" , ", "at least one keybroker URL"),
        ([], "at least one keybroker URL"),
        ("ftp://kbs", "is not an http\\(s\\) URL"),
        ("https://a,kbs:9443", "'kbs:9443' is not an http"),
    ],
)
def test_bad_url_lists_are_refused(urls: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Client(urls)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, "attempts must be at least 1"),
        ({"first_backoff_seconds": -1}, "backoff and budget must be positive"),
        ({"max_backoff_seconds": -0.1}, "backoff and budget must be positive"),
        ({"budget_seconds": 0}, "backoff and budget must be positive"),
    ],
)
def test_bad_retry_policies_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Retry(**kwargs)  # type: ignore[arg-type]  # the parametrised fields
