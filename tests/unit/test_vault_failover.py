"""The Vault/OpenBao session across a cluster (``addresses``), fast: a fake 3-node cluster behind an injected
requests transport (no process, no socket) and a fake monotonic clock that the session's backoff sleeps advance.

The fake does what a real OpenBao raft cluster was seen to do (tests/peers/openbao_raft.py). The active node serves.
Standbys answer reads from a copy that lags (a read right after a write finds nothing), and forward writes. While
the leader is dead, a standby answers with a 307 to it (requests follows that into a refused connection), then
with 500 "local node not active but active cluster node not found". ``sys/health`` answers 200/429/503,
``sys/leader`` names the leader, and a killed leader is replaced ``ELECTION`` seconds later.

The ``contract_*`` functions are the failover contract; tests/integration/test_vault_raft.py runs the same functions
against three real OpenBao nodes. The settings' refusals (no url nor addresses, an empty list, plain http to a
host that is not loopback, a duplicate, a url that is not among the addresses) are here too.
"""

from __future__ import annotations

import base64
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest
import requests
import requests.adapters
from requests.structures import CaseInsensitiveDict

from keybroker.backends.transit import TransitKeyWrapper
from keybroker.backends.vault.cluster import CONFIRM_EVERY
from keybroker.backends.vault.session import VaultSession
from keybroker.backends.vault.store import VaultKvStore
from keybroker.clock import SystemClock
from keybroker.config import TransitWrapperSettings, VaultBackendSettings, load_settings
from keybroker.errors import BackendUnavailable, ConfigurationError, Conflict
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import Algorithm, KeyMaterial, KeySpec

AES = KeySpec(Algorithm.AES, 256)
TOKEN_ENV = "KB_TEST_FAILOVER_TOKEN"
KV1, KV2, TRANSIT = "keybroker", "keybroker-v2", "transit"
ELECTION = 2.0  # the fake's leader election, in fake seconds (the real one took 1.6-4.2 s)
REQUEST_TIME = 0.001  # what each request to the fake costs, in fake seconds


# ---- the contract, shared with the real cluster ----------------------------------------------------------------


class ClusterUnderTest(Protocol):
    @property
    def urls(self) -> list[str]: ...

    def kill_leader(self) -> int: ...

    def standbys(self) -> list[int]: ...


def new_key() -> tuple[KeyId, bytes]:
    return KeyId(str(uuid.uuid4())), os.urandom(32)


def contract_keys_survive_a_leader_kill(
    store: VaultKvStore,
    wrapper: TransitKeyWrapper,
    cluster: ClusterUnderTest,
    now: Callable[[], float],
    budget: float,
    slack: float,
) -> float:
    """Keys and wrapped data keys made before the leader is killed and while the cluster elects another are all
    there afterwards, with the right bytes; no operation takes longer than the budget (plus ``slack`` for the
    request under way). Returns the seconds from the kill to the first operation that succeeded."""
    made: dict[KeyId, bytes] = {}
    wrapped: list[tuple[bytes, bytes, bytes]] = []

    def make_one() -> None:
        key_id, secret = new_key()
        store.put(key_id, KeyMaterial(AES, secret))
        made[key_id] = secret
        context = f"keybroker/{key_id}".encode()
        wrapped.append((wrapper.wrap(secret, context), secret, context))

    for _ in range(3):
        make_one()
    cluster.kill_leader()
    killed_at = now()
    first_success: float | None = None
    for _ in range(3):
        started = now()
        make_one()  # the first one waits for the new leader
        assert now() - started <= 2 * budget + slack  # two operations: a put and a wrap
        if first_success is None:
            first_success = now() - killed_at
    for key_id, secret in made.items():
        assert store.get(key_id, BackendRef(key_id), AES).secret == secret
    for blob, secret, context in wrapped:
        assert wrapper.unwrap(blob, context, wrapper.kek_id) == secret
    assert first_success is not None
    assert first_success <= budget + slack
    return first_success


