"""Attested key transfer over real HTTPS against a real server: SGX and TDX, both modes, AES, RSA and EC keys;
the workload CLI; and a workload written only from PROTOCOL.md."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from typer.testing import CliRunner

from keybroker.cli.main import app
from keybroker_client import Client, ProblemError
from keybroker_client.evidence import SimulatedEvidence
from tests.integration.conftest import Server, start_server, stop
from tests.integration.independent_client import fetch_key

runner = CliRunner()
MRENCLAVE = b"\x5a" * 32
MRTD = b"\x6b" * 48
PKCS8 = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class Setup:
    server: Server
    sim: Path
    keys: dict[str, tuple[str, bytes]]  # name -> (key id, expected bytes)
    zero_key: str  # a key whose policy matches the simulator's default (all-zero) measurements


def _cli(server: Server, *args: str) -> str:
    result = runner.invoke(app, [*args, "--addr", server.url, "--token", server.token, "--cacert", str(server.ca_file)])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("e2e")
    sim = base / "sim"
    assert runner.invoke(app, ["sim", "init", str(sim)]).exit_code == 0
    assert runner.invoke(app, ["sim", "collateral", str(sim), "--out", str(sim / "coll")]).exit_code == 0
    server = start_server(base / ".data", KEYBROKER_ATTESTATION__SIMULATED_ROOT=str(sim / "root-ca.pem"))
    try:
        _cli(server, "collateral", "import", str(sim / "coll"))
        policy = {
            "attestation_type": ["SGX", "TDX"],
            "allow_simulated": True,
            "sgx": {"attributes": {"mrenclave": [MRENCLAVE.hex()]}},
            "tdx": {"attributes": {"mrtd": [MRTD.hex()]}},
        }
        (base / "policy.json").write_text(json.dumps(policy))
        policy_id = _cli(server, "policy", "create", str(base / "policy.json"), "-o", "id").strip()
        zero = {"attestation_type": "SGX", "allow_simulated": True, "sgx": {"attributes": {"mrenclave": ["00" * 32]}}}
        (base / "zero.json").write_text(json.dumps(zero))
        zero_policy = _cli(server, "policy", "create", str(base / "zero.json"), "-o", "id").strip()
        keys: dict[str, tuple[str, bytes]] = {}
        aes = os.urandom(32)
        (base / "aes.bin").write_bytes(aes)
        keys["AES"] = (
            _cli(
                server,
                "key",
                "import",
                "-a",
                "AES",
                "-l",
                "256",
                "-p",
                policy_id,
                "-f",
                str(base / "aes.bin"),
                "-o",
                "id",
            ).strip(),
            aes,
        )
        rsa_key = rsa.generate_private_key(65537, 3072)
        (base / "rsa.pem").write_bytes(
            rsa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            )
        )
        keys["RSA"] = (
            _cli(
                server,
                "key",
                "import",
                "-a",
                "RSA",
                "-l",
                "3072",
                "-p",
                policy_id,
                "-f",
                str(base / "rsa.pem"),
                "-o",
                "id",
            ).strip(),
            rsa_key.private_bytes(*PKCS8),
        )
        ec_key = ec.generate_private_key(ec.SECP256R1())
        (base / "ec.pem").write_bytes(
            ec_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        keys["EC"] = (
            _cli(
                server,
                "key",
                "import",
                "-a",
                "EC",
                "--curve",
                "secp256r1",
                "-p",
                policy_id,
                "-f",
                str(base / "ec.pem"),
                "-o",
                "id",
            ).strip(),
            ec_key.private_bytes(*PKCS8),
        )
        zero_key = _cli(server, "key", "create", "-a", "AES", "-l", "128", "-p", zero_policy, "-o", "id").strip()
        yield Setup(server, sim, keys, zero_key)
    finally:
        stop(server.process)


def _evidence(setup: Setup, tee: str) -> SimulatedEvidence:
    if tee == "sgx":
        return SimulatedEvidence(setup.sim, "sgx", mrenclave=MRENCLAVE)
    return SimulatedEvidence(setup.sim, "tdx", mrtd=MRTD)


@pytest.mark.parametrize("kind", ["AES", "RSA", "EC"])
@pytest.mark.parametrize("mode", ["background", "passport"])
@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_keybroker_client_receives_the_imported_bytes(setup: Setup, tee: str, mode: str, kind: str) -> None:
    key_id, expected = setup.keys[kind]
    with Client(setup.server.url, ca=setup.server.ca_file) as client:
        released = client.fetch_key(key_id, _evidence(setup, tee), mode=mode)
    assert released.key == expected
    assert expected.hex() not in repr(released)


def test_refusal_carries_code_and_reasons(setup: Setup) -> None:
    key_id, _ = setup.keys["AES"]
    with Client(setup.server.url, ca=setup.server.ca_file) as client, pytest.raises(ProblemError) as caught:
        client.fetch_key(key_id, SimulatedEvidence(setup.sim, "sgx", mrenclave=b"\x01" * 32))
    assert caught.value.code == "policy_denied"
    assert [r["code"] for r in caught.value.problem.reasons] == ["mrenclave_mismatch"]


@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_a_workload_written_from_the_protocol(setup: Setup, tee: str) -> None:
    key_id, expected = setup.keys["AES"]
    import ssl

    with httpx.Client(
        base_url=setup.server.url, verify=ssl.create_default_context(cafile=str(setup.server.ca_file)), timeout=60
    ) as http:
        assert fetch_key(http, key_id, tee, _evidence(setup, tee).quote) == expected


def test_workload_cli(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "key.bin"
    command = [
        sys.executable,
        "-m",
        "keybroker_client.cli",
        "fetch-key",
        setup.zero_key,
        "--kbs",
        setup.server.url,
        "--ca",
        str(setup.server.ca_file),
        "--evidence",
        f"sim:{setup.sim}:sgx",
    ]
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(out.read_bytes()) == 16
    result = subprocess.run([*command, "--out", "-"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "--force" in result.stderr
    key_id, _ = setup.keys["AES"]  # its policy wants another MRENCLAVE than the simulator's default
    refused = [
        sys.executable,
        "-m",
        "keybroker_client.cli",
        "fetch-key",
        key_id,
        "--kbs",
        setup.server.url,
        "--ca",
        str(setup.server.ca_file),
        "--evidence",
        f"sim:{setup.sim}:sgx",
        "--out",
        str(tmp_path / "x"),
    ]
    result = subprocess.run(refused, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "policy_denied" in result.stderr
    assert "mrenclave_mismatch" in result.stderr
    assert not (tmp_path / "x").exists()


def test_demo(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "keybroker", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "decrypted 'the launch codes are 0000' (AES-GCM) and 'the launch codes are 0000' (RSA-OAEP)" in result.stdout
    assert "was refused: policy_denied (mrenclave_mismatch" in result.stdout
    assert '["key.transfer", "allowed"], ["key.transfer", "denied"]' in result.stdout
    log = (tmp_path / "demo" / "server.log").read_text()
    assert "simulated_tee_trusted" in log  # the start-up warning


def test_transfers_are_answered_while_rsa_7680_imports_run(setup: Setup) -> None:
    """Four importers send RSA-7680 keys back to back (each import is checked in the bounded pool for costly
    requests); meanwhile attested transfers keep being released. (Their latency is measured in bench/costly.py.)"""
    big = rsa.generate_private_key(65537, 7680)
    pem = big.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    policy = setup.server.client().get(f"/kbs/v1/keys/{setup.keys['AES'][0]}").json()["transfer_policy_id"]
    body = {
        "key_information": {"algorithm": "RSA", "key_length": 7680, "key_string": pem.decode()},
        "transfer_policy_id": policy,
    }
    stop_importing = threading.Event()
    imports: list[tuple[float, float, int]] = []  # (started, ended, status)

    def importer() -> None:
        with setup.server.client() as admin:
            while not stop_importing.is_set():
                started = time.monotonic()
                status = admin.post("/kbs/v1/keys", json=body).status_code
                imports.append((started, time.monotonic(), status))

    threads = [threading.Thread(target=importer) for _ in range(4)]
    for thread in threads:
        thread.start()
    released_during: list[float] = []
    try:
        time.sleep(0.3)
        key_id, expected = setup.keys["AES"]
        with Client(setup.server.url, ca=setup.server.ca_file) as client:
            for _ in range(15):
                assert client.fetch_key(key_id, _evidence(setup, "sgx")).key == expected
                released_during.append(time.monotonic())
    finally:
        stop_importing.set()
        for thread in threads:
            thread.join(timeout=120)
    assert imports
    assert {status for _, _, status in imports} == {201}
    first_start, last_end = min(s for s, _, _ in imports), max(e for _, e, _ in imports)
    assert all(first_start < at < last_end for at in released_during)  # every transfer overlapped the imports
    imported = (
        setup.server.client().get("/kbs/v1/keys", params={"algorithm": "RSA", "keyLength": 7680, "limit": 1000}).json()
    )
    assert len(imported) >= len(imports)
