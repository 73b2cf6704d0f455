"""The admin CLI against a real server: scripts' output formats, readable errors, exit codes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keybroker.cli.main import app
from tests.conftest import REPO
from tests.integration.conftest import Server, free_port

runner = CliRunner()
POLICY_FILE = str(REPO / "examples" / "transfer-policy.json")


@pytest.fixture
def cli_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("KEYBROKER_ADDR", server.url)
    monkeypatch.setenv("KEYBROKER_TOKEN", server.token)
    monkeypatch.setenv("KEYBROKER_CACERT", str(server.ca_file))
    return {"KEYBROKER_ADDR": server.url, "KEYBROKER_TOKEN": server.token}


def _ok(*args: str, stdin: str | bytes | None = None) -> str:
    result = runner.invoke(app, list(args), input=stdin)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_output_formats_and_import_modes(cli_env: dict[str, str], tmp_path: Path) -> None:
    policy = _ok("policy", "create", POLICY_FILE, "--output", "id").strip()
    raw = bytes(range(16))
    (tmp_path / "aes.bin").write_bytes(raw)
    raw_id = _ok("key", "import", "-a", "AES", "-l", "128", "-p", policy, "-f", str(tmp_path / "aes.bin"), "-o", "id")
    b64_id = _ok(
        "key",
        "import",
        "-a",
        "AES",
        "-l",
        "256",
        "-p",
        policy,
        "-f",
        "-",
        "--format",
        "base64",
        "-o",
        "id",
        stdin=base64.b64encode(bytes(32)).decode() + "\n",
    )
    listed = json.loads(_ok("key", "list", "--output", "json"))
    assert [k["id"] for k in listed] == [raw_id.strip(), b64_id.strip()]
    assert [k["key_information"]["key_length"] for k in listed] == [128, 256]
    assert _ok("key", "list", "--algorithm", "AES", "--length", "256", "-o", "id").split() == [b64_id.strip()]
    table = _ok("key", "list")
    assert raw_id.strip() in table
    assert "ALGORITHM" in table
    shown = json.loads(_ok("policy", "show", policy, "-o", "json"))
    assert shown["id"] == policy


def test_pagination_with_all(cli_env: dict[str, str]) -> None:
    policy = _ok("policy", "create", POLICY_FILE, "-o", "id").strip()
    created = [_ok("key", "create", "-a", "AES", "-l", "128", "-p", policy, "-o", "id").strip() for _ in range(5)]
    assert _ok("key", "list", "--limit", "2", "-o", "id").split() == created[:2]
    assert _ok("key", "list", "--limit", "2", "--all", "-o", "id").split() == created


def test_server_refusals_are_readable(cli_env: dict[str, str], tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["key", "create", "-a", "RSA", "-l", "1024", "-p", "00000000-0000-4000-8000-000000000000"]
    )
    assert result.exit_code == 1
    assert "unsupported_key_length, HTTP 400" in result.stderr
    assert "request id:" in result.stderr
    bad_policy = tmp_path / "bad.json"
    bad_policy.write_text(json.dumps({"attestation_type": "SGX", "sgx": {"attributes": {"mr_enclave": ["00"]}}}))
    result = runner.invoke(app, ["policy", "create", str(bad_policy)])
    assert result.exit_code == 1
    assert "sgx.attributes.mr_enclave: Extra inputs are not permitted" in result.stderr
    bad_policy.write_text("{not json")
    result = runner.invoke(app, ["policy", "create", str(bad_policy)])
    assert result.exit_code == 2
    assert f"Error: Invalid value for FILE: {bad_policy} is not valid JSON: Expecting property name" in result.output


@pytest.mark.parametrize("columns", ["20", "60", "200"])
def test_errors_are_whole_plain_lines_at_any_width(cli_env: dict[str, str], tmp_path: Path, columns: str) -> None:
    """As a script sees them (stderr not a terminal): one plain line per message, never boxed, wrapped or cut,
    whatever COLUMNS says, for typer's own errors, server refusals and local ones."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    bad = deep / "bad.json"
    bad.write_text("{not json")
    env = {**os.environ, **cli_env, "KEYBROKER_CACERT": os.environ["KEYBROKER_CACERT"], "COLUMNS": columns}
    cases = [
        (["policy", "create", str(bad)], 2, f"Error: Invalid value for FILE: {bad} is not valid JSON:"),
        (["policy", "create", str(deep / "missing.json")], 1, f"Error: cannot read {deep / 'missing.json'}:"),
        (
            ["key", "create", "-a", "RSA", "-l", "1024", "-p", "00000000-0000-4000-8000-000000000000"],
            1,
            "Error: RSA key_length must be one of 2048, 3072, 4096, 7680 (unsupported_key_length, HTTP 400)",
        ),
    ]
    for args, code, line in cases:
        result = subprocess.run(
            [sys.executable, "-m", "keybroker", *args], capture_output=True, text=True, env=env, check=False
        )
        assert result.returncode == code, result.stderr
        assert any(row.startswith(line) for row in result.stderr.splitlines()), result.stderr
        assert not set("╭╮╰╯│─…") & set(result.stderr), result.stderr
        assert "Traceback" not in result.stderr


