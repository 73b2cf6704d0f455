"""Server CPU per request of keybroker's ASGI application, in this process, without HTTP or TLS.

Usage (from the repository root, with the project's venv):

    .venv/bin/python bench/asgi.py                     # 2000 requests per phase, 8 concurrent tasks
    .venv/bin/python bench/asgi.py --profile 15        # then cProfile of each phase: the top 15 by own time
    .venv/bin/python bench/asgi.py --json

``keybroker init`` makes a data directory in a temp dir (SQLite, the embedded store); this process builds the
services and the application as ``keybroker serve`` does (``create_app``, its lifespan started), imports simulated
UpToDate collateral, a transfer policy for the simulated SGX enclave and an AES-256 key, then calls the application
directly (ASGI scope, receive, send: what uvicorn hands it after parsing HTTP) with ``--concurrency`` tasks on one
event loop. Per phase, CPU µs per request (``time.process_time``: every thread of the process, so the thread pool's
share is in it): ``GET /healthz``, the nonce step (``POST .../transfer {}``), the transfer step (quotes prebuilt for
fetched nonces) and complete transfers (nonce, quote built in this process, transfer: the quote build is
subtracted). ``dcap_qvl.verify`` of one quote in a loop is measured in the same run, as the yardstick. What this
leaves out, HTTP parsing and TLS, bench/transfer.py measures through a real server; the difference between the
two is what uvicorn, httptools and TLS cost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import itertools
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _profile import service_parts
from _setup import MEASUREMENTS, bare_verify_loop, make_simulator, report_data, workload_keys
from keybroker_client.sim_quotes import build_quote

Call = Callable[[str, str, bytes, dict[str, str]], Awaitable[tuple[int, dict[str, str], bytes]]]


def asgi_caller(app: Any) -> Call:
    """A function that sends one request into ``app`` the way uvicorn would and returns status, headers, body."""

    clients = itertools.count()

    async def call(method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        n = next(clients) % 60000  # a new client address every request: the per-address rate limits stay out of it
        raw_headers = [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "https",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": raw_headers,
            "client": (f"10.{n >> 8 & 255}.{n & 255}.1", 50000),
            "server": ("127.0.0.1", 9443),
            "state": {},
        }
        sent = False
        status, out_headers, chunks = 0, {}, []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                out_headers.update({k.decode(): v.decode() for k, v in message.get("headers", [])})
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await app(scope, receive, send)
        return status, out_headers, b"".join(chunks)

    return call


async def run_phase(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """CPU µs per call of ``one(i)`` for i in range(count), ``concurrency`` at a time."""
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await one(i)

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) * 1e6 / count


def profiled(top: int, profile: cProfile.Profile) -> list[dict[str, Any]]:
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = pstats.Stats(profile).stats  # type: ignore[attr-defined]  # undocumented
    total = sum(v[2] for v in stats.values()) or 1.0
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        {"function": f"{Path(path).name}:{line} {name}", "percent": round(100 * v[2] / total, 1)}
        for (path, line, name), v in ranked
    ]


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from keybroker.api.app import create_app
    from keybroker.config import load_settings
    from keybroker.logs import configure_logging
    from keybroker.services import build_services

    sim = make_simulator(tmp, None)
    data_dir = tmp / "data"
    init = [sys.executable, "-m", "keybroker", "init", "--data-dir", str(data_dir)]
    subprocess.run(init, check=True, capture_output=True, timeout=60)
    token = (data_dir / "admin-token").read_text().strip()
    overrides: dict[str, Any] = {"attestation": {"simulated_root": str(sim.directory / "root-ca.pem")}}
    if args.database_url:
        overrides["database"] = {"url": args.database_url}
    settings = load_settings(data_dir=data_dir, overrides=overrides)
    configure_logging(settings.logging)  # as ``keybroker serve``: JSON lines on stderr (a file here, see main)
    services = build_services(settings)
    app = create_app(services, owns_services=True)
    call = asgi_caller(app)
    admin = {"authorization": f"Bearer {token}", "content-type": "application/json"}

    async def expect(method: str, path: str, document: Any, status: int) -> Any:
        got, _, body = await call(method, path, json.dumps(document).encode(), admin)
        if got != status:
            raise SystemExit(f"{method} {path}: HTTP {got} {body[:300]!r}")
        return json.loads(body)

    from keybroker.attestation.collateral import bundle_upload

    async with app.router.lifespan_context(app):
        for bundle in (sim.collateral / "sgx", sim.collateral / "tdx"):
            await expect("POST", "/collateral/v1/items", {"items": bundle_upload(bundle), "source": "bench"}, 200)
        policy = {
            "attestation_type": ["SGX"],
            "sgx": {"attributes": {"mrenclave": [MEASUREMENTS.mrenclave.hex()], "isvsvn": MEASUREMENTS.isvsvn}},
            "allow_simulated": True,
        }
        policy_id = (await expect("POST", "/kbs/v1/key-transfer-policies", policy, 201))["id"]
        secret = os.urandom(32)
        info = {"algorithm": "AES", "key_length": 256, "key_string": base64.b64encode(secret).decode()}
        key = {"key_information": info, "transfer_policy_id": policy_id, "label": "bench-asgi"}
        key_id = (await expect("POST", "/kbs/v1/keys", key, 201))["id"]
        path = f"/kbs/v1/keys/{key_id}/transfer"
        keys = workload_keys(8)
        plain = {"content-type": "application/json"}
        transfer_headers = {"content-type": "application/json", "attestation-type": "SGX"}

        async def nonce() -> dict[str, str]:
            status, _, body = await call("POST", path, b"{}", plain)
            if status != 200:
                raise SystemExit(f"nonce: HTTP {status} {body[:300]!r}")
            return dict(json.loads(body))

        def transfer_body(value: dict[str, str], i: int) -> bytes:
            workload = keys[i % len(keys)]
            quote = build_quote(sim.platform, report_data(value, workload.spki), sgx=MEASUREMENTS)
            body = {"quote": base64.b64encode(quote).decode(), "nonce": value, "user_data": workload.spki_b64}
            return json.dumps(body).encode()

        async def transfer(body: bytes) -> None:
            status, _, answer = await call("POST", path, body, transfer_headers)
            if status != 200:
                raise SystemExit(f"transfer: HTTP {status} {answer[:300]!r}")

        async def healthz(_: int) -> None:
            status, _, _ = await call("GET", "/healthz", b"", {})
            if status != 200:
                raise SystemExit(f"healthz: HTTP {status}")

        async def nonce_only(_: int) -> None:
            await nonce()

        async def complete(i: int) -> None:
            await transfer(transfer_body(await nonce(), i))

        n = args.requests
        idle_started = time.process_time()
        await asyncio.sleep(2.0)
        results_idle = (time.process_time() - idle_started) / 2.0
        for i in range(50):  # warm-up: caches, pools, the first collateral load
            await complete(i)
        quote_build_us = 0.0
        started = time.process_time()
        sample = await nonce()
        for i in range(200):
            transfer_body(sample, i)
        quote_build_us = (time.process_time() - started) * 1e6 / 200
        phases: dict[str, Callable[[int], Awaitable[None]]] = {"healthz": healthz, "nonce step": nonce_only}
        results: dict[str, Any] = {}
        profiles: dict[str, Any] = {}

        async def measure(name: str, one: Callable[[int], Awaitable[None]], subtract: float = 0.0) -> None:
            results[name] = round(await run_phase(n, args.concurrency, one) - subtract, 1)
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await run_phase(min(n, 1000), args.concurrency, one)
                profile.disable()
                profiles[name] = profiled(args.profile, profile)

        for name, one in phases.items():
            await measure(name, one)
        prebuilt = [transfer_body(await nonce(), i) for i in range(n + (1000 if args.profile else 0))]
        taken = iter(prebuilt)

        async def transfer_only(_: int) -> None:
            await transfer(next(taken))

        await measure("transfer step", transfer_only)
        await measure("complete", complete, quote_build_us)
        parts = service_parts(services, sim, key_id, secret, keys, min(n, 1000), args.profile or 15)
    bare = bare_verify_loop(sim, 2.0, 20_000)
    return {
        "requests": n,
        "concurrency": args.concurrency,
        "database": "postgresql" if args.database_url else "sqlite",
        "bare_verify_us": round(bare.us_per_call, 1),
        "idle_cpu_share": round(results_idle, 4),
        "cpu_us_per_request": results,
        "x_bare_verify": {k: round(v / bare.us_per_call, 2) for k, v in results.items()},
        "profiles": profiles,
        "service": parts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase (default 2000)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent tasks (default 8)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile each phase, top N functions")
    parser.add_argument("--database-url", help="a PostgreSQL URL instead of the data directory's SQLite")
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="keybroker-bench-asgi-")))
        log = stack.enter_context((tmp / "server.log").open("wb"))
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)  # the server's log lines go to a file, as a server's do
        try:
            document = asyncio.run(bench(args, tmp))
        finally:
            os.dup2(saved, 2)
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"bare dcap_qvl verify: {document['bare_verify_us']} µs ({document['database']})")
    print(f"idle: {document['idle_cpu_share']:.1%} of a CPU")
    for name, us in document["cpu_us_per_request"].items():
        print(f"{name:<16} {us:>9.1f} µs CPU per request   {document['x_bare_verify'][name]:>5.2f} x bare verify")
    service = document["service"]
    print(f"\nbelow the edge, one thread: nonce {service['nonce_us']} µs, transfer {service['transfer_us']} µs; parts:")
    for part in service["parts"]:
        print(f"  {part['us']:>8.1f} µs  {part['part']}")
    for name, top in document["profiles"].items():
        print(f"\n{name}: top functions by own time")
        for row in top:
            print(f"  {row['percent']:>5.1f}%  {row['function']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
