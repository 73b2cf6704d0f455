"""Collateral for the simulated TEE in Intel's formats (dcap-test-pki.md §6-8): one bundle per TEE type
(``OUT/sgx/``, ``OUT/tdx/``), laid out like ``tests/data/dcap/real/*/`` and importable with
``keybroker collateral import``. Every TCB status can be produced, and revoked PCK or PCK CA certificates."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from keybroker.errors import InvalidRequest
from keybroker.policy.model import TcbStatus
from keybroker.sim.pki import SimPki, platform_info
from keybroker_client.sim_quotes import QE_MRSIGNER, TD_QE_MRSIGNER, raw_signature


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CollateralSpec:
    platform: str = "default"
    tcb_status: str = "UpToDate"
    advisories: tuple[str, ...] = ()
    valid_from: datetime | None = None  # default: now
    valid_days: int = 30
    crl_days: int | None = None  # default: valid_days
    revoked_pck: bool = False
    revoked_pck_ca: bool = False
    qe_mrsigner: str | None = None  # a different QE identity (negative tests)
    tcb_evaluation_data_number: int = 17
    extra_pck_serials: tuple[int, ...] = field(default=())


def _signed_body(member: str, inner: Mapping[str, object], pki: SimPki) -> bytes:
    text = json.dumps(inner, separators=(",", ":"))
    signature = raw_signature(pki.key("tcbsign"), text.encode()).hex()
    return f'{{"{member}":{text},"signature":"{signature}"}}'.encode()


def _crl(pki: SimPki, issuer_role: str, serials: list[int], this_update: datetime, days: int, number: int) -> bytes:
    issuer = pki.cert(issuer_role)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(this_update + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.key(issuer_role).public_key()), critical=False
        )
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )
    return builder.sign(pki.key(issuer_role), hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def make_collateral(pki: SimPki, out: Path, spec: CollateralSpec, now: datetime) -> list[Path]:
    try:
        status = TcbStatus(spec.tcb_status)
    except ValueError:
        raise InvalidRequest(f"unknown TCB status {spec.tcb_status!r}") from None
    info = platform_info(pki, spec.platform)
    start = spec.valid_from or now
    issue, next_update = _time(start), _time(start + timedelta(days=spec.valid_days))
    cpusvn = bytes.fromhex(str(info["cpusvn"]))
    tee_tcb_svn = bytes.fromhex(str(info["tee_tcb_svn"]))
    ca = str(info["ca"])
    pck_serial = x509.load_pem_x509_certificate(
        (pki.directory / "platforms" / spec.platform / "pck.pem").read_bytes()
    ).serial_number
    pem = {role: pki.pem(role).decode() for role in ("root", "tcbsign", ca)}
    written = []
    for tee in ("SGX", "TDX"):
        level: dict[str, object] = {"sgxtcbcomponents": [{"svn": b} for b in cpusvn], "pcesvn": info["pcesvn"]}
        tcb_info: dict[str, object] = {
            "id": tee,
            "version": 3,
            "issueDate": issue,
            "nextUpdate": next_update,
            "fmspc": info["fmspc"],
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": spec.tcb_evaluation_data_number,
        }
        if tee == "TDX":
            level["tdxtcbcomponents"] = [{"svn": b} for b in tee_tcb_svn]
            module = {"mrsigner": "00" * 48, "attributes": "0000000000000000", "attributesMask": "FFFFFFFFFFFFFFFF"}
            tcb_info["tdxModule"] = module
            tcb_info["tdxModuleIdentities"] = [
                {
                    "id": f"TDX_{tee_tcb_svn[1]:02X}",
                    **module,
                    "tcbLevels": [{"tcb": {"isvsvn": tee_tcb_svn[0]}, "tcbDate": issue, "tcbStatus": "UpToDate"}],
                }
            ]
        tcb_level: dict[str, object] = {"tcb": level, "tcbDate": issue, "tcbStatus": status.value}
        if spec.advisories:
            tcb_level["advisoryIDs"] = list(spec.advisories)
        tcb_info["tcbLevels"] = [tcb_level]
        mrsigner = spec.qe_mrsigner or (TD_QE_MRSIGNER if tee == "TDX" else QE_MRSIGNER).hex().upper()
        qe_identity = {
            "id": "TD_QE" if tee == "TDX" else "QE",
            "version": 2,
            "issueDate": issue,
            "nextUpdate": next_update,
            "tcbEvaluationDataNumber": spec.tcb_evaluation_data_number,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": mrsigner,
            "isvprodid": 2 if tee == "TDX" else 1,
            "tcbLevels": [{"tcb": {"isvsvn": info["qe_svn"]}, "tcbDate": issue, "tcbStatus": "UpToDate"}],
        }
        crl_days = spec.crl_days if spec.crl_days is not None else spec.valid_days
        pck_revoked = [pck_serial] if spec.revoked_pck else []
        root_revoked = [pki.cert(ca).serial_number] if spec.revoked_pck_ca else []
        folder = out / tee.lower()
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "tcb_info.json": _signed_body("tcbInfo", tcb_info, pki),
            "qe_identity.json": _signed_body("enclaveIdentity", qe_identity, pki),
            "tcb_info_issuer_chain.pem": (pem["tcbsign"] + pem["root"]).encode(),
            "qe_identity_issuer_chain.pem": (pem["tcbsign"] + pem["root"]).encode(),
            "pck_crl.der": _crl(pki, ca, pck_revoked + list(spec.extra_pck_serials), start, crl_days, 1),
            "pck_crl_issuer_chain.pem": (pem[ca] + pem["root"]).encode(),
            "root_ca_crl.der": _crl(pki, "root", root_revoked, start, max(crl_days, 1), 1),
        }
        for name, content in files.items():
            (folder / name).write_bytes(content)
        written.append(folder)
    return written
