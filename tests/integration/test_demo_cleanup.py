"""``keybroker demo`` and ``keybroker demo nginx`` as a user runs them (piped, COLUMNS=60, their own TMPDIR): each
step is announced as it starts, in plain lines without control characters (a spinner on a terminal), and however a
run ends (success, a failed step, SIGINT or SIGTERM in the middle, Ctrl-C at the end) nothing stays behind: no
keybroker-demo-* directory (which holds a master key and an admin token) and no process the demo started (the
server, nginx, a command it ran). ``--dir`` keeps the files, and the demo says where they are."""

from __future__ import annotations

import contextlib
import os
import pty
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ESC = "\x1b"


def _env(tmpdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    env.update(TMPDIR=str(tmpdir), COLUMNS="60")
    return env


def _started_under(tmpdir: Path) -> dict[int, str]:
    """Live processes whose command line or environment (TMPDIR) names ``tmpdir``, and their descendants (nginx's
    workers, a server's workers): what the demo started, wherever it was re-parented to."""
    needle = str(tmpdir).encode()
    parents: dict[int, int] = {}
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state == "Z":
                continue
            parents[int(entry.name)] = int(ppid)
            cmdline = (entry / "cmdline").read_bytes()
            if needle in cmdline or b"TMPDIR=" + needle + b"\0" in (entry / "environ").read_bytes() + b"\0":
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    grown = True
    while grown:
        children = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
        for pid in children:
            found[pid] = f"(child of {parents[pid]})"
        grown = bool(children)
    return found


def _assert_nothing_left(tmpdir: Path) -> None:
    deadline = time.monotonic() + 5  # a process that got SIGKILL is reaped by init a moment later
    while (alive := _started_under(tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive == {}, alive
    assert list(tmpdir.iterdir()) == []


class Demo:
    """``keybroker demo ARGS`` started as a user does, its output (stdout and stderr) read as it comes."""

    def __init__(self, tmpdir: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "keybroker", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(tmpdir),
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _next(self, deadline: float) -> str | None:
        """The next line, or None at the end of the output; AssertionError past ``deadline``."""
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is not None:
                self.lines.append(line)
            return line
        raise AssertionError(f"timed out; output so far:\n{self.output}")

    def wait_for(self, marker: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while (line := self._next(deadline)) is not None:
            if marker in line:
                return
        raise AssertionError(f"{marker!r} never came; output:\n{self.output}")

    def finish(self, timeout: float = 240) -> int:
        """Its exit status, after the whole of its output."""
        deadline = time.monotonic() + timeout
        while self._next(deadline) is not None:
            pass
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def tmpdir_() -> Iterator[Path]:
    """The TMPDIR the demo gets (empty): everything it made there must be gone at the end. Under /tmp, traversable
    by others (as root, nginx's workers run as nobody and must reach the token: pytest's tmp_path is 0700)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="kb-demo-tmpdir-"))
    tmpdir.chmod(0o711)
    yield tmpdir
    for pid in _started_under(tmpdir):  # a failed test leaves nothing running either
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _plain(output: str) -> None:
    """Piped output: no control characters (no colours, no spinner), every line whole (never folded at 60)."""
    assert ESC not in output
    assert "\r" not in output


def test_demo_shows_each_step_and_removes_its_files(tmpdir_: Path) -> None:
    demo = Demo(tmpdir_)
    try:
        assert demo.finish() == 0, demo.output
    finally:
        demo.kill()
    shown = demo.output
    _plain(shown)
    files = f"{tmpdir_}/keybroker-demo-"
    lines = shown.splitlines()
    started = next(line for line in lines if line.startswith("  starting keybroker on https://127.0.0.1:"))
    url = started.split()[3].removesuffix("...")
    for expected in (
        "▶ the demo's files: " + files,
        "  creating a simulated TEE and its collateral in " + files,
        "  keybroker init --data-dir " + files,
        f"  starting keybroker on {url}...",
        f"▶ keybroker serving on {url} (pid ",
        "  creating the RSA-3072 key...",
        "  the workload (MRENCLAVE c0ffeec0ffeec0ff…) attests and asks for both keys...",
        "▶ workload (MRENCLAVE c0ffeec0ffeec0ff…) attested and received both keys; with them it decrypted "
        "'the launch codes are 0000' (AES-GCM) and 'the launch codes are 0000' (RSA-OAEP)",
        "  stopping keybroker (pid ",
        "▶ keybroker stopped",
        "done; removed " + files,
    ):
        assert any(line.startswith(expected) for line in lines), (expected, shown)
    assert lines.index(started) < next(i for i, line in enumerate(lines) if line.startswith("▶ keybroker serving on"))
    _assert_nothing_left(tmpdir_)


def test_demo_whose_server_cannot_start_says_why_and_removes_its_files(tmpdir_: Path, taken_port: int) -> None:
    demo = Demo(tmpdir_, "--port", str(taken_port))
    try:
        assert demo.finish() == 1, demo.output
    finally:
        demo.kill()
    shown = demo.output
    _plain(shown)
    assert f"  starting keybroker on https://127.0.0.1:{taken_port}..." in shown
    assert "Error: keybroker exited (status 3): [Errno 98] error while attempting to bind" in shown
    assert "address already in use" in shown
    assert f"stopped what the demo started and removed {tmpdir_}/keybroker-demo-" in shown
    assert "Traceback" not in shown
    _assert_nothing_left(tmpdir_)


@pytest.mark.parametrize(
    ("signum", "marker"),
    [
        (signal.SIGTERM, "  starting keybroker on "),  # while the server starts
        (signal.SIGINT, "▶ keybroker serving on "),  # with the server up, before the keys
    ],
)
def test_demo_stopped_by_a_signal_midway_removes_its_files_and_stops_the_server(
    tmpdir_: Path, signum: signal.Signals, marker: str
) -> None:
    demo = Demo(tmpdir_)
    try:
        demo.wait_for(marker)
        demo.process.send_signal(signum)
        assert demo.finish() == 128 + signum, demo.output
    finally:
        demo.kill()
    shown = demo.output
    _plain(shown)
    assert f"interrupted ({signum.name}): stopped what the demo started and removed {tmpdir_}/keybroker-demo-" in shown
    assert "Traceback" not in shown
    _assert_nothing_left(tmpdir_)


def test_demo_kept_with_dir_says_where_after_sigterm(tmpdir_: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    demo = Demo(tmpdir_, "--dir", str(kept))
    try:
        demo.wait_for("▶ keybroker serving on ")
        demo.process.send_signal(signal.SIGTERM)
        assert demo.finish() == 143, demo.output
    finally:
        demo.kill()
    assert f"interrupted (SIGTERM): stopped what the demo started; its files are in {kept} (with" in demo.output
    assert (kept / "data" / "admin-token").exists()
    _assert_nothing_left(tmpdir_)
    assert _started_under(kept) == {}  # the server ran with --data-dir in it: stopped too


def test_demo_on_a_terminal_turns_a_spinner(tmpdir_: Path) -> None:
    main, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "keybroker", "demo"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=_env(tmpdir_),
        close_fds=True,
    )
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the demo closed its terminal
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(timeout=60) == 0, seen.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(main)
    shown = seen.decode(errors="replace")
    assert "starting keybroker on https://127.0.0.1:" in shown
    assert "⠋" in shown  # rich's "dots" spinner, redrawn in place
    assert "\x1b[?25l" in shown  # the cursor hidden while it turns (and shown again)
    assert not any(line.startswith("  starting keybroker on") for line in shown.splitlines())  # not a log's line
    assert "done; removed " in shown
    _assert_nothing_left(tmpdir_)


# ---- keybroker demo nginx ------------------------------------------------------------------------------------------


def _nginx_masters(output: str) -> list[int]:
    """The nginx masters nginx-pkcs11.sh reports started ("nginx: master pid N, https://...")."""
    return [int(pid) for pid in re.findall(r"nginx: master pid (\d+), https://", output)]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_demo_nginx_shows_each_step_and_removes_its_files(tmpdir_: Path) -> None:
    demo = Demo(tmpdir_, "nginx", "--no-wait")
    try:
        assert demo.finish() == 0, demo.output
    finally:
        demo.kill()
    shown = demo.output
    _plain(shown)
    files = f"{tmpdir_}/keybroker-demo-nginx-"
    for expected in (
        "▶ the demo's files: " + files,
        "  starting keybroker on https://127.0.0.1:",
        "  creating the transfer policy and an RSA-3072 key in keybroker...",
        "  the workload (MRENCLAVE 5eed5eed5eed5eed…) attests, fetches key ",
        "  starting nginx on 127.0.0.1:",
        "▶ TLS handshake with nginx: OK",
        "  stopping nginx (nginx)...",
        "▶ nginx stopped",
        "▶ keybroker stopped",
        "done; removed " + files,
    ):
        assert expected in shown, (expected, shown)
    assert "stopping nginx (nginx2)" not in shown  # the refused workload's nginx never started
    assert len(_nginx_masters(shown)) == 1
    _assert_nothing_left(tmpdir_)


def test_demo_nginx_whose_nginx_cannot_start_removes_its_files(tmpdir_: Path, taken_port: int) -> None:
    demo = Demo(tmpdir_, "nginx", "--no-wait", "--port", str(taken_port))
    try:
        assert demo.finish() == 1, demo.output
    finally:
        demo.kill()
    shown = demo.output
    _plain(shown)
    assert f"  starting nginx on 127.0.0.1:{taken_port}:" in shown
    assert "Error: nginx did not start (exit 1)" in shown
    assert "▶ keybroker stopped" in shown
    assert f"stopped what the demo started and removed {tmpdir_}/keybroker-demo-nginx-" in shown
    assert "Traceback" not in shown
    _assert_nothing_left(tmpdir_)


@pytest.mark.parametrize(
    ("signum", "marker", "status", "ending"),
    [
        # nginx and keybroker up, the second workload not asked yet: a run cut short
        (
            signal.SIGTERM,
            "▶ TLS handshake with nginx: OK",
            143,
            "interrupted (SIGTERM): stopped what the demo started and",
        ),
        # the demo's own end: Ctrl-C while nginx serves
        (signal.SIGINT, "Ctrl-C stops nginx and keybroker and removes the demo's files.", 0, "done;"),
    ],
)
def test_demo_nginx_stopped_by_a_signal_stops_nginx_and_keybroker_and_removes_its_files(
    tmpdir_: Path, signum: signal.Signals, marker: str, status: int, ending: str
) -> None:
    demo = Demo(tmpdir_, "nginx")
    try:
        demo.wait_for(marker)
        masters = _nginx_masters(demo.output)
        assert len(masters) == 1
        demo.process.send_signal(signum)
        assert demo.finish() == status, demo.output
    finally:
        demo.kill()
    shown = demo.output
    _plain(shown)
    assert "▶ nginx stopped" in shown
    assert "▶ keybroker stopped" in shown
    assert f"{ending} removed {tmpdir_}/keybroker-demo-nginx-" in shown
    assert not _alive(masters[0])
    _assert_nothing_left(tmpdir_)
