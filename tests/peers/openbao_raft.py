"""A 3-node OpenBao raft cluster on 127.0.0.1 (the ``bao`` binary of ``tests.peers.openbao``), for failover tests.

Each node has an API port and a cluster port (free loopback ports) and its data directory under ``workdir``.
Bring-up: node 0 is initialised (one key share, threshold 1) and unsealed; autopilot is told to promote joined
nodes after 1 s instead of 10 s; nodes 1 and 2 join node 0 through ``sys/storage/raft/join`` and are unsealed once
they report themselves initialised (unsealing earlier fails with "Vault is not initialized", the recipe's
pitfall); then the cluster is usable once all three are voters. ``performance_multiplier = 1`` keeps elections
short (a SIGKILLed leader is replaced in ~2-4 s).

Nodes come back **sealed** after a restart: ``restart`` unseals them again. ``stop`` sends SIGTERM to every node
it started and SIGKILL to any still running after the wait, so no process outlives the fixture.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hvac

from tests.peers.openbao import bao_binary
from tests.peers.process import free_port, stop_process, wait_until

NODES = 3
# Health statuses (sys/health): 200 active, 429 standby, 501 not initialised, 503 sealed.
ACTIVE, STANDBY = 200, 429


@dataclass
class Node:
    index: int
    api_port: int
    cluster_port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def config(self) -> str:
        return f"""
storage "raft" {{
  path = "{self.workdir / "data"}"
  node_id = "n{self.index}"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{self.api_port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_disable = true
}}
api_addr = "{self.url}"
cluster_addr = "https://127.0.0.1:{self.cluster_port}"
ui = false
"""

    def start(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "bao.hcl").write_text(self.config())
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [bao_binary(), "server", f"-config={self.workdir / 'bao.hcl'}"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(lambda: self.health() in {ACTIVE, STANDBY, 501, 503}, self._process(), self.log, "bao", 30)

    def _process(self) -> subprocess.Popen[bytes]:
        assert self.process is not None, f"node {self.index} is not running"
        return self.process

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self) -> int:
        """sys/health's status (0: no answer)."""
        try:
            return httpx.get(f"{self.url}/v1/sys/health", timeout=1.0).status_code
        except httpx.HTTPError:
            return 0

    def initialized(self) -> bool:
        try:
            return bool(httpx.get(f"{self.url}/v1/sys/seal-status", timeout=1.0).json().get("initialized"))
        except (httpx.HTTPError, ValueError):
            return False

    def kill(self) -> None:
        """SIGKILL: no step-down, no clean raft shutdown (a crash)."""
        process = self._process()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)


class RaftBao:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes = [Node(i, free_port(), free_port(), workdir / f"n{i}") for i in range(NODES)]
        self.root_token = ""
        self.unseal_key = ""
        try:
            self._bring_up()
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def _bring_up(self) -> None:
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        init = hvac.Client(url=first.url).sys.initialize(secret_shares=1, secret_threshold=1)
        self.root_token, self.unseal_key = init["root_token"], init["keys_base64"][0]
        (self.workdir / "init.json").write_text(json.dumps(init))
        (self.workdir / "init.json").chmod(0o600)
        self._unseal(first)
        self._wait(lambda: first.health() == ACTIVE, first, "the first node to become active")
        self.client(first.index).write_data(
            "sys/storage/raft/autopilot/configuration", data={"server_stabilization_time": "1s"}
        )
        for node in self.nodes[1:]:
            self._join(node)
        self._wait(lambda: self.voters() == NODES, first, f"{NODES} voters")

    def _join(self, node: Node) -> None:
        client = hvac.Client(url=node.url)
        deadline = time.monotonic() + 30
        while True:  # the leader's raft layer may not take joins for a moment after it became active
            try:
                if client.sys.join_raft_cluster(leader_api_addr=self.nodes[0].url)["joined"]:
                    break
            except (hvac.exceptions.VaultError, httpx.HTTPError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.index} did not join:\n{node.log.read_text()}")
            time.sleep(0.1)
        self._wait(node.initialized, node, "the joined node to report itself initialised")
        self._unseal(node)
        self._wait(lambda: node.health() in {ACTIVE, STANDBY}, node, "the joined node to be unsealed")

    def _unseal(self, node: Node) -> None:
        hvac.Client(url=node.url).sys.submit_unseal_key(self.unseal_key)

    @staticmethod
    def _wait(ready: Any, node: Node, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{node.log.read_text()}")
            time.sleep(0.05)

    def client(self, index: int | None = None) -> hvac.Client:
        """A root client on node ``index`` (default: the active node)."""
        node = self.nodes[self.leader() if index is None else index]
        return hvac.Client(url=node.url, token=self.root_token, timeout=10)

    def leader(self, timeout: float = 30.0) -> int:
        """The index of the active node, waiting for one (an election may be under way)."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.running() and node.health() == ACTIVE:
                    return node.index
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster has no active node")
            time.sleep(0.05)

    def voters(self) -> int:
        try:
            config = self.client(0).read("sys/storage/raft/configuration")
        except (hvac.exceptions.VaultError, httpx.HTTPError, OSError):
            return 0
        return sum(1 for server in config["data"]["config"]["servers"] if server["voter"])

    def standbys(self) -> list[int]:
        return [node.index for node in self.nodes if node.running() and node.health() == STANDBY]

    def kill_leader(self) -> int:
        """SIGKILL the active node; its index."""
        index = self.leader()
        self.nodes[index].kill()
        return index

    def step_down(self) -> int:
        """The active node steps down (``sys/step-down``) and stays up, as a standby; its index."""
        index = self.leader()
        self.client(index).sys.step_down()
        return index

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Start a stopped or killed node again and unseal it: it rejoins as a standby (or wins an election)."""
        node = self.nodes[index]
        if node.running():
            node.stop()
        node.start()
        self._unseal(node)
        self._wait(lambda: node.health() in {ACTIVE, STANDBY}, node, "the restarted node to be unsealed")

    def heal(self) -> None:
        """Every node running and unsealed again, and a leader elected."""
        for node in self.nodes:
            if not node.running():
                self.restart(node.index)
        self.leader()

    def stop(self) -> None:
        for node in self.nodes:
            if node.running():
                assert node.process is not None
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()  # waits for the SIGTERM above, SIGKILL after 10 s
