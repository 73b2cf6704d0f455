"""Transfers through the load balancer with 1 and 2 replicas on PostgreSQL, and on a single-host SQLite server, in
one run; and the database round trips of one transfer (nonce step included), counted on the wire.

Usage (from the repository root, as root or a user that can run PostgreSQL):

    .venv/bin/python bench/ha.py                       # 10 s per phase, 32 workloads
    .venv/bin/python bench/ha.py --duration 5 --concurrency 16 --json

Setup (not timed): ``scripts/cluster.sh up --kms embedded`` in a temporary directory (PostgreSQL, two replicas,
nginx; the keys in PostgreSQL under one KEK file, so that only the database differs from the SQLite run). Then, in
this order, ``bench/transfer.py --skip-prebuilt`` (complete transfers: nonce, quote, transfer) against:

* ``pg, 1 replica``: the load balancer sending to kb-1 only (``cluster.sh lb kb-1``);
* ``pg, 2 replicas``: to both;
* ``sqlite, 1 host``: transfer.py's own server on SQLite.

Server CPU per transfer is every process that serves it: the replicas, PostgreSQL's postmaster and its backends,
nginx's master and worker (for SQLite: the server). Client and servers share the machine's CPUs, so the ratios
between the rows are what to compare. Round trips: a third replica joins the deployment with its database URL
pointing at a counting relay (``_pgwire``); ``--rt-transfers`` transfers from 4 workloads, minus what the replica
sends while idle (heartbeats, leases), divided by the transfers.

The capacity estimate: cores of keybroker and of PostgreSQL for 10,000 workloads starting within one minute
(167 transfers/s on average), from the 2-replica row's CPU per transfer split between keybroker and PostgreSQL.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from _common import cpu_times, free_port, table
from _pgwire import RoundTripCounter
from _setup import MEASUREMENTS, create_key, report_data, workload_keys
from keybroker_client.sim_platform import load_platform
from keybroker_client.sim_quotes import build_quote

REPO = Path(__file__).resolve().parent.parent
PY = REPO / ".venv" / "bin" / "python"
CLUSTER = ["bash", str(REPO / "scripts" / "cluster.sh")]
WORKLOADS_PER_MINUTE = 10_000


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, **kwargs)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def transfer_bench(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    argv = [str(PY), str(REPO / "bench" / "transfer.py"), "--skip-prebuilt", "--json", "--duration",
            str(args.duration), "--concurrency", str(args.concurrency), "--verify-seconds", "1", *extra]  # fmt: skip
    done = run(argv)
    document: dict[str, Any] = json.loads(done.stdout)
    complete: dict[str, Any] = next(row for row in document["results"] if row["phase"] == "complete")
    return complete | {"bare": document["bare_verify"]}


def postmaster(directory: Path) -> int:
    return int((directory / "pg" / "data" / "postmaster.pid").read_text().split()[0])


def _statements(requests: list[tuple[int, bytes]], first: int) -> dict[str, int]:
    """What each recorded round trip carried, for ``--rt-show``: the SQL of its first Parse/Query message (a Bind
    of a statement prepared earlier is named by that statement's SQL), else its first message type."""
    prepared: dict[tuple[int, bytes], str] = {}  # statement names are per connection
    kinds: dict[str, int] = {}
    for index, (connection, request) in enumerate(requests):
        at, label = 0, ""
        while at + 5 <= len(request):
            tag, length = request[at : at + 1], int.from_bytes(request[at + 1 : at + 5], "big")
            body = request[at + 5 : at + 1 + length]
            if tag in (b"P", b"Q"):
                name, _, rest = body.partition(b"\0") if tag == b"P" else (b"", b"", body)
                sql = " ".join(rest.split(b"\0")[0].decode(errors="replace").split())[:100]
                prepared[connection, name] = sql
                label = label or sql
            elif tag == b"B":
                statement = body.split(b"\0")[1] if body.count(b"\0") >= 2 else b""
                label = label or prepared.get((connection, statement), "(bind of a statement prepared earlier)")
            elif not label:
                label = f"(message {tag!r})" if tag.isalpha() else "(connection start-up)"
            at += 1 + max(length, 4)
        if index >= first:
            kinds[label or "(empty)"] = kinds.get(label or "(empty)", 0) + 1
    return kinds


def round_trips(directory: Path, state: dict[str, Any], transfers: int, show: bool = False) -> dict[str, Any]:
    """A replica that reaches PostgreSQL through the counting relay; transfers from 4 threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    config = str(directory / "keybroker.toml")
    with RoundTripCounter(state["ports"]["pg"]) as relay:
        env["KEYBROKER_DATABASE__URL"] = f"postgresql://keybroker@127.0.0.1:{relay.port}/keybroker"
        data = directory / "kb-rt"
        run([str(REPO / ".venv" / "bin" / "keybroker"), "init", "--data-dir", str(data), "--config", config], env=env)
        port = free_port()
        with (directory / "kb-rt.log").open("wb") as log:
            server = subprocess.Popen(
                [str(REPO / ".venv" / "bin" / "keybroker"), "serve", "--data-dir", str(data), "--config", config,
                 "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            url, verify = f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(directory / "ca.pem"))
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/readyz", verify=verify, timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            token = (directory / "admin-token").read_text().strip()
            with httpx.Client(base_url=url, verify=verify, headers={"Authorization": f"Bearer {token}"}) as admin:
                key_id = create_key(admin, os.urandom(32))
            platform = load_platform(directory / "sim", "default")
            key = workload_keys(1)[0]
            path = f"/kbs/v1/keys/{key_id}/transfer"

            def transfer(http: httpx.Client) -> None:
                nonce = http.post(path, json={}).json()
                quote = build_quote(platform, report_data(nonce, key.spki), sgx=MEASUREMENTS)
                body = {"quote": base64.b64encode(quote).decode(), "nonce": nonce, "user_data": key.spki_b64}
                answer = http.post(path, json=body, headers={"Attestation-Type": "SGX"})
                if answer.status_code != 200:
                    raise SystemExit(f"round-trip phase: HTTP {answer.status_code}: {answer.text[:200]}")

            def worker(count: int) -> None:
                with httpx.Client(base_url=url, verify=verify, timeout=60) as http:
                    for _ in range(count):
                        transfer(http)

            relay.record = [] if show else None
            warm = [threading.Thread(target=worker, args=(4,)) for _ in range(4)]  # the lookup cache, the pool
            for thread in warm:
                thread.start()
            for thread in warm:
                thread.join()
            time.sleep(1)
            idle_start, idle_began = relay.snapshot(), time.monotonic()
            time.sleep(11)  # the heartbeat is every 10 s
            idle = (relay.snapshot().round_trips - idle_start.round_trips) / (time.monotonic() - idle_began)
            before, began = relay.snapshot(), time.monotonic()
            threads = [threading.Thread(target=worker, args=(transfers // 4,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds, after = time.monotonic() - began, relay.snapshot()
            if relay.record is not None:
                window = len(relay.record) - (after.round_trips - before.round_trips)
                for sql, count in sorted(_statements(relay.record, window).items(), key=lambda item: -item[1]):
                    print(f"{count:6d}  {sql}", file=sys.stderr)
            done = 4 * (transfers // 4)
            measured = after.round_trips - before.round_trips - idle * seconds
            return {
                "transfers": done,
                "round_trips_per_transfer": round(measured / done, 2),
                "idle_round_trips_per_s": round(idle, 2),
                "bytes_per_transfer": round((after.client_bytes + after.server_bytes
                                             - before.client_bytes - before.server_bytes) / done),
            }  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase (default 10)")
    parser.add_argument("--concurrency", type=int, default=32, help="workloads (default 32)")
    parser.add_argument("--rt-transfers", type=int, default=200, help="transfers for the round-trip count")
    parser.add_argument("--rt-show", action="store_true", help="print what the counted round trips carried")
    parser.add_argument("--rt-only", action="store_true", help="only the round-trip count (no load phases)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="keybroker-bench-ha-", dir="/tmp"))
    directory = base / "cluster"
    rows: list[dict[str, Any]] = []
    try:
        print("starting PostgreSQL, 2 replicas and nginx (scripts/cluster.sh up --kms embedded) ...", file=sys.stderr)
        os.chmod(base, 0o711)  # the postgres user reaches the cluster directory through it
        run([*CLUSTER, "--dir", str(directory), "up", "--kms", "embedded", "--replicas", "2"])
        state = json.loads((directory / "cluster.json").read_text())
        common = ["--addr", state["lb_url"], "--token", (directory / "admin-token").read_text().strip(),
                  "--cacert", str(directory / "ca.pem"), "--sim-dir", str(directory / "sim")]  # fmt: skip
        pg, lb = postmaster(directory), state["pids"]["lb"]
        for replicas in () if args.rt_only else (["kb-1"], ["kb-1", "kb-2"]):
            run([*CLUSTER, "--dir", str(directory), "lb", *replicas])
            pids = [state["pids"][r] for r in replicas]
            print(f"load through the balancer, {len(replicas)} replica(s) on PostgreSQL ...", file=sys.stderr)
            before_pg = sum(cpu_times(pg))
            row = transfer_bench(args, [*common, "--server-pid", ",".join(map(str, [*pids, pg, lb]))])
            pg_share = sum(cpu_times(pg)) - before_pg  # (this includes the setup requests: a small overestimate)
            rows.append(row | {"setup": f"pg, {len(replicas)} replica(s)", "postgres_cpu_s": round(pg_share, 2)})
        if not args.rt_only:
            print("single-host SQLite server ...", file=sys.stderr)
            rows.append(transfer_bench(args, []) | {"setup": "sqlite, 1 host", "postgres_cpu_s": None})
        print(f"round trips: a replica through a counting relay, {args.rt_transfers} transfers ...", file=sys.stderr)
        trips = round_trips(directory, state, args.rt_transfers, args.rt_show)
        if args.rt_only:
            print(json.dumps(trips))
            return 0
    finally:
        subprocess.run([*CLUSTER, "--dir", str(directory), "down"], capture_output=True, check=False, timeout=300)
        shutil.rmtree(base, ignore_errors=True)
    two = rows[1]
    per_transfer_ms = two["server_cpu_ms_per_op"] or 0.0
    pg_ms = 1000 * two["postgres_cpu_s"] / max(1, two["count"])
    rate = WORKLOADS_PER_MINUTE / 60
    estimate = {
        "transfers_per_s": round(rate, 1),
        "keybroker_and_nginx_cores": round(rate * (per_transfer_ms - pg_ms) / 1000, 2),
        "postgres_cores": round(rate * pg_ms / 1000, 2),
    }
    columns = (("setup", "setup"), ("count", "transfers"), ("errors", "errors"), ("per_second", "per s"),
               ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("server_cpu_ms_per_op", "srv CPU ms/op"),
               ("postgres_cpu_s", "pg CPU s"), ("client_cpu_ms_per_op", "cli CPU ms/op"))  # fmt: skip
    text = [table(rows, columns), ""]
    text.append(f"database round trips per complete transfer (nonce step included): "
                f"{trips['round_trips_per_transfer']} (target <= 3; idle replica {trips['idle_round_trips_per_s']}/s,"
                f" {trips['bytes_per_transfer']} bytes per transfer)")  # fmt: skip
    text.append(f"10,000 workloads in one minute = {estimate['transfers_per_s']} transfers/s: about "
                f"{estimate['keybroker_and_nginx_cores']} cores of keybroker (+nginx) and {estimate['postgres_cores']}"
                " cores of PostgreSQL at the 2-replica CPU per transfer (before headroom)")  # fmt: skip
    text.append(f"{os.cpu_count()} CPUs; client, replicas, PostgreSQL and nginx on the same machine")
    print("\n".join(text), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"results": rows, "round_trips": trips, "estimate": estimate}, indent=2))
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
