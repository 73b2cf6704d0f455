"""Helpers shared by the benchmarks (run them as scripts: ``python bench/NAME.py``)."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json as _json
import math
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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


def cpu_times(pid: int | Sequence[int]) -> tuple[float, float]:
    """(utime, stime) in seconds of processes (all their threads) and of their live child processes (the server's
    workers with --workers; PostgreSQL's backends; nginx's workers), from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    roots = {str(pid)} if isinstance(pid, int) else {str(p) for p in pid}
    user = system = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if stat.parent.name in roots or fields[1] in roots:  # the process itself, or a child (ppid)
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
    """``keybroker init`` a data directory in ``tmp`` and serve it over HTTPS (the service CA), both with ``env``
    added to the environment; yields (addr, admin token, server pid, CA file); stopped (terminate, wait) on the way
    out."""
    data_dir, log_path = tmp / "data", tmp / "server.log"
    command = [sys.executable, "-m", "keybroker"]
    environment = {**os.environ, **(env or {})}
    init = subprocess.run(
        [*command, "init", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
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
            serve, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment
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


# --- measurement helpers (as bench/keys.py) ---------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal of /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --- single-threaded reference loops ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Loop:
    name: str
    calls: int
    seconds: float

    @property
    def us_per_call(self) -> float:
        return self.seconds * 1e6 / self.calls

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls": self.calls,
            "seconds": round(self.seconds, 3),
            "us_per_call": round(self.us_per_call, 1),
            "per_second": round(self.calls / self.seconds, 1),
        }


def timed_loop(name: str, call: Callable[[], object], duration: float, max_calls: int) -> Loop:
    """Call ``call`` until ``duration`` seconds passed or ``max_calls`` calls were made (checked every 10 calls)."""
    call()  # warm up
    calls, started = 0, time.perf_counter()
    deadline = started + duration
    while calls < max_calls and time.perf_counter() < deadline:
        for _ in range(min(10, max_calls - calls)):
            call()
        calls += min(10, max_calls - calls)
    return Loop(name, calls, time.perf_counter() - started)


@dataclass
class Phase:
    name: str
    unit: str  # what one counted operation is
    seconds: float = 0.0
    server_cpu_s: float | None = None
    server_sys_s: float | None = None  # the kernel's share of server_cpu_s
    database_cpu_s: float | None = None  # PostgreSQL's postmaster and backends (with --postgres)
    client_cpu_s: float = 0.0
    machine_busy_s: float = 0.0  # every CPU of the machine, whoever used it
    latencies_ms: list[float] = field(default_factory=list)
    steps_ms: dict[str, list[float]] = field(default_factory=dict)  # per-step client latencies
    errors: list[str] = field(default_factory=list)
    checked: int = 0  # released keys unwrapped and compared
    note: str = ""

    def summary(self, bare_us: float) -> dict[str, Any]:
        ok = len(self.latencies_ms)
        ordered = sorted(self.latencies_ms)
        cpu = self.server_cpu_s
        cpu_ms = None if cpu is None or ok == 0 else cpu * 1000 / ok
        return {
            "phase": self.name,
            "unit": self.unit,
            "count": ok + len(self.errors),
            "errors": len(self.errors),
            "seconds": round(self.seconds, 3),
            "per_second": round(ok / self.seconds, 1) if self.seconds > 0 else 0.0,
            "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99),
            "max_ms": round(ordered[-1], 2) if ordered else None,
            "steps_p50_ms": {name: percentile(sorted(v), 50) for name, v in self.steps_ms.items()},
            "server_cpu_s": None if cpu is None else round(cpu, 2),
            "server_sys_s": None if self.server_sys_s is None else round(self.server_sys_s, 2),
            "server_cpu_ms_per_op": None if cpu_ms is None else round(cpu_ms, 3),
            "server_cpu_x_bare_verify": None if cpu_ms is None else round(cpu_ms * 1000 / bare_us, 2),
            "database_cpu_ms_per_op": (
                None if self.database_cpu_s is None or ok == 0 else round(self.database_cpu_s * 1000 / ok, 3)
            ),
            "client_cpu_s": round(self.client_cpu_s, 2),
            "machine_busy_s": round(self.machine_busy_s, 2),
            "other_processes_cpu_s": (
                None
                if cpu is None
                else round(max(0.0, self.machine_busy_s - cpu - (self.database_cpu_s or 0) - self.client_cpu_s), 2)
            ),
            "client_cpu_ms_per_op": round(self.client_cpu_s * 1000 / ok, 3) if ok else None,
            "released_keys_checked": self.checked,
            "note": self.note,
            "error_samples": [f"{n}x {text}" for text, n in Counter(self.errors).most_common(5)],
        }


class Load:
    """Threads, one keep-alive ``httpx.Client`` each, sharing a bounded supply of work."""

    def __init__(
        self,
        clients: list[httpx.Client],
        stop: threading.Event,
        server_pid: int | Sequence[int] | None,
        database_pid: int | None = None,
    ) -> None:
        self.clients, self.stop, self.server_pid = clients, stop, server_pid
        self.database_pid = database_pid  # PostgreSQL's postmaster: its CPU and its backends' is reported apart

    def run(
        self,
        phase: Phase,
        work: Callable[[int, int, Phase, dict[str, list[float]]], float | None],
        limit: int,
        duration: float,
        rate: float | None = None,
    ) -> Phase:
        """``work(worker, sequence, phase, steps)`` returns the latency in ms, or None after recording an error.
        Runs until ``limit`` operations were claimed or ``duration`` seconds passed.

        Closed loop (``rate`` None): each worker starts its next operation when its last one ends. Open loop:
        operations arrive at ``rate`` per second on average, as a Poisson process (exponential gaps, a fixed
        seed), whether or not earlier ones are done; a worker takes the next arrival, waits for its time if it is
        early, and its latency counts from the arrival, so time spent queued behind a busy server (all workers
        busy) is in it, as a client that arrived then would see it."""
        lock = threading.Lock()
        issued = 0
        started_at = time.perf_counter()
        deadline = started_at + duration
        arrivals = random.Random(1234)
        next_due = started_at

        def claim() -> tuple[int, float] | None:
            nonlocal issued, next_due
            with lock:
                due = next_due if rate else time.perf_counter()
                if issued >= limit or self.stop.is_set() or due >= deadline or time.perf_counter() >= deadline:
                    return None
                if rate:
                    next_due += arrivals.expovariate(rate)
                issued += 1
                return issued - 1, due

        def worker(index: int) -> None:
            latencies: list[float] = []
            steps: dict[str, list[float]] = {}
            local = Phase(phase.name, phase.unit)
            while (claimed := claim()) is not None:
                sequence, due = claimed
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                queued_ms = max(0.0, time.perf_counter() - due) * 1000 if rate else 0.0
                try:
                    elapsed = work(index, sequence, local, steps)
                except (httpx.HTTPError, OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as exc:
                    local.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    continue
                if elapsed is not None:
                    latencies.append(elapsed + queued_ms)
            with lock:
                phase.latencies_ms += latencies
                phase.errors += local.errors
                phase.checked += local.checked
                for name, values in steps.items():
                    phase.steps_ms.setdefault(name, []).extend(values)

        user, system = cpu_times(self.server_pid) if self.server_pid else (0.0, 0.0)
        database_before = sum(cpu_times(self.database_pid)) if self.database_pid else 0.0
        client_cpu, busy, started = time.process_time(), machine_busy_seconds(), time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(self.clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        phase.seconds, phase.client_cpu_s = time.perf_counter() - started, time.process_time() - client_cpu
        phase.machine_busy_s = machine_busy_seconds() - busy
        if self.server_pid:
            user_after, system_after = cpu_times(self.server_pid)
            phase.server_cpu_s = user_after - user + system_after - system
            phase.server_sys_s = system_after - system
        if self.database_pid:
            phase.database_cpu_s = sum(cpu_times(self.database_pid)) - database_before
        return phase
