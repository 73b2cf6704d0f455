"""Where a benchmark's server time goes: py-spy during the load phases, and the service layer profiled in-process."""

from __future__ import annotations

import base64
import contextlib
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from _setup import MEASUREMENTS, Simulator, WorkloadKey, report_data
from keybroker_client._client import unwrap
from keybroker_client.sim_quotes import build_quote


class Profiler:
    """``py-spy record`` on the server during one phase (collapsed stacks); stopped with SIGINT."""

    def __init__(self, py_spy: str | None, out_dir: Path | None, pid: int | None, gil: bool) -> None:
        self.py_spy, self.out_dir, self.pid, self.gil = py_spy, out_dir, pid, gil
        self.files: dict[str, Path] = {}

    @contextlib.contextmanager
    def record(self, phase: str, duration: float) -> Iterator[None]:
        if self.py_spy is None or self.out_dir is None or self.pid is None:
            yield
            return
        out = self.out_dir / f"{phase.replace(' ', '-')}.txt"
        command = [self.py_spy, "record", "--pid", str(self.pid), "--format", "raw", "--nolineno", "--rate", "100"]
        command += ["--duration", str(math.ceil(duration) + 60), "--output", str(out)]
        command += ["--gil"] if self.gil else []
        spy = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # let it attach
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if out.is_file():
                self.files[phase] = out
            else:
                print(f"py-spy wrote no profile for {phase}: {err.decode(errors='replace')[-500:]}", file=sys.stderr)


# Leaf frames where a sampled thread is waiting, not working (py-spy counts them as active): idle AnyIO workers, and
# workers queued on keybroker's SQLite write lock (Database.transaction's own samples are its lock.acquire).
WAITING_LEAVES = frozenset(
    {
        "threading.py:Condition.wait",
        "queue.py:Queue.get",
        "threading.py:Event.wait",
        "keybroker/storage/db.py:Database.transaction",
    }
)


