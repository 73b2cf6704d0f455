"""Simulated-quote generation speed: quotes per second for SGX v3, TDX v4 and TDX v5 (TD report 1.0 and 1.5).

Usage (from the repository root, with the project's venv):

    .venv/bin/python bench/sim.py                       # 3 s per measurement, 2 processes; table on stdout
    .venv/bin/python bench/sim.py --duration 1 --max-quotes 2000 --processes 4
    .venv/bin/python bench/sim.py --json                # JSON document on stdout, the table on stderr
    .venv/bin/python bench/sim.py --profile             # cProfile of SGX generation even when it is fast enough

A simulated PKI, one platform and its collateral (UpToDate) are created in a temp directory, as ``keybroker sim
init`` does. Then, single-threaded, for each variant and for both entry points:

* ``build_quote``: ``keybroker_client.sim_quotes.build_quote(platform, report_data, sgx=|tdx=, ...)``;
* ``evidence``: ``keybroker_client.evidence.SimulatedEvidence(dir, "sgx"|"tdx", ...).quote(report_data)``, what a
  workload calls;

each call gets fresh random 64 bytes of report data and is timed on its own (``time.perf_counter_ns``). A
measurement stops after ``--duration`` seconds or ``--max-quotes`` quotes, whichever comes first. Reported:
quotes/s (quotes over the loop's wall time, report data generation included) and median µs per quote.

Then ``--processes`` worker processes (``multiprocessing``, spawn) each load ``SimulatedEvidence`` and generate
SGX, then TDX v4, quotes for ``--duration`` seconds, starting together (a barrier); ``--max-quotes`` bounds the
total over the workers. Reported: total quotes/s (all quotes over first start to last end) and the speed-up over
the single-threaded ``evidence`` row.

Before timing, one quote of each variant from each entry point is verified with keybroker's ``QuoteVerifier``
(simulated root trusted, the generated collateral in ``MemoryCollateral``): it must give TCB status ``UpToDate``
with the quote version, body type and report data asked for. If single-threaded SGX ``evidence`` generation is
below 300 quotes/s (or with ``--profile``), SGX generation is profiled with cProfile (top 15 by tottime).

Exit status: 0; 2 when a sanity check fails or a worker process fails.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing
import os
import pstats
import queue
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keybroker_client.evidence import SimulatedEvidence
from keybroker_client.sim_platform import load_platform
from keybroker_client.sim_quotes import Platform, SgxMeasurements, TdxMeasurements, build_quote

SGX_TARGET_PER_SECOND = 300.0  # below this, single-threaded SGX generation is profiled
PROFILE_QUOTES = 500
_CHUNK = 256  # report data is drawn from os.urandom this many quotes at a time


class SanityError(Exception):
    """A generated quote did not verify as expected."""


@dataclass(frozen=True)
class Variant:
    name: str
    tee: str  # "sgx" | "tdx"
    version: int | None  # None: the default (3 for SGX, 4 for TDX)
    td_report_15: bool = False
    expected_version: int = 3
    expected_body: str = "SgxEnclave"

    def builder(self, platform: Platform) -> Callable[[bytes], bytes]:
        sgx = SgxMeasurements() if self.tee == "sgx" else None
        tdx = TdxMeasurements() if self.tee == "tdx" else None
        version, td15 = self.version, self.td_report_15
        return lambda report_data: build_quote(
            platform, report_data, sgx=sgx, tdx=tdx, version=version, td_report_15=td15
        )

    def evidence(self, directory: Path) -> Callable[[bytes], bytes]:
        return SimulatedEvidence(directory, self.tee, version=self.version, td_report_15=self.td_report_15).quote


VARIANTS = (
    Variant("SGX v3", "sgx", None),
    Variant("TDX v4", "tdx", None, expected_version=4, expected_body="TD10"),
    Variant("TDX v5 TD1.0", "tdx", 5, expected_version=5, expected_body="TD10"),
    Variant("TDX v5 TD1.5", "tdx", 5, True, expected_version=5, expected_body="TD15"),
)
PARALLEL_VARIANTS = ("SGX v3", "TDX v4")
APIS = ("build_quote", "evidence")


def make_simulator(directory: Path, now: datetime) -> None:
    """The PKI, the ``default`` platform and UpToDate collateral in ``directory/coll/{sgx,tdx}``."""
    from keybroker.sim.collateral import CollateralSpec, make_collateral
    from keybroker.sim.pki import PlatformSpec, add_platform, init_pki

    pki = init_pki(directory, now)
    add_platform(pki, PlatformSpec(), now)
    make_collateral(pki, directory / "coll", CollateralSpec(), now)


def sanity_check(directory: Path, now: datetime) -> list[dict[str, Any]]:
    """Verify one quote per variant and entry point; raises ``SanityError``."""
    from keybroker.attestation.collateral import read_bundle
    from keybroker.attestation.store import MemoryCollateral
    from keybroker.attestation.verifier import QuoteVerifier, TrustAnchors, intel_root_der

    root_der = x509.load_pem_x509_certificate((directory / "root-ca.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    anchors = TrustAnchors(intel_root_der(), root_der)
    items = read_bundle(directory / "coll" / "sgx", anchors.roots()) + read_bundle(
        directory / "coll" / "tdx", anchors.roots()
    )
    verifier = QuoteVerifier(MemoryCollateral(items), anchors)
    platform = load_platform(directory)
    checked = []
    for variant in VARIANTS:
        for api, make in (("build_quote", variant.builder(platform)), ("evidence", variant.evidence(directory))):
            report_data = os.urandom(64)
            quote = make(report_data)
            what = f"{variant.name} ({api})"
            try:
                verified = verifier.verify(quote, now)
            except Exception as exc:  # AttestationFailed, CollateralUnavailable: report, never hide
                raise SanityError(f"{what}: the quote did not verify: {type(exc).__name__}: {exc}") from None
            got = (verified.tcb_status, verified.quote.version, verified.quote.body_type, verified.quote.report_data)
            want = ("UpToDate", variant.expected_version, variant.expected_body, report_data)
            if got != want or not verified.simulated:
                raise SanityError(
                    f"{what}: status {got[0]!r}, version {got[1]}, body {got[2]}, report data "
                    f"{'as given' if got[3] == report_data else 'DIFFERENT'}, simulated {verified.simulated}; "
                    f"expected UpToDate, version {want[1]}, body {want[2]}, report data as given, simulated"
                )
            checked.append(
                {"variant": variant.name, "api": api, "tcb_status": verified.tcb_status, "bytes": len(quote)}
            )
    return checked


def _report_data() -> Callable[[], bytes]:
    """Fresh random 64-byte report data per call, drawn from the OS in chunks."""
    state: dict[str, Any] = {"pool": b"", "at": 0}

    def draw() -> bytes:
        if state["at"] >= len(state["pool"]):
            state["pool"], state["at"] = os.urandom(64 * _CHUNK), 0
        at = state["at"]
        state["at"] = at + 64
        pool: bytes = state["pool"]
        return pool[at : at + 64]

    return draw


@dataclass
class Timing:
    quotes: int = 0
    seconds: float = 0.0
    samples_ns: list[int] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.quotes / self.seconds if self.seconds > 0 else 0.0

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_ns) / 1000 if self.samples_ns else 0.0


def measure(make: Callable[[bytes], bytes], duration: float, max_quotes: int) -> Timing:
    for _ in range(20):  # warm-up: imports, lazy key material, caches
        make(os.urandom(64))
    draw, clock = _report_data(), time.perf_counter_ns
    samples: list[int] = []
    started = clock()
    deadline = started + int(duration * 1e9)
    now = started
    while len(samples) < max_quotes and now < deadline:
        report_data = draw()
        begin = clock()
        make(report_data)
        now = clock()
        samples.append(now - begin)
    return Timing(len(samples), (clock() - started) / 1e9, samples)


def _worker(
    directory: str, variant_name: str, duration: float, max_quotes: int, barrier: Any, results: Any, index: int
) -> None:
    """One process: load the platform (untimed), wait for the others, generate quotes, report the count."""
    try:
        variant = next(v for v in VARIANTS if v.name == variant_name)
        make = variant.evidence(Path(directory))
        for _ in range(20):
            make(os.urandom(64))
        draw = _report_data()
        barrier.wait(timeout=120)
        started = time.monotonic()
        deadline, count = started + duration, 0
        while count < max_quotes and time.monotonic() < deadline:
            make(draw())
            count += 1
        results.put((index, "ok", count, started, time.monotonic()))
    except BaseException:
        results.put((index, "error", traceback.format_exc(), 0.0, 0.0))


def measure_parallel(directory: Path, variant_name: str, processes: int, duration: float, max_quotes: int) -> Timing:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    per_worker = -(-max_quotes // processes)
    workers = [
        ctx.Process(
            target=_worker,
            args=(str(directory), variant_name, duration, per_worker, barrier, results, i),
            daemon=True,
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    outcomes: list[tuple[int, str, Any, float, float]] = []
    give_up = time.monotonic() + duration + 300
    try:
        while len(outcomes) < processes:
            try:
                outcomes.append(results.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            reported = {index for index, *_ in outcomes}
            died = [i for i, w in enumerate(workers) if w.exitcode is not None and i not in reported]
            if died or time.monotonic() > give_up:
                barrier.abort()  # the others stop waiting for the dead one
                what = f"exited with status {workers[died[0]].exitcode}" if died else "did not finish in time"
                raise RuntimeError(f"a worker process {what} ({variant_name}); see its output above")
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.exitcode is None:
                worker.terminate()  # only our own workers, by handle
                worker.join(timeout=5)
    failures = [detail for _, status, detail, _, _ in outcomes if status != "ok"]
    if failures:
        raise RuntimeError(f"a worker failed ({variant_name}):\n{failures[0]}")
    total = sum(int(count) for _, _, count, _, _ in outcomes)
    span = max(end for *_, end in outcomes) - min(start for *_, start, _ in outcomes)
    return Timing(total, span)


def profile_sgx(directory: Path, quotes: int, top: int = 15) -> str:
    make, draw = VARIANTS[0].evidence(directory), _report_data()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(quotes):
        make(draw())
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(pstats.SortKey.TIME).print_stats(top)
    return out.getvalue()


def table(result: dict[str, Any]) -> str:
    lines = [
        f"simulated quote generation: up to {result['duration']:g} s / {result['max_quotes']} quotes per measurement,"
        f" {result['cpus']} CPUs, Python {result['python']}",
        f"sanity: {len(result['sanity'])} quotes verified with QuoteVerifier, all UpToDate",
        "",
        "single-threaded",
        f"{'variant':<14} {'api':<12} {'quotes':>7} {'quotes/s':>9} {'median µs':>10} {'bytes':>6}",
    ]
    sizes = {(s["variant"], s["api"]): s["bytes"] for s in result["sanity"]}
    for row in result["single"]:
        lines.append(
            f"{row['variant']:<14} {row['api']:<12} {row['quotes']:>7} {row['quotes_per_s']:>9.0f} "
            f"{row['median_us']:>10.1f} {sizes[row['variant'], row['api']]:>6}"
        )
    lines += [
        "",
        f"{result['processes']} processes (spawn), SimulatedEvidence",
        f"{'variant':<14} {'quotes':>7} {'quotes/s':>9} {'x single':>9}",
    ]
    for row in result["parallel"]:
        lines.append(
            f"{row['variant']:<14} {row['quotes']:>7} {row['quotes_per_s']:>9.0f} {row['speedup_vs_single']:>8.2f}x"
        )
    sgx = result["sgx_evidence_quotes_per_s"]
    verdict = "met" if sgx >= SGX_TARGET_PER_SECOND else "NOT met"
    lines += [
        "",
        f"SGX single-threaded (evidence): {sgx:.0f} quotes/s (target >= {SGX_TARGET_PER_SECOND:.0f}: {verdict})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (3)")
    parser.add_argument("--max-quotes", type=int, default=100_000, help="quotes per measurement at most (100000)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes for the parallel runs (2)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--profile", action="store_true", help="cProfile SGX generation even above the target")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.max_quotes < 1 or args.processes < 1:
        parser.error("--duration must be positive, --max-quotes and --processes at least 1")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="keybroker-bench-sim-") as tmp:
        directory = Path(tmp)
        now = datetime.now(UTC)
        make_simulator(directory, now)
        try:
            sanity = sanity_check(directory, now)
        except SanityError as exc:
            print(f"sanity check failed: {exc}", file=sys.stderr)
            return 2

        platform = load_platform(directory)
        single: list[dict[str, Any]] = []
        for variant in VARIANTS:
            for api in APIS:
                make = variant.builder(platform) if api == "build_quote" else variant.evidence(directory)
                timing = measure(make, args.duration, args.max_quotes)
                single.append(
                    {
                        "variant": variant.name,
                        "api": api,
                        "quotes": timing.quotes,
                        "seconds": round(timing.seconds, 3),
                        "quotes_per_s": round(timing.per_second, 1),
                        "median_us": round(timing.median_us, 1),
                    }
                )
        evidence_rate = {row["variant"]: row["quotes_per_s"] for row in single if row["api"] == "evidence"}

        parallel: list[dict[str, Any]] = []
        for name in PARALLEL_VARIANTS:
            try:
                timing = measure_parallel(directory, name, args.processes, args.duration, args.max_quotes)
            except (RuntimeError, OSError) as exc:
                print(exc, file=sys.stderr)
                return 2
            parallel.append(
                {
                    "variant": name,
                    "quotes": timing.quotes,
                    "seconds": round(timing.seconds, 3),
                    "quotes_per_s": round(timing.per_second, 1),
                    "speedup_vs_single": round(timing.per_second / evidence_rate[name], 2),
                }
            )

        sgx_rate = evidence_rate["SGX v3"]
        profiled = profile_sgx(directory, PROFILE_QUOTES) if args.profile or sgx_rate < SGX_TARGET_PER_SECOND else None

    result: dict[str, Any] = {
        "duration": args.duration,
        "max_quotes": args.max_quotes,
        "processes": args.processes,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "seconds": round(time.perf_counter() - started, 1),
        "sanity": sanity,
        "single": single,
        "parallel": parallel,
        "sgx_evidence_quotes_per_s": sgx_rate,
        "sgx_target_per_s": SGX_TARGET_PER_SECOND,
    }
    text = table(result)
    heading = f"cProfile of SimulatedEvidence SGX ({PROFILE_QUOTES} quotes), top 15 by tottime:"
    if args.json:
        if profiled is not None:
            result["profile"] = profiled
        print(json.dumps(result, indent=2))
        print(text, file=sys.stderr)
        if profiled is not None:
            print(f"\n{heading}\n{profiled}", file=sys.stderr)
    else:
        print(text)
        if profiled is not None:
            print(f"\n{heading}\n{profiled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
