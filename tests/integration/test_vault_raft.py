"""The Vault/OpenBao KV store and the Transit wrapper configured with the three addresses of a real OpenBao raft
cluster (tests/peers/openbao_raft.py, one per module). They run the failover contract of
tests/unit/test_vault_failover.py (there against a fake cluster): the leader is SIGKILLed while keys are made,
and while worker threads make and read keys, with nothing lost, nothing failing, and no operation blocked longer
than the failover budget. Also covered: every node down, unavailable within the budget; a standby given first (or
as the only address) sends reads to the active node, where a standby's own copy would have missed them; a write
whose answer a proxy drops is sent again and recognised, not reported as a conflict."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from keybroker.backends.transit import TransitKeyWrapper
from keybroker.backends.vault.store import VaultKvStore
from keybroker.clock import SystemClock
from keybroker.config import EmbeddedBackendSettings, TransitWrapperSettings, VaultBackendSettings, load_settings
from keybroker.ids import BackendRef, KeyId
from keybroker.keys.models import KeyMaterial
from tests.peers.openbao_raft import RaftBao
from tests.unit import test_vault_failover as contract
from tests.unit.test_vault_failover import AES, KV1, KV2, new_key

TOKEN_ENV = "KB_TEST_RAFT_TOKEN"
BUDGET = 10.0
# A request under way when the budget ends, and this machine's scheduling (2 cores, other peers running).
SLACK = 1.5
Opened = tuple[VaultKvStore, TransitKeyWrapper]
T = TypeVar("T")


@pytest.fixture(scope="module")
def raft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RaftBao]:
    cluster = RaftBao(tmp_path_factory.mktemp("raft"))
    try:
        root = cluster.client()
        root.sys.enable_secrets_engine(backend_type="kv", path=KV1, options={"version": "1"})
        root.sys.enable_secrets_engine(backend_type="kv", path=KV2, options={"version": "2"})
        root.sys.enable_secrets_engine(backend_type="transit", path="transit")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(raft: RaftBao) -> RaftBao:
    """Every node running, unsealed and joined, a leader elected (a test before may have killed some)."""
    raft.heal()
    return raft


@pytest.fixture
def open_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raft: RaftBao) -> Iterator[Callable[..., Opened]]:
    """The KV store and the Transit wrapper built from settings as the registry builds them; ``connection``
    defaults to the cluster's three addresses."""
    monkeypatch.setenv(TOKEN_ENV, raft.root_token)
    opened: list[Any] = []

    def make(kv_version: int = 2, **connection: Any) -> Opened:
        connection = connection or {"addresses": raft.urls}
        auth = {"method": "token", "token": {"env": TOKEN_ENV}}
        mount = KV2 if kv_version == 2 else KV1
        settings = load_settings(
            data_dir=tmp_path / "data",
            overrides={
                "backends": {
                    "vault": {"type": "vault", "mount": mount, "kv_version": kv_version, "auth": auth, **connection},
                    "embedded": {"wrapper": {"type": "vault-transit", "key_name": "kek", "auth": auth, **connection}},
                },
                "keys": {"default_backend": "vault"},
            },
        )
        config, embedded = settings.backends["vault"], settings.backends["embedded"]
        assert isinstance(embedded, EmbeddedBackendSettings)
        wrapper_config = embedded.wrapper
        assert isinstance(config, VaultBackendSettings)
        assert isinstance(wrapper_config, TransitWrapperSettings)
        store = VaultKvStore.from_settings("vault", settings.secrets, config, SystemClock())
        wrapper = TransitKeyWrapper.from_settings(settings.secrets, wrapper_config, SystemClock())
        opened.extend((store, wrapper))
        wrapper.prepare()
        return store, wrapper

    yield make
    for each in opened:
        each.close()


class Load:
    """Worker threads that make a key, read it back and wrap it, over and over, until stopped."""

    def __init__(self, store: VaultKvStore, wrapper: TransitKeyWrapper, threads: int = 4) -> None:
        self.store, self.wrapper = store, wrapper
        self.made: dict[KeyId, bytes] = {}
        self.errors: list[BaseException] = []
        self.longest = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                self._one(*new_key())
            except BaseException as exc:  # recorded, and the test fails on it
                with self._lock:
                    self.errors.append(exc)
                return

    def _one(self, key_id: KeyId, secret: bytes) -> None:
        self._timed(lambda: self.store.put(key_id, KeyMaterial(AES, secret)))
        read = self._timed(lambda: self.store.get(key_id, BackendRef(key_id), AES))
        assert read.secret == secret, "read back other bytes than were written"
        wrapped = self._timed(lambda: self.wrapper.wrap(secret, b"ctx"))
        assert self._timed(lambda: self.wrapper.unwrap(wrapped, b"ctx", self.wrapper.kek_id)) == secret
        with self._lock:
            self.made[key_id] = secret

    def _timed(self, operation: Callable[[], T]) -> T:
        started = time.monotonic()
        result = operation()
        with self._lock:
            self.longest = max(self.longest, time.monotonic() - started)
        return result

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * BUDGET + SLACK)


