"""The service CA (the guide's CMS role) and the workload CA: created at init, kept in the database, shared by every
replica. The service CA issues each replica's own TLS certificate and signs CSRs for other services; clients trust
it by file (``DATA_DIR/ca.pem``, written by ``init`` and ``serve``) or by its SHA-384 fingerprint.

The CA private keys are kept in the database as PKCS#8, wrapped by the KEK (``KeyWrapper``) with the CA's name as
context, so they are as safe at rest as the keys keybroker stores and any replica with the KEK can use them. A
replica's TLS key is made at every ``serve`` and written encrypted with a passphrase that exists only in memory.

Rotation (``rotate``, then ``retire``): a new CA of the same name issues from then on. Until ``retire``, clients are
given the bundle (old CA first: pins keep matching) and issued certificates are chained with the new CA's key
certified by the old one (self-issued, so the old CA's path length 0 allows it): trusting either CA verifies them.

Data directories from before the CAs moved into the database (their keys in ``ca-key.pem`` files, encrypted with
a passphrase in ``tls-passphrase.wrapped``) are imported on first use.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
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
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.backends.base import KeyWrapper
from keybroker.errors import BackendUnavailable, ConfigurationError, Conflict, InvalidRequest, StoredKeyCorrupt
from keybroker.storage.db import Database
from keybroker.storage.tables import CertificateAuthorityRow

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"  # (before 0008: the encrypted CA key in the data directory)
# A second CA, for certificates of keys keybroker releases to workloads (the Nginx flow). Never the service CA:
# clients trust the service CA to authenticate keybroker itself, and a certificate for a key that a key manager
# imported must not be able to impersonate keybroker.
WORKLOAD_CA_CERT = "workload-ca.pem"
WORKLOAD_CA_KEY = "workload-ca-key.pem"
PASSPHRASE_FILE = "tls-passphrase.wrapped"  # noqa: S105 - a file name (before 0008)
SERVER_CERT = "tls/server.pem"
SERVER_KEY = "tls/server-key.pem"
_LEGACY_CONTEXT = b"keybroker/tls-passphrase/v1"
MAX_DAYS = 825
CA_DAYS = 3650
SERVICE, WORKLOAD = "service", "workload"
_FILES = {SERVICE: (CA_CERT, CA_KEY), WORKLOAD: (WORKLOAD_CA_CERT, WORKLOAD_CA_KEY)}


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
    """The context a CA's private key is wrapped under (its row's name)."""
    return b"keybroker/ca-key/v1\0" + name.encode()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    now: datetime,
    not_after: datetime,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    """A CA certificate for ``key``: self-signed, or (``issuer``) certified by another CA of the same name."""
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    return builder.sign(signer, hashes.SHA384())


@dataclass(frozen=True)
class CaRotation:
    """The fingerprints (SHA-384) of a rotation: the CA that issued until now, and the one that issues from now."""

    old_sha384: str
    new_sha384: str


def recorded_kek_id(database: Database, data_dir: Path) -> str | None:
    """The KEK that protects keybroker's own secrets, as the service CA records it (``None`` before init)."""
    with database.transaction() as session:
        row = session.get(CertificateAuthorityRow, SERVICE)
        if row is not None:
            return row.kek_id
    try:
        record = json.loads((data_dir / PASSPHRASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    kek_id = record.get("kek_id") if isinstance(record, dict) else None
    return kek_id if isinstance(kek_id, str) else None


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
        self._cert_file, self._legacy_key_file = _FILES[name]
        self._lock = threading.Lock()
        self._loaded: tuple[bytes, x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    @classmethod
    def workload(cls, database: Database, wrapper: KeyWrapper, data_dir: Path) -> ServiceCA:
        """The CA of key certificates (``WORKLOAD_CA_CERT``), separate from the service CA."""
        return cls(database, wrapper, data_dir, WORKLOAD)

    @property
    def cert_path(self) -> Path:
        """This replica's copy of the CA certificate, for clients (``publish``)."""
        return self._dir / self._cert_file

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
            cert_pem, key = self._legacy() or self._new(now, common_name)
            der = key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            row = CertificateAuthorityRow(
                name=self._name,
                cert_pem=cert_pem.decode("ascii"),
                key_wrapped=self._wrapper.wrap(der, ca_key_context(self._name)),
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
        return _pem(_ca_certificate(key, name, now, now + timedelta(days=CA_DAYS))), key

    def _legacy(self) -> tuple[bytes, ec.EllipticCurvePrivateKey] | None:
        """The CA of a data directory from before 0008 (certificate and encrypted key files), if there is one."""
        cert_path, key_path, record_path = (
            self.cert_path,
            self._dir / self._legacy_key_file,
            self._dir / PASSPHRASE_FILE,
        )
        if not (cert_path.is_file() and key_path.is_file() and record_path.is_file()):
            return None
        record = json.loads(record_path.read_text())
        passphrase = self._wrapper.unwrap(base64.b64decode(record["wrapped"]), _LEGACY_CONTEXT, record["kek_id"])
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"{key_path} does not hold an EC key")
        return cert_path.read_bytes(), key

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
        """What clients trust (``ca.pem``, ``GET /cms/v1/ca-certificates``): the CA's certificate, and while a rotation
        is not retired the retiring CA's before it."""
        row = self._published()
        return ((row.retiring_pem or "") + row.cert_pem).encode("ascii")

    def chain_pem(self) -> bytes:
        """What follows a certificate this CA issued: the CA's certificate, or while a rotation is not retired its
        key certified by the retiring CA (clients that trust either CA can then verify it)."""
        row = self._published()
        return (row.cross_pem or row.cert_pem).encode("ascii")

    def _published(self) -> CertificateAuthorityRow:
        row = self._row()
        if row is None:
            raise ConfigurationError(f"the deployment has no {self._name} CA; run 'keybroker init'")
        return row

    # --- rotation -------------------------------------------------------------------------------------------

    def rotate(self, now: datetime, audit: AuditLog, context: AuditContext) -> CaRotation:
        """A new CA (a new EC P-384 key, the same name, 10 years) issues every certificate from now on; the old one
        stays published and chained until ``retire``. Refused while an earlier rotation is not retired. The old
        CA's private key is not kept: the cross certificate, made now, is all the transition needs of it."""
        row = self._published()
        if row.retiring_pem is not None:
            raise Conflict(
                f"the {self._name} CA was rotated already and the old CA is not retired yet: once every client "
                "trusts the new one, run 'keybroker ca retire' first",
                code="ca_rotation_in_progress",
            )
        old_cert, old_key = self._load()
        key = ec.generate_private_key(ec.SECP384R1())
        new_cert = _ca_certificate(key, old_cert.subject, now, now + timedelta(days=CA_DAYS))
        until = min(new_cert.not_valid_after_utc, old_cert.not_valid_after_utc)
        cross = _ca_certificate(key, old_cert.subject, now, until, issuer=(old_cert, old_key))
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        done = CaRotation(fingerprint(row.cert_pem.encode("ascii")), fingerprint(_pem(new_cert)))
        values = {
            "cert_pem": _pem(new_cert).decode("ascii"),
            "key_wrapped": self._wrapper.wrap(der, ca_key_context(self._name)),
            "kek_id": self._wrapper.kek_id,
            "created_at": now,
            "retiring_pem": row.cert_pem,
            "cross_pem": _pem(cross).decode("ascii"),
        }
        details = {"old_sha384": done.old_sha384, "new_sha384": done.new_sha384}
        self._replace(row, values, audit, context, AuditEvent("ca.rotate", "success", f"ca:{self._name}", details))
        return done

    def retire(self, audit: AuditLog, context: AuditContext) -> str:
        """End a rotation: the old CA is published and chained no more. Returns the retired CA's fingerprint."""
        row = self._published()
        if row.retiring_pem is None:
            raise Conflict(
                f"the {self._name} CA has no predecessor to retire ('keybroker ca rotate' makes one)",
                code="no_ca_rotation",
            )
        retired = fingerprint(row.retiring_pem.encode("ascii"))
        details = {"retired_sha384": retired, "sha384": fingerprint(row.cert_pem.encode("ascii"))}
        event = AuditEvent("ca.retire", "success", f"ca:{self._name}", details)
        self._replace(row, {"retiring_pem": None, "cross_pem": None}, audit, context, event)
        return retired

    def _replace(self, row: CertificateAuthorityRow, values: dict[str, object], audit: AuditLog, ctx: AuditContext,
                 event: AuditEvent) -> None:  # fmt: skip
        """Update the CA's row from ``row`` (as read) to ``values``, audited, unless someone changed it meanwhile."""
        table = CertificateAuthorityRow
        with self._db.transaction(write=True) as session:
            changed = session.execute(
                update(table)
                .where(table.name == self._name, table.key_wrapped == row.key_wrapped)
                .where(table.retiring_pem.is_not_distinct_from(row.retiring_pem))
                .values(**values)
            )
            if getattr(changed, "rowcount", 0) != 1:  # another rotation (or a KEK rotation) got there first
                raise Conflict(
                    f"the {self._name} CA changed meanwhile; nothing was changed: run it again", code="ca_changed"
                )
            audit.append(session, ctx, event)

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        row = self._published()
        with self._lock:
            if self._loaded is None or self._loaded[0] != row.key_wrapped:
                der = self._wrapper.unwrap(row.key_wrapped, ca_key_context(self._name), row.kek_id)
                key = serialization.load_der_private_key(der, password=None)
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise ConfigurationError(f"the {self._name} CA key is not an EC key")
                self._loaded = (row.key_wrapped, x509.load_pem_x509_certificate(row.cert_pem.encode()), key)
            return self._loaded[1], self._loaded[2]

    def _issue(
        self,
        subject: x509.Name,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        sans: Sequence[x509.GeneralName],
        now: datetime,
        days: int,
    ) -> x509.Certificate:
        ca_cert, ca_key = self._load()
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
        return builder.sign(ca_key, hashes.SHA384())

    # --- the service's own TLS certificate ------------------------------------------------------------------

    def server_certificate(self, sans: Sequence[str], now: datetime, days: int) -> ServerCertificate:
        """A new TLS certificate for this replica (the names in ``sans``), and its key written encrypted under a
        passphrase that only the returned object (the serving process) holds."""
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0] if sans else "keybroker")])
        cert = self._issue(subject, key.public_key(), _san_entries(sans), now, days)
        password = secrets.token_urlsafe(32)
        cert_path, key_path = self._dir / SERVER_CERT, self._dir / SERVER_KEY
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password.encode()),
        )
        _write(key_path, encrypted)
        # The chain (leaf, then CA; during a rotation the cross certificate) so that clients pinning the CA can
        # verify the leaf.
        _write(cert_path, _pem(cert) + self.chain_pem())
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
        return self._issue(subject, public_key, sans, now, days)

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
        cert = self._issue(csr.subject, public_key, sans, now, days)
        return _pem(cert) + self.chain_pem()
