"""The help of both CLIs, as a user reads it: every command ends with an example that is a real invocation (it
parses against the CLI), every option and argument says what it is for under a readable name (``KEY_ID``, ``FILE``,
``HOST:PORT``; never ``<bool>``, ``<str>`` or ``{key_id}``), and nothing is cut at 60 columns or at 200.

The commands are found the way the CLI finds them (``get_command`` of each group, by name), so a group added later
is held to the same rules without a line changed here."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.testing import CliRunner

from keybroker.cli.main import app
from keybroker_client import cli as client_cli

runner = CliRunner()
EXAMPLE = re.compile(r"^Example: (keybroker .+)$", re.MULTILINE)
METAVAR = re.compile(r"^[A-Z][A-Z0-9_]*(:[A-Z][A-Z0-9_]*)?$")  # KEY_ID, FILE, HOST:PORT
# A type where a name belongs, a Python name in the usage line, or rich's mark of a cut word. (An argument's row
# shows its type, <str> or <path>, beside its name: see _outside_arguments.)
UGLY = re.compile(r"<bool>|<str>|<int>|<float>|<path>|<datetime>|<list\[|range>|\{[a-z_]+\}|…")
CUT = re.compile(r"<bool>|…")
SECRET = "kb-secret-sentinel-4f1d"  # the environment's token: never in any help
WIDTHS = (60, 200)


def _commands() -> Iterator[tuple[list[str], Any]]:
    """(path, command) for the root and every group and command under it, depth first."""

    def walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        if isinstance(command, TyperGroup):
            context = typer.Context(command)
            for name in command.list_commands(context):
                sub = command.get_command(context, name)
                assert sub is not None, f"{' '.join([*path, name])} is listed but not found"
                yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), [])


def _outside_arguments(text: str) -> str:
    """The help without its "Arguments" panel, whose rows show a type beside each (well-named) argument."""
    return re.sub(r"^╭─ Arguments .*?^╰─+╯$", "", text, flags=re.MULTILINE | re.DOTALL)


def _runnable(command: Any) -> bool:
    """A command that does something itself: a leaf, or a group that runs without a subcommand (``demo``)."""
    return not isinstance(command, TyperGroup) or bool(command.invoke_without_command)


def _resolve(argv: list[str]) -> tuple[list[str], Any]:
    """Parse ``argv`` (without ``keybroker``) as the CLI would, without running it: the command path it reaches and
    its context. An unknown command, an unknown option or a missing required one raises."""
    command: Any = typer.main.get_command(app)
    args, path = list(argv), list[str]()
    while isinstance(command, TyperGroup) and args and not args[0].startswith("-"):
        name = args.pop(0)
        sub = command.get_command(typer.Context(command), name)
        assert sub is not None, f"{name!r} is not a keybroker command"
        command, path = sub, [*path, name]
    return path, command.make_context(" ".join(["keybroker", *path]), args)


def test_every_command_ends_with_an_example_that_parses() -> None:
    problems = []
    commands = [(path, command) for path, command in _commands() if path and _runnable(command)]
    for path, command in commands:
        name = " ".join(["keybroker", *path])
        help_text = (command.help or "").rstrip()
        examples = EXAMPLE.findall(help_text)
        if not examples or not help_text.endswith(examples[-1]):
            problems.append(f"{name}: its help does not end with an 'Example: keybroker ...' line")
            continue
        argv = shlex.split(examples[-1])
        try:
            reached, _ = _resolve(argv[1:])
        except Exception as exc:  # (a UsageError, NoSuchOption, BadParameter: the example does not parse)
            problems.append(f"{name}: its example {examples[-1]!r} does not parse: {type(exc).__name__}: {exc}")
            continue
        if reached != path:
            problems.append(f"{name}: its example runs 'keybroker {' '.join(reached)}' instead")
    assert len(commands) >= 45  # (the walk found the CLI's commands)
    assert not problems, "\n".join(problems)


def test_a_wrong_example_would_be_caught() -> None:
    with pytest.raises(Exception, match="No such option: --algo") as raised:
        _resolve(shlex.split('key create --algo AES -l 256 -p "$POLICY"'))
    assert type(raised.value).__name__ == "NoSuchOption"
    with pytest.raises(Exception, match="Missing parameter: policy"):
        _resolve(["key", "create", "-a", "AES"])
    with pytest.raises(Exception, match="between 1 and 60 seconds"):
        _resolve(["db", "migrate", "--to", "postgresql://kb@db/kb", "--connect-timeout", "61"])
    assert _resolve(["demo", "--dir", "/tmp/x"])[0] == ["demo"]


def test_every_option_and_argument_is_documented_under_a_readable_name() -> None:
    problems = []
    for path, command in _commands():
        name = " ".join(["keybroker", *path])
        context = typer.Context(command)
        for param in command.get_params(context):  # (its options and arguments, and its --help)
            label = "/".join(param.opts)
            if not (param.help or "").strip():
                problems.append(f"{name} {label}: no help")
            if isinstance(param, TyperArgument) and not METAVAR.match(param.metavar or ""):
                problems.append(f"{name} {label}: argument named {param.metavar or param.name!r}, not like KEY_ID")
            if isinstance(param, TyperOption) and not param.is_flag and not METAVAR.match(param.metavar or ""):
                shown = param.metavar or param.display_type(context)
                problems.append(f"{name} {label}: value shown as {shown!r}, not a name like FILE or HOST:PORT")
            if isinstance(param, TyperOption) and param.is_flag and param.metavar != "":
                problems.append(f"{name} {label}: a flag shown with a type ({param.display_type(context)!r})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("columns", WIDTHS)
def test_help_is_whole_at_60_and_200_columns(columns: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``keybroker ... --help`` prints (rich panels for the commands, plain text for the root when piped):
    every option's name and metavar in one piece, no "…", no type where a name belongs, no secret from the
    environment."""
    environment = {"COLUMNS": str(columns), "KEYBROKER_TOKEN": SECRET, "KEYBROKER_CA_FINGERPRINT": SECRET}
    problems = []
    for path, command in _commands():
        name = " ".join(["keybroker", *path])
        result = runner.invoke(app, [*path, "--help"], env=environment)
        text = result.output
        if result.exit_code != 0 or not text.strip():
            problems.append(f"{name} --help: exit {result.exit_code}: {text[-300:]}")
            continue
        problems += [f"{name} at {columns}: {line.strip()!r}" for line in text.splitlines() if CUT.search(line)]
        problems += [
            f"{name} at {columns}: {line.strip()!r}"
            for line in _outside_arguments(text).splitlines()
            if UGLY.search(line) and not CUT.search(line)
        ]
        # (The root's help is plain text when piped, which CliRunner folds at 80 columns whatever COLUMNS says: the
        # integration tests read it, and the root's rich help at a terminal, from the real process.)
        if path and any(len(line) > columns for line in text.splitlines()):
            problems.append(f"{name} at {columns}: a line is wider than the terminal")
        if SECRET in text:
            problems.append(f"{name}: the help shows KEYBROKER_TOKEN's value")
        for param in command.params:
            whole = [*param.opts, *param.secondary_opts, *([param.metavar] if param.metavar else [])]
            if isinstance(param, TyperArgument):
                whole = [param.metavar or param.name]
            problems += [
                f"{name} at {columns}: {word!r} is cut or folded"
                for word in whole
                if not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text)
            ]
    assert not problems, "\n".join(problems)


