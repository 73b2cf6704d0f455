"""The real PyKMIP server (``pykmip-server`` from the venv) on 127.0.0.1, over mutual TLS.

``KmipServer`` makes a throwaway PKI with ``cryptography`` (a CA, a server certificate for IP:127.0.0.1 with the
serverAuth EKU, a client certificate CN=keybroker with the clientAuth EKU that the server insists on), writes a
``server.conf`` (``auth_suite=TLS1.2``: the ``Basic`` suite asks for TLSv1 and fails on OpenSSL 3), starts the
server on a free port and waits for the log line "Starting connection service". ``stop()`` sends SIGINT (the
server forks a multiprocessing manager and a policy monitor that SIGKILL would orphan) and waits; ``start()`` again
reuses the same port, certificates and database, so a test can take the backend away and bring it back. Every
process of the server's group is gone when ``stop()`` returns (see ``stop`` for when it has to kill them).

    with KmipServer(tmp_path) as kmip:
        store = KmipKeyStore.from_settings("kmip", settings.secrets, kmip.settings())
        kmip.stop(); ...; kmip.start()
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.config import KmipBackendSettings

READY_LINE = "Starting connection service"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key (PEM files)."""

    cert_file: Path
    key_file: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestCa:
    """A CA that signs leaf certificates. P-256 keys: the server's TLS 1.2 suites include ECDHE-ECDSA, and EC keys
    are generated in microseconds where RSA-2048 takes tens of milliseconds."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory: Path, common_name: str = "kmip-test-ca") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = directory / "ca.crt"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        common_name: str,
        usage: x509.ObjectIdentifier,
        san: list[x509.GeneralName] | None = None,
    ) -> Identity:
        """A leaf certificate with the single extended key usage ``usage``, written as ``<stem>.crt/.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        identity = Identity(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        identity.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(identity.key_file, key)
        return identity

    def client(self, stem: str = "client", common_name: str = "keybroker") -> Identity:
        return self.issue(stem, common_name, ExtendedKeyUsageOID.CLIENT_AUTH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def server_executable() -> Path:
    """``pykmip-server`` of the interpreter running the tests (the venv's), not whatever is on PATH."""
    path = Path(sys.executable).parent / "pykmip-server"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: install the kmip extra (pip install -e '.[kmip]')")
    return path


class KmipServer:
    """One PyKMIP server: its PKI, configuration and database under ``root``; stoppable and restartable."""

    def __init__(self, root: Path, start_timeout: float = 30.0, stop_grace: float = 3.0) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = free_port()
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.ca = TestCa(root / "pki")
        self.server_identity = self.ca.issue(
            "server",
            HOST,
            ExtendedKeyUsageOID.SERVER_AUTH,
            # IP:127.0.0.1 only: a client that checks host names (keybroker does) must refuse "localhost".
            san=[x509.IPAddress(ipaddress.IPv4Address(HOST))],
        )
        self.client_identity = self.ca.client()
        self.policy_dir = root / "policies"  # must exist; empty = the built-in policies only
        self.policy_dir.mkdir(exist_ok=True)
        # Fresh per KmipServer (ids restart at 1 in a new database), kept across stop/start.
        self.database_path = root / "kmip.sqlite"
        self.log_path = root / "server.log"
        self.output_path = root / "server.out"
        self.config_path = root / "server.conf"
        self.config_path.write_text(
            "[server]\n"
            f"hostname={HOST}\n"
            f"port={self.port}\n"
            f"certificate_path={self.server_identity.cert_file}\n"
            f"key_path={self.server_identity.key_file}\n"
            f"ca_path={self.ca.cert_file}\n"
            "auth_suite=TLS1.2\n"
            f"policy_path={self.policy_dir}\n"
            "enable_tls_client_auth=True\n"
            "logging_level=INFO\n"
            f"database_path={self.database_path}\n"
        )
        self._process: subprocess.Popen[bytes] | None = None
        self.start_seconds: list[float] = []
        self.stop_seconds: list[float] = []
        self.forced_stops = 0

    # -- paths for KmipBackendSettings -------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return self.ca.cert_file

    @property
    def cert_file(self) -> Path:
        return self.client_identity.cert_file

    @property
    def key_file(self) -> Path:
        return self.client_identity.key_file

    def backend_settings(self, **changes: Any) -> dict[str, Any]:
        """The ``[backends.<name>]`` table that selects this server (``KmipBackendSettings(**table)`` builds the
        settings object), with ``changes`` applied."""
        table: dict[str, Any] = {
            "type": "kmip",
            "host": self.host,
            "port": self.port,
            "cert_file": str(self.cert_file),
            "key_file": str(self.key_file),
            "ca_file": str(self.ca_file),
            "timeout_seconds": 5.0,
            "connections": 4,
        }
        table.update(changes)
        return table

    def settings(self, **changes: Any) -> KmipBackendSettings:
        return KmipBackendSettings(**self.backend_settings(**changes))

    @contextlib.contextmanager
    def client(self, identity: Identity | None = None) -> Iterator[Any]:
        """An open ``ProxyKmipClient`` of this server, PyKMIP's own way (for tests that work behind keybroker)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyKMIP's imports, and ssl.PROTOCOL_TLSv1_2 in its socket setup
            from kmip.core import enums
            from kmip.pie.client import ProxyKmipClient

            identity = identity or self.client_identity
            client = ProxyKmipClient(
                hostname=self.host,
                port=self.port,
                cert=str(identity.cert_file),
                key=str(identity.key_file),
                ca=str(self.ca_file),
                ssl_version="PROTOCOL_TLSv1_2",  # PyKMIP cannot pass server_hostname, so not PROTOCOL_TLS_CLIENT
                config_file=os.devnull,  # not ~/.pykmip/pykmip.conf or /etc/pykmip/pykmip.conf
                kmip_version=enums.KMIPVersion.KMIP_1_2,
            )
            client.open()
        try:
            yield client
        finally:
            client.close()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("the KMIP server is already running")
        began = time.monotonic()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.output_path.open("ab") as output:
            # A session of its own: the server and its helper processes form one process group, so stop() can
            # check that none of them outlives it.
            self._process = subprocess.Popen(
                [str(server_executable()), "-f", str(self.config_path), "-l", str(self.log_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
        deadline = began + self.start_timeout
        while True:
            if self._log_since(log_offset).find(READY_LINE) >= 0:
                break
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RuntimeError(f"pykmip-server exited with {code} before it was ready:\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pykmip-server not ready after {self.start_timeout} s:\n{self.diagnostics()}")
            time.sleep(0.02)
        self.start_seconds.append(time.monotonic() - began)

    def stop(self, grace: float | None = None) -> None:
        """SIGINT, then wait for the server and every process of its group to exit (idempotent).

        On SIGINT the server joins each connection thread for up to 10 s, and a thread whose client keeps its
        connection open (keybroker's pool does) runs that long: a server with open sessions would take 10 s per
        session to stop. After ``grace`` seconds (default ``stop_grace``) the whole process group, the server with
        its multiprocessing manager and policy monitor, is killed instead, so nothing outlives ``stop()``. Object
        writes are committed per request (SQLite), so the database is intact for the next ``start()``."""
        process = self._process
        if process is None:
            return
        began = time.monotonic()
        pgid = process.pid  # start_new_session: the server leads its own group
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(self.stop_grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                self._kill_group(pgid)
                process.wait(10)
                self.forced_stops += 1
        # The manager and the policy monitor exit with the server; make sure of it.
        deadline = time.monotonic() + 10
        while self._group_alive(pgid):
            if time.monotonic() > deadline:
                self._kill_group(pgid)
                break
            time.sleep(0.05)
        self._process = None
        self.stop_seconds.append(time.monotonic() - began)

    def restart(self, grace: float | None = None) -> None:
        self.stop(grace)
        self.start()

    def __enter__(self) -> KmipServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _group_alive(pgid: int) -> bool:
        """Whether a live (not zombie) process is left in the group. Helpers orphaned by a kill stay zombies until
        init reaps them, which can take a second or two; they hold nothing any more."""
        proc = Path("/proc")
        if not proc.is_dir():  # pragma: no cover - not Linux: zombies count as alive
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return False
            return True
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # exited meanwhile
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self, lines: int = 40) -> str:
        parts = []
        for path in (self.output_path, self.log_path):
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)
