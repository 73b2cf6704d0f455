"""The documents hold to the code: every ``keybroker`` command line that README.md, docs/*.md and deploy/README.md
show parses against the real CLI (typer app ``keybroker.cli.main:app``: unknown commands and options, extra
arguments and wrong values fail; nothing runs), and every ``KEYBROKER_*`` name and TOML key they show is a real
setting. The configuration examples themselves are loaded in test_readme_examples.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from keybroker.config import CLIENT_VARIABLES, Settings
from keybroker.config.catalog import is_setting_path, is_setting_variable, settings_of
from tests.unit.docs_examples import (
    REPO,
    blocks,
    check_command,
    command_lines,
    documents,
    inline_code,
    where,
)

DOCUMENTS = documents()
IDS = [str(path.relative_to(REPO)) for path in DOCUMENTS]
SECTIONS = frozenset(Settings.model_fields)
# Dotted names in prose that start like a section but are something else.
NOT_SETTINGS = frozenset({"auth.refused"})  # an audit action
FILE_SUFFIXES = frozenset({"txt", "md", "toml", "pem", "json", "py", "db", "sh", "conf", "crt", "key", "so", "rego"})


def _secret_variables() -> set[str]:
    """The variables the examples' secret sources name (``pin = { env = "KEYBROKER_HSM_PIN" }``)."""
    texts = [block.text for path in DOCUMENTS for block in blocks(path) if block.language == "toml"]
    texts += [path.read_text() for path in sorted((REPO / "deploy").glob("*.toml"))]
    return {name for text in texts for name in re.findall(r'\benv\s*=\s*"([^"]+)"', text)}


@pytest.mark.parametrize("path", DOCUMENTS, ids=IDS)
def test_every_command_line_shown_parses(path: Path) -> None:
    failures = [
        f"{line.where}: keybroker {' '.join(line.argv)}\n    {problem}"
        for line in command_lines(path)
        if (problem := check_command(line.argv, line.complete)) is not None
    ]
    assert not failures, "command lines the CLI refuses:\n" + "\n".join(failures)


def test_the_commands_are_found() -> None:
    """The extraction finds what the README shows (a broken pattern would make the check above pass vacuously)."""
    found = {" ".join(line.argv[:2]) for line in command_lines(REPO / "README.md")}
    assert len(command_lines(REPO / "README.md")) >= 80
    for expected in ("policy create", "key create", "init --data-dir", "db backup", "sim quote", "demo nginx"):
        assert expected in found, expected


