"""A PostgreSQL cluster of the tests' own: ``initdb`` in a temporary directory, started on a free loopback port,
stopped (and started again, for outages) by the tests.

PostgreSQL refuses to run as root: as root the cluster belongs to the ``postgres`` user (Debian's package creates
it) and every command runs through ``runuser``. keybroker connects as a role that owns its database and is no
superuser (``CREATEDB``-less, ``NOSUPERUSER``), with a password (scram-sha-256), as a deployment would.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.peers.process import free_port


def _bin(name: str) -> str:
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if candidates:
        return str(candidates[0])
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (bash scripts/bootstrap.sh --test, as root)")
    return found


class Postgres:
    def __init__(self, root: Path, durable: bool = False) -> None:
        self._durable = durable  # fsync on (a benchmark); the tests run without it
        self._as_root = os.geteuid() == 0
        if self._as_root:
            # The postgres user must reach its files: not under pytest's (root-only, 0700) temporary directories.
            root = Path(tempfile.mkdtemp(prefix="keybroker-pg-"))
        self.root = root
        self.data = root / "pgdata"
        self.socket_dir = root / "sockets"
        self.port = free_port()
        self.user = "keybroker"
        self.password = secrets.token_urlsafe(16)
        self.database = "keybroker"
        self._log = root / "postgres.log"

    @property
    def url(self) -> str:
        """With the password (for tools); keybroker gets it from a secret source instead (``url_without_password``)."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def url_without_password(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["runuser", "-u", "postgres", "--", *command] if self._as_root else list(command)
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> Postgres:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._as_root:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        pwfile = self.root / "admin-password"
        admin_password = secrets.token_urlsafe(16)
        pwfile.write_text(admin_password)
        if self._as_root:
            owner = pwd.getpwnam("postgres")
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        pwfile.chmod(0o600)
        self._admin_password = admin_password
        result = self._run(
            _bin("initdb"), "-D", str(self.data), "-U", "admin", "-A", "scram-sha-256", f"--pwfile={pwfile}",
            "--no-instructions", "-E", "UTF8", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr}")
        self.start()
        self.admin_sql(
            f"CREATE ROLE {self.user} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.database} OWNER {self.user}",
        )
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        if not self._durable:
            options += " -c fsync=off"
        result = self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self._log), "-o", options, "-w", "start",
                           check=False)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{self._read_log()}")

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        """Stop, and delete the cluster's files."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def admin_sql(self, *statements: str, database: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": self._admin_password}
        outputs = []
        for statement in statements:
            argv = [_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "admin", "-d", database]
            argv += ["-v", "ON_ERROR_STOP=1", "-tA", "-c", statement]
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"psql {statement!r}: {done.stderr}")
            outputs.append(done.stdout)
        return "".join(outputs)

    def create_database(self) -> str:
        """A new, empty database owned by keybroker's role; its name."""
        name = f"kb_{secrets.token_hex(6)}"
        self.admin_sql(f"CREATE DATABASE {name} OWNER {self.user}")
        return name

    def url_for(self, database: str, password: bool = False) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def reset(self) -> None:
        """An empty keybroker database again (between tests sharing the cluster)."""
        self.admin_sql(
            f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)",
            f"CREATE DATABASE {self.database} OWNER {self.user}",
        )

    def wait_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _read_log(self) -> str:
        try:
            return self._log.read_text()[-2000:]
        except OSError:
            return ""
