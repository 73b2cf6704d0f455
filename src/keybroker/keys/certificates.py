"""Certificates for broker-held RSA/EC keys, signed by the service CA (PROTOCOL.md §1): the guide's ``run.sh``
step that gives Nginx a certificate matching the private key it will receive by attestation.

The public key is derived from the stored material inside keybroker; the private key never leaves. Each issued
certificate is kept (newest first for GET) and audited in the same transaction; all go when the key is deleted.

They are signed by the workload CA (``ca.WORKLOAD_CA_CERT``), not by the service CA that keybroker's own clients
trust: whoever may certify keys (``keys:certify``) and import them (``keys:create``) must not be able to mint a
certificate that impersonates keybroker itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.ca import ServiceCA, fingerprint
from keybroker.clock import Clock
from keybroker.errors import InvalidRequest, NotFound
from keybroker.keys.material import stored_private_key
from keybroker.keys.models import Algorithm
from keybroker.keys.service import KeyService
from keybroker.storage.db import Database
from keybroker.storage.tables import KeyCertificateRow, KeyRow

MAX_SANS = 100
_DNS = re.compile(
    r"^(\*\.)?([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$"
)


@dataclass(frozen=True)
class KeyCertificate:
    key_id: str
    chain_pem: str  # the certificate, then the service CA
    certificate: x509.Certificate

    def describe(self) -> dict[str, object]:
        cert = self.certificate
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = [_show_san(name) for name in names]
        except x509.ExtensionNotFound:
            sans = []
        return {
            "key_id": self.key_id,
            "serial": format(cert.serial_number, "x"),
            "subject": cert.subject.rfc4514_string(),
            "san": sans,
            "not_before": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
            "not_after": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
            "sha384": fingerprint(cert.public_bytes(serialization.Encoding.PEM)),
            "public_key": cert.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode(),
            "certificate": self.chain_pem,
        }


def _show_san(name: x509.GeneralName) -> str:
    return f"IP:{name.value}" if isinstance(name, x509.IPAddress) else f"DNS:{name.value}"


def parse_subject(value: str) -> x509.Name:
    try:
        name = x509.Name.from_rfc4514_string(value)
    except ValueError:
        raise InvalidRequest(
            "subject must be an RFC 4514 name such as CN=web.example", code="invalid_subject"
        ) from None
    if not name.rdns:
        raise InvalidRequest("subject names nothing", code="invalid_subject")
    return name


def parse_sans(values: Sequence[str]) -> list[x509.GeneralName]:
    """``DNS:name`` / ``IP:address`` entries (a bare value is an IP address if it parses as one, else a name)."""
    if len(values) > MAX_SANS:
        raise InvalidRequest(f"at most {MAX_SANS} subject alternative names", code="invalid_san")
    entries: list[x509.GeneralName] = []
    for position, raw in enumerate(values):
        kind, sep, value = raw.partition(":")
        if not sep or kind.upper() not in {"DNS", "IP"}:
            kind, value = ("IP", raw) if _is_ip(raw) else ("DNS", raw)
        if kind.upper() == "IP":
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(value)))
            except ValueError:
                raise InvalidRequest(f"san[{position}] is not an IP address", code="invalid_san") from None
        elif len(value) <= 253 and _DNS.match(value):
            entries.append(x509.DNSName(value.lower()))
        else:
            raise InvalidRequest(f"san[{position}] is not a DNS name", code="invalid_san")
    return entries


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class KeyCertificates:
    def __init__(self, database: Database, keys: KeyService, ca: ServiceCA, audit: AuditLog, clock: Clock) -> None:
        self._db = database
        self._keys = keys
        self._ca = ca
        self._audit = audit
        self._clock = clock

    def issue(self, key_id: str, subject: str, sans: Sequence[str], days: int, audit: AuditContext) -> KeyCertificate:
        name, entries = parse_subject(subject), parse_sans(sans)
        record = self._keys.get(key_id)
        if record.spec.algorithm is Algorithm.AES:
            raise InvalidRequest("only RSA and EC keys can be certified", code="key_not_asymmetric")
        private = stored_private_key(self._keys.load_material(record))
        now = self._clock.now()
        self._ca.create(now, "keybroker workload CA")  # data directories from before it existed get it now
        cert = self._ca.certify_key(private.public_key(), name, entries, now, days)
        del private
        chain = cert.public_bytes(serialization.Encoding.PEM).decode() + self._ca.certificate_pem().decode()
        issued = KeyCertificate(record.id, chain, cert)
        with self._db.transaction(write=True) as session:
            if session.get(KeyRow, record.id) is None:  # deleted meanwhile
                raise NotFound(f"key {record.id} does not exist", code="key_not_found")
            session.add(
                KeyCertificateRow(
                    serial=format(cert.serial_number, "x"), key_id=record.id, chain_pem=chain, created_at=now
                )
            )
            session.flush()
            details = {
                key: value
                for key, value in issued.describe().items()
                if key in {"serial", "subject", "san", "not_after"}
            }
            self._audit.append(session, audit, AuditEvent("key.certify", "success", record.id, details))
        return issued

    def latest(self, key_id: str) -> KeyCertificate:
        record = self._keys.get(key_id)
        query = (
            select(KeyCertificateRow.chain_pem)
            .where(KeyCertificateRow.key_id == record.id)
            .order_by(KeyCertificateRow.created_at.desc(), KeyCertificateRow.serial.desc())
            .limit(1)
        )
        with self._db.transaction() as session:
            chain = session.scalar(query)
        if chain is None:
            raise NotFound(f"key {record.id} has no certificate yet; POST one", code="certificate_not_found")
        return KeyCertificate(record.id, chain, x509.load_pem_x509_certificate(chain.encode()))
