"""client/README.md shows only what exists: every Python block compiles, imports names keybroker_client has and
calls them with arguments their signatures take; every ``keybroker-client`` command line parses (and its
``--evidence`` is a valid spec); every ``keybroker`` command parses against the real CLI; the measurement fields
it lists are the dataclasses' fields; its error table says what ``retried`` does. Nothing runs here: the simulated
block runs for real in tests/integration/test_client_readme.py, the Gramine and TDX ones need hardware.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

import keybroker_client
from keybroker_client import Client, Problem, ProblemError
from keybroker_client._retry import retried
from keybroker_client.cli import build_parser
from keybroker_client.evidence import from_spec
from keybroker_client.sim_quotes import SgxMeasurements, TdxMeasurements
from tests.conftest import REPO
from tests.unit.docs_examples import blocks, check_command, command_lines, inline_code

README = REPO / "client" / "README.md"
TEXT = README.read_text()
TESTED = re.search(r"<!-- simulated-fetch:begin -->\n```bash\n(.*?)```", TEXT, re.S)


def _python_sources() -> list[tuple[str, str]]:
    found = [(block.where, block.text) for block in blocks(README) if block.language == "python"]
    for block in blocks(README):  # python3 - <<'EOF' ... EOF inside shell blocks
        for source in re.findall(r"python3 - [^\n]*<<'EOF'\n(.*?)\nEOF\n", block.text, re.S):
            found.append((block.where, source))
    return found


def _value(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return "<expression>"


def test_the_readme_has_the_three_workloads() -> None:
    sources = "\n".join(source for _, source in _python_sources())
    for provider in ("GramineSgxEvidence()", "TdxEvidence()", 'SimulatedEvidence("sim", "sgx", mrenclave="ab" * 32)'):
        assert provider in sources
    assert TESTED, "the simulated block is marked for its test"


@pytest.mark.parametrize(("where", "source"), _python_sources())
def test_python_blocks_use_only_what_keybroker_client_has(where: str, source: str) -> None:
    tree = ast.parse(source, where)
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keybroker_client"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    assert names, f"{where}: imports nothing from keybroker_client"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        bound: tuple[None, ...] = ()
        if isinstance(node.func, ast.Name) and node.func.id in names:
            target = names[node.func.id]
        elif isinstance(node.func, ast.Attribute) and node.func.attr in {"fetch_key", "quote"}:
            target = Client.fetch_key if node.func.attr == "fetch_key" else names.get("TdxEvidence", Client).quote
            bound = (None,)  # self
        else:
            continue
        args = [*bound, *(_value(arg) for arg in node.args)]
        kwargs = {keyword.arg: _value(keyword.value) for keyword in node.keywords if keyword.arg}
        try:
            inspect.signature(target).bind(*args, **kwargs)
        except TypeError as exc:
            pytest.fail(f"{where}: {ast.unparse(node)}: {exc}")


def _client_command_lines() -> list[tuple[str, list[str]]]:
    """``keybroker-client ...`` in shell blocks and inline code (outside the block the integration test runs), and
    the Gramine manifest's ``loader.argv`` for it."""
    found: list[tuple[str, list[str]]] = []
    for block in blocks(README):
        if block.language != "bash" or (TESTED and block.text == TESTED.group(1)):
            continue
        for shown in block.text.replace("\\\n", " ").splitlines():
            if shown.lstrip().startswith(("keybroker-client ", "sudo keybroker-client ")):
                words = shlex.split(shown.split(" #")[0].removeprefix("sudo "))
                found.append((block.where, words[1:]))
    for line, _, code in inline_code(README):
        if code.startswith(("keybroker-client ", "sudo keybroker-client ")):
            found.append((f"client/README.md:{line}", shlex.split(code.removeprefix("sudo "))[1:]))
        if code.startswith("loader.argv = ["):
            argv = json.loads(code.removeprefix("loader.argv = "))
            if "keybroker_client.cli" in argv:
                found.append((f"client/README.md:{line}", argv[argv.index("keybroker_client.cli") + 1 :]))
    return found


