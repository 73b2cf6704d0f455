"""The simulated PKI (dcap-test-pki.md §2, §4, §5): root CA, PCK Platform and Processor CAs, TCB signing
certificate, and platforms (PCK key and certificate with the SGX extension, attestation key, TCB values),
persisted in a directory so that one platform produces many quotes.

Layout of ``DIR``: ``root-ca.pem`` (the trust anchor to configure), ``pki/*.key`` and ``pki/*.pem``,
``platforms/<name>/{platform.json, pck.pem, pck.key, ak.key}``. The keys are unencrypted (mode 0600): this is test
material, never trusted unless an operator configures its root.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keybroker.errors import InvalidRequest
from keybroker.sim import der

SGX_EXTENSION = "1.2.840.113741.1.13.1"
_KEY_USAGE_SIGN = x509.KeyUsage(True, True, False, False, False, False, False, False, False)
_KEY_USAGE_CA = x509.KeyUsage(False, False, False, False, False, True, True, False, False)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keybroker simulated TEE"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Nowhere"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "NA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "ZZ"),
        ]
    )


NAMES = {
    "root": _name("Simulated SGX Root CA"),
    "platform": _name("Simulated SGX PCK Platform CA"),
    "processor": _name("Simulated SGX PCK Processor CA"),
    "tcbsign": _name("Simulated SGX TCB Signing"),
}


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if secret:
        os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidRequest(f"{path} is not an EC key")
    return key


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    days: int,
    ca_path_length: int | None,
    key_usage: x509.KeyUsage,
    extra: list[x509.ExtensionType] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca_path_length is not None, path_length=ca_path_length), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    for extension in extra or []:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class SimPki:
    directory: Path

    def key(self, role: str) -> ec.EllipticCurvePrivateKey:
        return load_key(self.directory / "pki" / f"{role}.key")

    def cert(self, role: str) -> x509.Certificate:
        path = self.directory / ("root-ca.pem" if role == "root" else f"pki/{role}.pem")
        return x509.load_pem_x509_certificate(path.read_bytes())

    def pem(self, role: str) -> bytes:
        return self.cert(role).public_bytes(serialization.Encoding.PEM)


def init_pki(directory: Path, now: datetime) -> SimPki:
    """Create the CAs unless they exist (idempotent)."""
    pki = SimPki(directory)
    if (directory / "root-ca.pem").exists():
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    start = now - timedelta(days=365)  # room for collateral dated in the past (expiry tests)
    keys = {role: ec.generate_private_key(ec.SECP256R1()) for role in NAMES}
    root = _certificate(NAMES["root"], keys["root"], NAMES["root"], keys["root"], start, 365 * 30, 1, _KEY_USAGE_CA)
    certs = {"root": root}
    for ca in ("platform", "processor"):
        certs[ca] = _certificate(NAMES[ca], keys[ca], NAMES["root"], keys["root"], start, 365 * 15, 0, _KEY_USAGE_CA)
    certs["tcbsign"] = _certificate(
        NAMES["tcbsign"], keys["tcbsign"], NAMES["root"], keys["root"], start, 365 * 7, None, _KEY_USAGE_SIGN
    )
    for role, key in keys.items():
        _write(directory / "pki" / f"{role}.key", _key_pem(key), secret=True)
        if role != "root":
            _write(directory / "pki" / f"{role}.pem", certs[role].public_bytes(serialization.Encoding.PEM))
    _write(directory / "root-ca.pem", root.public_bytes(serialization.Encoding.PEM))
    return pki


@dataclass(frozen=True)
class PlatformSpec:
    name: str = "default"
    fmspc: str = "00906ED50000"
    ca: str = "platform"  # "platform" | "processor"
    cpusvn: str = "0a0a0202ff0100000000000000000000"
    pcesvn: int = 13
    qe_svn: int = 8
    tee_tcb_svn: str = "03010200000000000000000000000000"
    sgx_type: int = 0


def _sgx_extension(spec: PlatformSpec, ppid: bytes) -> x509.UnrecognizedExtension:
    base = SGX_EXTENSION
    cpusvn = bytes.fromhex(spec.cpusvn)
    components = [der.sequence(der.oid(f"{base}.2.{i + 1}"), der.integer(cpusvn[i])) for i in range(16)]
    tcb = der.sequence(
        *components,
        der.sequence(der.oid(f"{base}.2.17"), der.integer(spec.pcesvn)),
        der.sequence(der.oid(f"{base}.2.18"), der.octet_string(cpusvn)),
    )
    parts = [
        der.sequence(der.oid(f"{base}.1"), der.octet_string(ppid)),
        der.sequence(der.oid(f"{base}.2"), tcb),
        der.sequence(der.oid(f"{base}.3"), der.octet_string(b"\x00\x00")),
        der.sequence(der.oid(f"{base}.4"), der.octet_string(bytes.fromhex(spec.fmspc))),
        der.sequence(der.oid(f"{base}.5"), der.enumerated(spec.sgx_type)),
    ]
    if spec.ca == "platform":
        parts.append(der.sequence(der.oid(f"{base}.6"), der.octet_string(secrets.token_bytes(16))))
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(base), der.sequence(*parts))


def add_platform(pki: SimPki, spec: PlatformSpec, now: datetime) -> Path:
    """Create a platform (idempotent by name): PCK key and certificate from its CA, and an attestation key."""
    if spec.ca not in ("platform", "processor") or len(bytes.fromhex(spec.fmspc)) != 6:
        raise InvalidRequest("a platform needs a 6-byte FMSPC and ca 'platform' or 'processor'")
    folder = pki.directory / "platforms" / spec.name
    if (folder / "platform.json").exists():
        return folder
    pck_key, ak = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ppid = secrets.token_bytes(16)
    pck = _certificate(
        _name("Simulated SGX PCK Certificate"),
        pck_key,
        NAMES[spec.ca],
        pki.key(spec.ca),
        now - timedelta(days=365),
        365 * 7,
        None,
        _KEY_USAGE_SIGN,
        [_sgx_extension(spec, ppid)],
    )
    _write(folder / "pck.key", _key_pem(pck_key), secret=True)
    _write(folder / "ak.key", _key_pem(ak), secret=True)
    _write(folder / "pck.pem", pck.public_bytes(serialization.Encoding.PEM))
    _write(
        folder / "platform.json",
        json.dumps(
            {
                "name": spec.name,
                "fmspc": spec.fmspc.upper(),
                "ca": spec.ca,
                "cpusvn": spec.cpusvn,
                "pcesvn": spec.pcesvn,
                "qe_svn": spec.qe_svn,
                "tee_tcb_svn": spec.tee_tcb_svn,
                "sgx_type": spec.sgx_type,
                "ppid": ppid.hex(),
            },
            indent=2,
        ).encode(),
    )
    return folder


def platform_info(pki: SimPki, name: str = "default") -> dict[str, object]:
    path = pki.directory / "platforms" / name / "platform.json"
    try:
        info: dict[str, object] = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidRequest(f"no simulated platform {name!r} in {pki.directory}; run 'keybroker sim init'") from None
    return info


def platforms(pki: SimPki) -> list[str]:
    folder = pki.directory / "platforms"
    return sorted(p.name for p in folder.iterdir() if (p / "platform.json").exists()) if folder.is_dir() else []
