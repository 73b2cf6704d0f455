"""The highly available topology on one machine, on loopback ports: PostgreSQL, a 3-node OpenBao raft cluster,
keybroker replicas and nginx in front of them. Run it through ``scripts/cluster.sh`` (which bootstraps .venv).

    up [--dir DIR] [--replicas N]   start everything (default DIR: /tmp/keybroker-cluster, 2 replicas)
    status                          every component, and keybroker's own ``cluster status``
    kill NAME | stop NAME | start NAME
                                    SIGKILL / stop / start one of: pg, bao-1..3, kb-1..N, lb (start unseals OpenBao)
    lb NAME...                      send the load balancer's traffic to these replicas only (nginx reload)
    env                             shell exports to use the cluster (source <(scripts/cluster.sh env))
    down                            stop everything and delete DIR

State is in DIR/cluster.json. Secrets stay in DIR, mode 0600: the PostgreSQL password, OpenBao's unseal keys and
root token (init.json: on real hosts hand the shares to people and revoke the root token), keybroker's Vault token,
the first replica's admin token. The replicas' KEK is in OpenBao Transit and their keys in OpenBao KV: no master
key on any host. Quotes of the simulated TEE (DIR/sim) are trusted, so that transfers can be tried: never in
production.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv" / "bin"
DEFAULT_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "keybroker-cluster"
AS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(what: str, check: Any, timeout: float = 60.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError, subprocess.SubprocessError):
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-1500:] if log is not None and log.exists() else ""
    raise SystemExit(f"cluster: {what} did not come up within {timeout:.0f} s\n{tail}")


def secret_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """A daemon of the cluster: its own session (a Ctrl-C in this terminal does not reach it), output to ``log``."""
    with log.open("ab") as sink:
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    return process.pid


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def terminate(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if not alive(pid):
        return
    assert pid is not None
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


# --- PostgreSQL ---------------------------------------------------------------------------------------------------


def pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if not found:
        raise SystemExit(f"cluster: PostgreSQL's {name} is missing (bash scripts/bootstrap.sh --test, as root)")
    return str(found[0])


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if AS_ROOT else argv  # PostgreSQL refuses to run as root


def pg_start(state: dict[str, Any]) -> None:
    pg = Path(state["dir"]) / "pg"
    options = f"-p {state['ports']['pg']} -k {pg} -c listen_addresses=127.0.0.1"
    argv = [pg_bin("pg_ctl"), "-D", str(pg / "data"), "-l", str(pg / "postgres.log"), "-o", options, "-w", "start"]
    subprocess.run(as_postgres(argv), check=True, capture_output=True, timeout=120)


def pg_stop(state: dict[str, Any], mode: str = "fast") -> None:
    argv = [pg_bin("pg_ctl"), "-D", str(Path(state["dir"]) / "pg" / "data"), "-m", mode, "-w", "stop"]
    subprocess.run(as_postgres(argv), check=False, capture_output=True, timeout=120)


def pg_up(state: dict[str, Any]) -> None:
    base = Path(state["dir"])
    pg = base / "pg"
    pg.mkdir()
    admin = secrets.token_urlsafe(18)
    secret_file(pg / "admin-password", admin)
    if AS_ROOT:
        owner = pwd.getpwnam("postgres")
        for path in (pg, pg / "admin-password"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    argv = [pg_bin("initdb"), "-D", str(pg / "data"), "-U", "admin", "-A", "scram-sha-256",
            f"--pwfile={pg / 'admin-password'}", "-E", "UTF8", "--no-instructions"]  # fmt: skip
    subprocess.run(as_postgres(argv), check=True, capture_output=True, timeout=120)
    pg_start(state)
    password = secrets.token_urlsafe(18)
    secret_file(base / "pg-password", password)
    sql = [
        f"CREATE ROLE keybroker LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}'",
        "CREATE DATABASE keybroker OWNER keybroker",  # keybroker owns its database; no superuser, no extensions
    ]
    for statement in sql:
        psql = [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(state["ports"]["pg"]), "-U", "admin", "-d", "postgres",
                "-v", "ON_ERROR_STOP=1", "-qc", statement]  # fmt: skip
        subprocess.run(psql, check=True, capture_output=True, env={**os.environ, "PGPASSWORD": admin}, timeout=60)


# --- OpenBao ------------------------------------------------------------------------------------------------------


def bao_url(state: dict[str, Any], n: int) -> str:
    return f"http://127.0.0.1:{state['ports'][f'bao-{n}']}"


def bao_health(url: str) -> int:
    """200 active, 429 standby, 501 not initialised, 503 sealed; 0 unreachable."""
    try:
        return httpx.get(f"{url}/v1/sys/health", timeout=1.0).status_code
    except httpx.HTTPError:
        return 0


def bao_start(state: dict[str, Any], n: int) -> None:
    node = Path(state["dir"]) / "bao" / f"n{n}"
    state["pids"][f"bao-{n}"] = spawn([str(VENV / "bao"), "server", f"-config={node / 'bao.hcl'}"], node / "server.log")
    wait(f"bao-{n}", lambda: bao_health(bao_url(state, n)) != 0, log=node / "server.log")


def bao_unseal(state: dict[str, Any], n: int) -> None:
    url = bao_url(state, n)
    init = json.loads((Path(state["dir"]) / "bao" / "init.json").read_text())

    def initialised() -> bool:  # a joining node learns it from the leader (retry_join): unsealing before fails
        return bool(httpx.get(f"{url}/v1/sys/seal-status", timeout=1.0).json().get("initialized"))

    wait(f"bao-{n} joining the raft cluster", initialised, log=Path(state["dir"]) / "bao" / f"n{n}" / "server.log")
    for share in init["keys_base64"][:3]:  # three of the five shares: the threshold
        httpx.put(f"{url}/v1/sys/unseal", json={"key": share}, timeout=5.0).raise_for_status()
    wait(f"bao-{n} unsealed", lambda: bao_health(url) in (200, 429))


def bao_up(state: dict[str, Any]) -> None:
    base = Path(state["dir"]) / "bao"
    for n in (1, 2, 3):
        node = base / f"n{n}"
        (node / "data").mkdir(parents=True)
        joins = "\n".join(f'  retry_join {{ leader_api_addr = "{bao_url(state, m)}" }}' for m in (1, 2, 3) if m != n)
        cluster_port = state["ports"][f"bao-{n}-cluster"]
        (node / "bao.hcl").write_text(
            f'storage "raft" {{\n  path = "{node / "data"}"\n  node_id = "n{n}"\n  performance_multiplier = 1\n'
            f"{joins}\n}}\n"
            f'listener "tcp" {{\n  address = "127.0.0.1:{state["ports"][f"bao-{n}"]}"\n'
            f'  cluster_address = "127.0.0.1:{cluster_port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{bao_url(state, n)}"\ncluster_addr = "https://127.0.0.1:{cluster_port}"\n'
            "disable_mlock = true\nui = false\n"
        )
        bao_start(state, n)
    init = httpx.put(f"{bao_url(state, 1)}/v1/sys/init", json={"secret_shares": 5, "secret_threshold": 3}, timeout=30)
    init.raise_for_status()
    secret_file(base / "init.json", init.text)
    for n in (1, 2, 3):
        bao_unseal(state, n)
    root = init.json()["root_token"]
    api = httpx.Client(base_url=bao_url(state, 1), headers={"X-Vault-Token": root}, timeout=30)
    wait("bao-1 active", lambda: bao_health(bao_url(state, 1)) == 200)
    api.post("/v1/sys/mounts/keybroker", json={"type": "kv", "options": {"version": "1"}}).raise_for_status()
    api.post("/v1/sys/mounts/transit", json={"type": "transit"}).raise_for_status()
    policy = """