def test_a_leader_killed_under_load_loses_nothing_and_blocks_within_the_budget(
    cluster: RaftBao, open_backends: Callable[..., Opened]
) -> None:
    store, wrapper = open_backends()
    load_store, load_wrapper = open_backends()  # the worker threads' own sessions, as another replica's
    load = Load(load_store, load_wrapper)
    try:
        time.sleep(0.5)  # under way before the kill
        waited = contract.contract_keys_survive_a_leader_kill(store, wrapper, cluster, time.monotonic, BUDGET, SLACK)
        time.sleep(0.5)  # and after it
    finally:
        load.stop()
    print(f"leader kill -> first success {waited:.2f} s; longest operation under load {load.longest:.2f} s")
    assert load.errors == []
    assert load.longest <= BUDGET + SLACK
    assert len(load.made) > 10
    for key_id, secret in load.made.items():
        assert store.get(key_id, BackendRef(key_id), AES).secret == secret


@pytest.mark.parametrize("given", ["standby first", "only a standby"])
@pytest.mark.parametrize("kv_version", [1, 2])
def test_a_standby_given_as_an_address_reads_from_the_active_node(
    cluster: RaftBao, open_backends: Callable[..., Opened], given: str, kv_version: int
) -> None:
    standby = cluster.urls[cluster.standbys()[0]]
    addresses = [standby, *(url for url in cluster.urls if url != standby)] if given == "standby first" else [standby]
    store, _ = open_backends(kv_version, addresses=addresses)
    contract.contract_reads_after_writes_come_from_the_active_node(store)
    assert store._session._here == cluster.urls[cluster.leader()]


def test_a_leader_that_steps_down_is_left_for_the_new_one(
    cluster: RaftBao, open_backends: Callable[..., Opened]
) -> None:
    store, _ = open_backends()
    contract.contract_a_leader_that_stepped_down_is_left(
        store, cluster.step_down, time.sleep, lambda: cluster.urls[cluster.leader()]
    )


@pytest.mark.parametrize("kv_version", [1, 2])
def test_a_write_found_already_stored_is_success_and_anything_else_a_conflict(
    cluster: RaftBao, open_backends: Callable[..., Opened], kv_version: int
) -> None:
    store, _ = open_backends(kv_version)
    root = cluster.client()

    def stored_before(path: str, secret: dict[str, Any]) -> None:
        if kv_version == 2:
            root.secrets.kv.v2.create_or_update_secret(path, secret, cas=0, mount_point=KV2)
        else:
            root.secrets.kv.v1.create_or_update_secret(path, secret, mount_point=KV1)

    contract.contract_a_write_found_stored_is_that_write(store, stored_before)


class AnswerDropper(http.server.ThreadingHTTPServer):
    """A proxy in front of one node that forwards every request and loses the answer to the first write whose path
    contains ``drop``: the node stores it, the client sees the connection close before the answer (``half``: after
    its headers and half of its body)."""

    def __init__(self, upstream: str, drop: str, half: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.drop, self.half, self.dropped = upstream, drop, half, 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Forward(http.server.BaseHTTPRequestHandler):
    server: AnswerDropper

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "content-length", "connection"}}
        url = self.server.upstream + self.path
        answer = requests.request(self.command, url, data=body, headers=headers, timeout=10, allow_redirects=False)
        content = answer.content or b"{}" * 8  # a 204 has no body to cut in half: claim one
        lose = self.command in {"POST", "PUT"} and self.server.drop in self.path and not self.server.dropped
        if lose:
            self.server.dropped += 1
            self.close_connection = True
            if not self.server.half:
                return  # stored upstream; no answer
        self.send_response(answer.status_code if not lose else 200)
        for name, value in answer.headers.items():
            if name.lower() not in {"content-length", "transfer-encoding", "connection", "content-encoding"}:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content) if lose else len(answer.content)))
        self.end_headers()
        self.wfile.write(content[: len(content) // 2] if lose else answer.content)

    do_GET = do_POST = do_PUT = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("half", [False, True], ids=["no answer", "half an answer"])
@pytest.mark.parametrize("kv_version", [1, 2])
def test_a_write_whose_answer_was_lost_is_sent_again_and_recognised(
    cluster: RaftBao, open_backends: Callable[..., Opened], kv_version: int, half: bool
) -> None:
    key_id, secret = new_key()
    proxy = AnswerDropper(cluster.urls[cluster.leader()], key_id, half)
    try:
        store, _ = open_backends(kv_version, addresses=[proxy.url, *cluster.urls])
        assert store.put(key_id, KeyMaterial(AES, secret)) == BackendRef(key_id)
        assert proxy.dropped == 1
        assert store.get(key_id, BackendRef(key_id), AES).secret == secret
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_with_every_node_down_an_operation_is_unavailable_within_the_budget(
    cluster: RaftBao, open_backends: Callable[..., Opened]
) -> None:
    budget = 2.0
    store, _ = open_backends(addresses=cluster.urls, failover_seconds=budget)
    key_id, secret = new_key()
    store.put(key_id, KeyMaterial(AES, secret))
    for node in cluster.nodes:
        node.kill()
    down = contract.contract_no_active_node_is_unavailable_within_the_budget(
        store, cluster.urls, time.monotonic, budget, SLACK
    )
    assert "unreachable" in down.detail
    cluster.heal()
    assert store.get(key_id, BackendRef(key_id), AES).secret == secret  # the same session, once a leader is back
