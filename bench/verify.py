"""Quote verification cost: keybroker's ``QuoteVerifier`` (cached collateral) against a bare ``dcap_qvl.verify``.

Usage (from the repository root, with the project's venv):

    .venv/bin/python bench/verify.py                     # 1000 timed calls per method per quote, table on stdout
    .venv/bin/python bench/verify.py --iterations 200    # quicker
    .venv/bin/python bench/verify.py --json              # JSON document on stdout, the table on stderr
    .venv/bin/python bench/verify.py --profile           # also cProfile the keybroker loop (top 15 by tottime)

The quotes are the positive real ones of ``tests/data/dcap/real/`` (folders not starting with ``neg-``), each
verified at the ``now`` of its ``expected.json``. Three methods, on the same quotes in the same run:

* ``bare``: ``dcap_qvl.QuoteCollateralV3.from_json(collateral.json)`` once, then ``dcap_qvl.verify(quote, coll, now)``;
* ``keybroker``: ``QuoteVerifier(MemoryCollateral(items), TrustAnchors(intel_root_der()))`` with the items of
  ``read_bundle`` over every folder; ``verify(quote, now_datetime)``, after a warm-up that fills the collateral cache;
* ``keybroker-db``: the same verifier over the database-backed ``CollateralStore`` as the server uses it (a temp data
  directory, ``initialise``, ``store.put(items, "bench")``).

Measurements are interleaved (blocks of ``--block`` calls per method and quote, the method order rotating each
round) so machine noise hits every method alike; each call is timed on its own with ``time.perf_counter_ns``.
Reported per quote and method: median and p90 µs per call; and the ratio keybroker / bare of the medians, per quote
and as the geometric mean over the quotes. The issue's target is keybroker <= 1.2x the bare call. Compare numbers
on one machine only. Exit status 0 (2 when the test data is missing or a result differs from ``expected.json``).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.metadata
import io
import json
import math
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dcap_qvl

from keybroker.attestation.collateral import CollateralItem, read_bundle
from keybroker.attestation.store import CollateralStore, MemoryCollateral
from keybroker.attestation.verifier import QuoteVerifier, TrustAnchors, intel_root_der


class Mismatch(Exception):
    """A method's result differs from ``expected.json``."""


REAL = Path(__file__).resolve().parent.parent / "tests" / "data" / "dcap" / "real"
TARGET_RATIO = 1.2
METHODS = ("bare", "keybroker", "keybroker-db")


@dataclass(frozen=True)
class Case:
    name: str
    folder: Path
    quote: bytes
    collateral: Any  # dcap_qvl.QuoteCollateralV3
    now: int
    expected_status: str

    @property
    def now_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