path "keybroker/*"                   { capabilities = ["create", "read", "update", "delete"] }
path "transit/keys/keybroker-kek"    { capabilities = ["create", "read", "update"] }
path "transit/encrypt/keybroker-kek" { capabilities = ["update"] }
path "transit/decrypt/keybroker-kek" { capabilities = ["update"] }
"""
    api.put("/v1/sys/policies/acl/keybroker", json={"policy": policy}).raise_for_status()
    token = api.post("/v1/auth/token/create-orphan", json={"policies": ["keybroker"], "period": "24h"})
    token.raise_for_status()
    secret_file(Path(state["dir"]) / "vault-token", token.json()["auth"]["client_token"])

    def voters() -> bool:  # joined nodes start as non-voters; autopilot promotes them (~11 s)
        answer = api.get("/v1/sys/storage/raft/configuration").json()
        return sum(1 for s in answer["data"]["config"]["servers"] if s["voter"]) == 3

    wait("three raft voters", voters, timeout=90)
    api.close()


def bao_leader(state: dict[str, Any]) -> str | None:
    for n in (1, 2, 3):
        if bao_health(bao_url(state, n)) == 200:
            return f"bao-{n}"
    return None


# --- keybroker replicas -------------------------------------------------------------------------------------------


def write_config(state: dict[str, Any]) -> Path:
    base = Path(state["dir"])
    config = base / "keybroker.toml"
    database = f"""[database]
