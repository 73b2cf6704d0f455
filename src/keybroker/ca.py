"""The service CA (the guide's CMS role) and the workload CA: created at init, kept in the database, shared by every
replica. The service CA issues each replica's own TLS certificate and signs CSRs for other services; clients trust
it by file (``DATA_DIR/ca.pem``, written by ``init`` and ``serve``) or by its SHA-384 fingerprint.

The CA private keys are kept in the database as PKCS#8, wrapped by the KEK (``KeyWrapper``) with the CA's name as
context, so they are as safe at rest as the keys keybroker stores and any replica with the KEK can use them. A
replica's TLS key is made at every ``serve`` and written encrypted with a passphrase that exists only in memory.

Rotation (``ca_rotation``: rotate, activate, retire) keeps up to two CAs of one name, each a row: the one that
issues (row ``NAME``) and, during a rotation, its successor (``NAME:next``, published but not issuing yet) or its
predecessor (``NAME:old``, published but no longer issuing). What clients are given (``certificate_pem``: ca.pem,
``GET /cms/v1/ca-certificates``) is every published CA, the older first; what follows an issued certificate is
the issuing CA alone, read in the same transaction as its key (``_issue``).

Data directories from before the CAs moved into the database (their keys in ``ca-key.pem`` files) are imported
on first use, and those files removed once the database holds the CAs (``ca_legacy``, ``forget_legacy_files``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from keybroker import ca_legacy
from keybroker.backends.base import KeyWrapper
from keybroker.errors import (
    BackendUnavailable,
    ConfigurationError,
    Conflict,
    InvalidRequest,
    KeybrokerError,
    StoredKeyCorrupt,
)
from keybroker.storage.db import Database
from keybroker.storage.tables import CertificateAuthorityRow

CA_CERT = "ca.pem"
CA_KEY = ca_legacy.KEY_FILES["service"]  # (before 0008: the encrypted CA key in the data directory)
# A second CA, for certificates of keys keybroker releases to workloads (the Nginx flow). Never the service CA:
# clients trust the service CA to authenticate keybroker itself, and a certificate for a key that a key manager
# imported must not be able to impersonate keybroker.
WORKLOAD_CA_CERT = "workload-ca.pem"
WORKLOAD_CA_KEY = ca_legacy.KEY_FILES["workload"]
PASSPHRASE_FILE = ca_legacy.PASSPHRASE_FILE  # (before 0008)
SERVER_CERT = "tls/server.pem"
SERVER_KEY = "tls/server-key.pem"
MAX_DAYS = 825
CA_DAYS = 3650
EXPIRY_MARGIN = timedelta(minutes=5)  # a CA that expires sooner issues nothing (a certificate would be useless)
SERVICE, WORKLOAD = "service", "workload"
NEXT, OLD = "next", "old"  # the rows of a rotation: NAME:next (published, not issuing yet), NAME:old (retiring)
_CERT_FILES = {SERVICE: CA_CERT, WORKLOAD: WORKLOAD_CA_CERT}


def fingerprint(cert_pem: bytes) -> str:
    """SHA-384 of the first certificate's DER, as lowercase hex (the pin clients use)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha384(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def ca_key_context(name: str) -> bytes:
    """The context a CA's private key is wrapped under: the CA's name, the same for the rows of its rotation
    (``service:next``, ``service:old``), so that a rotation moves rows without re-wrapping a key (``_load`` checks
    that a row's key is its certificate's)."""
    return b"keybroker/ca-key/v1\0" + name.partition(":")[0].encode()


def row_name(name: str, phase: str | None = None) -> str:
    """The row of CA ``name``: the issuing one, or (``phase``) its successor or predecessor during a rotation."""
    return f"{name}:{phase}" if phase else name


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def ca_certificate(key: ec.EllipticCurvePrivateKey, subject: x509.Name, now: datetime) -> x509.Certificate:
    """A self-signed CA certificate for ``key`` (10 years; it issues end-entity certificates only)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def recorded_kek_id(database: Database, data_dir: Path) -> str | None:
    """The KEK that protects keybroker's own secrets, as the service CA records it (``None`` before init)."""
    with database.transaction() as session:
        row = session.get(CertificateAuthorityRow, SERVICE)
        if row is not None:
            return row.kek_id
    return ca_legacy.passphrase_kek(data_dir)


def forget_legacy_files(database: Database, wrapper: KeyWrapper, data_dir: Path) -> tuple[Path, ...]:
    """Remove the CA key files of a data directory from before 0008 (``ca_legacy``) whose CA the database holds
    with a key that opens under ``wrapper``; returns what was removed."""
    if ca_legacy.leftovers(data_dir) is None:
        return ()
    imported = []
    for name in (SERVICE, WORKLOAD):
        try:
            ServiceCA(database, wrapper, data_dir, name)._load()
        except KeybrokerError:  # not in the database, or its key does not open here: the file may be all there is
            continue
        imported.append(name)
    return ca_legacy.remove(data_dir, imported)


