"""The README's own commands, run as written: the first command serves the API; the quick start works."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import REPO
from tests.integration.conftest import Server, clean_env, free_port, stop

README = (REPO / "README.md").read_text()


def _first_command(purpose: str) -> str:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "the README starts with a bash block"
    for line in block.group(1).splitlines():
        if purpose in line:
            return line.split("#")[0].strip()
    raise AssertionError(f"no README command to {purpose}")


def test_readme_starts_with_the_two_commands() -> None:
    first_lines = README.split("\n", 8)[:8]
    assert first_lines[0] == "# keybroker"
    assert _first_command("run the service") == "bash scripts/run.sh"
    assert _first_command("run the whole test suite") == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_first_command_serves_the_api(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "run.log"
    command = _first_command("run the service")
    env = clean_env(KEYBROKER_DATA_DIR=str(tmp_path / ".data"), KEYBROKER_SERVER__LISTEN=f"127.0.0.1:{port}")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["bash", "-c", command], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=1, verify=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        token = (tmp_path / ".data" / "admin-token").read_text().strip()
        assert token in log.read_text()  # printed once, on first start
        ca = ssl.create_default_context(cafile=str(tmp_path / ".data" / "ca.pem"))
        response = httpx.get(
            f"https://127.0.0.1:{port}/kbs/v1/keys", headers={"Authorization": f"Bearer {token}"}, verify=ca
        )
        assert response.status_code == 200
        assert response.json() == []
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def test_quick_start_runs_as_written(server: Server, tmp_path: Path) -> None:
    block = re.search(r"<!-- quickstart:begin -->\n```bash\n(.*?)```\n<!-- quickstart:end -->", README, re.S)
    assert block
    # The quick start runs from the repository root against the service of the first command: here a copy of
    # the examples beside the test server's data directory, and the server's address in KEYBROKER_ADDR.
    workdir = server.data_dir.parent
    shutil.copytree(REPO / "examples", workdir / "examples")
    (workdir / ".venv").symlink_to(REPO / ".venv")
    script = "set -euo pipefail\nset -x\n" + block.group(1)
    result = subprocess.run(  # noqa: PLW1510 - the exit status is asserted below
        ["bash", "-c", script],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(KEYBROKER_ADDR=server.url),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--insecure" not in block.group(1)
    assert "verify=False" not in block.group(1)
    output = result.stdout
    assert re.search(r"\bEC\s+secp384r1\b", output)
    assert "tls" in output
    assert '"algorithm": "RSA"' in output
    assert "deleted key" in result.stderr
    with server.client() as client:
        keys = client.get("/kbs/v1/keys").json()
    assert sorted(k["key_information"]["algorithm"] for k in keys) == ["EC", "RSA"]  # AES was deleted
    stop(server.process)