url = "postgresql://keybroker@127.0.0.1:{state["ports"]["pg"]}/keybroker"
password = {{ file = "{base / "pg-password"}" }}

[limits]
trusted_proxies = ["127.0.0.1"]

[attestation]
simulated_root = "{base / "sim" / "root-ca.pem"}"  # the simulated TEE: for trying transfers, never in production
"""
    if state["kms"] == "embedded":
        config.write_text(f"""# keybroker replicas of the local HA cluster (scripts/cluster.sh --kms embedded): one
# PostgreSQL database holding the keys too, under one KEK file that every replica is given (on real hosts: by
# your configuration management, mode 0600), nginx in front. Only --data-dir and --listen differ.
{database}
[backends.embedded]
type = "embedded"
wrapper = {{ type = "local", master_key_file = "{base / "kek"}" }}
""")
        return config
    addresses = json.dumps([bao_url(state, n) for n in (1, 2, 3)])
    auth = f'{{ method = "token", token = {{ file = "{base / "vault-token"}" }} }}'
    config.write_text(f"""# keybroker replicas of the local HA cluster (scripts/cluster.sh): one PostgreSQL database,
# keys in OpenBao KV on a 3-node raft cluster, the KEK in OpenBao Transit, nginx in front (its address is trusted
# for X-Forwarded-For). Every replica uses this same file; only --data-dir and --listen differ.
{database}
[keys]
default_backend = "vault"

[backends.vault]
type = "vault"
addresses = {addresses}
mount = "keybroker"
kv_version = 1
auth = {auth}

[backends.embedded]
type = "embedded"
wrapper = {{ type = "vault-transit", addresses = {addresses}, key_name = "keybroker-kek", auth = {auth} }}
""")
    return config


def keybroker(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    argv = [str(VENV / "keybroker"), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)


def kb_start(state: dict[str, Any], name: str) -> None:
    base = Path(state["dir"])
    data = base / name
    port = state["ports"][name]
    argv = [str(VENV / "keybroker"), "serve", "--data-dir", str(data), "--config", str(base / "keybroker.toml"),
            "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    state["pids"][name] = spawn(argv, base / f"{name}.log", env)
    verify = ssl.create_default_context(cafile=str(data / "ca.pem"))
    url = f"https://127.0.0.1:{port}"
    wait(
        name, lambda: httpx.get(f"{url}/readyz", verify=verify, timeout=2).status_code == 200, log=base / f"{name}.log"
    )


def kb_up(state: dict[str, Any], name: str) -> None:
    base = Path(state["dir"])
    done = keybroker("init", "--data-dir", str(base / name), "--config", str(base / "keybroker.toml"))
    if done.returncode != 0:
        raise SystemExit(f"cluster: keybroker init {name} failed:\n{done.stderr}")
    if (base / name / "admin-token").exists():
        shutil.copy(base / name / "admin-token", base / "admin-token")
    kb_start(state, name)


# --- nginx --------------------------------------------------------------------------------------------------------


def nginx_config(state: dict[str, Any], replicas: list[str]) -> None:
    base = Path(state["dir"])
    lb = base / "lb"
    servers = "\n".join(f"    server 127.0.0.1:{state['ports'][r]} max_fails=1 fail_timeout=5s;" for r in replicas)
    (
        lb / "nginx.conf"
    ).write_text(f"""# nginx in front of keybroker's replicas (scripts/cluster.sh): TLS with a certificate from the
