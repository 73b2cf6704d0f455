"""The guide's Vault set-up (scripts/vault-guide-setup.sh: OpenBao with raft storage, 5 key shares, threshold 3,
KV v1 at ``keybroker``) behind a real keybroker server: keys live at ``keybroker/<key id>``, the embedded store's
KEK lives in Transit, an attested transfer returns the right bytes, and when Vault restarts sealed the transfer is
a 503 until three shares unseal it, after which the same keybroker process releases the key again."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
from typer.testing import CliRunner

from keybroker.cli.main import app
from keybroker_client import Client, ProblemError
from keybroker_client.evidence import SimulatedEvidence
from tests.integration.conftest import Server, start_server, stop
from tests.peers.openbao import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "vault-guide-setup.sh"
MRENCLAVE = b"\x5a" * 32
runner = CliRunner()


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def vault_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("guide-vault")
    _script(str(directory), str(free_port()))
    try:
        yield directory
    finally:
        subprocess.run(["bash", str(SCRIPT), "--stop", str(directory)], capture_output=True, timeout=60, check=False)


def _root(vault_dir: Path) -> hvac.Client:
    init = json.loads((vault_dir / "init.json").read_text())
    return hvac.Client(url=f"http://127.0.0.1:{(vault_dir / 'port').read_text().strip()}", token=init["root_token"])


def test_the_script_sets_up_vault_as_the_guide_does(vault_dir: Path) -> None:
    init = json.loads((vault_dir / "init.json").read_text())
    assert len(init["unseal_keys_b64"]) == 5
    assert (vault_dir / "init.json").stat().st_mode & 0o077 == 0
    assert (vault_dir / "keybroker-token").stat().st_mode & 0o077 == 0
    client = _root(vault_dir)
    status = client.sys.read_seal_status()
    assert (status["t"], status["n"], status["sealed"], status["storage_type"]) == (3, 5, False, "raft")
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    assert mounts["keybroker/"]["type"] == "kv"
    assert (mounts["keybroker/"]["options"] or {}).get("version", "1") == "1"  # no version option: KV v1
    assert "transit/" in mounts
    # keybroker's token is limited to its paths.
    limited = hvac.Client(url=client.url, token=(vault_dir / "keybroker-token").read_text().strip())
    with pytest.raises(hvac.exceptions.Forbidden):
        limited.sys.list_mounted_secrets_engines()


@pytest.fixture(scope="module")
def server(vault_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    base = tmp_path_factory.mktemp("guide-kbs")
    sim = base / "sim"
    assert runner.invoke(app, ["sim", "init", str(sim)]).exit_code == 0
    assert runner.invoke(app, ["sim", "collateral", str(sim), "--out", str(sim / "coll")]).exit_code == 0
    data_dir = base / ".data"
    data_dir.mkdir(mode=0o700)
    shutil.copy(vault_dir / "keybroker.toml", data_dir / "keybroker.toml")
    running = start_server(data_dir, KEYBROKER_ATTESTATION__SIMULATED_ROOT=str(sim / "root-ca.pem"))
    try:
        yield running, sim
    finally:
        stop(running.process)


def test_no_master_key_file_exists_with_a_transit_kek(server: tuple[Server, Path]) -> None:
    running, _ = server
    assert not (running.data_dir / "master.key").exists()


def test_keys_live_in_vault_and_transfer_survives_a_sealed_restart(
    server: tuple[Server, Path], vault_dir: Path
) -> None:
    running, sim = server
    secret = os.urandom(32)
    imported = runner.invoke(
        app,
        [
            "collateral",
            "import",
            str(sim / "coll"),
            "--addr",
            running.url,
            "--token",
            running.token,
            "--cacert",
            str(running.ca_file),
        ],
    )
    assert imported.exit_code == 0, imported.output
    with running.client() as api:
        policy = {
            "attestation_type": "SGX",
            "allow_simulated": True,
            "sgx": {"attributes": {"mrenclave": [MRENCLAVE.hex()]}},
        }
        policy_id = api.post("/kbs/v1/key-transfer-policies", json=policy).json()["id"]
        created = api.post(
            "/kbs/v1/keys",
            json={
                "key_information": {
                    "algorithm": "AES",
                    "key_length": 256,
                    "key_string": base64.b64encode(secret).decode(),
                },
                "transfer_policy_id": policy_id,
            },
        )
        assert created.status_code == 201, created.text
        assert created.json()["backend"] == "vault"
        key_id = created.json()["id"]
    stored = _root(vault_dir).secrets.kv.v1.read_secret(key_id, mount_point="keybroker")["data"]
    assert base64.b64decode(stored["material"]) == secret  # the guide's layout: keybroker/<key id>
    evidence = SimulatedEvidence(sim, "sgx", mrenclave=MRENCLAVE)

    def fetch() -> bytes:
        with Client(running.url, ca=running.ca_file) as client:
            return client.fetch_key(key_id, evidence).key

    assert fetch() == secret
    _script("--stop", str(vault_dir))
    with pytest.raises(ProblemError) as down:
        fetch()
    assert (down.value.status, down.value.code) == (503, "backend_unavailable")
    _script("--start", str(vault_dir))  # back, but sealed (raft storage: Vault always starts sealed)
    with pytest.raises(ProblemError) as sealed:
        fetch()
    assert (sealed.value.status, sealed.value.code) == (503, "backend_unavailable")
    _script("--unseal", str(vault_dir))
    assert fetch() == secret  # the same keybroker process, not restarted
