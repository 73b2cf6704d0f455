"""Start-up time of the ``keybroker`` CLI, as whole processes, against ``bao version`` in the same run.

Usage (from the repository root, with the project's venv):

    .venv/bin/python bench/cli.py                # 15 rounds (about 40 s with its own server)
    .venv/bin/python bench/cli.py --runs 31 --json

It starts its own server (``keybroker init`` + ``serve`` over HTTPS in a temp dir, three keys created), then runs
each command ``--runs`` times as a user does (``.venv/bin/keybroker``, the console script; ``KEYBROKER_ADDR``,
``KEYBROKER_TOKEN``, ``KEYBROKER_CACERT`` set; ``COLUMNS=80``), in rounds that take the commands in a rotating
order so that the machine's noise hits all of them alike:

* ``bao version``: OpenBao's CLI (a Go binary, ``.venv/bin/bao``), the baseline of a CLI that starts at once;
* ``keybroker --version`` and ``keybroker --help`` with the output piped (plain text), and ``--help`` on a
  terminal (a pty: rich draws the help, as a person sees it);
* ``keybroker key list`` against the server, piped (plain lines) and on a terminal (rich's table), and
  ``keybroker policy list -o json``.

Wall time from fork to exit (``time.perf_counter`` around ``subprocess.run``) and the CPU time of the process
(user + system, ``RUSAGE_CHILDREN``). Reported per command: median, p90 and minimum wall seconds, the median as a
multiple of ``bao version``'s, and the median CPU seconds (also as a multiple of bao's: CPU time suffers less
than wall time from other work on the machine). The targets (issue #15): ``keybroker --help``
<= 0.4 s and ``keybroker key list`` <= 0.6 s, judged on the medians; a machine busy with other work makes every
figure slower, the ratio to bao less so.

Exit status: 0; 1 if a command failed (non-zero exit); 2 on setup errors (no bao, the server does not start).
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _common import SetupError, own_server
from _common import table as render_table

VENV_BIN = Path(sys.executable).parent
KEYBROKER = str(VENV_BIN / "keybroker")
BAO = str(VENV_BIN / "bao")
POLICY_FILE = Path(__file__).resolve().parent.parent / "examples" / "transfer-policy.json"
TARGETS = {"keybroker --help": 0.4, "keybroker key list": 0.6}


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    terminal: bool = False  # stdout and stderr on a pty instead of pipes


COMMANDS = (
    Command("bao version", [BAO, "version"]),
    Command("keybroker --version", [KEYBROKER, "--version"]),
    Command("keybroker --help", [KEYBROKER, "--help"]),
    Command("keybroker --help (terminal)", [KEYBROKER, "--help"], terminal=True),
    Command("keybroker key list", [KEYBROKER, "key", "list"]),
    Command("keybroker key list (terminal)", [KEYBROKER, "key", "list"], terminal=True),
    Command("keybroker policy list -o json", [KEYBROKER, "policy", "list", "-o", "json"]),
)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(command: Command, env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds from start to exit, CPU seconds (user + system) of the process, and its exit status."""
    cpu = _children_cpu()
    wall, code = _run(command, env)
    return wall, _children_cpu() - cpu, code


def _run(command: Command, env: dict[str, str]) -> tuple[float, int]:
    if not command.terminal:
        started = time.perf_counter()
        done = subprocess.run(command.argv, env=env, capture_output=True, check=False)
        return time.perf_counter() - started, done.returncode
    controller, terminal = pty.openpty()
    try:
        started = time.perf_counter()
        process = subprocess.Popen(command.argv, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
        os.close(terminal)
        terminal = -1
        while True:  # drain the pty, or a long help blocks the child on a full buffer
            try:
                if not os.read(controller, 65536):
                    break
            except OSError:  # EIO: the child closed its side
                break
        code = process.wait()
        return time.perf_counter() - started, code
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)