# deployment's service CA (clients trust the same ca.pem), re-encrypted to the replicas, verified against that CA.
worker_processes 1;
pid {lb / "nginx.pid"};
error_log {lb / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  log_format upstreams '$remote_addr [$time_iso8601] "$request" $status $request_time s '
                       'upstream $upstream_addr $upstream_status $upstream_response_time s';
  access_log {lb / "access.log"} upstreams;
  client_body_temp_path {lb / "tmp"};
  proxy_temp_path {lb / "tmp"};
  fastcgi_temp_path {lb / "tmp"};
  uwsgi_temp_path {lb / "tmp"};
  scgi_temp_path {lb / "tmp"};
  client_max_body_size 1m;
  client_body_buffer_size 1m;        # transfer bodies (quotes) stay in memory
  proxy_buffer_size 64k;
  proxy_buffers 8 64k;
  upstream keybroker {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{state["ports"]["lb"]} ssl;
    ssl_certificate {lb / "lb.pem"};
    ssl_certificate_key {lb / "lb.key"};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass https://keybroker;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_ssl_trusted_certificate {base / "ca.pem"};
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
      proxy_connect_timeout 2s;
      proxy_read_timeout 60s;
      proxy_next_upstream error timeout http_502 http_504;   # a POST goes elsewhere only if it was not sent
    }}
  }}
}}
""")


def lb_start(state: dict[str, Any]) -> None:
    lb = Path(state["dir"]) / "lb"
    argv = ["nginx", "-c", str(lb / "nginx.conf"), "-p", str(lb), "-g", "daemon off;"]
    state["pids"]["lb"] = spawn(argv, lb / "nginx.out")
    verify = ssl.create_default_context(cafile=str(Path(state["dir"]) / "ca.pem"))
    wait("nginx", lambda: httpx.get(f"{state['lb_url']}/healthz", verify=verify, timeout=2).status_code == 200,
         log=lb / "error.log")  # fmt: skip


def lb_up(state: dict[str, Any]) -> None:
    base = Path(state["dir"])
    lb = base / "lb"
    (lb / "tmp").mkdir(parents=True)
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(lb / "lb.key"), "-out", str(lb / "lb.csr"), "-subj", "/CN=keybroker-lb",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.chmod(lb / "lb.key", 0o600)
    first = f"https://127.0.0.1:{state['ports']['kb-1']}"
    token = (base / "admin-token").read_text().strip()
    issued = keybroker("ca", "issue", str(lb / "lb.csr"), "--out", str(lb / "lb.pem"), "--addr", first,
                       "--token", token, "--cacert", str(base / "ca.pem"))  # fmt: skip
    if issued.returncode != 0:
        raise SystemExit(f"cluster: the load balancer's certificate was not issued:\n{issued.stderr}")
    nginx_config(state, state["replicas"])
    lb_start(state)


# --- commands -----------------------------------------------------------------------------------------------------


def load(directory: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((directory / "cluster.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"cluster: no cluster in {directory} (scripts/cluster.sh up)") from None
    return state


def save(state: dict[str, Any]) -> None:
    (Path(state["dir"]) / "cluster.json").write_text(json.dumps(state, indent=2) + "\n")


def up(directory: Path, replicas: int, kms: str) -> dict[str, Any]:
    if (directory / "cluster.json").exists():
        raise SystemExit(f"cluster: {directory} has a cluster already (scripts/cluster.sh down first)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if AS_ROOT:
        os.chmod(directory, 0o711)  # the postgres user must reach DIR/pg; nothing else in DIR is readable to it
        reach = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(directory)], check=False)
        if reach.returncode != 0:
            shutil.rmtree(directory, ignore_errors=True)
            raise SystemExit(f"cluster: the postgres user cannot reach {directory}; use --dir under /tmp")
    names = [f"kb-{n}" for n in range(1, replicas + 1)]
    baos = [f"bao-{n}" for n in (1, 2, 3)] if kms == "openbao" else []
    ports = {name: free_port() for name in ["pg", "lb", *names, *baos]}
    ports.update({f"{name}-cluster": free_port() for name in baos})
    state: dict[str, Any] = {"dir": str(directory), "ports": ports, "pids": {}, "replicas": names, "kms": kms,
                             "lb_url": f"https://127.0.0.1:{ports['lb']}"}  # fmt: skip
    save(state)
    try:
        pg_up(state)
        if kms == "openbao":
            bao_up(state)
        else:
            fd = os.open(directory / "kek", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:  # the local KEK's format: 32 random bytes
                handle.write(os.urandom(32))
        save(state)
        done = keybroker("sim", "init", str(directory / "sim"))
        assert done.returncode == 0, done.stderr
        done = keybroker("sim", "collateral", str(directory / "sim"), "--out", str(directory / "sim" / "coll"))
        assert done.returncode == 0, done.stderr
        write_config(state)
        for name in names:
            kb_up(state, name)
            save(state)
        shutil.copy(directory / "kb-1" / "ca.pem", directory / "ca.pem")
        lb_up(state)
        save(state)
        done = keybroker("collateral", "import", str(directory / "sim" / "coll"), *admin_args(state))
        assert done.returncode == 0, done.stderr
    except BaseException:
        save(state)
        print(f"cluster: bring-up failed; logs in {directory}; scripts/cluster.sh down cleans up", file=sys.stderr)
        raise
    return state


def admin_args(state: dict[str, Any]) -> list[str]:
    base = Path(state["dir"])
    token = (base / "admin-token").read_text().strip()
    return ["--addr", state["lb_url"], "--token", token, "--cacert", str(base / "ca.pem")]


def stop(state: dict[str, Any], name: str, sig: int = signal.SIGTERM) -> None:
    if name == "pg":
        pg_stop(state, "immediate" if sig == signal.SIGKILL else "fast")
        return
    terminate(state["pids"].get(name), sig)


def start(state: dict[str, Any], name: str) -> None:
    if name == "pg":
        pg_start(state)
    elif name.startswith("bao-"):
        bao_start(state, int(name[4:]))
        bao_unseal(state, int(name[4:]))
    elif name.startswith("kb-"):
        kb_start(state, name)
    elif name == "lb":
        lb_start(state)
    save(state)


def status(state: dict[str, Any]) -> int:
    base = Path(state["dir"])
    verify = ssl.create_default_context(cafile=str(base / "ca.pem"))
    problems = 0
    pg = subprocess.run(as_postgres([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(state["ports"]["pg"])]),
                        capture_output=True, timeout=30, check=False)  # fmt: skip
    rows = [("pg", f"127.0.0.1:{state['ports']['pg']}", "ready" if pg.returncode == 0 else "down")]
    for n in (1, 2, 3) if state["kms"] == "openbao" else ():
        code = bao_health(bao_url(state, n))
        rows.append((f"bao-{n}", bao_url(state, n), {200: "active", 429: "standby", 503: "sealed"}.get(code, "down")))
    for name in state["replicas"]:
        url = f"https://127.0.0.1:{state['ports'][name]}"
        try:
            ready = httpx.get(f"{url}/readyz", verify=verify, timeout=3).status_code == 200
        except httpx.HTTPError:
            ready = False
        rows.append((name, url, "ready" if ready else "down"))
    try:
        served = httpx.get(f"{state['lb_url']}/healthz", verify=verify, timeout=3).status_code == 200
    except httpx.HTTPError:
        served = False
    rows.append(("lb", state["lb_url"], "serving" if served else "down"))
    for name, address, condition in rows:
        problems += condition in ("down", "sealed")
        print(f"{name:<7} {address:<28} {condition}")
    listed = keybroker("cluster", "status", *admin_args(state))
    print(listed.stdout or listed.stderr, end="")
    return 1 if problems else 0


def env(state: dict[str, Any]) -> None:
    base = Path(state["dir"])
    print(f"export KEYBROKER_ADDR={state['lb_url']}")
    print(f"export KEYBROKER_CACERT={base / 'ca.pem'}")
    print(f"export KEYBROKER_TOKEN=$(cat {base / 'admin-token'})")


def down(directory: Path) -> None:
    try:
        state = load(directory)
    except SystemExit:
        return
    for name in ["lb", *state["replicas"], "bao-1", "bao-2", "bao-3"]:
        terminate(state["pids"].get(name))  # (no bao-N with --kms embedded: nothing to stop)
    if (directory / "pg" / "data").exists():
        pg_stop(state)
    shutil.rmtree(directory, ignore_errors=True)


def usage(state: dict[str, Any]) -> None:
    base = Path(state["dir"])
    kms = "embedded (KEK file DIR/kek)"
    if state["kms"] == "openbao":
        kms = "OpenBao " + ", ".join(bao_url(state, n) for n in (1, 2, 3))
    print(f"""keybroker HA cluster up in {base}
  load balancer  {state["lb_url"]}   (CA: {base / "ca.pem"}; admin token: {base / "admin-token"})
  replicas       {", ".join(f"{r} https://127.0.0.1:{state['ports'][r]}" for r in state["replicas"])}
  PostgreSQL     127.0.0.1:{state["ports"]["pg"]}   KMS: {kms}