@pytest.mark.parametrize(
    ("shown", "problem"),
    [
        ("```bash\nkeybroker key create --algoritm AES --length 256 --policy P\n```", "No such option: --algoritm"),
        ("```bash\nkeybroker key creat --algorithm AES\n```", "'creat' is not a command"),
        ("```bash\nPOLICY=$(keybroker policy craete examples/transfer-policy.json)\n```", "'craete' is not a command"),
        ("```bash\nkeybroker ca issue CSR --out CERT --days many\n```", "valid integer"),
        ("```bash\nkeybroker key create --algorithm AES --length 256\n```", "Missing parameter: policy"),  # to run
        ("```text\nkeybroker db status | backup FILE\n```", "unexpected extra argument(s) (FILE)"),
        ("```text\nkeybroker key    create|imprt|list\n```", "'imprt' is not a command"),
        ("```text\nkeybroker serve --data-dir DIR [--listne HOST:PORT]\n```", "No such option: --listne"),
        ("Run `keybroker key list --output tabel`.", "'tabel' is not one of"),
        ("Run `keybroker serve --role\nattestation --wrkers 2`.", "No such option: --wrkers"),
        ("```sh\nsystemd-run --pipe /opt/keybroker/bin/keybroker int --data-dir D\n```", "'int' is not a command"),
    ],
)
def test_a_wrong_command_line_fails_the_check(shown: str, problem: str, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# A page\n\n{shown}\n")
    lines = command_lines(page)
    assert lines, shown
    problems = [check_command(line.argv, line.complete) for line in lines]
    assert any(found is not None and problem in found for found in problems), problems


@pytest.mark.parametrize(
    "shown",
    [
        "```bash\nkeybroker ca issue CSR --out CERT --days N   # N: a placeholder for a number\n```",
        "```text\nkeybroker audit  list [--since T] [--key ID] | verify\n```",
        "```bash\nsofthsm2-util --init-token --label keybroker --pin 1234   # 'keybroker' is an argument here\n```",
        "```bash\n# keybroker side: not a command, a comment\n```",
        "Mentioned: `keybroker key certify` (its required parameters left out).",
    ],
)
def test_placeholders_mentions_and_other_words_pass(shown: str, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# A page\n\n{shown}\n")
    assert [check_command(line.argv, line.complete) for line in command_lines(page)] == [None] * len(
        command_lines(page)
    )


def _variable_problems(path: Path, secrets: set[str]) -> list[str]:
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        for name in re.findall(r"\bKEYBROKER_[A-Z0-9_<>]*[A-Z0-9>]", line):
            if name in CLIENT_VARIABLES or name in secrets or is_setting_variable(Settings, name, sections=True):
                continue
            problems.append(f"{where(path, number)}: {name} is neither a setting's variable nor the CLI's")
    return problems


@pytest.mark.parametrize("path", DOCUMENTS, ids=IDS)
def test_every_keybroker_variable_named_is_real(path: Path) -> None:
    problems = _variable_problems(path, _secret_variables())
    assert not problems, "\n".join(problems)


def test_a_misspelt_variable_fails_the_check(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Set `KEYBROKER_SERVER__LISTEN` or `KEYBROKER_SERVR__LISTEN`, `KEYBROKER_BACKENDS__<NAME>__WRAPER__TYPE`,\n"
        "`KEYBROKER_BACKENDS__KMS__WRAPPER__PIN__ENV`, `KEYBROKER_TOKEN`, `KEYBROKER_TOKN`, `KEYBROKER_*`.\n"
    )
    problems = _variable_problems(page, set())
    assert [problem.split(": ")[1].split()[0] for problem in problems] == [
        "KEYBROKER_SERVR__LISTEN",
        "KEYBROKER_BACKENDS__<NAME>__WRAPER__TYPE",
        "KEYBROKER_TOKN",
    ]


_KEYS = frozenset(part for setting in settings_of(Settings) for part in setting.key) | {"env", "file"}


def _setting_problem(code: str) -> str | None:
    """Why an inline code span that shows a TOML key (``[tls] enabled = false``, ``keys.default_backend``,
    ``kv_version = 2``) does not name a real setting; None if it does or shows none."""
    table = re.fullmatch(r"\[([a-z_]+(?:\.[a-z_<>-]+)*)\](?:\s+([\w.]+)(?:\s*=.*)?)?", code)
    dotted = re.fullmatch(r"([a-z_]+(?:\.[a-z_<>]+)+)(?: = .*)?", code)
    bare = re.fullmatch(r"([a-z_]+) = (.+)", code)
    if table:
        path = (*table.group(1).split("."), *(table.group(2).split(".") if table.group(2) else ()))
    elif dotted and dotted.group(1).split(".")[0] in SECTIONS and dotted.group(1) not in NOT_SETTINGS:
        path = tuple(dotted.group(1).split("."))
        if path[-1] in FILE_SUFFIXES:
            return None  # keys.txt, server.py
    elif bare and _is_toml(code):
        return None if bare.group(1) in _KEYS else f"{bare.group(1)} is no key of any setting"
    else:
        return None
    if not is_setting_path(Settings, path):
        return f"{'.'.join(path)} is not a setting"
    return None


def _is_toml(code: str) -> bool:
    try:
        tomllib.loads(code)
    except tomllib.TOMLDecodeError:
        return False  # hash = SHA-256(...): a formula, not a setting
    return True


# docs/configuration.md names keys relative to the table it lists them in, and is generated from the settings models
# (test_config.py holds it to them).
PROSE = [(path, name) for path, name in zip(DOCUMENTS, IDS, strict=True) if name != "docs/configuration.md"]


@pytest.mark.parametrize("path", [path for path, _ in PROSE], ids=[name for _, name in PROSE])
def test_every_setting_named_in_prose_is_real(path: Path) -> None:
    problems = [
        f"{where(path, line)}: `{code}`: {problem}"
        for line, _, code in inline_code(path)
        if (problem := _setting_problem(code)) is not None
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("[tls] enabeld = false", "tls.enabeld is not a setting"),
        ("keys.default_backnd", "keys.default_backnd is not a setting"),
        ("server.workers", None),
        ("backends.<name>.wrapper.pin", None),
        ("[backends.<name>]", None),
        ("kv_versoin = 2", "kv_versoin is no key of any setting"),
        ("database.password = { env = ... }", None),
        ("keys.txt", None),
        ("nonce.val", None),
        ("hash = SHA-256(prev_hash ‖ content)", None),
        ("sslmode=verify-full", None),
        ("[A-Za-z0-9._-]", None),
        ("[sever]", "sever is not a setting"),
    ],
)
def test_a_misspelt_setting_in_prose_fails_the_check(code: str, problem: str | None) -> None:
    assert _setting_problem(code) == problem