def top_functions(collapsed: Path, limit: int) -> dict[str, Any]:
    """From py-spy's collapsed stacks: the share of samples waiting (by leaf), and among the other samples the top
    functions by own (leaf) samples and the top keybroker functions by inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    waiting: Counter[str] = Counter()
    total = working = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [shorten(frame) for frame in stack.split(";")[1:]]  # the first frame names the thread
        if not frames:
            continue
        total += count
        if frames[-1] in WAITING_LEAVES:
            waiting[frames[-1]] += count
            continue
        working += count
        own[frames[-1]] += count
        for frame in set(frames):
            if frame.startswith("keybroker/") and not frame.startswith(("keybroker/cli/", "keybroker/__main__")):
                inclusive[frame] += count

    def ranked(counter: Counter[str], base: int) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "percent": round(100 * n / base, 1) if base else 0.0}
            for name, n in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "waiting": ranked(waiting, total),
        "own": ranked(own, working),
        "inclusive": ranked(inclusive, working),
    }


def shorten(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py)`` -> ``pkg/mod.py:func``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in where:
            where = where.rsplit(marker, 1)[1]
            break
    return f"{where}:{name}" if where else name


# --- in-process service profile ------------------------------------------------------------------------------


def service_profile(
    data_dir: Path, sim: Simulator, key_id: str, secret: bytes, keys: list[WorkloadKey], count: int, top: int
) -> dict[str, Any]:
    """Where the service layer's CPU goes, in this process, one thread, no HTTP, on the benchmark server's data
    directory (the server is idle by now; SQLite WAL allows a second process): ``service_parts``."""
    from keybroker.config import load_settings
    from keybroker.services import build_services

    settings = load_settings(
        data_dir=data_dir, overrides={"attestation": {"simulated_root": str(sim.directory / "root-ca.pem")}}
    )
    services = build_services(settings)
    try:
        return service_parts(services, sim, key_id, secret, keys, count, top)
    finally:
        services.close()


def service_parts(
    services: Any, sim: Simulator, key_id: str, secret: bytes, keys: list[WorkloadKey], count: int, top: int
) -> dict[str, Any]:
    """``count`` calls each of ``TransferService.nonce`` and of a whole transfer below the edge (``lookup``,
    ``parse_transfer``, ``TransferService.transfer``), then of the parts a transfer consists of, each timed alone
    with CPU time (so no profiler overhead is in these numbers); then ``count`` transfers under cProfile for a
    ranking of functions by own time (shares of the profiled time: the profiler inflates Python-heavy code against
    C calls such as dcap-qvl)."""
    import cProfile
    import json
    import pstats

    from keybroker.api.deps import _reject_duplicate_members
    from keybroker.audit.log import AuditContext, AuditEvent
    from keybroker.crypto.transfer import wrap_for_workload
    from keybroker.policy.engine import RequestContext, evaluate
    from keybroker.storage import revision
    from keybroker.transfer.requests import parse_transfer

    audit = AuditContext(request_id="bench-transfer", client="127.0.0.1")
    transfer, attestation = services.transfer, services.attestation

    def bodies(n: int) -> list[tuple[bytes, WorkloadKey]]:
        out = []
        for i in range(n):
            key = keys[i % len(keys)]
            nonce = transfer.nonce(key_id)[0].as_json()
            quote = build_quote(sim.platform, report_data(nonce, key.spki), sgx=MEASUREMENTS)
            body = {"quote": base64.b64encode(quote).decode(), "nonce": nonce, "user_data": key.spki_b64}
            out.append((json.dumps(body).encode(), key))
        return out

    def whole(raw: bytes) -> Any:
        outcome = transfer.transfer(
            transfer.lookup(key_id), parse_transfer("SGX", _reject_duplicate_members(raw)), None, audit
        )
        if outcome.refusal is not None:
            raise RuntimeError(f"the transfer was refused: {outcome.refusal.instance_code}")
        return outcome.wrapped

    def cpu_us(calls: list[Callable[[], object]]) -> float:
        started = time.process_time()
        for call in calls:
            call()
        return round((time.process_time() - started) * 1e6 / len(calls), 1)

    for raw, _ in bodies(10):  # warm-up: caches, connections, first collateral load
        whole(raw)
    nonce_us = cpu_us([lambda: transfer.nonce(key_id)] * count)
    work = bodies(count)
    transfer_us = cpu_us([partial(whole, raw) for raw, _ in work])
    raw, key = bodies(1)[0]
    last = whole(raw).as_json()
    released = unwrap(base64.b64decode(last["wrapped_key"]), base64.b64decode(last["wrapped_swk"]), key.private)

    looked_up = transfer.lookup(key_id)
    record, document = looked_up
    material = services.keys.load_material(record)
    work = bodies(count)
    parsed = [parse_transfer("SGX", _reject_duplicate_members(raw)) for raw, _ in work]
    event = AuditEvent("key.transfer", "allowed", key_id, {"bench": True})
    now = attestation.clock.now()
    verifier = transfer.verifier
    claims, _ = verifier.background(parsed[0].quote(), parsed[0].nonce, parsed[0].user_data, [])
    context = RequestContext(frozenset(), False, frozenset())
    parts: list[tuple[str, list[Callable[[], object]]]] = [
        (
            "JSON body + parse_transfer",
            [partial(lambda r: parse_transfer("SGX", _reject_duplicate_members(r)), r) for r, _ in work],
        ),
        ("nonce check (HMAC, expiry)", [partial(verifier.check_nonce, p.nonce) for p in parsed]),
        ("QuoteVerifier.verify", [partial(attestation.verifier.verify, p.quote(), now) for p in parsed]),
        (
            "verify + binding + claims",
            [partial(verifier.background, p.quote(), p.nonce, p.user_data, []) for p in parsed],
        ),
        ("policy evaluate", [partial(evaluate, document, claims, context, True)] * count),
        ("revision read (driver)", [partial(revision.read, services.database)] * count),
        (
            "nonce use + audit entry (one write)",
            [
                partial(services.audit.append_transfer, audit, event, verifier.nonce_use(p.nonce, "bench"))
                for p in parsed
            ],
        ),
        ("KeyService.load_material (read, unseal)", [partial(services.keys.load_material, record)] * count),
        (
            "wrap_for_workload (RSA-OAEP, AES-GCM)",
            [partial(wrap_for_workload, material.secret, parsed[0].public_key)] * count,
        ),
    ]
    timed = [{"part": name, "us": cpu_us(calls)} for name, calls in parts]

    work = bodies(count)
    profile = cProfile.Profile()
    profile.enable()
    for raw, _ in work:
        whole(raw)
    profile.disable()
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = pstats.Stats(profile).stats  # type: ignore[attr-defined]  # undocumented
    profiled = sum(v[2] for v in stats.values())
    db = sum(v[2] for k, v in stats.items() if "sqlalchemy" in k[0] or "sqlite3" in k[2] or "psycopg" in k[0])
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {
        "transfers": count,
        "released_key_matches": released == secret,
        "nonce_us": nonce_us,
        "transfer_us": transfer_us,
        "parts": timed,
        "profiled_db_percent": round(100 * db / profiled, 1),
        "top": [
            {"function": f"{shorten(f'{name} ({path})')}:{line}", "percent": round(100 * v[2] / profiled, 1)}
            for (path, line, name), v in ranked
        ],
    }