def contract_no_active_node_is_unavailable_within_the_budget(
    store: VaultKvStore, urls: list[str], now: Callable[[], float], budget: float, slack: float
) -> BackendUnavailable:
    """With every node down (or sealed), an operation tries for the budget, no longer, and reports the backend
    unavailable, naming each node's state."""
    key_id, _ = new_key()
    started = now()
    with pytest.raises(BackendUnavailable) as caught:
        store.get(key_id, BackendRef(key_id), AES)
    took = now() - started
    assert budget <= took <= budget + slack
    assert caught.value.instance_code == "backend_unavailable"
    assert "no active node" in caught.value.detail
    assert all(url in caught.value.detail for url in urls)
    return caught.value


def contract_reads_after_writes_come_from_the_active_node(store: VaultKvStore, rounds: int = 15) -> None:
    """A store whose first address (or only address) is a standby: every read right after its write finds the key
    (a standby answering it from its own lagging copy would not)."""
    for _ in range(rounds):
        key_id, secret = new_key()
        ref = store.put(key_id, KeyMaterial(AES, secret))
        assert store.get(key_id, ref, AES).secret == secret


def contract_a_leader_that_stepped_down_is_left(
    store: VaultKvStore, step_down: Callable[[], object], sleep: Callable[[float], None], leader: Callable[[], str]
) -> None:
    """A leader that steps down stays reachable, as a standby whose reads lag: within ``CONFIRM_EVERY`` the session
    notices (the node's sys/health) and sends every request to the new active node."""
    contract_reads_after_writes_come_from_the_active_node(store, rounds=2)
    step_down()
    sleep(CONFIRM_EVERY + 0.2)
    contract_reads_after_writes_come_from_the_active_node(store, rounds=10)
    assert store._session._here == leader()


def contract_a_write_found_stored_is_that_write(
    store: VaultKvStore, stored_before: Callable[[str, dict[str, Any]], None]
) -> None:
    """What a write sent again after a lost answer finds: the same secret already at the path is success (the
    earlier try was stored), another secret there stays a conflict and is not overwritten."""
    key_id, secret = new_key()
    record = {"key_id": key_id, "algorithm": "AES", "key_length": 256, "curve_type": None}
    stored_before(key_id, {**record, "material": base64.b64encode(secret).decode()})
    assert store.put(key_id, KeyMaterial(AES, secret)) == BackendRef(key_id)
    assert store.get(key_id, BackendRef(key_id), AES).secret == secret
    with pytest.raises(Conflict) as refused:
        store.put(key_id, KeyMaterial(AES, os.urandom(32)))
    assert refused.value.instance_code == "key_exists"
    assert store.get(key_id, BackendRef(key_id), AES).secret == secret


