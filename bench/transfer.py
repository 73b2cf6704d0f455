"""Complete attested key transfers per second (simulated SGX workloads), and a bare ``dcap_qvl`` verify to compare.

Usage (from the repository root, with the project's venv):

    .venv/bin/python bench/transfer.py                  # own server in a temp dir, 32 workloads, 10 s per phase
    .venv/bin/python bench/transfer.py --json           # JSON document on stdout, the table on stderr
    .venv/bin/python bench/transfer.py --duration 3 --concurrency 8 --requests 2000
    .venv/bin/python bench/transfer.py --profile /tmp/kb-prof [--py-spy /path/to/py-spy]   # py-spy the server
    .venv/bin/python bench/transfer.py --profile-service 1000   # then the service layer's CPU, in-process
    .venv/bin/python bench/transfer.py --addr https://127.0.0.1:9443 --token "$KEYBROKER_TOKEN" \\
        --cacert DATA/ca.pem --sim-dir SIMDIR [--server-pid PID[,PID...]]   # a server trusting SIMDIR/root-ca.pem

Setup (not timed): a simulated TEE (test PKI, platform ``default``, UpToDate collateral) in a temp dir; without
``--addr``, ``keybroker init`` and ``keybroker serve`` on a free 127.0.0.1 port (HTTPS, the service CA) with
``KEYBROKER_ATTESTATION__SIMULATED_ROOT`` set; the collateral imported (POST /collateral/v1/items, as
``keybroker collateral import``); a transfer policy allowing the simulated SGX enclave and an imported AES-256 key
(known bytes, so the released key can be checked); ``--workload-keys`` RSA-3072 workload key pairs, reused.

Measured, in this order, in one run:

* ``bare verify``: ``dcap_qvl.verify_with_root_ca`` of one simulated quote in a loop, single-threaded, server idle;
* ``quote build``: ``build_quote`` (the simulated quoting enclave) single-threaded: µs per quote;
* ``complete``: ``--concurrency`` workloads (threads, one keep-alive ``httpx.Client`` each, no bearer token; the
  same rate as ``httpx.AsyncClient`` tasks for about half the client CPU) do whole transfers back to back: POST
  /kbs/v1/keys/{id}/transfer ``{}`` (the nonce), REPORTDATA = SHA-512(val ‖ iat ‖ SPKI), ``build_quote``, POST the
  transfer (``Attestation-Type: SGX``). Latency = from the nonce request to the
  parsed transfer response, quote generation included. Every ``--check-every``-th released key is unwrapped after
  the latency is taken and compared with the imported bytes (a mismatch is an error);
* ``nonce step only``: the same workloads fetch nonces back to back for the next phase;
* ``transfer step only``: quotes for those nonces are built before the window (reported as client quotes/s), then
  the workloads POST only the prebuilt transfers (nonces stay valid 300 s).

Per phase: transfers (or requests) per second, p50/p99 latency, errors, server CPU seconds (utime+stime of
/proc/<pid>/stat; ``n/a`` for an external server without ``--server-pid``) per transfer and as a multiple of one
bare verification, client CPU (this process, all threads), and the CPU other processes used meanwhile (from
/proc/stat; flagged when above 0.1 CPU: the numbers are then perturbed). Client and server share the machine's
CPUs (the client's load is part of the numbers): compare versions on one machine. The workloads are a closed loop
(no think time), so mean latency = concurrency / rate (Little's law): p99 <= 100 ms at 32 workloads needs > 320/s.

``--profile DIR`` runs ``py-spy record`` on the server during each load phase (DIR/<phase>.txt, collapsed stacks)
and prints the share of samples waiting (idle pool threads, the SQLite write lock), then the top functions by own
samples and the top keybroker functions by inclusive samples; it slows the server, so take throughput from a run
without it. ``--profile-service N`` (own server only) then runs TransferService.nonce/.transfer and each part of a
transfer N times in this process on the server's data directory, one thread, no HTTP, timed in CPU time, plus a
cProfile ranking; server CPU per complete transfer minus the service layer's is the HTTP/TLS/ASGI share.

Every loop is bounded by ``--duration`` and ``--requests`` (default cap 1,000,000). Only loopback targets.
Exit status: 0 if every transfer succeeded, 1 if any failed, 2 on setup errors.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.metadata
import json
import math
import os
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _common import LeanClient, Load, Loop, Phase, SetupError, is_loopback, own_server, timed_loop
from _profile import Profiler, service_profile, top_functions
from _report import OPEN_LOOP, report_text, targets
from _setup import (
    MEASUREMENTS,
    Simulator,
    WorkloadKey,
    bare_verify_loop,
    create_key,
    import_collateral,
    local_postgres,
    make_simulator,
    report_data,
    workload_keys,
)
from keybroker_client._client import unwrap
from keybroker_client.sim_quotes import build_quote

SAFETY_MAX_REQUESTS = 1_000_000  # the count bound when --requests is not given
MAX_PREBUILT = 60_000  # at most this many nonces fetched and quotes prebuilt for the transfer-step-only phase
NONCE_TTL_S = 300.0
TRANSFER_HEADERS = {"Attestation-Type": "SGX"}
JSON_HEADERS = {"Attestation-Type": "SGX", "Content-Type": "application/json"}
UNLIMITED = {"KEYBROKER_LIMITS__UNAUTHENTICATED_RPS": "1000000", "KEYBROKER_LIMITS__UNAUTHENTICATED_BURST": "10000000"}


# --- benchmark --------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    sim: Simulator
    key_id: str
    secret: bytes
    keys: list[WorkloadKey]
    load: Load

    @property
    def path(self) -> str:
        return f"/kbs/v1/keys/{self.key_id}/transfer"

    def check(self, released: dict[str, Any], key: WorkloadKey, phase: Phase) -> bool:
        """Unwrap a released key and compare it with the imported bytes; a mismatch is recorded as an error."""
        phase.checked += 1
        try:
            got = unwrap(
                base64.b64decode(released["wrapped_key"]), base64.b64decode(released["wrapped_swk"]), key.private
            )
        except Exception as exc:  # UnwrapError, binascii.Error, KeyError
            phase.errors.append(f"unwrap failed: {type(exc).__name__}: {exc}")
            return False
        if got != self.secret:
            phase.errors.append("the released key differs from the imported key")
            return False
        return True

    def complete(self, worker: int, sequence: int, phase: Phase, steps: dict[str, list[float]]) -> float | None:
        """One whole transfer: nonce, quote, transfer; unwrap and compare every --check-every-th."""
        client, key = self.load.clients[worker], self.keys[worker % len(self.keys)]
        started = time.perf_counter()
        response = client.post(self.path, json={})
        if response.status_code != 200:
            phase.errors.append(f"nonce: HTTP {response.status_code}: {response.text[:200]}")
            return None
        nonce = response.json()
        got_nonce = time.perf_counter()
        quote = build_quote(self.sim.platform, report_data(nonce, key.spki), sgx=MEASUREMENTS)
        body = {"quote": base64.b64encode(quote).decode(), "nonce": nonce, "user_data": key.spki_b64}
        built = time.perf_counter()
        response = client.post(self.path, json=body, headers=TRANSFER_HEADERS)
        if response.status_code != 200:
            phase.errors.append(f"transfer: HTTP {response.status_code}: {response.text[:200]}")
            return None
        released = response.json()
        done = time.perf_counter()
        steps.setdefault("nonce request", []).append((got_nonce - started) * 1000)
        steps.setdefault("quote build", []).append((built - got_nonce) * 1000)
        steps.setdefault("transfer request", []).append((done - built) * 1000)
        if sequence % self.args.check_every == 0 and not self.check(released, key, phase):
            return None
        return (done - started) * 1000

    def healthz(self, worker: int, sequence: int, phase: Phase, steps: dict[str, list[float]]) -> float | None:
        started = time.perf_counter()
        response = self.load.clients[worker].get("/healthz")
        if response.status_code != 200:
            phase.errors.append(f"healthz: HTTP {response.status_code}: {response.text[:200]}")
            return None
        return (time.perf_counter() - started) * 1000

    def run(self, profiler: Profiler) -> tuple[list[Phase], dict[str, Any]]:
        args, limit = self.args, self.args.requests or SAFETY_MAX_REQUESTS
        phases: list[Phase] = []
        extra: dict[str, Any] = {}

        print(f"warm-up: {2 * len(self.load.clients)} complete transfers ...", file=sys.stderr, flush=True)
        warm = self.load.run(Phase("warm-up", "transfer"), self.complete, 2 * len(self.load.clients), 120.0)
        if warm.errors or warm.checked == 0:
            warm.name = "warm-up (failed)"
            return [warm], extra

        if args.healthz:
            print(f"measuring GET /healthz for {args.duration} s ...", file=sys.stderr, flush=True)
            with profiler.record("healthz", args.duration):
                probes = self.load.run(Phase("GET /healthz", "request"), self.healthz, limit, args.duration)
            probes.note = "a load balancer's liveness probe, back to back"
            phases.append(probes)
        if args.rate:
            print(f"measuring complete transfers arriving at {args.rate:g}/s for {args.duration} s ...",
                  file=sys.stderr, flush=True)  # fmt: skip
            with profiler.record("open", args.duration):
                phase = self.load.run(Phase(OPEN_LOOP, "transfer"), self.complete, limit, args.duration, args.rate)
            phase.note = (
                f"open loop: Poisson arrivals at {args.rate:g}/s on {len(self.load.clients)} connections; "
                "latency from the arrival, queueing included"
            )
            phases.append(phase)
            return phases, extra
        print(f"measuring complete transfers for {args.duration} s ...", file=sys.stderr, flush=True)
        with profiler.record("complete", args.duration):
            phase = self.load.run(Phase("complete", "transfer"), self.complete, limit, args.duration)
        phase.note = "nonce + quote build + transfer; latency includes quote generation"
        phases.append(phase)
        if args.skip_prebuilt or self.load.stop.is_set():
            return phases, extra
        if args.duration > NONCE_TTL_S / 2:
            phase.note += f"; transfer-step-only skipped (nonces live {NONCE_TTL_S:.0f} s)"
            return phases, extra

        # Enough prebuilt transfers for the window at twice the complete rate, within the caps.
        rate = len(phase.latencies_ms) / phase.seconds if phase.seconds else 0.0
        wanted = min(limit, MAX_PREBUILT, max(len(self.load.clients) * 4, math.ceil(2 * rate * args.duration)))
        nonces: list[dict[str, str] | None] = [None] * wanted

        def fetch(worker: int, sequence: int, p: Phase, steps: dict[str, list[float]]) -> float | None:
            started = time.perf_counter()
            response = self.load.clients[worker].post(self.path, json={})
            if response.status_code != 200:
                p.errors.append(f"nonce: HTTP {response.status_code}: {response.text[:200]}")
                return None
            nonces[sequence] = response.json()
            return (time.perf_counter() - started) * 1000

        print(f"fetching {wanted} nonces ...", file=sys.stderr, flush=True)
        with profiler.record("nonce", args.duration):
            nonce_phase = self.load.run(Phase("nonce step only", "nonce"), fetch, wanted, NONCE_TTL_S / 4)
        nonce_phase.note = "POST .../transfer {} only, prefetched for the next phase"
        phases.append(nonce_phase)

        print("building quotes for them ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        bodies: list[tuple[int, bytes]] = []
        for sequence, nonce in enumerate(nonces):
            if nonce is None:
                continue
            index = sequence % len(self.keys)
            quote = build_quote(self.sim.platform, report_data(nonce, self.keys[index].spki), sgx=MEASUREMENTS)
            body = {"quote": base64.b64encode(quote).decode(), "nonce": nonce, "user_data": self.keys[index].spki_b64}
            bodies.append((index, json.dumps(body).encode()))
        prebuild = Loop("quote build + body (prebuilt)", max(1, len(bodies)), time.perf_counter() - started)
        extra["prebuild"] = prebuild.summary()

        def transfer(worker: int, sequence: int, p: Phase, steps: dict[str, list[float]]) -> float | None:
            index, body = bodies[sequence]
            started = time.perf_counter()
            response = self.load.clients[worker].post(self.path, content=body, headers=JSON_HEADERS)
            if response.status_code != 200:
                p.errors.append(f"transfer: HTTP {response.status_code}: {response.text[:200]}")
                return None
            released = response.json()
            elapsed = (time.perf_counter() - started) * 1000
            if sequence % self.args.check_every == 0 and not self.check(released, self.keys[index], p):
                return None
            return elapsed

        print(f"measuring the transfer step only ({len(bodies)} prebuilt) ...", file=sys.stderr, flush=True)
        with profiler.record("transfer", args.duration):
            step = self.load.run(Phase("transfer step only", "transfer"), transfer, len(bodies), args.duration)
        step.note = "POST prebuilt quote + nonce only"
        if len(step.latencies_ms) + len(step.errors) >= len(bodies) and step.seconds < args.duration * 0.95:
            step.note += f"; ran out of prebuilt transfers after {step.seconds:.1f} s"
        phases.append(step)
        return phases, extra


# --- main ---------------------------------------------------------------------------------------------------------


def _pids(text: str) -> list[int]:
    try:
        pids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pid or a comma-separated list of pids") from None
    if not pids or any(p <= 0 for p in pids):
        raise argparse.ArgumentTypeError("pids are positive")
    return pids


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--addr", help="URL of a running server (loopback only); default: start one")
    parser.add_argument("--token", default=os.environ.get("KEYBROKER_TOKEN"), help="admin bearer token (with --addr)")
    parser.add_argument("--cacert", help="CA certificate to verify an https server (with --addr)")
    parser.add_argument("--sim-dir", type=Path, help="simulator directory the server trusts (needed with --addr)")
    parser.add_argument(
        "--server-pid",
        type=_pids,
        help="with --addr: the server's pid for CPU accounting; several comma-separated (replicas, PostgreSQL's "
        "postmaster, the load balancer): their CPU and their children's is summed",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="workloads, one connection each (default 32)")
    parser.add_argument("--workers", type=int, default=1, help="server processes of a server this starts (default 1)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase (default 10)")
    parser.add_argument("--requests", type=int, help="also stop each load phase after this many transfers")
    parser.add_argument("--workload-keys", type=int, default=32, help="RSA-3072 workload key pairs (default 32)")
    parser.add_argument("--check-every", type=int, default=50, help="unwrap and compare every Nth key (default 50)")
    parser.add_argument("--verify-seconds", type=float, default=3.0, help="bare verify loop length (default 3)")
    parser.add_argument("--skip-prebuilt", action="store_true", help="skip the nonce/transfer-step-only phases")
    parser.add_argument(
        "--rate",
        type=float,
        help="open loop instead of the closed-loop phases: complete transfers arriving at this many per second "
        "(Poisson) for --duration, latency from each arrival",
    )
    parser.add_argument("--healthz", action="store_true", help="also GET /healthz back to back (server CPU per probe)")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="own server on a local PostgreSQL started for the run (its CPU reported beside keybroker's)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    parser.add_argument("--profile", type=Path, help="py-spy the server during each load phase into this directory")
    parser.add_argument("--profile-gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy executable (default: from PATH)")
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile (default 15)")
    parser.add_argument(
        "--profile-service",
        type=int,
        default=0,
        metavar="N",
        help="afterwards, N transfers through TransferService in-process under cProfile (own server only)",
    )
    parser.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="load generator: lean (http.client keep-alive, default) or httpx (about twice the client CPU)",
    )
    parser.add_argument("--json", action="store_true", help="JSON results on stdout (the table goes to stderr)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or (args.requests is not None and args.requests < 1):
        parser.error("--concurrency and --requests must be >= 1, --duration > 0")
    if args.workload_keys < 1 or args.check_every < 1 or not 0 < args.verify_seconds <= 60:
        parser.error("--workload-keys and --check-every must be >= 1, 0 < --verify-seconds <= 60")
    if args.duration > 600:
        parser.error("--duration is at most 600 s")
    if args.addr:
        if not is_loopback(args.addr):
            parser.error(f"{args.addr} is not a loopback address")
        if not args.token:
            parser.error("--addr needs --token (or KEYBROKER_TOKEN)")
        if args.sim_dir is None:
            parser.error("--addr needs --sim-dir: the simulator whose root-ca.pem the server trusts")
    elif args.server_pid is not None:
        parser.error("--server-pid is for --addr")
    if args.profile_service and (args.addr or not 0 < args.profile_service <= 20_000):
        parser.error("--profile-service needs the benchmark's own server (no --addr) and 1..20000 transfers")
    if args.profile is not None and not args.py_spy:
        parser.error("--profile needs py-spy: put it on PATH or pass --py-spy")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server is stopped on SIGTERM too
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="keybroker-bench-transfer-")))
            print("creating the simulated TEE ...", file=sys.stderr, flush=True)
            sim = make_simulator(tmp, args.sim_dir)
            database_pid = None
            if args.addr:
                addr, token, pid = args.addr.rstrip("/"), args.token, args.server_pid
            else:
                env = {"KEYBROKER_ATTESTATION__SIMULATED_ROOT": str(sim.directory / "root-ca.pem")}
                if args.healthz:
                    env.update(UNLIMITED)  # every probe comes from 127.0.0.1: the unauthenticated limit would refuse
                if args.postgres:
                    print("starting PostgreSQL ...", file=sys.stderr, flush=True)
                    env_pg, database_pid = stack.enter_context(local_postgres(tmp))
                    env.update(env_pg)
                print("starting a keybroker server ...", file=sys.stderr, flush=True)
                addr, token, pid, args.cacert = stack.enter_context(own_server(tmp, env, workers=args.workers))
            verify: Any = ssl.create_default_context(cafile=args.cacert) if args.cacert else True
            timeout = httpx.Timeout(args.timeout, connect=10.0)
            bearer = {"Authorization": f"Bearer {token}"}
            admin = stack.enter_context(httpx.Client(base_url=addr, headers=bearer, verify=verify, timeout=timeout))
            import_collateral(admin, sim.collateral)
            secret = os.urandom(32)
            key_id = create_key(admin, secret)
            print(f"generating {args.workload_keys} RSA-3072 workload keys ...", file=sys.stderr, flush=True)
            keys = workload_keys(args.workload_keys)

            print(f"bare dcap_qvl verify loop ({args.verify_seconds} s) ...", file=sys.stderr, flush=True)
            bare = bare_verify_loop(sim, args.verify_seconds, 100_000)
            data = os.urandom(64)
            quote_loop = timed_loop(
                "build_quote (SGX)", lambda: build_quote(sim.platform, data, sgx=MEASUREMENTS), 1.0, 20_000
            )

            clients: list[Any] = []
            for _ in range(args.concurrency):
                if args.client == "httpx":
                    clients.append(stack.enter_context(httpx.Client(base_url=addr, verify=verify, timeout=timeout)))
                else:
                    lean = LeanClient(addr, verify, args.timeout)
                    stack.callback(lean.close)
                    clients.append(lean)
            stop = threading.Event()
            stack.callback(stop.set)  # runs first on the way out: workers of an interrupted phase stop claiming
            for client in clients:  # open every keep-alive connection before measuring (a nonce request: the
                # attested endpoints' rate limit is far above what a benchmark sends, /healthz's is not)
                opened = client.post(f"/kbs/v1/keys/{key_id}/transfer", json={})
                if opened.status_code != 200:
                    raise SetupError(f"nonce request: HTTP {opened.status_code}")
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
            first = pid[0] if isinstance(pid, list) else pid  # py-spy follows the first process
            profiler = Profiler(args.py_spy, args.profile, first, args.profile_gil)
            bench = Bench(args, sim, key_id, secret, keys, Load(clients, stop, pid, database_pid))
            phases, extra = bench.run(profiler)
            if args.profile_service and not stop.is_set():
                print(f"profiling {args.profile_service} in-process transfers ...", file=sys.stderr, flush=True)
                try:
                    extra["service_profile"] = service_profile(
                        tmp / "data", sim, key_id, secret, keys, args.profile_service, args.top
                    )
                except Exception as exc:  # the profile is an extra: report and go on
                    print(f"the in-process profile failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    rows = [phase.summary(bare.us_per_call) for phase in phases]
    document: dict[str, Any] = {
        "target": addr if args.addr else "own server",
        "cpus": os.cpu_count(),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "max_requests": args.requests,
        "workload_keys": args.workload_keys,
        "check_every": args.check_every,
        "python": sys.version.split()[0],
        "httpx": httpx.__version__,
        "dcap_qvl": importlib.metadata.version("dcap-qvl"),
        "bare_verify": bare.summary(),
        "quote_build": quote_loop.summary(),
        **extra,
        "results": rows,
        "errors": sum(row["errors"] for row in rows),
        "targets": targets(rows, args.concurrency, args.rate),
        "database": "postgresql" if args.postgres else ("sqlite" if not args.addr else "external"),
    }
    service = document.get("service_profile")
    if service is not None:
        complete = next((row for row in rows if row["phase"] == "complete"), None)
        per_op = complete["server_cpu_ms_per_op"] if complete else None
        service["http_overhead_us"] = (
            None if per_op is None else round(per_op * 1000 - service["nonce_us"] - service["transfer_us"], 1)
        )
        if not service["released_key_matches"]:
            document["errors"] += 1
            print("in-process profile: the released key differs from the imported key", file=sys.stderr)
    if profiler.files:
        document["profiles"] = {
            phase: {**top_functions(path, args.top), "file": str(path)} for phase, path in profiler.files.items()
        }
    print(report_text(document), file=sys.stderr if args.json else sys.stdout)
    for row in rows:
        for sample in row["error_samples"]:
            print(f"{row['phase']}: {sample}", file=sys.stderr)
    if args.json:
        print(json.dumps(document, indent=2))
    return 1 if document["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
