"""client/README.md's simulated workload, run as written against a real keybroker process: the setup block's
commands (``keybroker sim init sim/``, keybroker started with the simulated root its second line names), then the
fetch block verbatim with bash, from the directory a user runs it in. The blocks are read from the README here,
so that the README and the test cannot drift.

It is issue #15's report: ``SimulatedEvidence("sim", "sgx", mrenclave="ab" * 32)`` (a hex string) made
``fetch_key`` raise ``TransportError: unexpected answer ...: TypeError``. The same server then shows the TLS hints
a user gets without a CA, or with an http:// URL on its TLS port.
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keybroker_client import Client, ProblemError, TlsError
from keybroker_client.evidence import SimulatedEvidence
from tests.conftest import REPO
from tests.integration.conftest import Server, clean_env, start_server, stop

README = (REPO / "client" / "README.md").read_text()


def _block(marker: str) -> str:
    found = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n", README, re.S)
    assert found, f"client/README.md has no bash block after <!-- {marker} -->"
    return found.group(1)


SETUP = _block("simulated-setup").splitlines()
FETCH = _block("simulated-fetch:begin")


@dataclass
class Workload:
    server: Server
    workdir: Path  # where the README's commands run: sim/ and .data/ are here


def _bash(script: str, workdir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a shell that has only the system's PATH: the README's own lines put keybroker on it."""
    return subprocess.run(  # noqa: PLW1510 - the exit status is asserted by the callers
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(PATH="/usr/local/bin:/usr/bin:/bin", **env),
    )


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workload]:
    workdir = tmp_path_factory.mktemp("client-readme")
    (workdir / ".venv").symlink_to(REPO / ".venv")  # the blocks put $PWD/.venv/bin on PATH, as in the repository
    *first, serve = SETUP
    assert first[-1].split("#")[0].strip() == "keybroker sim init sim/"
    made = _bash("\n".join(first), workdir)
    assert made.returncode == 0, made.stderr
    assert (workdir / "sim" / "root-ca.pem").is_file()
    # The last line starts keybroker (scripts/run.sh: init, then serve) with one setting: here the same setting on
    # a free port (run.sh's fixed 127.0.0.1:9443 may be taken), and KEYBROKER_ADDR saying where it is.
    setting = re.fullmatch(r"(KEYBROKER_\w+)=\$PWD/(\S+) bash scripts/run\.sh\s+#.*", serve)
    assert setting, serve
    server = start_server(workdir / ".data", **{setting.group(1): str(workdir / setting.group(2))})
    try:
        yield Workload(server, workdir)
    finally:
        stop(server.process)


@pytest.fixture(scope="module")
def fetched(workload: Workload) -> subprocess.CompletedProcess[str]:
    """The fetch block, verbatim, once."""
    assert 'SimulatedEvidence("sim", "sgx", mrenclave="ab" * 32)' in FETCH  # the form of the issue: hex
    return _bash(FETCH, workload.workdir, KEYBROKER_ADDR=workload.server.url)


def _released_id(fetched: subprocess.CompletedProcess[str]) -> str:
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    released = re.search(r"^ReleasedKey\(key_id='([0-9a-f-]{36})', <32 bytes redacted>\)$", fetched.stdout, re.M)
    assert released, fetched.stdout + fetched.stderr
    return released.group(1)


def test_the_readme_s_simulated_fetch_runs_as_written(
    workload: Workload, fetched: subprocess.CompletedProcess[str]
) -> None:
    key_id = _released_id(fetched)
    key_file = workload.workdir / "key.bin"  # and the same key from the command line
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    assert f"received key {key_id} (32 bytes) -> key.bin" in fetched.stderr
    assert "Traceback" not in fetched.stderr


def test_another_mrenclave_is_refused_by_the_same_policy(
    workload: Workload, fetched: subprocess.CompletedProcess[str]
) -> None:
    """The hex string reached the quote as MRENCLAVE: "cd" * 32 is refused by the policy that names "ab" * 32."""
    key_id = _released_id(fetched)
    evidence = SimulatedEvidence(workload.workdir / "sim", "sgx", mrenclave="cd" * 32)
    with (
        Client(workload.server.url, ca=workload.server.ca_file) as client,
        pytest.raises(ProblemError) as refused,
    ):
        client.fetch_key(key_id, evidence)
    assert refused.value.code == "policy_denied"
    assert [reason["code"] for reason in refused.value.problem.reasons] == ["mrenclave_mismatch"]


def test_without_a_ca_the_error_says_to_pass_the_deployment_s(workload: Workload) -> None:
    evidence = SimulatedEvidence(workload.workdir / "sim", "sgx", mrenclave="ab" * 32)
    with Client(workload.server.url) as client, pytest.raises(TlsError) as caught:
        client.fetch_key("00000000-0000-0000-0000-000000000000", evidence)
    assert "no CA was given" in str(caught.value)
    assert "ca='ca.pem'" in str(caught.value)
    assert "ca_fingerprint=" in str(caught.value)
    # The workload CLI, as a user runs it: one line, no traceback, exit 1.
    result = subprocess.run(  # noqa: PLW1510 - asserted below
        [
            sys.executable,
            "-m",
            "keybroker_client.cli",
            "fetch-key",
            "00000000-0000-0000-0000-000000000000",
            "--kbs",
            workload.server.url,
            "--evidence",
            "sim:sim:sgx",
            "--out",
            "key-nothing.bin",
        ],
        cwd=workload.workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach {workload.server.url}: no CA was given")
    assert "--ca ca.pem" in result.stderr
    assert "--ca-fingerprint" in result.stderr
    assert "Traceback" not in result.stderr


def test_http_on_keybroker_s_tls_port_says_to_use_https(workload: Workload) -> None:
    address = workload.server.url.removeprefix("https://")
    evidence = SimulatedEvidence(workload.workdir / "sim", "sgx")
    with Client(f"http://{address}") as client, pytest.raises(TlsError) as caught:
        client.fetch_key("00000000-0000-0000-0000-000000000000", evidence)
    assert f"use https://{address}" in str(caught.value)