def load_cases(root: Path) -> list[Case]:
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("neg-")):
        expected = json.loads((folder / "expected.json").read_text())
        cases.append(
            Case(
                name=folder.name,
                folder=folder,
                quote=(folder / "quote.bin").read_bytes(),
                collateral=dcap_qvl.QuoteCollateralV3.from_json((folder / "collateral.json").read_text()),
                now=int(expected["now"]),
                expected_status=str(expected["expected"]["status"]),
            )
        )
    return cases


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Linear interpolation between closest ranks (``sorted_values`` ascending, not empty)."""
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class Bench:
    """Holds the verifiers; ``call(method, case)`` returns a zero-argument callable doing one verification."""

    def __init__(self, cases: list[Case], data_dir: Path) -> None:
        from keybroker import services
        from keybroker.clock import SystemClock
        from keybroker.config import load_settings
        from keybroker.storage.db import Database

        anchors = TrustAnchors(intel_root_der())
        items: list[CollateralItem] = []
        for case in cases:
            items.extend(read_bundle(case.folder, anchors.roots()))
        self.memory_verifier = QuoteVerifier(MemoryCollateral(items), anchors)

        settings = load_settings(data_dir=data_dir)
        services.initialise(settings)
        self.database = Database.from_url(settings.database_url)
        store = CollateralStore(self.database, SystemClock())
        store.put(items, "bench")
        self.db_verifier = QuoteVerifier(store, anchors)

    def call(self, method: str, case: Case) -> Callable[[], str]:
        quote, now, now_dt, coll = case.quote, case.now, case.now_datetime, case.collateral
        if method == "bare":
            return lambda: str(dcap_qvl.verify(quote, coll, now).status)
        verifier = self.memory_verifier if method == "keybroker" else self.db_verifier
        return lambda: verifier.verify(quote, now_dt).tcb_status

    def close(self) -> None:
        self.database.engine.dispose()


def run(bench: Bench, cases: list[Case], iterations: int, block: int) -> dict[tuple[str, str], list[int]]:
    samples: dict[tuple[str, str], list[int]] = {(c.name, m): [] for c in cases for m in METHODS}
    calls = {(c.name, m): bench.call(m, c) for c in cases for m in METHODS}
    # Warm-up: fills the verifiers' collateral caches and the PCK-extension cache; checks every result.
    for case in cases:
        for method in METHODS:
            status = ""
            for _ in range(max(3, min(block, 20))):
                status = calls[case.name, method]()
            if status != case.expected_status:
                raise Mismatch(f"{case.name}/{method}: status {status!r}, expected {case.expected_status!r}")
    clock = time.perf_counter_ns
    rounds = math.ceil(iterations / block)
    for round_no in range(rounds):
        count = min(block, iterations - round_no * block)
        shift = round_no % len(METHODS)
        order = METHODS[shift:] + METHODS[:shift]
        for case in cases:
            for method in order:
                fn, out = calls[case.name, method], samples[case.name, method]
                for _ in range(count):
                    start = clock()
                    fn()
                    out.append(clock() - start)
    return samples


def summarise(cases: list[Case], samples: dict[tuple[str, str], list[int]]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    ratios: dict[str, list[float]] = {"keybroker": [], "keybroker-db": []}
    for case in cases:
        medians: dict[str, float] = {}
        for method in METHODS:
            values = sorted(samples[case.name, method])
            medians[method] = statistics.median(values) / 1000
            rows.append(
                {
                    "quote": case.name,
                    "method": method,
                    "calls": len(values),
                    "median_us": round(medians[method], 1),
                    "p90_us": round(percentile(values, 0.9) / 1000, 1),
                    "ratio_vs_bare": round(medians[method] / medians["bare"], 3),
                }
            )
        for method, collected in ratios.items():
            collected.append(medians[method] / medians["bare"])
    overall = {method: round(math.exp(statistics.fmean(map(math.log, r))), 3) for method, r in ratios.items()}
    return {
        "target_ratio": TARGET_RATIO,
        "ratio_geomean": overall,
        "target_met": overall["keybroker"] <= TARGET_RATIO,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"dcap-qvl {result['dcap_qvl_version']}, {result['iterations']} calls per method per quote,"
        f" blocks of {result['block']}, {result['seconds']:.1f} s",
        "",
        f"{'quote':<28} {'method':<13} {'calls':>6} {'median µs':>10} {'p90 µs':>10} {'x bare':>7}",
    ]
    previous = None
    for row in result["rows"]:
        if previous is not None and row["quote"] != previous:
            lines.append("")
        previous = row["quote"]
        lines.append(
            f"{row['quote']:<28} {row['method']:<13} {row['calls']:>6} {row['median_us']:>10.1f} "
            f"{row['p90_us']:>10.1f} {row['ratio_vs_bare']:>6.2f}x"
        )
    geo = result["ratio_geomean"]
    verdict = "met" if result["target_met"] else "NOT met"
    lines += [
        "",
        f"keybroker / bare (median, geometric mean over quotes): {geo['keybroker']:.2f}x"
        f"  (target <= {TARGET_RATIO:.1f}x: {verdict})",
        f"keybroker-db / bare (median, geometric mean over quotes): {geo['keybroker-db']:.2f}x",
    ]
    return "\n".join(lines)


def profile(bench: Bench, cases: list[Case], iterations: int, top: int = 15) -> str:
    calls = [bench.call("keybroker", case) for case in cases]
    profiler = cProfile.Profile()
    profiler.enable()
    for fn in calls:
        for _ in range(iterations):
            fn()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats(pstats.SortKey.TIME).print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=1000, help="timed calls per method per quote (1000)")
    parser.add_argument("--block", type=int, default=50, help="calls per method and quote between switches (50)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--profile", action="store_true", help="cProfile the keybroker loop, top 15 by tottime")
    parser.add_argument("--data", type=Path, default=REAL, help=f"quote folders (default {REAL})")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.block < 1:
        parser.error("--iterations and --block must be at least 1")
    if not args.data.is_dir():
        print(f"no test data at {args.data}", file=sys.stderr)
        return 2
    cases = load_cases(args.data)
    if not cases:
        print(f"no positive quote folders in {args.data}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="keybroker-bench-verify-") as tmp:
        bench = Bench(cases, Path(tmp) / "data")
        try:
            started = time.perf_counter()
            try:
                samples = run(bench, cases, args.iterations, args.block)
            except Mismatch as exc:
                print(exc, file=sys.stderr)
                return 2
            result = summarise(cases, samples)
            result.update(
                iterations=args.iterations,
                block=args.block,
                seconds=time.perf_counter() - started,
                dcap_qvl_version=importlib.metadata.version("dcap-qvl"),
            )
            profiled = profile(bench, cases, args.iterations) if args.profile else None
        finally:
            bench.close()

    text = table(result)
    if args.json:
        if profiled is not None:
            result["profile"] = profiled
        print(json.dumps(result, indent=2))
        print(text, file=sys.stderr)
        if profiled is not None:
            print(profiled, file=sys.stderr)
    else:
        print(text)
        if profiled is not None:
            print(f"\ncProfile of the keybroker loop ({args.iterations} calls per quote), top 15 by tottime:")
            print(profiled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
