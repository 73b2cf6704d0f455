"""The service CA (the guide's CMS role): created at init, issues the service's own TLS certificate and signs
CSRs for other services. Clients trust it by file (``ca.pem``) or by its SHA-384 fingerprint.

Private keys on disk are PKCS#8, encrypted with a random passphrase that is itself wrapped by the KEK
(``KeyWrapper``), so they are as safe at rest as the keys keybroker stores.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.backends.base import KeyWrapper
from keybroker.errors import ConfigurationError, InvalidRequest

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
# A second CA, for certificates of keys keybroker releases to workloads (the Nginx flow). Never the service CA:
# clients trust the service CA to authenticate keybroker itself, and a certificate for a key that a key manager
# imported must not be able to impersonate keybroker.
WORKLOAD_CA_CERT = "workload-ca.pem"
WORKLOAD_CA_KEY = "workload-ca-key.pem"
PASSPHRASE_FILE = "tls-passphrase.wrapped"  # noqa: S105 - a file name
SERVER_CERT = "tls/server.pem"
SERVER_KEY = "tls/server-key.pem"
_CONTEXT = b"keybroker/tls-passphrase/v1"
MAX_DAYS = 825


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


@dataclass(frozen=True)
class ServerCertificate:
    cert_file: Path
    key_file: Path
    key_password: str


class ServiceCA:
    def __init__(self, data_dir: Path, wrapper: KeyWrapper, cert_file: str = CA_CERT, key_file: str = CA_KEY) -> None:
        self._dir = data_dir
        self._wrapper = wrapper
        self._cert_file = cert_file
        self._key_file = key_file

    @classmethod
    def workload(cls, data_dir: Path, wrapper: KeyWrapper) -> ServiceCA:
        """The CA of key certificates (``WORKLOAD_CA_CERT``), separate from the service CA."""
        return cls(data_dir, wrapper, WORKLOAD_CA_CERT, WORKLOAD_CA_KEY)

    @property
    def cert_path(self) -> Path:
        return self._dir / self._cert_file

    def exists(self) -> bool:
        return self.cert_path.is_file() and (self._dir / self._key_file).is_file()

    # --- the passphrase that encrypts private keys on disk ------------------------------------------------

    def _passphrase(self) -> bytes:
        path = self._dir / PASSPHRASE_FILE
        if not path.exists():
            secret = secrets.token_urlsafe(32).encode()
            record = {"kek_id": self._wrapper.kek_id, "wrapped": base64.b64encode(self._wrapper.wrap(secret, _CONTEXT))}
            _write(path, json.dumps({k: v.decode() if isinstance(v, bytes) else v for k, v in record.items()}).encode())
            return secret
        record = json.loads(path.read_text())
        return self._wrapper.unwrap(base64.b64decode(record["wrapped"]), _CONTEXT, record["kek_id"])

    def _encrypted(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase()),
        )

    # --- the CA ------------------------------------------------------------------------------------------

    def create(self, now: datetime, common_name: str) -> None:
        """Create the CA (EC P-384, 10 years) unless it exists. Safe against a concurrent ``create`` in another
        process (server workers): an ``flock`` orders them, and the loser finds the CA made."""
        if self.exists():
            return
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._dir / f".{self._cert_file}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not self.exists():
                self._create(now, common_name)
        finally:
            os.close(fd)  # releases the lock

    def _create(self, now: datetime, common_name: str) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keybroker"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384())
        )
        _write(self._dir / self._key_file, self._encrypted(key))
        _write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def certificate_pem(self) -> bytes:
        try:
            return self.cert_path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError(f"no service CA in {self._dir}; run 'keybroker init'") from None

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.certificate_pem())
        key = serialization.load_pem_private_key((self._dir / self._key_file).read_bytes(), password=self._passphrase())
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("the CA key is not an EC key")
        return cert, key

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
        """The TLS certificate to serve with; (re)issued when missing, expiring within 30 days, or when the
        configured names changed."""
        cert_path, key_path = self._dir / SERVER_CERT, self._dir / SERVER_KEY
        password = self._passphrase().decode()
        if cert_path.exists() and key_path.exists():
            current = x509.load_pem_x509_certificate(cert_path.read_bytes())
            try:
                names = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                same_names = {str(n.value) for n in names} == {str(n.value) for n in _san_entries(sans)}
            except x509.ExtensionNotFound:
                same_names = False
            if same_names and current.not_valid_after_utc - now > timedelta(days=30):
                return ServerCertificate(cert_path, key_path, password)
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0] if sans else "keybroker")])
        cert = self._issue(subject, key.public_key(), _san_entries(sans), now, days)
        _write(key_path, self._encrypted(key))
        # The chain (leaf, then CA) so that clients pinning the CA can verify the leaf.
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM) + self.certificate_pem())
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
        return cert.public_bytes(serialization.Encoding.PEM) + self.certificate_pem()