def populate(addr: str, token: str, ca_file: str) -> None:
    """A transfer policy and three AES keys, so that ``key list`` prints a table with rows."""
    import ssl

    verify = ssl.create_default_context(cafile=ca_file)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=addr, headers=headers, verify=verify, timeout=60) as client:
        policy = client.post("/kbs/v1/key-transfer-policies", json=json.loads(POLICY_FILE.read_text()))
        if policy.status_code != 201:
            raise SetupError(f"policy create: HTTP {policy.status_code} {policy.text[:300]}")
        for _ in range(3):
            body = {
                "key_information": {"algorithm": "AES", "key_length": 256},
                "transfer_policy_id": policy.json()["id"],
            }
            created = client.post("/kbs/v1/keys", json=body)
            if created.status_code != 201:
                raise SetupError(f"key create: HTTP {created.status_code} {created.text[:300]}")


def measure(runs: int, env: dict[str, str]) -> tuple[dict[str, list[float]], dict[str, list[float]], list[str]]:
    times: dict[str, list[float]] = {command.name: [] for command in COMMANDS}
    cpu: dict[str, list[float]] = {command.name: [] for command in COMMANDS}
    failures: list[str] = []
    for command in COMMANDS:  # warm the page cache and the .pyc files once
        run_once(command, env)
    for round_number in range(runs):
        shift = round_number % len(COMMANDS)
        for command in COMMANDS[shift:] + COMMANDS[:shift]:
            seconds, cpu_seconds, code = run_once(command, env)
            if code != 0:
                failures.append(f"{command.name}: exit {code}")
            times[command.name].append(seconds)
            cpu[command.name].append(cpu_seconds)
    return times, cpu, failures


def summarise(times: dict[str, list[float]], cpu: dict[str, list[float]]) -> list[dict[str, Any]]:
    bao = statistics.median(times["bao version"])
    bao_cpu = statistics.median(cpu["bao version"])
    rows = []
    for name, values in times.items():
        ordered = sorted(values)
        median = statistics.median(ordered)
        target = TARGETS.get(name)
        rows.append(
            {
                "command": name,
                "runs": len(ordered),
                "median_s": round(median, 3),
                "p90_s": round(ordered[max(0, int(0.9 * len(ordered)) - 1)], 3),
                "min_s": round(ordered[0], 3),
                "x_bao": round(median / bao, 2),
                "cpu_s": round(statistics.median(cpu[name]), 3),
                "cpu_x_bao": round(statistics.median(cpu[name]) / bao_cpu, 2),
                "target_s": target,
                "verdict": "" if target is None else ("ok" if median <= target else "MISSED"),
            }
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    parser.add_argument("--json", action="store_true", help="JSON results on stdout (the table goes to stderr)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(BAO).is_file():
        print(f"setup error: {BAO} is missing (scripts/bootstrap.sh installs OpenBao)", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="kb-bench-cli-") as tmp, own_server(Path(tmp)) as server:
            addr, token, _pid, ca_file = server
            populate(addr, token, ca_file)
            env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
            env |= {"KEYBROKER_ADDR": addr, "KEYBROKER_TOKEN": token, "KEYBROKER_CACERT": ca_file, "COLUMNS": "80"}
            times, cpu, failures = measure(args.runs, env)
    except SetupError as exc:
        print(f"setup error: {exc}", file=sys.stderr)
        return 2
    rows = summarise(times, cpu)
    columns = [
        ("command", "command"),
        ("median_s", "median s"),
        ("p90_s", "p90 s"),
        ("min_s", "min s"),
        ("x_bao", "x bao"),
        ("cpu_s", "CPU s"),
        ("cpu_x_bao", "CPU x bao"),
        ("target_s", "target s"),
        ("verdict", ""),
    ]
    shown = [
        {key: f"{value:.3f}" if key.endswith("_s") and value is not None else value or "" for key, value in row.items()}
        | {"cpu_s": f"{row['cpu_s']:.3f}"}
        for row in rows
    ]
    print(render_table(shown, columns), file=sys.stderr if args.json else sys.stdout)
    for failure in failures[:10]:
        print(f"FAILED {failure}", file=sys.stderr)
    if args.json:
        print(json.dumps({"runs": args.runs, "results": rows, "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
