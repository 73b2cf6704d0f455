"""Helpers shared by the benchmarks (run them as scripts: ``python bench/NAME.py``)."""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import ssl
from collections.abc import Sequence
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


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds of a process (all its threads) and of its live child processes (the server's
    workers with --workers), from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # the process itself, or a child (ppid)
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
