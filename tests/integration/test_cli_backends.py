"""``keybroker backends check`` asks the server it is pointed at (KEYBROKER_ADDR or --addr), not a data directory
that happens to be here; ``--offline``/``--data-dir`` checks a data directory's configuration from this host.
Against a real server whose second backend (OpenBao KV) points at a closed port."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import Server, clean_env, start_server, stop
from tests.peers.process import free_port

KEYBROKER = str(REPO / ".venv" / "bin" / "keybroker")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("backends")
    token_file = base / "vault-token"
    token_file.write_text("s.not-a-real-token\n")
    token_file.chmod(0o600)
    toml = f"""
[backends.embedded]
type = "embedded"

[backends.vault]
type = "vault"
url = "http://127.0.0.1:{free_port()}"
auth = {{ token = {{ file = "{token_file}" }} }}
"""
    running = start_server(base / ".data", toml=toml)
    try:
        yield running
    finally:
        stop(running.process)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another deployment's data directory, with the embedded backend only, in a directory of its own."""
    here = tmp_path_factory.mktemp("elsewhere")
    subprocess.run([KEYBROKER, "init", "--data-dir", ".data"], cwd=here, check=True, capture_output=True,
                   env=clean_env())  # fmt: skip
    return here


def keybroker(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KEYBROKER, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(COLUMNS="60", **(env or {})),
        timeout=120,
        check=False,
    )


def connection(server: Server) -> dict[str, str]:
    return {"KEYBROKER_ADDR": server.url, "KEYBROKER_TOKEN": server.token, "KEYBROKER_CACERT": str(server.ca_file)}


def test_the_server_checks_its_backends(server: Server, healthy: Path) -> None:
    """From a directory holding another deployment's .data (what the old command read): the server's backends."""
    result = keybroker("backends", "check", cwd=healthy, env=connection(server))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows["embedded"].split()[:5] == ["embedded", "embedded", "local", "yes", "ok"]
    assert rows["vault"].split()[:5] == ["vault", "vault", "-", "no", "backend_unavailable"]
    assert "Vault at http://127.0.0.1:" in rows["vault"]
    assert result.stderr.startswith("checked by ")
    assert result.stderr.rstrip().endswith(": 1 of 2 failed")
    assert "Store(" not in result.stdout + result.stderr  # (no Python reprs)
    assert "not-a-real-token" not in result.stdout + result.stderr


def test_json_and_the_addr_option(server: Server) -> None:
    result = keybroker(
        "backends", "check", "-o", "json", "--addr", server.url, "--token", server.token,
        "--cacert", str(server.ca_file),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["replica"]
    assert [(b["name"], b["type"], b["default"], b["ok"]) for b in report["backends"]] == [
        ("embedded", "embedded", True, True),
        ("vault", "vault", False, False),
    ]
    assert report["backends"][1]["code"] == "backend_unavailable"


def test_a_token_without_backends_read_is_refused(server: Server) -> None:
    auditor = keybroker("token", "create", "--name", "auditor", "--role", "auditor", env=connection(server))
    assert auditor.returncode == 0, auditor.stderr
    result = keybroker("backends", "check", env={**connection(server), "KEYBROKER_TOKEN": auditor.stdout.strip()})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: this token does not grant backends:read (forbidden, HTTP 403)")


def test_offline_checks_the_data_directory_here(server: Server, healthy: Path) -> None:
    """--data-dir means offline (even with KEYBROKER_ADDR set), and so does --offline with the default .data."""
    for args in (["--data-dir", str(healthy / ".data")], ["--offline"]):
        result = keybroker("backends", "check", *args, cwd=healthy, env=connection(server))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[7:12] == ["embedded", "embedded", "local", "yes", "ok"]
        assert f"checked by this host, offline ({healthy / '.data'})" in result.stderr
        assert result.stderr.rstrip().endswith(": all 1 ok")
    failing = keybroker("backends", "check", "--data-dir", str(server.data_dir), "-o", "json")
    assert failing.returncode == 1, failing.stderr
    assert [b["ok"] for b in json.loads(failing.stdout)["backends"]] == [True, False]


def test_the_data_dir_variable_alone_does_not_switch_to_offline(server: Server, healthy: Path) -> None:
    result = keybroker("backends", "check", env={**connection(server), "KEYBROKER_DATA_DIR": str(healthy / ".data")})
    assert result.returncode == 1, result.stderr  # (the server's failing vault backend, not the healthy directory)


def test_reconcile_is_readable(healthy: Path) -> None:
    result = keybroker("backends", "reconcile", "--data-dir", str(healthy / ".data"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "finished 0 interrupted write(s); 0 still wait(s) for a backend; 0 pending in all"
    result = keybroker("backends", "reconcile", "--data-dir", str(healthy / ".data"), "-o", "json")
    assert json.loads(result.stdout) == {"finished": 0, "waiting": 0, "pending": []}
