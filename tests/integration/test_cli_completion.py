"""The CLI in a user's shell: ``keybroker --show-completion`` / ``--install-completion`` give bash a completion that
completes commands and options (run by bash itself, from the script keybroker printed), and the help reads whole at
a 60-column terminal and when piped."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # (the venv's bin: keybroker is installed beside the interpreter)
KEYBROKER = BIN / "keybroker"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "_KEYBROKER_", "_TYPER_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(home), **extra)
    return env


def _bash(script: str, home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by a non-interactive bash, the shell keybroker is asked from (typer detects it)."""
    assert BASH is not None
    return subprocess.run(
        [BASH, "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        env=_env(home, **extra),
        timeout=120,
        check=False,
    )


def _complete(words: str, home: Path, script: str = "source <(keybroker --show-completion bash)") -> list[str]:
    """What bash offers for ``words`` + TAB: the completion function keybroker's script defines, run by bash."""
    completed = _bash(
        f"{script}\nCOMP_WORDS=({words}); COMP_CWORD={len(words.split()) - (0 if words.endswith(' ') else 1)}\n"
        '_keybroker_completion keybroker\nprintf "%s\\n" "${COMPREPLY[@]}"',
        home,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.split()


def test_show_completion_prints_a_bash_script(tmp_path: Path) -> None:
    shown = _bash("keybroker --show-completion bash", tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "_KEYBROKER_COMPLETE=complete_bash" in shown.stdout
    assert re.search(r"^complete -o default -F _keybroker_completion keybroker$", shown.stdout, re.MULTILINE)
    assert _bash("keybroker --show-completion", tmp_path).stdout == shown.stdout  # (the shell is detected)


def test_bash_completes_commands_and_options(tmp_path: Path) -> None:
    offered = _complete("keybroker ke", tmp_path)
    assert "key" in offered
    assert all(word.startswith("ke") for word in offered)  # (key, kek)
    assert _complete("keybroker key", tmp_path) == ["key"]
    assert set(_complete("keybroker key ", tmp_path)) >= {"create", "import", "list", "show", "delete", "certify"}
    assert _complete("keybroker key cr", tmp_path) == ["create"]
    assert _complete("keybroker key create --po", tmp_path) == ["--policy"]
    assert _complete("keybroker attestation policy de", tmp_path) == ["delete"]
    assert _complete("keybroker nosuch", tmp_path) == []


def test_completion_through_the_environment(tmp_path: Path) -> None:
    """The protocol the script uses: keybroker itself answers when _KEYBROKER_COMPLETE is set."""
    answer = subprocess.run(
        [str(KEYBROKER)],
        capture_output=True,
        text=True,
        env=_env(tmp_path, _KEYBROKER_COMPLETE="complete_bash", COMP_WORDS="keybroker ke", COMP_CWORD="1"),
        timeout=60,
        check=False,
    )
    assert answer.returncode == 0, answer.stderr
    assert "key" in answer.stdout.split()


def test_install_completion_is_sourced_by_bashrc(tmp_path: Path) -> None:
    installed = _bash("keybroker --install-completion", tmp_path)
    assert installed.returncode == 0, installed.stderr
    script = tmp_path / ".bash_completions" / "keybroker.sh"
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
    assert "_keybroker_completion" in script.read_text()
    assert _complete("keybroker key", tmp_path, script=f"source {tmp_path / '.bashrc'}") == ["key"]
    assert _bash("keybroker --install-completion", tmp_path).returncode == 0  # (again: .bashrc sources it once)
    assert (tmp_path / ".bashrc").read_text().count(f"source '{script}'") == 1


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _at_terminal(args: list[str], columns: int, home: Path) -> str:
    """What keybroker prints on a terminal ``columns`` wide (a pseudo-terminal: rich draws its panels)."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        [str(KEYBROKER), *args],
        stdin=child,
        stdout=child,
        stderr=child,
        env=_env(home, COLUMNS=str(columns), TERM="xterm-256color"),
        close_fds=True,
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    assert process.wait(timeout=60) == 0
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


@pytest.mark.parametrize("command", [[], ["key", "create"], ["db", "migrate"]])
def test_help_at_a_60_column_terminal_is_whole(command: list[str], tmp_path: Path) -> None:
    text = _at_terminal([*command, "--help"], 60, tmp_path)
    assert "╭─ Options" in text  # (rich's panels: the terminal form)
    assert "…" not in text, text
    assert "<bool>" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 60, text
    expected = {
        (): ["--version", "--install-completion", "--show-completion", "key", "attestation"],
        ("key", "create"): ["--algorithm", "ALGORITHM", "POLICY_ID", "--ca-fingerprint", "HASH", "Example:"],
        ("db", "migrate"): ["--connect-timeout", "SECONDS", "--password-file", "--allow-running", "Example:"],
    }[tuple(command)]
    for word in expected:
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text), f"{word} is cut:\n{text}"


def test_piped_help_is_plain_and_fits_60_columns(tmp_path: Path) -> None:
    piped = subprocess.run(
        [str(KEYBROKER), "--help"],
        capture_output=True,
        text=True,
        env=_env(tmp_path, COLUMNS="60"),
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert "╭" not in piped.stdout
    assert "<bool>" not in piped.stdout
    assert max(len(line) for line in piped.stdout.splitlines()) <= 60, piped.stdout
    assert re.search(r"^  --show-completion ", piped.stdout, re.MULTILINE)