# ---- the fake cluster --------------------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class FakeCluster(requests.adapters.BaseAdapter):
    """Three nodes (module docstring), as one requests transport; ``served`` logs which node answered what."""

    def __init__(self, time: FakeTime) -> None:
        super().__init__()
        self.time = time
        self.urls = [f"http://127.0.0.1:{8200 + 10 * n}" for n in range(3)]
        self.state = {url: "standby" for url in self.urls}
        self.state[self.urls[0]] = "active"
        self.leader: str | None = self.urls[0]  # what standbys believe (the dead one during an election)
        self.election_at: float | None = None
        self.data: dict[str, dict[str, Any]] = {}  # committed on the active node
        self.replica: dict[str, dict[str, Any]] = {}  # what standbys read from: never catches up in these tests
        self.served: list[tuple[str, str, str]] = []
        self.lose_next_write_answer: type[Exception] | None = None  # the error the client then sees

    # The cluster under test (ClusterUnderTest)
    def kill_leader(self) -> int:
        assert self.leader is not None
        assert self.state[self.leader] == "active"
        self.state[self.leader] = "down"
        self.election_at = self.time.now + ELECTION
        return self.urls.index(self.leader)

    def standbys(self) -> list[int]:
        return [i for i, url in enumerate(self.urls) if self.state[url] == "standby"]

    def step_down(self) -> None:
        """The leader becomes a standby (still up, reading its lagging copy); the next node takes over at once."""
        assert self.leader is not None
        old = self.leader
        self.state[old] = "standby"
        self.leader = next(
            url
            for url in self.urls[self.urls.index(old) + 1 :] + self.urls
            if self.state[url] == "standby" and url != old
        )
        self.state[self.leader] = "active"

    def _elect(self) -> None:
        if self.election_at is not None and self.time.now >= self.election_at:
            self.election_at = None
            candidates = [url for url in self.urls if self.state[url] == "standby"]
            if candidates:
                self.leader = candidates[0]
                self.state[candidates[0]] = "active"

    # The transport
    def close(self) -> None:
        pass

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        self.time.now += REQUEST_TIME
        self._elect()
        parts = urlsplit(request.url or "")
        node, path = f"{parts.scheme}://{parts.netloc}", parts.path
        state = self.state.get(node, "down")
        if state == "down":
            raise requests.ConnectionError(f"refused: {node}")
        if path == "/v1/sys/health":
            return self._answer(request, {"active": 200, "standby": 429, "sealed": 503}[state], {"standby": True})
        if state == "sealed":
            return self._answer(request, 503, {"errors": ["Vault is sealed"]})
        if path == "/v1/sys/leader":
            return self._answer(request, 200, {"is_self": state == "active", "leader_address": self.leader or ""})
        if state == "standby":
            if self.leader is None or self.state[self.leader] != "active":
                if self.election_at is not None and self.time.now < self.election_at - ELECTION / 2:
                    return self._answer(request, 307, None, {"Location": f"{self.leader}{path}"})
                return self._answer(
                    request, 500, {"errors": ["local node not active but active cluster node not found"]}
                )
            if request.method == "GET" and not path.startswith("/v1/auth/"):
                return self._serve(request, node, path, self.replica)  # a read from the standby's own copy
        return self._serve(request, node, path, self.data)

    def _serve(
        self, request: requests.PreparedRequest, node: str, path: str, data: dict[str, Any]
    ) -> requests.Response:
        method = request.method or "GET"
        self.served.append((node if data is self.data else f"standby {node}", method, path))
        if request.headers.get("X-Vault-Token") != "root":
            return self._answer(request, 403, {"errors": ["permission denied"]})
        body = json.loads(request.body) if isinstance(request.body, str | bytes) and request.body else {}
        if path == "/v1/auth/token/lookup-self":
            return self._answer(request, 200, {"data": {"ttl": 0, "renewable": False, "policies": ["root"]}})
        mount, _, rest = path.removeprefix("/v1/").partition("/")
        if mount == KV2:
            kind, _, rest = rest.partition("/")
            mount, method = f"{KV2}/{kind}", "DELETE" if kind == "metadata" else method
        name = f"{mount}/{rest}"
        if mount == TRANSIT:
            return self._transit(request, rest, body)
        if method == "GET":
            if name not in data:
                return self._answer(request, 404, {"errors": []})
            found = data[name]
            return self._answer(
                request,
                200,
                {"data": {"data": found, "metadata": {"deletion_time": ""}}}
                if mount.startswith(KV2)
                else {"data": found},
            )
        if method == "DELETE":
            data.pop(name.replace(f"{KV2}/metadata/", f"{KV2}/data/"), None)
            return self._answer(request, 204, None)
        if mount.startswith(KV2):
            if name in data and (body.get("options") or {}).get("cas") == 0:
                return self._answer(
                    request, 400, {"errors": ["check-and-set parameter did not match the current version"]}
                )
            data[name] = body["data"]
        else:
            data[name] = body
        lost, self.lose_next_write_answer = self.lose_next_write_answer, None
        if lost is not None:  # stored, but the answer never arrives whole (the leader died, a reset)
            raise lost("connection reset by peer")
        return self._answer(request, 204 if mount == KV1 else 200, None if mount == KV1 else {"data": {"version": 1}})

    def _transit(self, request: requests.PreparedRequest, rest: str, body: dict[str, Any]) -> requests.Response:
        action, _, _ = rest.partition("/")
        if action == "keys":
            return self._answer(request, 200 if request.method == "GET" else 204, {"data": {}})
        if action == "encrypt":
            sealed = base64.b64encode(json.dumps([body["plaintext"], body["associated_data"]]).encode()).decode()
            return self._answer(request, 200, {"data": {"ciphertext": f"vault:v1:{sealed}"}})
        plaintext, context = json.loads(base64.b64decode(body["ciphertext"].removeprefix("vault:v1:")))
        if context != body["associated_data"]:
            return self._answer(request, 400, {"errors": ["cipher: message authentication failed"]})
        return self._answer(request, 200, {"data": {"plaintext": plaintext}})

    @staticmethod
    def _answer(
        request: requests.PreparedRequest, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> requests.Response:
        response = requests.Response()
        response.status_code, response.request, response.url = status, request, request.url or ""
        response._content = b"" if body is None else json.dumps(body).encode()
        response.raw = io.BytesIO(response._content)
        response.headers = CaseInsensitiveDict({"Content-Type": "application/json", **(headers or {})})
        return response


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def fake(time: FakeTime) -> FakeCluster:
    return FakeCluster(time)


def _backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **connection: Any) -> tuple[Any, Any]:
    monkeypatch.setenv(TOKEN_ENV, "root")
    auth = {"method": "token", "token": {"env": TOKEN_ENV}}
    settings = load_settings(
        data_dir=tmp_path / "data",
        overrides={
            "backends": {
                "vault": {"type": "vault", "mount": KV2, "kv_version": 2, "auth": auth, **connection},
                "embedded": {"wrapper": {"type": "vault-transit", "auth": auth, **connection}},
            },
            "keys": {"default_backend": "vault"},
        },
    )
    return settings, settings.backends


