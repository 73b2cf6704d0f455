"""Key-create throughput per algorithm, then key-metadata GET throughput, of a keybroker server.

Usage (from the repository root, with the project's venv):

    .venv/bin/python bench/keys.py                      # starts its own server (init + serve in a temp dir)
    .venv/bin/python bench/keys.py --duration 3 --json  # JSON document on stdout, the table on stderr
    .venv/bin/python bench/keys.py --addr https://localhost:9443 --token "$KEYBROKER_TOKEN" [--cacert ca.pem]

Without ``--addr`` it runs ``keybroker init`` into a temp dir, serves it on a free 127.0.0.1 port with this Python,
waits for /healthz, uses DATA_DIR/admin-token, and stops the server (terminate, wait) at the end, even on Ctrl-C.

Per algorithm (AES-128/256, EC P-256/384/521, RSA-2048/3072/4096; RSA-7680 with ``--include-rsa-7680``, at most a
few keys), ``--concurrency`` worker threads, each with its own keep-alive ``httpx.Client`` (more requests/s for less
client CPU than ``httpx.AsyncClient``), POST /kbs/v1/keys back to back until ``--duration`` seconds passed or
``--requests`` were sent; then GET /kbs/v1/keys/{id} on random created keys, with the same bounds. Reported: req/s
(successes over wall time), p50/p99 ms, errors, server CPU seconds (utime+stime of /proc/<pid>/stat, "n/a" for an
external server) and per request, client CPU seconds. Client and server share the CPUs: compare versions on one
machine, do not read the numbers as capacity.

Only loopback targets. An external server keeps the policy and keys created: use a throwaway data directory.
Exit status: 0 if every request succeeded, 1 if any failed, 2 on setup errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from _common import SetupError, is_loopback, own_server, percentile
from _common import table as render_table

SPECS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("AES-128", {"algorithm": "AES", "key_length": 128}),
    ("AES-256", {"algorithm": "AES", "key_length": 256}),
    ("EC P-256", {"algorithm": "EC", "curve_type": "secp256r1"}),
    ("EC P-384", {"algorithm": "EC", "curve_type": "secp384r1"}),
    ("EC P-521", {"algorithm": "EC", "curve_type": "secp521r1"}),
    ("RSA-2048", {"algorithm": "RSA", "key_length": 2048}),
    ("RSA-3072", {"algorithm": "RSA", "key_length": 3072}),
    ("RSA-4096", {"algorithm": "RSA", "key_length": 4096}),
)
RSA_7680 = ("RSA-7680", {"algorithm": "RSA", "key_length": 7680})
RSA_7680_MAX_REQUESTS = 4
SAFETY_MAX_REQUESTS = 1_000_000  # the count bound when --requests is not given
POLICY_FILE = Path(__file__).resolve().parent.parent / "examples" / "transfer-policy.json"


@dataclass
class Phase:
    name: str
    operation: str
    seconds: float = 0.0
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = len(self.latencies_ms)
        ordered = sorted(self.latencies_ms)
        cpu = self.server_cpu_s
        return {
            "phase": self.name,
            "operation": self.operation,
            "requests": ok + len(self.errors),
            "errors": len(self.errors),
            "seconds": round(self.seconds, 3),
            "per_second": round(ok / self.seconds, 1) if self.seconds > 0 else 0.0,
            "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99),
            "server_cpu_s": None if cpu is None else round(cpu, 2),
            "server_cpu_ms_per_request": None if cpu is None or ok == 0 else round(cpu * 1000 / ok, 2),
            "client_cpu_s": round(self.client_cpu_s, 2),
            "error_samples": sorted(set(self.errors))[:5],
        }


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of proc(5)


def measure(
    clients: list[httpx.Client],
    stop: threading.Event,
    server_pid: int | None,
    phase: Phase,
    send: Callable[[httpx.Client, random.Random], httpx.Response],
    limit: int,
    duration: float,
) -> Phase:
    """Run ``send`` on every worker until ``limit`` requests were issued or ``duration`` seconds passed."""
    lock = threading.Lock()
    issued = 0
    deadline = time.perf_counter() + duration

    def claim() -> bool:
        nonlocal issued
        with lock:
            if issued >= limit or stop.is_set() or time.perf_counter() >= deadline:
                return False
            issued += 1
            return True

    def worker(index: int) -> None:
        client, rng = clients[index], random.Random(index)
        latencies: list[float] = []
        ids: list[str] = []
        errors: list[str] = []
        while claim():
            started = time.perf_counter()
            try:
                response = send(client, rng)
                elapsed_ms = (time.perf_counter() - started) * 1000
                if response.status_code not in (200, 201):
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
                if phase.operation == "create":
                    ids.append(str(response.json()["id"]))
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(elapsed_ms)
        with lock:
            phase.latencies_ms += latencies
            phase.ids += ids
            phase.errors += errors

    server_cpu = cpu_seconds(server_pid) if server_pid else 0.0
    client_cpu, started = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.seconds, phase.client_cpu_s = time.perf_counter() - started, time.process_time() - client_cpu
    phase.server_cpu_s = cpu_seconds(server_pid) - server_cpu if server_pid else None
    return phase


def creator(body: dict[str, Any]) -> Callable[[httpx.Client, random.Random], httpx.Response]:
    def create(client: httpx.Client, _rng: random.Random) -> httpx.Response:
        return client.post("/kbs/v1/keys", json=body)

    return create


def run(args: argparse.Namespace, addr: str, token: str, server_pid: int | None) -> list[Phase]:
    verify: Any = ssl.create_default_context(cafile=args.cacert) if args.cacert else True
    headers = {"Authorization": f"Bearer {token}"}
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(httpx.Client(base_url=addr, headers=headers, verify=verify, timeout=timeout))
            for _ in range(args.concurrency)
        ]
        stop = threading.Event()
        stack.callback(stop.set)  # runs first on the way out: workers of an interrupted phase stop claiming
        for client in clients:  # open every keep-alive connection before measuring
            client.get("/healthz").raise_for_status()
        response = clients[0].post("/kbs/v1/key-transfer-policies", json=json.loads(POLICY_FILE.read_text()))
        if response.status_code != 201:
            raise SetupError(f"cannot create a transfer policy: HTTP {response.status_code} {response.text[:300]}")
        policy_id = response.json()["id"]
        limit = args.requests or SAFETY_MAX_REQUESTS
        phases: list[Phase] = []
        for name, info in (*SPECS, RSA_7680) if args.include_rsa_7680 else SPECS:
            body = {"key_information": info, "transfer_policy_id": policy_id}
            cap = min(limit, RSA_7680_MAX_REQUESTS) if info.get("key_length") == 7680 else limit
            print(f"measuring create {name} ...", file=sys.stderr, flush=True)
            phases.append(measure(clients, stop, server_pid, Phase(name, "create"), creator(body), cap, args.duration))
            if phases[-1].errors and not phases[-1].latencies_ms:
                print(f"every {name} request failed: stopping", file=sys.stderr)
                return phases
        ids = [key_id for phase in phases for key_id in phase.ids]

        def getter(client: httpx.Client, rng: random.Random) -> httpx.Response:
            return client.get(f"/kbs/v1/keys/{rng.choice(ids)}")

        if ids:
            print(f"measuring get metadata on {len(ids)} keys ...", file=sys.stderr, flush=True)
            phases.append(
                measure(clients, stop, server_pid, Phase("GET metadata", "get"), getter, limit, args.duration)
            )
        return phases


def table(rows: list[dict[str, Any]]) -> str:
    columns = (
        ("phase", "phase"), ("requests", "requests"), ("errors", "errors"), ("per_second", "req/s"),
        ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("server_cpu_s", "srv CPU s"),
        ("server_cpu_ms_per_request", "srv CPU ms/req"), ("client_cpu_s", "cli CPU s"),
    )  # fmt: skip
    return render_table(rows, columns)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--addr", help="URL of a running server (loopback only); default: start one")
    parser.add_argument("--token", default=os.environ.get("KEYBROKER_TOKEN"), help="admin bearer token (with --addr)")
    parser.add_argument("--cacert", help="CA certificate to verify an https server")
    parser.add_argument("--concurrency", type=int, default=8, help="workers, one connection each (default 8)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--requests", type=int, help="also stop each measurement after this many requests")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds (default 120)")
    parser.add_argument(
        "--include-rsa-7680", action="store_true", help=f"also RSA-7680 (at most {RSA_7680_MAX_REQUESTS} keys)"
    )
    parser.add_argument("--json", action="store_true", help="JSON results on stdout (the table goes to stderr)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or (args.requests is not None and args.requests < 1):
        parser.error("--concurrency and --requests must be >= 1, --duration > 0")
    if args.addr and not is_loopback(args.addr):
        parser.error(f"{args.addr} is not a loopback address")
    if args.addr and not args.token:
        parser.error("--addr needs --token (or KEYBROKER_TOKEN)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server is stopped on SIGTERM too
    try:
        with contextlib.ExitStack() as stack:
            if args.addr:
                addr, token, pid = args.addr.rstrip("/"), args.token, None
            else:
                print("starting a keybroker server ...", file=sys.stderr, flush=True)
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="keybroker-bench-")))
                addr, token, pid, args.cacert = stack.enter_context(own_server(tmp))
            phases = run(args, addr, token, pid)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    rows = [phase.summary() for phase in phases]
    errors = sum(row["errors"] for row in rows)
    print(table(rows), file=sys.stderr if args.json else sys.stdout)
    for row in rows:
        for sample in row["error_samples"]:
            print(f"{row['phase']}: {sample}", file=sys.stderr)
    if args.json:
        document = {
            "target": addr if args.addr else "own server",
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "max_requests": args.requests,
            "python": sys.version.split()[0],
            "httpx": httpx.__version__,
            "errors": errors,
            "results": rows,
        }
        print(json.dumps(document, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