Try:
  source <(scripts/cluster.sh env)         # KEYBROKER_ADDR/CACERT/TOKEN for the keybroker CLI
  .venv/bin/keybroker cluster status
  scripts/cluster.sh kill kb-1             # then keep fetching keys through {state["lb_url"]}
  scripts/cluster.sh status
  scripts/cluster.sh down""")


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/cluster.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("KEYBROKER_CLUSTER_DIR", DEFAULT_DIR)))
    commands = parser.add_subparsers(dest="command", required=True)
    up_command = commands.add_parser("up")
    up_command.add_argument("--replicas", type=int, default=2, choices=range(1, 10))
    up_command.add_argument(
        "--kms",
        choices=("openbao", "embedded"),
        default="openbao",
        help="openbao (default): keys in OpenBao KV, the KEK in Transit, on 3 raft nodes; embedded: keys in "
        "PostgreSQL under a KEK file shared by the replicas, no OpenBao",
    )
    for name in ("status", "env", "down"):
        commands.add_parser(name)
    for name in ("kill", "stop", "start"):
        commands.add_parser(name).add_argument("name")
    commands.add_parser("lb").add_argument("names", nargs="+")
    args = parser.parse_args()
    directory = args.dir.resolve()
    if args.command == "up":
        usage(up(directory, args.replicas, args.kms))
        return 0
    if args.command == "down":
        down(directory)
        return 0
    state = load(directory)
    if args.command == "status":
        return status(state)
    if args.command == "env":
        env(state)
        return 0
    if args.command == "lb":
        unknown = set(args.names) - set(state["replicas"])
        if unknown:
            raise SystemExit(f"cluster: no replica {', '.join(sorted(unknown))}")
        nginx_config(state, args.names)
        os.kill(state["pids"]["lb"], signal.SIGHUP)  # nginx reloads its configuration without dropping requests
        time.sleep(0.5)
        return 0
    known = ["pg", "lb", *state["replicas"]] + (["bao-1", "bao-2", "bao-3"] if state["kms"] == "openbao" else [])
    if args.name not in known:
        raise SystemExit(f"cluster: {args.name!r} is not one of {', '.join(known)}")
    if args.command == "start":
        start(state, args.name)
    else:
        stop(state, args.name, signal.SIGKILL if args.command == "kill" else signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
