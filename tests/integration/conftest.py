"""Real server processes: ``keybroker init`` + ``keybroker serve`` on a free loopback port, stopped afterwards."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.peers.process import free_port, stop_process, wait_until


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    env.update(extra)
    return env


def wait_until_serving(
    url: str, process: subprocess.Popen[bytes], log: Path, verify: ssl.SSLContext | bool = True, timeout: float = 60.0
) -> None:
    wait_until(
        lambda: httpx.get(f"{url}/healthz", timeout=1.0, verify=verify).status_code == 200,
        process,
        log,
        "server",
        timeout,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout=15)


@dataclass
class Server:
    url: str
    token: str
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca.pem"

    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120.0, verify=self.verify()
        )


def start_server(data_dir: Path, *serve_args: str, toml: str | None = None, **env: str) -> Server:
    """``keybroker init`` then ``serve`` on a free port; ``env`` adds KEYBROKER_* settings (plain HTTP with
    ``KEYBROKER_TLS__ENABLED="false"``), ``toml`` is written to ``DATA_DIR/keybroker.toml`` before ``init``, and
    ``serve_args`` go to ``serve`` (e.g. ``--workers 2``)."""
    if toml is not None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (data_dir / "keybroker.toml").write_text(toml)
    subprocess.run(
        [sys.executable, "-m", "keybroker", "init", "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        env=clean_env(),
    )
    port = free_port()
    log = data_dir.parent / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keybroker",
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                f"127.0.0.1:{port}",
                *serve_args,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(**env),
        )
    tls = env.get("KEYBROKER_TLS__ENABLED", "true") != "false" and "enabled = false" not in (toml or "")
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, log, ssl.create_default_context(cafile=str(data_dir / "ca.pem")))
    except Exception:
        stop(process)
        raise
    token = (data_dir / "admin-token").read_text().strip()
    return Server(url, token, data_dir, log, process)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path / ".data")
    try:
        yield running
    finally:
        stop(running.process)
