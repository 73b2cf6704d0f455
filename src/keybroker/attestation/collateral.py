"""Intel collateral: TCB info per TEE and FMSPC, QE identities, PCK CRLs, the root CA CRL, with issuer chains.

A ``CollateralItem`` is one of them exactly as Intel's PCS serves it: TCB info and QE identity bodies are kept
byte for byte (their signatures cover the exact text of the inner object). Items are checked before they are
stored: the signature, the issuer chain up to a trusted root, and the dates. A bundle folder has the layout of
``tests/data/dcap/real/*/``: ``tcb_info.json``, ``qe_identity.json``, ``pck_crl.der``, ``root_ca_crl.der`` and the
three ``*_issuer_chain.pem`` files.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keybroker.errors import CollateralInvalid


@dataclass(frozen=True, slots=True)
class CollateralItem:
    """One stored piece. ``key`` names it: ``tcb:SGX:00A067110000``, ``qe:TDX``, ``pckcrl:platform``,
    ``rootcacrl``. ``body`` is the PCS response body (JSON text as bytes, or DER for CRLs)."""

    key: str
    body: bytes
    issuer_chain: str  # PEM, leaf first, root last ("" for the root CA CRL, which the root itself signs)
    issue_date: datetime
    next_update: datetime

    @property
    def kind(self) -> str:
        return self.key.split(":", 1)[0]


def tcb_key(tee: str, fmspc: str) -> str:
    return f"tcb:{tee}:{fmspc.upper()}"


def qe_key(tee: str) -> str:
    return f"qe:{tee}"


def pck_crl_key(ca: str) -> str:
    return f"pckcrl:{ca}"


ROOT_CRL_KEY = "rootcacrl"


def inner_object(body: str, member: str) -> tuple[str, bytes]:
    """The exact text of ``body``'s ``member`` object (what the signature covers) and the signature bytes."""
    try:
        document = json.loads(body)
        signature = bytes.fromhex(document["signature"])
        marker = f'"{member}":'
        start = body.index(marker) + len(marker)
        while body[start] in " \t\r\n":
            start += 1
        _, end = json.JSONDecoder().raw_decode(body, start)
    except (ValueError, KeyError, TypeError, IndexError):
        raise CollateralInvalid(f"not a PCS {member} response body") from None
    return body[start:end], signature


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _chain(pem: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise CollateralInvalid("an issuer chain is not PEM certificates") from None
    return certificates


def _verify_raw_ecdsa(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or len(signature) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _check_chain(chain: Sequence[x509.Certificate], roots: Sequence[bytes], now: datetime, what: str) -> None:
    """Each certificate signed by the next; the last one is a trusted root (by DER); all valid at ``now``."""
    if not chain:
        raise CollateralInvalid(f"{what}: empty issuer chain")
    root_der = chain[-1].public_bytes(serialization.Encoding.DER)
    if root_der not in roots:
        raise CollateralInvalid(f"{what}: the issuer chain does not end at a trusted root", code="untrusted_root")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (InvalidSignature, ValueError, TypeError):
            raise CollateralInvalid(f"{what}: the issuer chain is broken at {child.subject.rfc4514_string()}") from None
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CollateralInvalid(f"{what}: certificate {cert.subject.rfc4514_string()} is not valid now")


def check_signed_json(
    body: bytes, member: str, issuer_chain: str, roots: Sequence[bytes], now: datetime
) -> dict[str, Any]:
    """Verify a TCB info / QE identity body; returns the inner object parsed."""
    text = body.decode("utf-8")
    inner, signature = inner_object(text, member)
    chain = _chain(issuer_chain)
    _check_chain(chain, roots, now, member)
    if not _verify_raw_ecdsa(chain[0], signature, inner.encode()):
        raise CollateralInvalid(
            f"{member}: the signature does not verify (altered or signed by another key)",
            code="collateral_signature_invalid",
        )
    parsed: dict[str, Any] = json.loads(inner)
    return parsed


def check_crl(
    der: bytes, issuer_chain: Sequence[x509.Certificate], roots: Sequence[bytes], now: datetime, what: str
) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        raise CollateralInvalid(f"{what}: not a DER CRL") from None
    _check_chain(issuer_chain, roots, now, what)
    if not crl.is_signature_valid(issuer_chain[0].public_key()):  # type: ignore[arg-type]  # Intel CAs: EC keys
        raise CollateralInvalid(f"{what}: the CRL signature does not verify", code="collateral_signature_invalid")
    return crl


def item_from_pcs(key: str, body: bytes, issuer_chain: str, roots: Sequence[bytes]) -> CollateralItem:
    """Check one PCS response and wrap it as an item; ``CollateralInvalid`` for anything wrong or malformed."""
    try:
        return _item_from_pcs(key, body, issuer_chain, roots)
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
        if isinstance(exc, CollateralInvalid):
            raise
        raise CollateralInvalid(f"{key}: malformed collateral ({type(exc).__name__})") from None


def _item_from_pcs(key: str, body: bytes, issuer_chain: str, roots: Sequence[bytes]) -> CollateralItem:
    """Check one PCS response and wrap it as an item. Expired items are accepted here (they are stored and shown
    by ``collateral status``) but never pass a quote: the verifier checks dates at verification time."""
    kind = key.split(":", 1)[0]
    if kind in ("tcb", "qe"):
        member = "tcbInfo" if kind == "tcb" else "enclaveIdentity"
        inner = check_signed_json(body, member, issuer_chain, roots, _signing_time(body, member))
        issue, next_update = _parse_time(inner["issueDate"]), _parse_time(inner["nextUpdate"])
        tee = key.split(":")[1]
        expected_id = tee if kind == "tcb" else ("QE" if tee == "SGX" else "TD_QE")
        if inner.get("id") != expected_id:
            raise CollateralInvalid(f"the {member} is for {inner.get('id')!r}, not {expected_id!r}")
        if kind == "tcb" and str(inner.get("fmspc", "")).upper() != key.split(":")[2]:
            raise CollateralInvalid(f"the TCB info is for FMSPC {inner.get('fmspc')}, not {key.split(':')[2]}")
    else:
        chain = _chain(issuer_chain) if issuer_chain else []
        if kind == "rootcacrl":
            root = [x509.load_der_x509_certificate(r) for r in roots]
            signer = next((r for r in root if _crl_signed_by(body, r)), None)
            if signer is None:
                raise CollateralInvalid("the root CA CRL is not signed by a trusted root", code="untrusted_root")
            chain = [signer]
        crl = check_crl(body, chain, roots, _crl_time(body), key)
        if crl.issuer != chain[0].subject:
            raise CollateralInvalid(f"{key}: the CRL is issued by {crl.issuer.rfc4514_string()}, not by its chain's CA")
        if kind == "pckcrl" and _pck_ca_of(crl.issuer) != key.split(":")[1]:
            raise CollateralInvalid(f"{key}: the CRL is not from the PCK {key.split(':')[1]} CA")
        issue = crl.last_update_utc
        if crl.next_update_utc is None:
            raise CollateralInvalid(f"{key}: the CRL has no nextUpdate")
        next_update = crl.next_update_utc
    return CollateralItem(key, body, issuer_chain, issue, next_update)


def _signing_time(body: bytes, member: str) -> datetime:
    # Chains are checked at the item's issue date: an item stays verifiable (and visibly expired) after the
    # signing certificate rolls over; freshness is the verifier's decision, at verification time.
    inner, _ = inner_object(body.decode("utf-8"), member)
    return _parse_time(json.loads(inner)["issueDate"])


def _crl_time(der: bytes) -> datetime:
    try:
        return x509.load_der_x509_crl(der).last_update_utc
    except ValueError:
        raise CollateralInvalid("not a DER CRL") from None


def _crl_signed_by(der: bytes, cert: x509.Certificate) -> bool:
    try:
        # Intel CAs have EC keys; cryptography types public_key() as every key type, is_signature_valid fewer.
        return x509.load_der_x509_crl(der).is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    except ValueError:
        return False


# --- bundles (folders in the PCS formats) ----------------------------------------------------------------------

_BUNDLE_FILES = (
    "tcb_info.json",
    "qe_identity.json",
    "pck_crl.der",
    "root_ca_crl.der",
    "tcb_info_issuer_chain.pem",
    "qe_identity_issuer_chain.pem",
    "pck_crl_issuer_chain.pem",
)


def is_bundle(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _BUNDLE_FILES)


def bundle_keys(folder: Path) -> list[str]:
    """The item keys of a bundle folder, in the order tcb, qe, pckcrl, rootcacrl."""
    tcb_inner, _ = inner_object((folder / "tcb_info.json").read_text(), "tcbInfo")
    tcb = json.loads(tcb_inner)
    tee = "TDX" if tcb.get("id") == "TDX" else "SGX"
    return [
        tcb_key(tee, tcb["fmspc"]),
        qe_key(tee),
        pck_crl_key(_pck_ca((folder / "pck_crl.der").read_bytes())),
        ROOT_CRL_KEY,
    ]


def read_bundle(folder: Path, roots: Sequence[bytes]) -> list[CollateralItem]:
    """The four items of one bundle folder, each checked. Raises ``CollateralInvalid`` naming the file."""
    missing = [name for name in _BUNDLE_FILES if not (folder / name).is_file()]
    if missing:
        raise CollateralInvalid(f"{folder}: missing {', '.join(missing)}")
    tcb_body = (folder / "tcb_info.json").read_bytes()
    tcb_inner, _ = inner_object(tcb_body.decode("utf-8"), "tcbInfo")
    tcb = json.loads(tcb_inner)
    tee = "TDX" if tcb.get("id") == "TDX" else "SGX"
    pck_crl = (folder / "pck_crl.der").read_bytes()
    ca = _pck_ca(pck_crl)
    pieces = [
        (tcb_key(tee, tcb["fmspc"]), tcb_body, "tcb_info_issuer_chain.pem"),
        (qe_key(tee), (folder / "qe_identity.json").read_bytes(), "qe_identity_issuer_chain.pem"),
        (pck_crl_key(ca), pck_crl, "pck_crl_issuer_chain.pem"),
        (ROOT_CRL_KEY, (folder / "root_ca_crl.der").read_bytes(), ""),
    ]
    items = []
    for key, body, chain_file in pieces:
        chain = (folder / chain_file).read_text() if chain_file else ""
        try:
            items.append(item_from_pcs(key, body, chain, roots))
        except CollateralInvalid as exc:
            raise CollateralInvalid(f"{folder.name}/{key}: {exc.detail}", code=exc.instance_code) from None
    return items


def _pck_ca(der: bytes) -> str:
    try:
        return _pck_ca_of(x509.load_der_x509_crl(der).issuer)
    except ValueError:
        raise CollateralInvalid("pck_crl.der is not a DER CRL") from None


def _pck_ca_of(issuer: x509.Name) -> str:
    names = issuer.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    return "platform" if "Platform" in common_name else "processor" if "Processor" in common_name else "unknown"


def write_bundle_files(folder: Path, items: Sequence[tuple[str, bytes, str]]) -> list[Path]:
    """Write one bundle folder per TCB info and PCK CA (``<tee>-<fmspc>-<ca>``): the TCB info, the QE identity of
    its TEE, that CA's PCK CRL and the root CA CRL. (A TCB info does not say which PCK CA its platforms use, so
    each CA whose CRL is cached gets a bundle.) Returns the folders written."""
    by_key = {key: (body, chain) for key, body, chain in items}
    written = []
    for key in sorted(k for k in by_key if k.startswith("tcb:")):
        _, tee, fmspc = key.split(":")
        for ca in ("processor", "platform"):
            qe, crl, root = by_key.get(qe_key(tee)), by_key.get(pck_crl_key(ca)), by_key.get(ROOT_CRL_KEY)
            if qe is None or crl is None or root is None:
                continue
            out = folder / f"{tee.lower()}-{fmspc.lower()}-{ca}"
            out.mkdir(parents=True, exist_ok=True)
            files = {
                "tcb_info.json": by_key[key][0],
                "tcb_info_issuer_chain.pem": by_key[key][1].encode(),
                "qe_identity.json": qe[0],
                "qe_identity_issuer_chain.pem": qe[1].encode(),
                "pck_crl.der": crl[0],
                "pck_crl_issuer_chain.pem": crl[1].encode(),
                "root_ca_crl.der": root[0],
            }
            for name, content in files.items():
                (out / name).write_bytes(content)
            written.append(out)
    return written


_FILES = {
    "tcb": ("tcb_info.json", "tcb_info_issuer_chain.pem"),
    "qe": ("qe_identity.json", "qe_identity_issuer_chain.pem"),
    "pckcrl": ("pck_crl.der", "pck_crl_issuer_chain.pem"),
    "rootcacrl": ("root_ca_crl.der", None),
}


def bundle_upload(folder: Path) -> list[dict[str, str]]:
    """A bundle folder as the items of ``POST /collateral/v1/items`` (body base64, issuer chain PEM)."""
    items = []
    for key in bundle_keys(folder):
        body_file, chain_file = _FILES[key.split(":")[0]]
        items.append(
            {
                "key": key,
                "body": base64.b64encode((folder / body_file).read_bytes()).decode(),
                "issuer_chain": (folder / chain_file).read_text() if chain_file else "",
            }
        )
    return items


def bundle_to_qvl(folder: Path) -> Any:
    """A bundle folder as dcap-qvl's ``QuoteCollateralV3`` (for comparisons with the bare library)."""
    import dcap_qvl

    tcb, tcb_signature = inner_object((folder / "tcb_info.json").read_text(), "tcbInfo")
    qe, qe_signature = inner_object((folder / "qe_identity.json").read_text(), "enclaveIdentity")
    return dcap_qvl.QuoteCollateralV3(
        (folder / "pck_crl_issuer_chain.pem").read_text(),
        (folder / "root_ca_crl.der").read_bytes(),
        (folder / "pck_crl.der").read_bytes(),
        (folder / "tcb_info_issuer_chain.pem").read_text(),
        tcb,
        tcb_signature,
        (folder / "qe_identity_issuer_chain.pem").read_text(),
        qe,
        qe_signature,
    )
