"""The highly available topology of ``scripts/cluster.sh`` (PostgreSQL, three OpenBao raft nodes, two replicas,
nginx in front), started by the script itself, and its failures under load: a replica killed with SIGKILL,
PostgreSQL stopped for 5 s, the OpenBao raft leader killed. Workloads are keybroker_client with its default retries,
through the load balancer, and a workload written only from PROTOCOL.md."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keybroker_client import Client, KeybrokerClientError
from keybroker_client.evidence import SimulatedEvidence
from tests.integration.independent_client import fetch_key
from tests.integration.replicas import MRENCLAVE

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "cluster.sh"


@dataclass
class Cluster:
    dir: Path
    state: dict[str, Any]
    keys: dict[str, bytes] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", str(SCRIPT), "--dir", str(self.dir), *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    @property
    def lb(self) -> str:
        return str(self.state["lb_url"])

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def token(self) -> str:
        return (self.dir / "admin-token").read_text().strip()

    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def replica(self, name: str) -> str:
        return f"https://127.0.0.1:{self.state['ports'][name]}"

    def http(self, url: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=url or self.lb, verify=self.verify(), timeout=60, headers={"Authorization": f"Bearer {self.token}"}
        )

    def evidence(self) -> SimulatedEvidence:
        return SimulatedEvidence(self.dir / "sim", "sgx", mrenclave=MRENCLAVE)

    def reload(self) -> None:
        self.state = json.loads((self.dir / "cluster.json").read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Not under pytest's root-only temporary directory: the postgres user must reach the cluster's directory.
    directory = Path(f"/tmp/keybroker-ha-test-{os.getpid()}")
    started = subprocess.run(
        ["bash", str(SCRIPT), "--dir", str(directory), "up"], capture_output=True, text=True, timeout=600, check=False
    )
    cluster = Cluster(directory, {})
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "keybroker HA cluster up" in started.stdout
        cluster.reload()
        attributes = {"mrenclave": [MRENCLAVE.hex()]}
        policy = {"attestation_type": "SGX", "allow_simulated": True, "sgx": {"attributes": attributes}}
        with cluster.http() as http:
            made = http.post("/kbs/v1/key-transfer-policies", json=policy)
            assert made.status_code == 201, made.text
            for n in range(12):
                material = os.urandom(32)
                info = {"algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(material).decode()}
                body = {"key_information": info, "label": f"ha-{n}", "transfer_policy_id": made.json()["id"]}
                created = http.post("/kbs/v1/keys", json=body)
                assert created.status_code == 201, created.text
                assert created.json()["backend"] == "vault"  # in OpenBao KV, on the raft cluster
                cluster.keys[created.json()["id"]] = material
        yield cluster
    finally:
        cluster.run("down", check=False)


@dataclass
class Outcome:
    started: float
    seconds: float
    error: str | None


class Load:
    """``threads`` workloads fetching random keys through the load balancer until stopped."""

    def __init__(self, cluster: Cluster, threads: int = 4) -> None:
        self.cluster = cluster
        self.outcomes: list[Outcome] = []
        self.wrong = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]

    def _work(self) -> None:
        rng = random.Random()
        with Client(self.cluster.lb, ca=self.cluster.ca) as client:
            while not self._stop.is_set():
                key_id = rng.choice(list(self.cluster.keys))
                began = time.monotonic()
                error = None
                try:
                    if client.fetch_key(key_id, self.cluster.evidence()).key != self.cluster.keys[key_id]:
                        self.wrong += 1
                except KeybrokerClientError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                self.outcomes.append(Outcome(began, time.monotonic() - began, error))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def failures(self) -> list[str]:
        return [o.error for o in self.outcomes if o.error is not None]


def _slowest(load: Load) -> float:
    return max(o.seconds for o in load.outcomes)


def _audit_verify(cluster: Cluster) -> None:
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "keybroker"), "audit", "verify", "--addr", cluster.lb, "--token", cluster.token,
         "--cacert", str(cluster.ca)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit chain intact" in done.stderr


def _every_key_transfers(cluster: Cluster, url: str | None = None) -> None:
    with Client(url or cluster.lb, ca=cluster.ca) as client:
        for key_id, material in cluster.keys.items():
            assert client.fetch_key(key_id, cluster.evidence()).key == material


def test_an_independent_workload_through_the_load_balancer_and_a_nonce_across_replicas(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.lb, verify=cluster.verify(), timeout=60) as http:
        for key_id, material in list(cluster.keys.items())[:3]:
            assert fetch_key(http, key_id, "sgx", cluster.evidence().quote) == material
    key_id = next(iter(cluster.keys))
    with httpx.Client(base_url=cluster.replica("kb-1"), verify=cluster.verify(), timeout=60) as one:
        nonce = one.post(f"/kbs/v1/keys/{key_id}/transfer", json={}).json()

    # The quote for that nonce, made once and presented 16 times at both replicas at once.
    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    user_data = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    report = hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + user_data).digest()
    body = {
        "quote": base64.b64encode(cluster.evidence().quote(report)).decode(),
        "nonce": nonce,
        "user_data": base64.b64encode(user_data).decode(),
    }
    barrier = threading.Barrier(16)

    def use(n: int) -> tuple[int, str]:
        with httpx.Client(base_url=cluster.replica(("kb-1", "kb-2")[n % 2]), verify=cluster.verify(), timeout=60) as h:
            barrier.wait()
            answer = h.post(f"/kbs/v1/keys/{key_id}/transfer", json=body, headers={"Attestation-Type": "SGX"})
            return answer.status_code, answer.json().get("code", "")

    with ThreadPoolExecutor(16) as pool:
        answers = sorted(pool.map(use, range(16)))
    assert answers[0][0] == 200
    assert answers[1:] == [(409, "nonce_replayed")] * 15


def test_a_replica_killed_under_load_costs_retries_not_failures(cluster: Cluster) -> None:
    with Load(cluster) as load:
        time.sleep(3)
        cluster.run("kill", "kb-1")
        killed_at = time.monotonic()
        time.sleep(5)
        cluster.run("start", "kb-1")  # the same data directory and port: it serves again
        time.sleep(3)
    during = [o for o in load.outcomes if killed_at <= o.started <= killed_at + 5]
    print(f"kill -9: {len(load.outcomes)} transfers, {len(during)} while dead, slowest {_slowest(load):.2f} s")
    assert load.failures() == []
    assert load.wrong == 0
    assert len(during) > 10  # transfers went on while kb-1 was dead
    assert len(load.outcomes) > 40
    _every_key_transfers(cluster, cluster.replica("kb-1"))
    _audit_verify(cluster)


def test_postgres_stopped_for_5_s_gives_only_503_and_both_replicas_recover_unrestarted(cluster: Cluster) -> None:
    statuses: list[tuple[int, str, float]] = []
    stop = threading.Event()
    key_id = next(iter(cluster.keys))

    def probe() -> None:  # raw requests (no client retries) to see every answer the replicas give meanwhile
        with httpx.Client(base_url=cluster.lb, verify=cluster.verify(), timeout=30) as http:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    answer = http.post(f"/kbs/v1/keys/{key_id}/transfer", json={})
                    code = answer.json().get("code", "") if answer.status_code != 200 else ""
                    statuses.append((answer.status_code, code, time.monotonic() - began))
                    if answer.status_code == 200:
                        nonce = answer.json()
                        used = http.post(
                            f"/kbs/v1/keys/{key_id}/transfer",
                            json={"quote": "AAAA", "nonce": nonce, "user_data": "AAAA"},
                            headers={"Attestation-Type": "SGX"},
                        )
                        code = used.json().get("code", "")
                        statuses.append((used.status_code, code, time.monotonic() - began))
                except httpx.HTTPError as exc:
                    statuses.append((0, type(exc).__name__, time.monotonic() - began))
                time.sleep(0.05)

    pg = Path(cluster.dir)
    with Load(cluster, threads=2) as load:
        probes = [threading.Thread(target=probe) for _ in range(2)]
        for thread in probes:
            thread.start()
        time.sleep(1)
        mark = len(statuses)
        cluster.run("stop", "pg")
        time.sleep(5)
        during = statuses[mark:]
        cluster.run("start", "pg")
        time.sleep(4)
        stop.set()
        for thread in probes:
            thread.join()
    assert pg.exists()
    outage = {(status, code) for status, code, _ in during}
    print(f"postgres down 5 s: answers {sorted(outage)}, slowest {max(t for *_, t in during):.2f} s")
    assert outage, "no request was answered while PostgreSQL was down"
    assert {status for status, _ in outage} <= {200, 400, 503}, outage  # 400: the probe's quote is not a quote
    assert (503, "database_unavailable") in outage
    assert max(seconds for _, _, seconds in during) < 10
    assert load.wrong == 0
    _every_key_transfers(cluster, cluster.replica("kb-1"))
    _every_key_transfers(cluster, cluster.replica("kb-2"))
    with cluster.http() as http:
        for name in ("kb-1", "kb-2"):
            assert http.get(f"{cluster.replica(name)}/readyz").status_code == 200


def test_the_openbao_leader_killed_under_load_transfers_resume_and_no_key_is_lost(cluster: Cluster) -> None:
    leader = next(
        f"bao-{n}"
        for n in (1, 2, 3)
        if httpx.get(f"http://127.0.0.1:{cluster.state['ports'][f'bao-{n}']}/v1/sys/health").status_code == 200
    )
    with Load(cluster) as load:
        time.sleep(2)
        cluster.run("kill", leader)
        killed_at = time.monotonic()
        time.sleep(8)
    assert load.wrong == 0
    assert load.failures() == []
    after = sorted(o.started + o.seconds for o in load.outcomes if o.started + o.seconds > killed_at)
    assert after, "no transfer finished after the leader was killed"
    print(
        f"openbao leader killed: first transfer done {after[0] - killed_at:.2f} s after, slowest {_slowest(load):.2f} s"
    )
    assert after[0] - killed_at < 15  # resumed within seconds
    _every_key_transfers(cluster)
    cluster.run("start", leader)  # back as a standby, unsealed
    status = cluster.run("status")
    assert "sealed" not in status.stdout
    assert status.stdout.count("standby") == 2