@pytest.fixture
def open_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeCluster, time: FakeTime
) -> Iterator[Callable[..., tuple[VaultKvStore, TransitKeyWrapper]]]:
    """A KV v2 store and a Transit wrapper on the fake cluster, configured with ``connection`` (default: its three
    addresses)."""
    opened: list[Any] = []

    def make(kv_version: int = 2, **connection: Any) -> tuple[VaultKvStore, TransitKeyWrapper]:
        connection = connection or {"addresses": fake.urls}
        settings, backends = _backend(tmp_path, monkeypatch, **connection)
        config, wrapper_config = backends["vault"], backends["embedded"].wrapper
        assert isinstance(config, VaultBackendSettings)
        assert isinstance(wrapper_config, TransitWrapperSettings)

        def session(config: Any) -> VaultSession:
            clock = SystemClock()
            return VaultSession(
                settings.secrets, config, clock, sleep=time.sleep, monotonic=time.monotonic, transport=fake
            )

        mount = KV2 if kv_version == 2 else KV1
        store = VaultKvStore("vault", session(config), mount, kv_version, "")
        wrapper = TransitKeyWrapper(session(wrapper_config), TRANSIT, "kek")
        opened.extend((store, wrapper))
        return store, wrapper

    yield make
    for each in opened:
        each.close()


# ---- the contract on the fake ------------------------------------------------------------------------------------


def test_keys_made_before_and_during_a_leader_kill_are_all_there(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]], fake: FakeCluster, time: FakeTime
) -> None:
    store, wrapper = open_store()
    waited = contract_keys_survive_a_leader_kill(store, wrapper, fake, time.monotonic, budget=10.0, slack=0.0)
    assert ELECTION <= waited <= ELECTION + 1.0  # found within a backoff step of the election
    assert not [entry for entry in fake.served if entry[0].startswith("standby")]


