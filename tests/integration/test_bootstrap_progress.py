"""``bash scripts/bootstrap.sh`` shows what it installs while pip runs: piped (CI) a handful of plain lines without
control characters; on a terminal one line redrawn in place with a counter and a spinner. It runs in a copy of the
checkout with a copy of the project's .venv (never the project's own .venv, which other runs use): pip then finds
the dependencies installed and reinstalls only keybroker and keybroker-client, a real run of the same path."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "scripts" / "bootstrap.sh"
DEPENDENCIES = sum(1 for line in (REPO / "constraints.txt").read_text().splitlines() if line[:1].isalnum())


def _checkout(to: Path) -> Path:
    """What bootstrap.sh installs from: the two projects, their metadata and the constraints."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for tree in ("src", "client"):
        shutil.copytree(REPO / tree, to / tree, ignore=ignore)
    for name in ("pyproject.toml", "constraints.txt", "README.md", "scripts/bootstrap.sh"):
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, to / name)
    return to


def test_bootstrap_piped_says_what_it_installs_in_a_few_plain_lines(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path / "checkout")
    subprocess.run(["cp", "-a", str(REPO / ".venv"), str(checkout / ".venv")], check=True)
    (checkout / ".venv" / ".keybroker-installed").unlink()  # as after a change of pyproject.toml: install
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    result = subprocess.run(
        ["bash", "scripts/bootstrap.sh"],
        cwd=checkout,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\x1b" not in result.stderr
    assert "\r" not in result.stderr
    assert lines[0] == f"bootstrap: installing keybroker and {DEPENDENCIES} dependencies into .venv (about a minute)..."
    assert any(line.startswith("bootstrap:   fetching the dependencies (") for line in lines), lines
    log = (checkout / ".venv" / "pip-install.log").read_text()  # pip's own lines stay there
    found = len(re.findall(r"^(?:Requirement already satisfied:|Collecting|Processing) ", log, re.MULTILINE))
    assert 0 < found <= DEPENDENCIES
    assert any(
        line.startswith(f"bootstrap:   [{found}/{DEPENDENCIES}] dependencies found; building keybroker")
        for line in lines
    ), lines
    unpacked = re.search(r"^Installing collected packages: (.*)$", log, re.MULTILINE)
    assert unpacked, log
    count = len(unpacked.group(1).split(", "))  # keybroker, keybroker-client and whatever the copy lacked
    assert any(line.startswith(f"bootstrap:   unpacking {count} packages into .venv (") for line in lines), lines
    assert lines[-1].startswith(f"bootstrap: installed keybroker and {DEPENDENCIES} dependencies into .venv in ")
    assert all(line.startswith("bootstrap: ") for line in lines), lines
    assert len(lines) < 15  # a CI log gets a few lines, not pip's hundreds
    assert "Successfully installed " in log
    # Installed: a second run reinstalls nothing and says nothing.
    started = time.monotonic()
    again = subprocess.run(
        ["bash", "scripts/bootstrap.sh"],
        cwd=checkout,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    assert time.monotonic() - started < 30


def _pip_progress(tmp_path: Path, transcript: str, pause_before: str) -> tuple[bytes, Path]:
    """bootstrap.sh's pip_progress (the function itself, taken from the script) on a terminal, reading
    ``transcript`` as pip writes it: line by line, with 2.5 s of silence before the line that starts with
    ``pause_before``."""
    function = subprocess.run(
        ["sed", "-n", "/^pip_progress() {/,/^}/p", str(BOOTSTRAP)], capture_output=True, text=True, check=True
    ).stdout
    assert function.startswith("pip_progress() {")
    (tmp_path / "transcript").write_text(transcript)
    log = tmp_path / "pip.log"
    script = (
        f"{function}\n"
        'while IFS= read -r line; do [[ $line == "$PAUSE"* ]] && sleep 2.5; printf "%s\\n" "$line"; done '
        f'<"$TRANSCRIPT" | pip_progress "$LOG" 3'
    )
    main, terminal = pty.openpty()
    process = subprocess.Popen(
        ["bash", "-c", script],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**os.environ, "PAUSE": pause_before, "TRANSCRIPT": str(tmp_path / "transcript"), "LOG": str(log)},
    )
    os.close(terminal)
    seen = b""
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 30)
            assert ready, seen
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the script closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(main)
    return seen, log


TRANSCRIPT = """\
Obtaining file:///work/main/client
  Preparing editable metadata (pyproject.toml): started
WARNING: Location 'file:///opt/pypi-more/simple/httpx/' is ignored: it is neither a file nor a directory.
Processing /opt/pypi/files/httpx-0.28.1-py3-none-any.whl (from keybroker-client==0.1.0)
Collecting fastapi>=0.115 (from keybroker==0.1.0)
  Downloading fastapi-0.165.0-py3-none-any.whl (159 kB)
Requirement already satisfied: sqlalchemy>=2.0.30 in ./.venv/lib/python3.11/site-packages (from keybroker==0.1.0)
WARNING: a warning of pip's own, passed on
Building wheels for collected packages: keybroker, keybroker-client
  Building editable for keybroker (pyproject.toml): started
Installing collected packages: httpx, fastapi, keybroker-client, keybroker
Successfully installed fastapi-0.165.0 httpx-0.28.1 keybroker-0.1.0 keybroker-client-0.1.0
"""


def test_bootstrap_on_a_terminal_counts_in_one_line_and_turns_while_pip_is_silent(tmp_path: Path) -> None:
    seen, log = _pip_progress(tmp_path, TRANSCRIPT, "Successfully installed")
    shown = seen.decode().replace("\r\n", "\n")  # the terminal's own line ends
    redraws = [part.removeprefix("\x1b[K") for part in shown.split("\r")]
    assert "bootstrap: | 0s preparing keybroker's metadata" in redraws
    assert any(r.endswith("[1/3] httpx") for r in redraws), redraws
    assert any(r.endswith("[2/3] downloading fastapi (159 kB)") for r in redraws), redraws
    assert any(r.endswith("[3/3] sqlalchemy") for r in redraws), redraws
    assert any(r.endswith("[3/3] building keybroker, keybroker-client") for r in redraws), redraws
    unpacking = [r for r in redraws if r.endswith("unpacking 4 packages into .venv")]
    assert len({r.split()[2] for r in unpacking}) >= 3, unpacking  # 0s, 1s, 2s: it went on while pip said nothing
    assert len({r.split()[1] for r in unpacking}) >= 3, unpacking  # and the spinner turned
    assert "WARNING: a warning of pip's own, passed on\n" in shown  # on a line of its own
    assert "is ignored: it is neither a file nor a directory" not in shown
    assert shown.endswith("\r\x1b[K")  # the progress line is gone at the end
    assert log.read_text() == TRANSCRIPT  # pip's whole output, for when it fails
