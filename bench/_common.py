"""Helpers shared by the benchmarks (run them as scripts: ``python bench/NAME.py``)."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json as _json
import math
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx


def percentile(ordered: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)], 2)


def is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def healthy(addr: str, ca_file: str) -> bool:
    try:
        verify = ssl.create_default_context(cafile=ca_file)
        return httpx.get(f"{addr}/healthz", timeout=1.0, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds of a process (all its threads) and of its live child processes (the server's
    workers with --workers), from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # the process itself, or a child (ppid)
            user += int(fields[11]) / tick  # fields 14 and 15 of proc(5)
            system += int(fields[12]) / tick
    return user, system


def table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned text table: ``columns`` are (row key, heading); floats with two decimals."""

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [[label for _, label in columns]] + [[fmt(row[key]) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


class LeanResponse:
    """What the load loops read of a response (the subset of ``httpx.Response`` they use)."""

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return _json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise ValueError(f"HTTP {self.status_code}: {self.text[:200]}")


class LeanClient:
    """A keep-alive HTTP/1.1 client on ``http.client`` for load loops: the same requests as ``httpx.Client``
    (TLS verified against the same context) for a fraction of its CPU, so that the load generator sharing the
    machine takes less from the server. One per thread; reconnects once if the server closed the connection."""

    def __init__(self, base_url: str, verify: ssl.SSLContext | bool, timeout: float) -> None:
        parts = urllib.parse.urlsplit(base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port
        if parts.scheme == "https":
            context = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()
            self._connect: Callable[[], http.client.HTTPConnection] = lambda: http.client.HTTPSConnection(
                host, port, timeout=timeout, context=context
            )
        else:
            self._connect = lambda: http.client.HTTPConnection(host, port, timeout=timeout)
        self._connection = self._connect()

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> LeanResponse:
        for attempt in (1, 2):
            try:
                self._connection.request(method, path, body=body, headers=headers)
                response = self._connection.getresponse()
                return LeanResponse(response.status, response.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._connection.close()
                self._connection = self._connect()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def post(
        self, path: str, json: Any = None, content: bytes | None = None, headers: dict[str, str] | None = None
    ) -> LeanResponse:
        sent = dict(headers or {})
        if json is not None:
            content = _json.dumps(json).encode()
            sent.setdefault("Content-Type", "application/json")
        return self.request("POST", path, content or b"", sent)

    def get(self, path: str) -> LeanResponse:
        return self.request("GET", path, None, {})

    def close(self) -> None:
        self._connection.close()


class SetupError(Exception):
    """The benchmark cannot run (bad arguments, server not starting, a setup request refused)."""


@contextlib.contextmanager
def own_server(
    tmp: Path, env: dict[str, str] | None = None, workers: int = 1, startup_timeout: float = 30.0
) -> Iterator[tuple[str, str, int, str]]:
    """``keybroker init`` a data directory in ``tmp`` and serve it over HTTPS (the service CA) with ``env`` added
    to the environment; yields (addr, admin token, server pid, CA file); stopped (terminate, wait) on the way out."""
    data_dir, log_path = tmp / "data", tmp / "server.log"
    command = [sys.executable, "-m", "keybroker"]
    init = subprocess.run(
        [*command, "init", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60, check=False
    )
    if init.returncode != 0:
        raise SetupError(f"keybroker init failed: {init.stderr.strip()}")
    token = (data_dir / "admin-token").read_text().strip()
    port = free_port()
    addr = f"https://127.0.0.1:{port}"
    ca_file = str(data_dir / "ca.pem")
    serve = [*command, "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", "--workers", str(workers)]
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            serve, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while not healthy(addr, ca_file):
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise SetupError(f"the server did not become healthy on {addr}:\n{tail}")
                time.sleep(0.1)
            yield addr, token, server.pid, ca_file
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