def test_with_every_node_down_or_sealed_an_operation_gives_up_after_the_budget(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]], fake: FakeCluster, time: FakeTime
) -> None:
    store, _ = open_store(addresses=fake.urls, failover_seconds=3)
    for url in fake.urls:
        fake.state[url] = "down"
    down = contract_no_active_node_is_unavailable_within_the_budget(store, fake.urls, time.monotonic, 3.0, 0.6)
    assert "unreachable" in down.detail
    for url in fake.urls:
        fake.state[url] = "sealed"
    sealed = contract_no_active_node_is_unavailable_within_the_budget(store, fake.urls, time.monotonic, 3.0, 0.6)
    assert "sealed" in sealed.detail
    fake.state[fake.urls[1]] = "active"
    fake.leader = fake.urls[1]
    key_id, secret = new_key()
    store.put(key_id, KeyMaterial(AES, secret))  # back: no restart of the session needed
    assert store.get(key_id, BackendRef(key_id), AES).secret == secret


@pytest.mark.parametrize("given", ["standby first", "only a standby"])
def test_a_standby_given_as_an_address_sends_every_request_to_the_active_node(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]], fake: FakeCluster, given: str
) -> None:
    standby = fake.urls[1]
    addresses = [standby, fake.urls[0], fake.urls[2]] if given == "standby first" else [standby]
    store, _ = open_store(addresses=addresses)
    contract_reads_after_writes_come_from_the_active_node(store)
    assert {node for node, _, _ in fake.served} == {fake.urls[0]}


def test_a_leader_that_steps_down_is_left_for_the_new_one(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]], fake: FakeCluster, time: FakeTime
) -> None:
    store, _ = open_store()
    old = fake.urls[0]
    contract_a_leader_that_stepped_down_is_left(store, fake.step_down, time.sleep, lambda: str(fake.leader))
    assert not [entry for entry in fake.served if entry[0] == f"standby {old}"]


@pytest.mark.parametrize("kv_version", [1, 2])
def test_a_write_found_already_stored_is_success_and_anything_else_a_conflict(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]], fake: FakeCluster, kv_version: int
) -> None:
    store, _ = open_store(kv_version=kv_version)
    mount = f"{KV2}/data" if kv_version == 2 else KV1

    def stored_before(path: str, secret: dict[str, Any]) -> None:
        fake.data[f"{mount}/{path}"] = secret

    contract_a_write_found_stored_is_that_write(store, stored_before)


# ---- the fake only: what the real cluster cannot be made to do on cue ----------------------------------------------


@pytest.mark.parametrize("lost", [requests.ConnectionError, requests.exceptions.ChunkedEncodingError])
@pytest.mark.parametrize("kv_version", [1, 2])
def test_a_write_whose_answer_was_lost_is_sent_again_and_recognised(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]],
    fake: FakeCluster,
    kv_version: int,
    lost: type[Exception],
) -> None:
    """The real-cluster counterpart runs through a proxy that drops the answer or cuts it off (test_vault_raft.py):
    no answer at all, or half of its body."""
    store, _ = open_store(kv_version=kv_version)
    key_id, secret = new_key()
    fake.lose_next_write_answer = lost
    assert store.put(key_id, KeyMaterial(AES, secret)) == BackendRef(key_id)
    assert fake.lose_next_write_answer is None
    assert store.get(key_id, BackendRef(key_id), AES).secret == secret
    assert sum(1 for name in fake.data if key_id in name) == 1


def test_a_single_url_is_not_retried(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]], fake: FakeCluster, time: FakeTime
) -> None:
    """Without addresses, url keeps its meaning: one address, an outage reported at once."""
    store, _ = open_store(url=fake.urls[0])
    fake.kill_leader()
    started = time.now
    key_id, _ = new_key()
    with pytest.raises(BackendUnavailable) as caught:
        store.get(key_id, BackendRef(key_id), AES)
    assert time.now - started < 0.1  # no waiting, no backoff
    assert caught.value.detail == f"Vault at {fake.urls[0]} cannot be reached"