def test_there_are_keybroker_client_command_lines() -> None:
    shown = {" ".join(argv) for _, argv in _client_command_lines()}
    assert any("--evidence sgx-gramine" in line for line in shown), shown
    assert any("--evidence tdx" in line for line in shown), shown


@pytest.mark.parametrize(("where", "argv"), _client_command_lines())
def test_keybroker_client_command_lines_parse(where: str, argv: list[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: keybroker-client {' '.join(argv)} does not parse")
    if not args.evidence.startswith("sim:"):
        from_spec(args.evidence)  # tdx, sgx-gramine, auto: no hardware needed to construct


@pytest.mark.parametrize("line", command_lines(README), ids=lambda line: line.where)
def test_keybroker_commands_parse(line: Any) -> None:
    problem = check_command(line.argv, line.complete)
    assert problem is None, f"{line.where}: {line.text}: {problem}"


def _listed() -> tuple[set[str], set[str]]:
    """The fields the README says SimulatedEvidence takes: ``SgxMeasurements` (...) or `TdxMeasurements` (...)``."""
    text = " ".join(TEXT.split())
    found = re.search(r"`sim_quotes\.SgxMeasurements` \((.*?)\) or `TdxMeasurements` \((.*?)\), byte fields", text)
    assert found, "client/README.md lists the fields SimulatedEvidence takes"
    sgx, tdx = (set(re.findall(r"`(\w+)`", group)) for group in found.groups())
    return sgx, tdx


def test_the_measurement_fields_listed_are_the_dataclasses() -> None:
    sgx, tdx = _listed()
    assert sgx == {f.name for f in dataclasses.fields(SgxMeasurements)}
    assert tdx == {f.name for f in dataclasses.fields(TdxMeasurements)}


def _error_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in TEXT.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and (name := re.match(r"`(\w+Error|PinMismatch)`", cells[0])):
            rows[name.group(1)] = cells[2]
    return rows


def test_the_error_table_is_the_error_tree_and_its_retries() -> None:
    rows = _error_rows()
    exported = {
        name
        for name in keybroker_client.__all__
        if isinstance(getattr(keybroker_client, name), type) and issubclass(getattr(keybroker_client, name), Exception)
    }
    assert set(rows) == exported - {"KeybrokerClientError"}
    for name, says in rows.items():
        error = getattr(keybroker_client, name)
        if error is ProblemError:
            for status, expected in ((429, True), (502, True), (504, True), (403, False), (500, False)):
                problem = Problem(status=status, code="c", title="t", detail="d")
                assert retried(ProblemError(problem)) is expected, (name, status)
            assert says == "429, 502\u2013504 only"
        else:
            assert retried(error("x")) is (says == "yes"), name


def test_every_class_named_in_the_prose_exists() -> None:
    import builtins

    from keybroker_client import evidence, sim_quotes

    modules = (keybroker_client, evidence, sim_quotes, builtins)
    named = {
        match.group(1)
        for _, _, code in inline_code(README)
        if (match := re.match(r"(?:sim_quotes\.)?([A-Z][A-Za-z]+)(?:\(|$)", code))
    }
    assert {"SimulatedEvidence", "ConfigurationError", "TlsError", "Retry"} <= named
    for name in named:
        assert any(hasattr(module, name) for module in modules), f"client/README.md names {name}: it does not exist"


def test_the_paths_the_readme_gives_are_the_providers() -> None:
    from keybroker_client import evidence

    assert str(evidence.TSM_REPORT) in TEXT
    assert f"{evidence.GRAMINE_ATTESTATION}/user_report_data" in TEXT
    assert f"{evidence.GRAMINE_ATTESTATION}/quote" in TEXT
    assert Path("tests/integration/test_client_readme.py").as_posix() in TEXT
