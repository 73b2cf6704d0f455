"""The CLI starts light: its entry point and its help import no command module, and a command imports only its
own (keybroker.cli.main's COMMANDS, loaded when looked up). bench/cli.py measures what this is for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from keybroker.cli.main import COMMANDS, app, load
from tests.integration.conftest import clean_env
from tests.peers.process import free_port

# What no help page and no command that only talks to the server may import (each costs 0.1 to 1 s to import).
HEAVY = ("sqlalchemy", "alembic", "hvac", "kmip", "pkcs11", "fastapi", "uvicorn", "dcap_qvl", "regopy", "structlog")
PROBE = """
import json, sys
sys.argv = ["keybroker", *json.loads(sys.argv[1])]
from keybroker.cli.main import main
try:
    main()
except SystemExit:
    pass
cli = {name for name in sys.modules if name.startswith("keybroker.cli.")}
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} | cli)), file=sys.stderr)
"""
COMMAND_MODULES = {f"keybroker.cli.{lazy.target.split(':')[0].rsplit('.', 1)[1]}" for lazy in COMMANDS.values()}


def _loaded(args: list[str], **env: str) -> set[str]:
    """The top-level packages, and the modules of keybroker.cli, loaded by ``keybroker ARGS`` in a fresh
    interpreter, as the console script runs it."""
    env = clean_env(KEYBROKER_ADDR=f"https://127.0.0.1:{free_port()}", COLUMNS="60", **env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return set(json.loads(done.stderr.splitlines()[-1]))


LIGHT = ("httpx", "rich", "pydantic", "keybroker_client", "cryptography", "ssl", "email")
NO_CLIENT = ("httpx", "keybroker_client", "cryptography")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "also_not", "modules"),
    [
        ([], LIGHT, []),  # (no arguments: the help)
        (["--help"], LIGHT, []),
        (["--version"], LIGHT, []),
        (["key", "--help"], NO_CLIENT, ["keybroker.cli.keys"]),
        (["policy", "create", "--help"], NO_CLIENT, ["keybroker.cli.policies"]),
        (["key", "list"], (), ["keybroker.cli.keys"]),  # (no server there: the error imports the client's errors)
        (["backends", "check"], (), ["keybroker.cli.backends"]),
    ],
    ids=["no arguments", "--help", "--version", "key --help", "policy create --help", "key list", "backends check"],
)
def test_what_a_command_imports(args: list[str], also_not: tuple[str, ...], modules: list[str]) -> None:
    loaded = _loaded(args)
    assert "keybroker" in loaded  # (the probe ran)
    assert sorted(loaded & {*HEAVY, *also_not}) == []
    assert sorted(loaded & COMMAND_MODULES) == modules  # (its own command module only)


@pytest.mark.integration
def test_completing_a_command_name_imports_no_command_module() -> None:
    loaded = _loaded([], _KEYBROKER_COMPLETE="complete_bash", COMP_WORDS="keybroker ", COMP_CWORD="1")
    assert "keybroker" in loaded
    assert sorted(loaded & COMMAND_MODULES) == []


@pytest.mark.integration
def test_a_command_imports_what_it_needs() -> None:
    """The probe sees imports: a command of the database imports SQLAlchemy (the test above can fail)."""
    assert "sqlalchemy" in _loaded(["db", "status", "--data-dir", "/nonexistent-keybroker"])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_summary_is_the_commands_own_help(name: str) -> None:
    """``keybroker --help`` shows COMMANDS' summaries without importing the groups: they must say what the
    groups' own help says (its first paragraph)."""
    command = load(name)
    assert command.name == name
    own = " ".join((command.help or "").split("\n\n")[0].split())
    assert COMMANDS[name].summary == own, f"update COMMANDS[{name!r}] in keybroker/cli/main.py"


def test_the_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)


def test_a_command_is_found_and_a_typo_is_suggested() -> None:
    group = typer.main.get_command(app)
    context = typer.Context(group)
    assert group.get_command(context, "nothing") is None  # type: ignore[attr-defined]  # (a TyperGroup)
    result = CliRunner().invoke(app, ["kee", "list"])
    assert result.exit_code == 2
    assert "No such command 'kee'. Did you mean 'key'" in result.output