@dataclass(frozen=True)
class CaRows:
    """The rows of one CA, read together: the issuing CA and, during a rotation, its successor or predecessor."""

    issuing: CertificateAuthorityRow | None
    next: CertificateAuthorityRow | None = None
    old: CertificateAuthorityRow | None = None

    def published(self) -> list[CertificateAuthorityRow]:
        """What clients trust, the older CA first (a client reading only the first certificate keeps working)."""
        return [row for row in (self.old, self.issuing, self.next) if row is not None]


@dataclass(frozen=True)
class ServerCertificate:
    cert_file: Path
    key_file: Path
    key_password: str


class ServiceCA:
    """One CA of the deployment (``SERVICE`` or ``WORKLOAD``). Thread-safe; safe across processes and replicas
    (the database orders concurrent creations: the first row wins, the others read it)."""

    def __init__(self, database: Database, wrapper: KeyWrapper, data_dir: Path, name: str = SERVICE) -> None:
        self._db = database
        self._wrapper = wrapper
        self._dir = data_dir
        self._name = name
        self._cert_file = _CERT_FILES[name]
        self._lock = threading.Lock()
        self._loaded: tuple[bytes, str, x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    @classmethod
    def workload(cls, database: Database, wrapper: KeyWrapper, data_dir: Path) -> ServiceCA:
        """The CA of key certificates (``WORKLOAD_CA_CERT``), separate from the service CA."""
        return cls(database, wrapper, data_dir, WORKLOAD)

    @property
    def cert_path(self) -> Path:
        """This replica's copy of the CA certificate, for clients (``publish``)."""
        return self._dir / self._cert_file

    @property
    def name(self) -> str:
        return self._name

    @property
    def database(self) -> Database:
        return self._db

    @property
    def wrapper(self) -> KeyWrapper:
        return self._wrapper

    def rows(self) -> CaRows:
        """This CA's rows, in one transaction."""
        table = CertificateAuthorityRow
        names = {row_name(self._name, phase): phase for phase in (None, NEXT, OLD)}
        with self._db.transaction() as session:
            found = {row.name: row for row in session.scalars(select(table).where(table.name.in_(names)))}
            for row in found.values():
                session.expunge(row)
        return CaRows(*(found.get(name) for name in names))

    def _row(self) -> CertificateAuthorityRow | None:
        with self._db.transaction() as session:
            row = session.get(CertificateAuthorityRow, self._name)
            if row is not None:
                session.expunge(row)
            return row

    def exists(self) -> bool:
        return self._row() is not None

    # --- the CA ------------------------------------------------------------------------------------------

    def create(self, now: datetime, common_name: str) -> None:
        """Create the CA (EC P-384, 10 years) unless the deployment has one, import it from a data directory of
        an earlier version if there is one there, and publish its certificate in the data directory."""
        if self._row() is None:
            legacy = ca_legacy.read(self._dir, self._name, self._cert_file, self._wrapper)
            cert_pem, key = legacy or self._new(now, common_name)
            row = CertificateAuthorityRow(
                name=self._name,
                cert_pem=cert_pem.decode("ascii"),
                key_wrapped=self._wrapper.wrap(pkcs8(key), ca_key_context(self._name)),
                kek_id=self._wrapper.kek_id,
                created_at=now,
            )
            try:
                with self._db.transaction(write=True) as session:
                    session.add(row)
            except IntegrityError:
                pass  # another process or replica created it first: theirs is the deployment's
        self.publish()

    def publish(self) -> Path:
        """Write the CA certificate to the data directory (what clients and ``--cacert`` use)."""
        pem = self.certificate_pem()
        if not self.cert_path.is_file() or self.cert_path.read_bytes() != pem:
            _write(self.cert_path, pem)
        return self.cert_path

    def _new(self, now: datetime, common_name: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keybroker"),
            ]
        )
        return _pem(ca_certificate(key, name, now)), key

    def check_kek(self) -> None:
        """Raise ``ConfigurationError`` unless this CA's key unwraps under the configured KEK (a joining replica
        configured with another KEK than the deployment's)."""
        try:
            self._load()
        except (StoredKeyCorrupt, BackendUnavailable) as exc:
            raise ConfigurationError(
                f"this replica's KEK cannot open the deployment's keys ({exc.instance_code}): every replica must be "
                "configured with the deployment's KEK"
            ) from None

    def certificate_pem(self) -> bytes:
        """What clients trust (``ca.pem``, ``GET /cms/v1/ca-certificates``): the issuing CA and, during a rotation,
        the other published one, the older first."""
        rows = self.rows()
        if rows.issuing is None:
            raise self._missing()
        return "".join(row.cert_pem for row in rows.published()).encode("ascii")

    def _published(self) -> CertificateAuthorityRow:
        row = self._row()
        if row is None:
            raise self._missing()
        return row

    def _missing(self) -> ConfigurationError:
        return ConfigurationError(f"the deployment has no {self._name} CA; run 'keybroker init'")

    def opens(self, row: CertificateAuthorityRow) -> None:
        """Raise unless ``row``'s key unwraps under the KEK and is its certificate's (``_load``)."""
        self._load(row)

    def _load(self, row: CertificateAuthorityRow | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The certificate and key of ``row`` (the issuing CA's when None), the key unwrapped by the KEK and checked
        to be the certificate's."""
        row = row or self._published()
        with self._lock:
            if self._loaded is not None and self._loaded[0] == row.key_wrapped and self._loaded[1] == row.cert_pem:
                return self._loaded[2], self._loaded[3]
        der = self._wrapper.unwrap(row.key_wrapped, ca_key_context(row.name), row.kek_id)
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"the {row.name} CA key is not an EC key")
        cert = x509.load_pem_x509_certificate(row.cert_pem.encode("ascii"))
        if cert.public_key() != key.public_key():
            raise StoredKeyCorrupt(f"the {row.name} CA's key is not its certificate's", code="ca_key_mismatch")
        with self._lock:
            self._loaded = (row.key_wrapped, row.cert_pem, cert, key)
        return cert, key

    def _issue(
        self,
        subject: x509.Name,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        sans: Sequence[x509.GeneralName],
        now: datetime,
        days: int,
    ) -> tuple[x509.Certificate, bytes]:
        """A certificate of the issuing CA, and what follows it in its chain (that CA's certificate): both from one
        read of the CA's row, so that a rotation meanwhile cannot pair a certificate with another CA's chain."""
        row = self._published()
        ca_cert, ca_key = self._load(row)
        expires = ca_cert.not_valid_after_utc
        if expires <= now + EXPIRY_MARGIN:
            when = "expired" if expires <= now else "expires"
            then = (
                "rotate it: keybroker ca rotate, then keybroker ca activate (docs/operations.md)"
                if self._name == SERVICE
                else "it can issue no more certificates"
            )
            raise Conflict(
                f"the {self._name} CA {when} at {expires.isoformat(timespec='seconds')}: {then}", code="ca_expired"
            )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(ca_key, hashes.SHA384()), row.cert_pem.encode("ascii")

    # --- the service's own TLS certificate ------------------------------------------------------------------

    def server_certificate(self, sans: Sequence[str], now: datetime, days: int) -> ServerCertificate:
        """A new TLS certificate for this replica (the names in ``sans``), and its key written encrypted under a
        passphrase that only the returned object (the serving process) holds."""
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0] if sans else "keybroker")])
        cert, chain = self._issue(subject, key.public_key(), _san_entries(sans), now, days)
        password = secrets.token_urlsafe(32)
        cert_path, key_path = self._dir / SERVER_CERT, self._dir / SERVER_KEY
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password.encode()),
        )
        _write(key_path, encrypted)
        _write(cert_path, _pem(cert) + chain)  # the chain: leaf, then the CA that issued it
        return ServerCertificate(cert_path, key_path, password)

    # --- certificates for broker-held keys (the Nginx flow) ------------------------------------------------------

    def certify_key(
        self,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        subject: x509.Name,
        sans: Sequence[x509.GeneralName],
        now: datetime,
        days: int,
    ) -> x509.Certificate:
        """A TLS server/client certificate for ``public_key`` (whose private key keybroker holds)."""
        if not 1 <= days <= MAX_DAYS:
            raise InvalidRequest(f"days must be between 1 and {MAX_DAYS}", code="invalid_days")
        return self._issue(subject, public_key, sans, now, days)[0]

    # --- CSRs of other services (the CMS role) --------------------------------------------------------------

    def sign_csr(self, csr_pem: str, now: datetime, days: int) -> bytes:
        """Sign a CSR: its subject and its DNS/IP SANs, as a TLS server+client certificate. Returns the chain."""
        if not 1 <= days <= MAX_DAYS:
            raise InvalidRequest(f"days must be between 1 and {MAX_DAYS}", code="invalid_days")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise InvalidRequest("csr is not a PEM certificate signing request", code="invalid_csr") from None
        if not csr.is_signature_valid:
            raise InvalidRequest("the CSR's signature does not verify", code="invalid_csr")
        public_key = csr.public_key()
        if isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < 2048:
                raise InvalidRequest("RSA keys must have at least 2048 bits", code="invalid_csr")
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if public_key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
                raise InvalidRequest("EC keys must be on P-256, P-384 or P-521", code="invalid_csr")
        else:
            raise InvalidRequest("the CSR's key must be RSA or EC", code="invalid_csr")
        sans: list[x509.GeneralName] = []
        try:
            requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            requested = x509.SubjectAlternativeName([])
        for name in requested:
            if not isinstance(name, x509.DNSName | x509.IPAddress):
                raise InvalidRequest("only DNS and IP subject alternative names are signed", code="invalid_csr")
            sans.append(name)
        if not sans and not csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            raise InvalidRequest("the CSR names no subject (no CN and no SAN)", code="invalid_csr")
        cert, chain = self._issue(csr.subject, public_key, sans, now, days)
        return _pem(cert) + chain
