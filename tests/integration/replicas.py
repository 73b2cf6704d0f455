"""Several keybroker replicas of one deployment on a PostgreSQL database of the tests' own, as real processes: the
same ``keybroker init`` / ``keybroker serve`` an operator runs on each host, with the settings in the environment.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from typer.testing import CliRunner

from keybroker.cli.main import app
from tests.integration.conftest import Server, clean_env, stop, wait_until_serving
from tests.peers.postgres import Postgres
from tests.peers.process import free_port

PASSWORD_ENV = "KB_TEST_REPLICA_PG_PASSWORD"
MRENCLAVE = b"\x5a" * 32
runner = CliRunner()


@dataclass
class Deployment:
    """One deployment: a database, a KEK, the simulated TEE's root; ``replica()`` starts one more replica."""

    postgres: Postgres
    database: str
    base: Path
    kek: str = field(default_factory=lambda: base64.b64encode(os.urandom(32)).decode())
    sim: Path | None = None
    servers: list[Server] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        settings = {
            "KEYBROKER_DATABASE__URL": self.postgres.url_for(self.database),
            "KEYBROKER_DATABASE__PASSWORD__ENV": PASSWORD_ENV,
            PASSWORD_ENV: self.postgres.password,
            "KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY": self.kek,
        }
        if self.sim is not None:
            settings["KEYBROKER_ATTESTATION__SIMULATED_ROOT"] = str(self.sim / "root-ca.pem")
        merged = {**settings, **extra}
        return clean_env(**{name: value for name, value in merged.items() if value != ""})  # "": unset it

    def init(self, data_dir: Path, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keybroker", "init", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            env=self.env(**extra),
            timeout=120,
            check=False,
        )

    def serve(self, data_dir: Path, port: int | None = None, *args: str, **extra: str) -> Server:
        """``keybroker serve`` on an initialised data directory (``port``: the same one again after a kill)."""
        port = port or free_port()
        log = data_dir.parent / f"{data_dir.name}-{port}.log"
        with log.open("ab") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(data_dir), "--listen",
                 f"127.0.0.1:{port}", *args],
                stdout=sink, stderr=subprocess.STDOUT, env=self.env(**extra),
            )  # fmt: skip
        url = f"https://127.0.0.1:{port}"
        try:
            wait_until_serving(url, process, log, ssl.create_default_context(cafile=str(data_dir / "ca.pem")))
        except Exception:
            stop(process)
            raise
        token_file = self.base / "admin-token"
        server = Server(url, token_file.read_text().strip() if token_file.exists() else "", data_dir, log, process)
        self.servers.append(server)
        return server

    def replica(self, name: str, *args: str, **extra: str) -> Server:
        data_dir = self.base / name
        done = self.init(data_dir, **extra)
        assert done.returncode == 0, done.stderr
        if (data_dir / "admin-token").exists():  # the first replica: its admin token works on all
            (self.base / "admin-token").write_text((data_dir / "admin-token").read_text())
        return self.serve(data_dir, None, *args, **extra)

    def stop_all(self) -> None:
        for server in self.servers:
            stop(server.process)


def cli(server: Server, *args: str) -> str:
    result = runner.invoke(app, [*args, "--addr", server.url, "--token", server.token, "--cacert", str(server.ca_file)])
    assert result.exit_code == 0, result.output
    return result.stdout


def simulated_tee(base: Path) -> Path:
    sim = base / "sim"
    assert runner.invoke(app, ["sim", "init", str(sim)]).exit_code == 0
    assert runner.invoke(app, ["sim", "collateral", str(sim), "--out", str(sim / "coll")]).exit_code == 0
    return sim


def provision(server: Server, sim: Path, count: int = 1) -> dict[str, bytes]:
    """Collateral, a policy for the simulated enclave MRENCLAVE and ``count`` imported AES keys: id -> bytes."""
    cli(server, "collateral", "import", str(sim / "coll"))
    policy = {
        "attestation_type": "SGX",
        "allow_simulated": True,
        "sgx": {"attributes": {"mrenclave": [MRENCLAVE.hex()]}},
    }
    with server.client() as http:
        made = http.post("/kbs/v1/key-transfer-policies", json=policy)
        assert made.status_code == 201, made.text
        policy_id = made.json()["id"]
        keys: dict[str, bytes] = {}
        for n in range(count):
            material = os.urandom(32)
            body = {
                "key_information": {
                    "algorithm": "AES",
                    "key_length": 256,
                    "key_string": base64.b64encode(material).decode(),
                },
                "label": f"key-{n}",
                "transfer_policy_id": policy_id,
            }
            created = http.post("/kbs/v1/keys", json=body)
            assert created.status_code == 201, created.text
            keys[created.json()["id"]] = material
    return keys


def audit_verify(server: Server) -> str:
    result = runner.invoke(
        app, ["audit", "verify", "--addr", server.url, "--token", server.token, "--cacert", str(server.ca_file)]
    )
    assert result.exit_code == 0, result.output
    return result.output


def replicas_listed(server: Server) -> list[dict[str, object]]:
    with server.client() as http:
        answer = http.get("/kbs/v1/cluster/replicas")
    assert answer.status_code == 200, answer.text
    listed: list[dict[str, object]] = answer.json()
    return listed


def files_in(directory: Path) -> Iterator[str]:
    return (str(path.relative_to(directory)) for path in sorted(directory.rglob("*")))


def table_counts(postgres: Postgres, database: str) -> dict[str, int]:
    """Rows per table of keybroker's schema (for "changes nothing")."""
    names = postgres.admin_sql(
        "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'", database=database
    ).strip()
    counts: dict[str, int] = {}
    for name in filter(None, names.split(",")):
        counts[name] = int(postgres.admin_sql(f"SELECT count(*) FROM {name}", database=database).strip())
    return counts


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def http_verify(server: Server) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca_file))


def get(server: Server, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or server.token}"}
    return httpx.get(f"{server.url}{path}", headers=headers, verify=http_verify(server), timeout=30)