def test_wrong_token_and_unreachable_server(cli_env: dict[str, str]) -> None:
    result = runner.invoke(app, ["key", "list", "--token", "kb_wrong"])
    assert result.exit_code == 1
    assert "invalid_token, HTTP 401" in result.stderr
    result = runner.invoke(app, ["key", "list", "--addr", f"https://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert "cannot reach keybroker at https://127.0.0.1:" in result.stderr


def test_config_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["config", "check", "--data-dir", str(tmp_path), "-o", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["server"]["listen"] == "127.0.0.1:9443"
    monkeypatch.setenv("KEYBROKER_SERVER__LISTEN", "nowhere")
    result = runner.invoke(app, ["config", "check", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "server.listen" in result.stderr


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        ("UPDATE audit_events SET outcome = 'denied' WHERE seq = 3", "entry 3 was altered"),
        ("DELETE FROM audit_events WHERE seq = 2", "entry 2 is missing"),
    ],
    ids=["edited", "deleted"],
)
def test_audit_verify_names_the_tampered_entry(
    cli_env: dict[str, str], server: Server, tamper: str, named: str
) -> None:
    import sqlite3

    policy = _ok("policy", "create", POLICY_FILE, "-o", "id").strip()
    for _ in range(3):
        _ok("key", "create", "-a", "AES", "-l", "256", "-p", policy)
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "audit chain intact: 5 entries" in result.stderr
    with sqlite3.connect(server.data_dir / "keybroker.db") as db:
        db.execute(tamper)
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 1
    assert named in result.stderr


def test_tokens_and_roles(cli_env: dict[str, str]) -> None:
    secret = _ok("token", "create", "--name", "auditor-1", "--role", "auditor", "--ttl", "2h").strip()
    tokens = json.loads(_ok("token", "list", "-o", "json"))
    auditor = next(t for t in tokens if t["name"] == "auditor-1")
    assert auditor["roles"] == ["auditor"]
    assert "token" not in auditor
    assert _ok("audit", "list", "--token", secret)  # the auditor may read the audit log...
    result = runner.invoke(app, ["policy", "create", POLICY_FILE, "--token", secret])
    assert result.exit_code == 1  # ...but not create policies
    assert "forbidden, HTTP 403" in result.stderr
    _ok("role", "set", "auditor", "-p", "audit:read", "-p", "key_transfer_policies:create")
    assert _ok("policy", "create", POLICY_FILE, "--token", secret, "-o", "id")
    _ok("token", "revoke", auditor["id"])
    result = runner.invoke(app, ["audit", "list", "--token", secret])
    assert "token_revoked, HTTP 401" in result.stderr
    result = runner.invoke(app, ["token", "create", "--name", "x", "--role", "nobody"])
    assert "unknown_role" in result.stderr
    result = runner.invoke(app, ["token", "create", "--name", "x", "--role", "admin", "--ttl", "5y"])
    assert result.exit_code == 2