def test_readiness_needs_an_active_node_now(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]], fake: FakeCluster, time: FakeTime
) -> None:
    store, _ = open_store()
    store.check()
    fake.kill_leader()
    started = time.now
    with pytest.raises(BackendUnavailable) as electing:
        store.check()
    assert time.now - started < 0.1  # /readyz does not wait for the election
    assert "standby" in electing.value.detail
    time.sleep(ELECTION)
    store.check()


def test_no_token_in_reprs_or_messages(
    open_store: Callable[..., tuple[VaultKvStore, TransitKeyWrapper]], fake: FakeCluster
) -> None:
    store, wrapper = open_store(addresses=fake.urls, failover_seconds=1)
    for url in fake.urls:
        fake.state[url] = "down"
    with pytest.raises(BackendUnavailable) as caught:
        wrapper.wrap(b"\0" * 32, b"ctx")
    for text in (repr(store), repr(wrapper), repr(store._session), str(caught.value), repr(caught.value)):
        assert "root" not in text


# ---- the settings ------------------------------------------------------------------------------------------------

AUTH = {"method": "token", "token": {"env": TOKEN_ENV}}


def _vault(tmp_path: Path, **connection: Any) -> Any:
    settings = load_settings(
        data_dir=tmp_path / "data",
        overrides={
            "backends": {"vault": {"type": "vault", "auth": AUTH, **connection}},
            "keys": {"default_backend": "vault"},
        },
    )
    return settings.backends["vault"]


@pytest.mark.parametrize(
    ("connection", "message"),
    [
        ({}, "give url (one Vault/OpenBao address) or addresses (the nodes of one cluster)"),
        ({"addresses": []}, "addresses must list at least one node (or leave it out and give url)"),
        (
            {"addresses": ["https://a.example:8200", "http://b.example:8200"]},
            "addresses: Value error, plain http is only allowed to a loopback address; use https",
        ),
        (
            {"addresses": ["https://a.example:8200", "https://a.example:8200/"]},
            "addresses lists https://a.example:8200 twice",
        ),
        (
            {"url": "https://c.example:8200", "addresses": ["https://a.example:8200"]},
            "url must be one of addresses (or leave it out: the first address is tried first)",
        ),
        (
            {"addresses": ["https://a.example:8200"], "failover_seconds": 0},
            "failover_seconds: Input should be greater than 0",
        ),
        (
            {"addresses": ["https://a.example:8200"], "failover_seconds": 121},
            "failover_seconds: Input should be less than or equal to 120",
        ),
    ],
)
def test_cluster_settings_that_are_refused(tmp_path: Path, connection: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        _vault(tmp_path, **connection)
    assert message in str(refused.value)


def test_cluster_settings_that_are_accepted(tmp_path: Path) -> None:
    single = _vault(tmp_path, url="https://vault.example:8200/")
    assert (single.url, single.addresses, single.nodes, single.failover_seconds) == (
        "https://vault.example:8200",
        None,
        None,
        10.0,
    )
    nodes = ["https://a.example:8200/", "http://127.0.0.1:8200", "https://c.example:8200"]
    cluster = _vault(tmp_path, addresses=nodes)
    assert cluster.url == "https://a.example:8200"
    assert cluster.nodes == ("https://a.example:8200", "http://127.0.0.1:8200", "https://c.example:8200")
    second_first = _vault(tmp_path, url="http://127.0.0.1:8200", addresses=nodes, failover_seconds=2.5)
    assert second_first.nodes == ("http://127.0.0.1:8200", "https://a.example:8200", "https://c.example:8200")
    assert second_first.failover_seconds == 2.5
