"""The report of bench/transfer.py: its table, the issue's targets judged on the phases they are about, the text."""

from __future__ import annotations

import os
from typing import Any

from _common import table as render_table

TARGET_RATE, TARGET_P99_MS, TARGET_CONCURRENCY, TARGET_CPU_RATIO = 450.0, 100.0, 32, 2.0
OPEN_LOOP, TARGET_OPEN_RATE, TARGET_OPEN_P99_MS = "open loop", 300.0, 50.0
TARGET_NONCE_MS, TARGET_HEALTHZ_MS = 0.3, 0.2


def table(rows: list[dict[str, Any]]) -> str:
    columns = (
        ("phase", "phase"), ("count", "count"), ("errors", "errors"), ("per_second", "per s"),
        ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("server_cpu_ms_per_op", "srv CPU ms/op"),
        ("server_cpu_x_bare_verify", "x bare verify"), ("server_cpu_s", "srv CPU s"),
        ("database_cpu_ms_per_op", "pg CPU ms/op"), ("client_cpu_ms_per_op", "cli CPU ms/op"),
        ("client_cpu_s", "cli CPU s"),
    )  # fmt: skip
    return render_table(rows, columns)


def targets(rows: list[dict[str, Any]], concurrency: int, rate: float | None = None) -> list[dict[str, Any]]:
    """Issue #16's targets, each judged on the phase it is about (those of phases that did not run are left out)."""
    by_phase = {row["phase"]: row for row in rows}
    found: list[dict[str, Any]] = []

    def target(name: str, measured: Any, met: bool | None) -> None:
        found.append({"target": name, "measured": measured, "met": None if measured is None else met})

    complete = by_phase.get("complete")
    if complete is not None:
        ratio, p99 = complete["server_cpu_x_bare_verify"], complete["p99_ms"]
        target(f"complete transfers/s >= {TARGET_RATE:.0f}", complete["per_second"],
               complete["per_second"] >= TARGET_RATE)  # fmt: skip
        target(f"p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_CONCURRENCY} workloads", p99,
               None if concurrency != TARGET_CONCURRENCY or p99 is None else p99 <= TARGET_P99_MS)  # fmt: skip
        target(f"server CPU per transfer <= {TARGET_CPU_RATIO:.0f}x one bare verify", ratio,
               ratio is not None and ratio <= TARGET_CPU_RATIO)  # fmt: skip
    nonce = by_phase.get("nonce step only")
    if nonce is not None and nonce["server_cpu_ms_per_op"] is not None:
        cpu = nonce["server_cpu_ms_per_op"]
        target(f"nonce step <= {TARGET_NONCE_MS} ms server CPU", cpu, cpu <= TARGET_NONCE_MS)
    probes = by_phase.get("GET /healthz")
    if probes is not None and probes["server_cpu_ms_per_op"] is not None:
        cpu = probes["server_cpu_ms_per_op"]
        target(f"/healthz <= {TARGET_HEALTHZ_MS} ms server CPU", cpu, cpu <= TARGET_HEALTHZ_MS)
    open_loop = by_phase.get(OPEN_LOOP)
    if open_loop is not None:
        p99 = open_loop["p99_ms"]
        judged = rate == TARGET_OPEN_RATE and p99 is not None
        target(f"open loop at {TARGET_OPEN_RATE:.0f}/s: p99 <= {TARGET_OPEN_P99_MS:.0f} ms", p99,
               (p99 <= TARGET_OPEN_P99_MS) if judged else None)  # fmt: skip
        target(f"open loop: {rate:g}/s offered, achieved", open_loop["per_second"], None)
    return found


def report_text(document: dict[str, Any]) -> str:
    lines = [table(document["results"]), ""]
    for name in ("bare_verify", "quote_build"):
        loop = document[name]
        lines.append(f"{loop['name']:<32} {loop['us_per_call']:>9.1f} µs/call  {loop['per_second']:>9.1f}/s (1 thread)")
    if "prebuild" in document:
        loop = document["prebuild"]
        lines.append(f"{loop['name']:<32} {loop['us_per_call']:>9.1f} µs/call  {loop['per_second']:>9.1f}/s (1 thread)")
    for row in document["results"]:
        if row["steps_p50_ms"]:
            steps = ", ".join(f"{name} {value} ms" for name, value in row["steps_p50_ms"].items())
            lines.append(f"{row['phase']}: p50 per step: {steps}")
        if row["server_sys_s"] is not None and row["server_cpu_s"]:
            share = 100 * row["server_sys_s"] / row["server_cpu_s"]
            lines.append(
                f"{row['phase']}: server CPU {share:.0f}% in the kernel (stime); machine busy "
                f"{row['machine_busy_s']:.1f} CPU-s of {row['seconds'] * (os.cpu_count() or 1):.1f}, other processes "
                f"{row['other_processes_cpu_s']:.1f} CPU-s"
                + (" (OTHER LOAD: perturbed)" if row["other_processes_cpu_s"] > 0.1 * row["seconds"] else "")
            )
        if row["note"]:
            lines.append(f"{row['phase']}: {row['note']}")
    lines.append("")
    for target in document["targets"]:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[target["met"]]
        lines.append(f"target {target['target']:<48} measured {target['measured']}: {verdict}")
    lines.append(
        f"{document['cpus']} CPUs, concurrency {document['concurrency']}, client and server on the same machine"
    )
    if document.get("profiles"):
        lines.append("py-spy was attached during the load phases: the rates, latencies and server CPU above include")
        lines.append("its perturbation (it stops the server at each sample); take them from a run without --profile.")
    for phase, top in document.get("profiles", {}).items():
        lines.append("")
        lines.append(f"py-spy, server, phase {phase}: {top['samples']} thread samples ({top['file']})")
        lines.append("  waiting (% of all samples, excluded below):")
        lines += [f"    {item['percent']:5.1f}%  {item['function']}" for item in top["waiting"]]
        for kind, title in (("own", "own samples"), ("inclusive", "inclusive samples, keybroker functions")):
            lines.append(f"  top by {title} (% of the other samples):")
            lines += [f"    {item['percent']:5.1f}%  {item['function']}" for item in top[kind]]
    service = document.get("service_profile")
    if service:
        lines.append("")
        lines.append(
            f"in-process service layer, 1 thread, no HTTP, CPU time per call ({service['transfers']} calls each):"
        )
        lines.append(f"  TransferService.nonce    {service['nonce_us']:>8.0f} µs CPU per call")
        lines.append(
            f"  TransferService.transfer {service['transfer_us']:>8.0f} µs CPU per call; its parts, each alone:"
        )
        lines += [f"    {item['us']:>8.0f} µs  {item['part']}" for item in service["parts"]]
        if service.get("http_overhead_us") is not None:
            lines.append(
                f"  server CPU per complete transfer - (nonce + transfer) above: {service['http_overhead_us']:.0f} µs"
                " (HTTP, TLS, ASGI, middleware, thread pool, GIL hand-offs)"
            )
        db_share = service["profiled_db_percent"]
        lines.append(f"  cProfile of transfer, top own time (% of profiled; SQLAlchemy + sqlite3 own: {db_share}%):")
        lines += [f"    {item['percent']:5.1f}%  {item['function']}" for item in service["top"]]
    return "\n".join(lines)
