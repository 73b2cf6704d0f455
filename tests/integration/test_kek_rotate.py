"""``keybroker kek rotate --to FILE`` with real processes and real KEK holders, the way docs/operations.md tells an
operator to run it: a single host on SQLite moving to a new local master key and to OpenBao Transit (a real
``bao server -dev``), with the rotation killed by SIGKILL half way and run again; two replicas on PostgreSQL moving
to a PKCS#11 key in a SoftHSM2 token. Every key is released afterwards with the same bytes (background check and
passport, so the token signing key and the nonce key open too), the audit chain verifies, and a replica configured
with the old KEK refuses to start, naming the KEK to configure. Refusals with real holders change nothing: a sealed
Transit, a token that is not there, a running server."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.config import load_settings
from keybroker.services import build_services
from keybroker_client import Client
from keybroker_client.evidence import SimulatedEvidence
from tests.integration.conftest import Server, clean_env, stop, wait_until_serving
from tests.integration.replicas import MRENCLAVE, Deployment, audit_verify, provision, simulated_tee
from tests.peers.openbao import ROOT_TOKEN, DevBao
from tests.peers.postgres import Postgres
from tests.peers.process import free_port
from tests.peers.softhsm import SoftHsm

pytestmark = pytest.mark.integration

BAO_TOKEN_ENV = "KB_TEST_ROTATE_BAO_TOKEN"
HSM_PIN_ENV = "KB_TEST_ROTATE_HSM_PIN"
NEW_LOCAL = '[backends.embedded]\nwrapper = { type = "local", master_key_file = "master-2.key" }\n'


def keybroker(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keybroker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@dataclass
class Host:
    """One keybroker host on SQLite: ``init`` and ``serve`` as an operator runs them, settings in the environment."""

    data_dir: Path
    sim: Path
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return clean_env(KEYBROKER_ATTESTATION__SIMULATED_ROOT=str(self.sim / "root-ca.pem"), **self.extra)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return keybroker(*args, "--data-dir", str(self.data_dir), env=self.env())

    def serve(self) -> Server:
        port = free_port()
        log = self.data_dir.parent / f"serve-{port}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(self.data_dir), "--listen",
                 f"127.0.0.1:{port}"],
                stdout=sink, stderr=subprocess.STDOUT, env=self.env(),
            )  # fmt: skip
        url = f"https://127.0.0.1:{port}"
        try:
            wait_until_serving(url, process, log, ssl.create_default_context(cafile=str(self.data_dir / "ca.pem")))
        except Exception:
            stop(process)
            raise
        return Server(url, (self.data_dir / "admin-token").read_text().strip(), self.data_dir, log, process)

    def configure(self, section: str) -> None:
        """The section given to kek rotate --to, put into keybroker.toml (docs/operations.md, step 4)."""
        (self.data_dir / "keybroker.toml").write_text(section)

    def dump(self) -> list[str]:
        """Every row of the database (for "changes nothing")."""
        with _read_only(self.data_dir) as db:
            return list(db.iterdump())


def _read_only(data_dir: Path) -> contextlib.closing[sqlite3.Connection]:
    """The database, read-only, closed after use (an open connection counts as the database being in use)."""
    return contextlib.closing(sqlite3.connect(f"file:{data_dir / 'keybroker.db'}?mode=ro", uri=True, timeout=1))


def serve_refused(env: dict[str, str], data_dir: Path) -> str:
    """``keybroker serve`` that must refuse to start: its message."""
    ran = keybroker("serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{free_port()}", env=env, timeout=120)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr
    return ran.stderr.replace("\n", " ")


def released(urls: list[str], ca: Path, keys: dict[str, bytes], sim: Path) -> None:
    """Every key, released to the simulated enclave in both modes, has its bytes."""
    evidence = SimulatedEvidence(sim, "sgx", mrenclave=MRENCLAVE)
    with Client(urls, ca=str(ca)) as client:
        for n, (key_id, material) in enumerate(keys.items()):
            if n % 2:
                assert client.fetch_key(key_id, evidence, mode="passport").key == material
            else:
                assert client.fetch_key(key_id, evidence, mode="background").key == material


def rotations(server: Server) -> list[str]:
    with server.client() as http:
        entries = http.get("/kbs/v1/audit", params={"target": "kek"}).json()
    return [entry["action"] for entry in entries]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[Host, Server, dict[str, bytes]]]:
    """A host with three keys, released once (so that the token signing key exists) and a running server."""
    data_dir = tmp_path / "data"
    machine = Host(data_dir, simulated_tee(tmp_path))
    done = machine.run("init")
    assert done.returncode == 0, done.stderr
    server = machine.serve()
    try:
        keys = provision(server, machine.sim, count=3)
        released([server.url], data_dir / "ca.pem", keys, machine.sim)
        yield machine, server, keys
    finally:
        stop(server.process)


def test_a_single_host_moves_to_a_new_local_master_key(host: tuple[Host, Server, dict[str, bytes]]) -> None:
    machine, server, keys = host
    to = machine.data_dir.parent / "new-kek.toml"
    to.write_text(NEW_LOCAL)

    # While the server runs: refused, nothing changed.
    before = machine.dump()
    running = machine.run("kek", "rotate", "--to", str(to))
    assert running.returncode == 1, running.stderr
    assert "is open in another process (a keybroker serve?): stop it first; nothing was changed" in running.stderr
    assert not (machine.data_dir / "master-2.key").exists()

    stop(server.process)
    assert machine.dump() == before
    done = machine.run("kek", "rotate", "--to", str(to))
    assert done.returncode == 0, done.stderr
    assert "moved 7 records of backend 'embedded'" in done.stderr  # 3 keys, 2 CA keys, the token key, the nonce key
    assert "Keep the old KEK" in done.stderr

    # The old configuration: refused, naming the KEK to configure.
    kek_id = LocalKeyWrapper.from_file(machine.data_dir / "master-2.key").kek_id
    refused = serve_refused(machine.env(), machine.data_dir)
    assert f"configure KEK {kek_id} on this replica" in refused

    # The new one, the old master key gone: every key released with its bytes, one audit chain.
    machine.configure(to.read_text())
    (machine.data_dir / "master.key").unlink()
    after = machine.serve()
    try:
        released([after.url], machine.data_dir / "ca.pem", keys, machine.sim)
        assert rotations(after) == ["kek_rotation.start", "kek_rotation.finish"]
        assert "audit chain intact" in audit_verify(after)
    finally:
        stop(after.process)


def test_a_rotation_to_openbao_transit_killed_half_way_finishes_when_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BAO_TOKEN_ENV, ROOT_TOKEN)  # (the services this test builds itself read it)
    bao = DevBao(tmp_path / "bao")
    try:
        bao.enable_transit()
        machine = Host(tmp_path / "data", simulated_tee(tmp_path), {BAO_TOKEN_ENV: ROOT_TOKEN})
        assert machine.run("init").returncode == 0
        server = machine.serve()
        try:
            keys = provision(server, machine.sim, count=300)
        finally:
            stop(server.process)
        section = (
            f'[backends.embedded]\nwrapper = {{ type = "vault-transit", url = "{bao.url}", key_name = "kb-kek", '
            f'auth = {{ method = "token", token = {{ env = "{BAO_TOKEN_ENV}" }} }} }}\n'
        )
        to = tmp_path / "transit.toml"
        to.write_text(section)

        # Transit sealed: the new KEK cannot be used, nothing changes.
        before = machine.dump()
        bao.seal()
        sealed = machine.run("kek", "rotate", "--to", str(to))
        assert sealed.returncode == 1, sealed.stderr
        assert "the new KEK of backend 'embedded' cannot be used" in sealed.stderr
        assert "nothing was changed" in sealed.stderr
        assert machine.dump() == before
        bao.unseal()

        # Killed with SIGKILL once some records have moved.
        shown = json.loads(machine.run("kek", "status", "-o", "json").stdout)
        total = sum(row["records"] for row in shown["records"])
        assert total == len(keys) + 3  # the keys, the two CA keys and the nonce key (no token signed yet)
        rotating = subprocess.Popen(
            [sys.executable, "-m", "keybroker", "kek", "rotate", "--to", str(to), "--data-dir", str(machine.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=machine.env(),
        )  # fmt: skip
        moved = _moved_when_killed(machine, rotating)
        assert 0 < moved < total, f"killed after {moved} of {total}: make the deployment larger"

        # Start-up with the old configuration: refused, naming the command that finishes it.
        refused = serve_refused(machine.env(), machine.data_dir)
        assert "has not finished" in refused
        assert f"keybroker kek rotate --to {to}" in refused
        status = machine.run("kek", "status")
        assert f"has not finished: keybroker kek rotate --to {to}" in status.stderr.replace("\n", " ")

        again = machine.run("kek", "rotate", "--to", str(to))
        assert again.returncode == 0, again.stderr
        assert f"moved {total - moved} records" in again.stderr  # only what was left, nothing twice

        machine.configure(section)
        (machine.data_dir / "master.key").unlink()  # no master key on this host any more
        every = build_services(load_settings(data_dir=machine.data_dir))
        try:
            for key_id, material in keys.items():  # all 300 open under Transit
                assert every.keys.load_material(every.keys.get(key_id)).secret == material
        finally:
            every.close()
        after = machine.serve()
        try:
            released([after.url], machine.data_dir / "ca.pem", dict(list(keys.items())[:4]), machine.sim)
            assert rotations(after) == ["kek_rotation.start", "kek_rotation.start", "kek_rotation.finish"]
            assert "audit chain intact" in audit_verify(after)
        finally:
            stop(after.process)
    finally:
        bao.stop()


def _moved_when_killed(machine: Host, rotating: subprocess.Popen[bytes]) -> int:
    """SIGKILL the rotation as soon as it reports its first batch; how many records were under Transit then. (Its
    output, not the database, says when: a process that opens the database meanwhile would stop the rotation.)"""
    assert rotating.stderr is not None
    try:
        for line in rotating.stderr:
            if line.startswith(b"moved ") and b" of " in line:
                rotating.send_signal(signal.SIGKILL)
                break
    finally:
        rotating.kill()
        rotating.wait(timeout=120)
        rotating.stderr.close()
    assert rotating.returncode == -signal.SIGKILL, "the rotation finished before it could be killed"
    tables = ("embedded_key_material", "certificate_authorities", "signing_keys", "service_secrets")
    with _read_only(machine.data_dir) as db:
        return sum(
            int(db.execute(f"SELECT count(*) FROM {table} WHERE kek_id LIKE 'transit:%'").fetchone()[0])
            for table in tables
        )


def test_replicas_on_postgresql_move_to_a_pkcs11_kek(postgres: Postgres, softhsm: SoftHsm, tmp_path: Path) -> None:
    token = softhsm.token()
    deployment = Deployment(postgres, postgres.create_database(), tmp_path, sim=simulated_tee(tmp_path))
    pin = {HSM_PIN_ENV: token.pin}
    try:
        a, b = deployment.replica("a"), deployment.replica("b")
        assert deployment.sim is not None
        keys = provision(a, deployment.sim, count=3)
        released([a.url, b.url], a.ca_file, keys, deployment.sim)
        section = (
            f'[backends.embedded]\nwrapper = {{ type = "pkcs11", module = "{token.module}", token_label = '
            f'"{token.label}", key_label = "kb-kek", pin = {{ env = "{HSM_PIN_ENV}" }} }}\n'
        )
        to = tmp_path / "pkcs11.toml"
        to.write_text(section)
        wrong = tmp_path / "no-token.toml"
        wrong.write_text(section.replace(token.label, "no-such-token"))
        rotate = ["kek", "rotate", "--data-dir", str(a.data_dir)]

        running = keybroker(*rotate, "--to", str(to), env=deployment.env(**pin))
        assert running.returncode == 1, running.stderr
        assert "replicas are running (last heartbeat:" in running.stderr
        deployment.stop_all()
        missing = keybroker(*rotate, "--to", str(wrong), env=deployment.env(**pin))
        assert missing.returncode == 1  # the heartbeats are younger than 30 s: still refused, before any token
        assert "replicas are running (last heartbeat:" in missing.stderr
        assert "by the database's clock); nothing was changed" in missing.stderr
        assert "no-such-token" not in missing.stderr
        # As if an operator had waited 31 s for the stopped replicas' heartbeats to go stale (the guard reads their
        # age by the database's clock): their last heartbeat moved 31 s into the past instead of a 31 s sleep.
        postgres.admin_sql(
            "UPDATE replicas SET heartbeat_at = heartbeat_at - interval '31 seconds'", database=deployment.database
        )
        missing = keybroker(*rotate, "--to", str(wrong), env=deployment.env(**pin))
        assert missing.returncode == 2, missing.stderr
        assert "the new KEK of backend 'embedded' cannot be used (PKCS#11 module" in missing.stderr
        assert "has no token labelled 'no-such-token'" in missing.stderr

        done = keybroker(*rotate, "--to", str(to), env=deployment.env(**pin))
        assert done.returncode == 0, done.stderr
        assert "moved 7 records" in done.stderr
        assert "KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY: unset it" in done.stderr
        said = running.stdout + running.stderr + missing.stdout + missing.stderr + done.stdout + done.stderr
        for secret in (
            deployment.kek,
            base64.b64decode(deployment.kek).hex(),
            token.pin,
            *map(bytes.hex, keys.values()),
        ):
            assert secret not in said  # neither KEK, nor the PIN, nor any key's material

        # A replica that has only the old KEK refuses to start and names the KEK to configure.
        refused = serve_refused(deployment.env(**pin), a.data_dir)
        assert "moved them there" in refused
        assert f"configure KEK pkcs11:{token.label}/kb-kek" in refused

        # Each replica restarted with the new section and without the old KEK.
        without_old = {"KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY": "", **pin}
        deployment.servers.clear()
        restarted = []
        for data_dir in (a.data_dir, b.data_dir):
            (data_dir / "keybroker.toml").write_text(section)
            restarted.append(deployment.serve(data_dir, None, **without_old))
        released([server.url for server in restarted], a.ca_file, keys, deployment.sim)
        assert rotations(restarted[1]) == ["kek_rotation.start", "kek_rotation.finish"]
        assert "audit chain intact" in audit_verify(restarted[0])
    finally:
        deployment.stop_all()