def test_the_rules_would_catch_a_cut_name() -> None:
    """The checks above read what rich prints: too narrow a terminal cuts option names and marks them with "…"."""
    result = runner.invoke(app, ["key", "create", "--help"], env={"COLUMNS": "40"})
    assert result.exit_code == 0
    assert CUT.search(result.output), result.output
    assert "--algorithm" not in result.output  # (cut: "--algo…")
    for ugly in ("--all  <bool>", "Usage: keybroker key show [OPTIONS] {key_id}", "--since  <datetime>"):
        assert UGLY.search(ugly), ugly
    arguments = runner.invoke(app, ["key", "show", "--help"], env={"COLUMNS": "200"}).output
    assert "<str>" in arguments
    assert "<str>" not in _outside_arguments(arguments)


# --- keybroker-client (argparse) ------------------------------------------------------------------------------


def _client_commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def test_client_commands_end_with_examples_that_parse() -> None:
    parser = client_cli.build_parser()
    problems = []
    commands = _client_commands(parser)
    assert set(commands) == {"fetch-key", "provision"}
    for name, command in [("", parser), *commands.items()]:
        epilog = command.epilog or ""
        examples = re.findall(r"^  (keybroker-client .+)$", epilog, re.MULTILINE)
        if not epilog.startswith("Example") or not examples:
            problems.append(f"keybroker-client {name}: no example at the end of its help")
        for example in examples:
            argv = shlex.split(example)[1:]
            if name and argv[0] != name:
                problems.append(f"keybroker-client {name}: its example runs {argv[0]}")
            try:
                parser.parse_args(argv)
            except SystemExit:
                problems.append(f"keybroker-client {name}: its example {example!r} does not parse")
    assert not problems, "\n".join(problems)


def test_client_options_are_documented_under_readable_names() -> None:
    problems = []
    for name, command in _client_commands(client_cli.build_parser()).items():
        for action in command._actions:
            label = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"keybroker-client {name} {label}: no help")
            takes_value = action.nargs != 0
            if takes_value and not (isinstance(action.metavar, str) and METAVAR.match(action.metavar)):
                problems.append(f"keybroker-client {name} {label}: value shown as {action.metavar or action.dest!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("columns", WIDTHS)
def test_client_help_is_whole(
    columns: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("KEYBROKER_TOKEN", SECRET)  # (read into --token's default when the parser is built)
    problems = []
    commands = _client_commands(client_cli.build_parser())
    for name in ["", *commands]:
        with pytest.raises(SystemExit) as exited:
            client_cli.main([*([name] if name else []), "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        if SECRET in text:
            problems.append(f"keybroker-client {name} --help shows KEYBROKER_TOKEN's value")
        if "Example" not in text:
            problems.append(f"keybroker-client {name} --help has no example")
        for action in commands[name]._actions if name else []:
            for word in [*action.option_strings, *([action.metavar] if isinstance(action.metavar, str) else [])]:
                if not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text):
                    problems.append(f"keybroker-client {name} at {columns}: {word!r} is cut or folded")
        for example in re.findall(r"^  (keybroker-client .+)$", text, re.MULTILINE):
            if example not in {client_cli.FETCH_EXAMPLE, client_cli.PROVISION_EXAMPLE}:
                problems.append(f"keybroker-client {name} at {columns}: the example is folded: {example!r}")
    assert not problems, "\n".join(problems)
