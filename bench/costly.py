"""Transfers while costly requests run: complete attested transfers' p50/p99 without, then with, RSA-7680 imports.

Usage (from the repository root, with the project's venv):

    .venv/bin/python bench/costly.py                       # 8 workloads, 10 s per phase, 4 importers
    .venv/bin/python bench/costly.py --json                # JSON on stdout, the table on stderr
    .venv/bin/python bench/costly.py --importers 4 --duration 5 --concurrency 16

Setup as bench/transfer.py (own server, simulated TEE, policy, AES-256 key, workload keys), plus one RSA-7680 key
generated here (seconds, not timed) whose PEM the importers send again and again. Then, in one run:

* ``transfers alone``: ``--concurrency`` workloads do complete transfers (nonce, quote, transfer) back to back;
* ``transfers + imports``: the same, while ``--importers`` threads each import the RSA-7680 key back to back
  (``POST /kbs/v1/keys`` with ``key_string``), so that that many imports are always in flight.

Reported: both phases' rate and p50/p99 (p99 with imports / p99 alone: target <= 2), and the imports' count,
rate and latency (p50/p99/max; target: each answered in under 3 s). Client and server share the machine's CPUs.
Exit status: 0 if every request succeeded, 1 if any failed, 2 on setup errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from _common import LeanClient, Load, Phase, SetupError, own_server, percentile
from _common import table as render_table
from _setup import create_key, import_collateral, make_simulator, workload_keys
from transfer import Bench

TARGET_P99_RATIO, TARGET_IMPORT_S = 2.0, 3.0


def rsa_7680_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=7680)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class Importers:
    """``count`` threads importing ``pem`` back to back until stopped; import latencies in seconds."""

    def __init__(self, admin: httpx.Client, policy: str, pem: str, count: int) -> None:
        self.admin, self.count = admin, count
        self.body = {
            "key_information": {"algorithm": "RSA", "key_length": 7680, "key_string": pem},
            "transfer_policy_id": policy,
            "label": "bench-costly",
        }
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._loop_once()

    def _loop_once(self) -> None:
        """One import, timed."""
        started = time.perf_counter()
        response = self.admin.post("/kbs/v1/keys", json=self.body)
        elapsed = time.perf_counter() - started
        with self._lock:
            if response.status_code == 201:
                self.latencies.append(elapsed)
            else:
                self.errors.append(f"import: HTTP {response.status_code}: {response.text[:200]}")

    def __enter__(self) -> Importers:
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.count)]
        for thread in self._threads:
            thread.start()
        time.sleep(0.5)  # the imports are under way before the transfers are measured
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def summary(self, seconds: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "importers": self.count,
            "imports": len(ordered),
            "errors": len(self.errors),
            "per_second": round(len(ordered) / seconds, 2) if seconds else 0.0,
            "p50_s": None if not ordered else round(percentile(ordered, 50) or 0.0, 3),
            "p99_s": None if not ordered else round(percentile(ordered, 99) or 0.0, 3),
            "max_s": round(ordered[-1], 3) if ordered else None,
            "error_samples": self.errors[:5],
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=8, help="workloads doing transfers (default 8)")
    parser.add_argument("--importers", type=int, default=4, help="RSA-7680 imports in flight (default 4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    parser.add_argument("--json", action="store_true", help="JSON results on stdout (the table goes to stderr)")
    args = parser.parse_args(argv)
    args.check_every, args.requests = 50, None  # what transfer.Bench reads
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="keybroker-bench-costly-")))
            print("creating the simulated TEE and starting a server ...", file=sys.stderr, flush=True)
            sim = make_simulator(tmp, None)
            env = {"KEYBROKER_ATTESTATION__SIMULATED_ROOT": str(sim.directory / "root-ca.pem")}
            addr, token, pid, cacert = stack.enter_context(own_server(tmp, env, workers=args.workers))
            verify = ssl.create_default_context(cafile=cacert)
            admin = stack.enter_context(
                httpx.Client(base_url=addr, headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=120)
            )
            import_collateral(admin, sim.collateral)
            secret = os.urandom(32)
            key_id = create_key(admin, secret)
            policy = admin.get(f"/kbs/v1/keys/{key_id}").json()["transfer_policy_id"]
            print("generating workload keys and one RSA-7680 key to import ...", file=sys.stderr, flush=True)
            keys = workload_keys(args.concurrency)
            pem = rsa_7680_pem()
            clients = []
            for _ in range(args.concurrency):
                lean = LeanClient(addr, verify, 120.0)
                stack.callback(lean.close)
                clients.append(lean)
            stop = threading.Event()
            stack.callback(stop.set)
            # LeanClient quacks like the httpx.Client that Load is typed with.
            bench = Bench(args, sim, key_id, secret, keys, Load(clients, stop, pid))  # type: ignore[arg-type]
            bench.load.run(Phase("warm-up", "transfer"), bench.complete, 2 * args.concurrency, 60.0)
            print("single RSA-7680 imports, one at a time ...", file=sys.stderr, flush=True)
            single = Importers(admin, policy, pem, 1)
            for _ in range(3):
                single._loop_once()

            print(f"transfers alone for {args.duration} s ...", file=sys.stderr, flush=True)
            alone = bench.load.run(Phase("transfers alone", "transfer"), bench.complete, 10**6, args.duration)
            print(f"transfers with {args.importers} RSA-7680 imports in flight ...", file=sys.stderr, flush=True)
            with Importers(admin, policy, pem, args.importers) as importers:
                loaded = bench.load.run(Phase("transfers + imports", "transfer"), bench.complete, 10**6, args.duration)
            imports = importers.summary(loaded.seconds + 0.5)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    rows = [alone.summary(1.0), loaded.summary(1.0)]
    p99_alone, p99_loaded = rows[0]["p99_ms"], rows[1]["p99_ms"]
    ratio = round(p99_loaded / p99_alone, 2) if p99_alone and p99_loaded else None
    document = {
        "cpus": os.cpu_count(),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "results": rows,
        "imports": imports,
        "single_import_s": single.summary(1.0),
        "p99_ratio": ratio,
        "targets": [
            {"target": f"transfer p99 with imports <= {TARGET_P99_RATIO}x alone", "measured": ratio,
             "met": None if ratio is None else ratio <= TARGET_P99_RATIO},
            {"target": f"an RSA-7680 import answered in < {TARGET_IMPORT_S} s (alone, max of 3)",
             "measured": single.summary(1.0)["max_s"],
             "met": None if not single.latencies else max(single.latencies) < TARGET_IMPORT_S},
        ],
        "errors": rows[0]["errors"] + rows[1]["errors"] + imports["errors"],
    }  # fmt: skip
    columns = (
        ("phase", "phase"), ("count", "count"), ("errors", "errors"), ("per_second", "per s"),
        ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("server_cpu_ms_per_op", "srv CPU ms/op"),
    )  # fmt: skip
    lines = [render_table(rows, columns), ""]
    lines.append(
        f"imports: {imports['imports']} by {imports['importers']} threads, {imports['per_second']}/s, "
        f"p50 {imports['p50_s']} s, p99 {imports['p99_s']} s, max {imports['max_s']} s, errors {imports['errors']}"
    )
    lines.append(f"single imports (one at a time): {[round(x, 3) for x in single.latencies]} s")
    for target in document["targets"]:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[target["met"]]
        lines.append(f"target {target['target']:<48} measured {target['measured']}: {verdict}")
    lines.append(f"{document['cpus']} CPUs, client and server on the same machine")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    for sample in imports["error_samples"] + rows[0]["error_samples"] + rows[1]["error_samples"]:
        print(sample, file=sys.stderr)
    if args.json:
        print(json.dumps(document, indent=2))
    return 1 if document["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
