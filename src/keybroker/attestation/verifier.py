"""Quote verification: dcap-qvl with the cached collateral valid at ``now``, the trust anchor chosen by
configuration (Intel's root, plus the simulated root only when configured), and every failure mapped to a
specific reason. No network I/O when the collateral is cached. Appraisal (policies) happens elsewhere.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from keybroker.attestation.collateral import (
    ROOT_CRL_KEY,
    CollateralItem,
    inner_object,
    pck_crl_key,
    qe_key,
    tcb_key,
)
from keybroker.attestation.quote import Quote, SgxReport, TdReport, parse_quote
from keybroker.attestation.store import CollateralLookup
from keybroker.errors import AttestationFailed, CollateralUnavailable

INTEL_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"


def intel_root_der() -> bytes:
    pem = resources.files("keybroker.attestation").joinpath("intel_sgx_root_ca.pem").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    if hashlib.sha256(der).hexdigest() != INTEL_ROOT_SHA256:
        raise RuntimeError("the packaged Intel SGX Root CA is not the genuine one")
    return der


@dataclass(frozen=True)
class TrustAnchors:
    """Intel's root always; a simulated root only when the operator configured one (never from a request)."""

    intel: bytes
    simulated: bytes | None = None

    def roots(self) -> list[bytes]:
        return [self.intel] + ([self.simulated] if self.simulated else [])

    def classify(self, root_pem: bytes) -> bool:
        """True if ``root_pem`` is the simulated root, False for Intel's; refuses any other root."""
        der = _der(root_pem)
        if der == self.intel:
            return False
        if self.simulated is not None and der == self.simulated:
            return True
        raise AttestationFailed("the quote's PCK chain does not end at a trusted root", reason="untrusted_root")


@dataclass(frozen=True)
class VerifiedQuote:
    quote: Quote
    tcb_status: str
    advisory_ids: tuple[str, ...]
    simulated: bool
    root_key_id: str
    tcb_date: str | None
    collateral: dict[str, str] = field(default_factory=dict)  # item key -> SHA-256 of the body used

    def claims(self) -> dict[str, Any]:
        """The verified claims with ITA's names (PROTOCOL.md §4); hex lowercase."""
        q = self.quote
        claims: dict[str, Any] = {
            "attester_type": q.tee,
            "attester_tcb_status": self.tcb_status,
            "attester_advisory_ids": list(self.advisory_ids),
            "fmspc": q.fmspc.lower(),
            "tcb_date": self.tcb_date,
            "root_key_id": self.root_key_id,
            "collateral": dict(self.collateral),
            "keybroker_simulated": self.simulated,
            "quote_version": q.version,
        }
        report = q.report
        if isinstance(report, SgxReport):
            claims.update(
                sgx_mrenclave=report.mr_enclave.hex(),
                sgx_mrsigner=report.mr_signer.hex(),
                sgx_isvprodid=report.isv_prod_id,
                sgx_isvsvn=report.isv_svn,
                sgx_config_id=report.config_id.hex(),
                sgx_config_svn=report.config_svn,
                sgx_attributes=report.attributes.hex(),
                sgx_report_data=report.report_data.hex(),
                sgx_is_debuggable=report.debug,
                dbgstat="enabled" if report.debug else "disabled",
            )
        else:
            claims.update(
                tdx_mrseam=report.mr_seam.hex(),
                tdx_mrsignerseam=report.mr_signer_seam.hex(),
                tdx_seamsvn=report.seam_svn,
                tdx_td_attributes=report.td_attributes.hex(),
                tdx_xfam=report.xfam.hex(),
                tdx_mrtd=report.mr_td.hex(),
                tdx_mrconfigid=report.mr_config_id.hex(),
                tdx_mrowner=report.mr_owner.hex(),
                tdx_mrownerconfig=report.mr_owner_config.hex(),
                tdx_rtmr0=report.rtmrs[0].hex(),
                tdx_rtmr1=report.rtmrs[1].hex(),
                tdx_rtmr2=report.rtmrs[2].hex(),
                tdx_rtmr3=report.rtmrs[3].hex(),
                tdx_report_data=report.report_data.hex(),
                tdx_tee_tcb_svn=report.tee_tcb_svn.hex(),
                tdx_is_debuggable=report.debug,
                dbgstat="enabled" if report.debug else "disabled",
            )
        return claims


# dcap-qvl 0.7.0 messages (dcap-test-pki.md §11) -> stable reasons; the first matching fragment wins.
_REASONS: Sequence[tuple[str, str]] = (
    ("Debug mode is enabled", "debug_enclave"),
    ("TCB Info expired", "collateral_expired"),
    ("QE Identity expired", "collateral_expired"),
    ("TCBInfo expired", "collateral_expired"),
    ("not yet valid", "collateral_not_yet_valid"),
    ("in the future", "collateral_not_yet_valid"),
    ("CrlExpired", "crl_expired"),
    ("expired", "collateral_expired"),
    ("CertRevoked", "certificate_revoked"),
    ("Revoked", "tcb_revoked"),
    ("revoked", "certificate_revoked"),
    ("ISV enclave report signature is invalid", "quote_signature_invalid"),
    ("Signature is invalid for qe_report", "qe_report_signature_invalid"),
    ("QE report hash mismatch", "qe_binding_invalid"),
    ("Invalid QE auth data length", "qe_binding_invalid"),
    ("QE MRSIGNER", "qe_identity_mismatch"),
    ("QE ISVPRODID", "qe_identity_mismatch"),
    ("QE MISCSELECT", "qe_identity_mismatch"),
    ("QE ATTRIBUTES", "qe_identity_mismatch"),
    ("QE ISVSVN", "qe_identity_mismatch"),
    ("QE report validation failed", "qe_identity_mismatch"),
    ("Unknown QE vendor ID", "unknown_qe_vendor"),
    ("FMSPC", "collateral_mismatch"),
    ("Fmspc", "collateral_mismatch"),
    ("signature", "collateral_signature_invalid"),
    ("Signature", "collateral_signature_invalid"),
    ("UnknownIssuer", "untrusted_root"),
    ("root ca", "untrusted_root"),
    ("certificate", "certificate_invalid"),
    ("Failed to decode quote", "quote_malformed"),
    ("Failed to parse quote", "quote_malformed"),
    ("Reserved bits in TD attributes", "td_attributes_invalid"),
    ("SEPT_VE_DISABLE", "td_attributes_invalid"),
    ("Invalid MR service TD", "td_attributes_invalid"),
)


def _split_message(message: str) -> tuple[str, str]:
    """dcap-qvl's 'Verification failed: <headline>\n\nCaused by:\n    <cause>' as (headline, cause)."""
    headline, _, rest = message.removeprefix("Verification failed: ").partition("\n")
    cause = " ".join(line.strip() for line in rest.replace("Caused by:", "").splitlines() if line.strip())
    return headline.strip(), cause[:300]


def reason_for(message: str) -> str:
    for fragment, reason in _REASONS:
        if fragment in message:
            return reason
    return "verification_failed"


@lru_cache(maxsize=64)
def _der(pem: bytes) -> bytes:
    try:
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise AttestationFailed("the quote's root certificate does not parse", reason="quote_malformed") from None


@lru_cache(maxsize=64)
def _root_key_id(root_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(root_pem)
    raw = cert.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return hashlib.sha384(raw).hexdigest()  # as dcap-qvl: SHA-384 of the root's uncompressed public key point


@dataclass(frozen=True)
class _Assembled:
    collateral: Any  # dcap_qvl.QuoteCollateralV3
    tcb_levels: list[dict[str, Any]]
    hashes: dict[str, str]


class QuoteVerifier:
    def __init__(
        self,
        store: CollateralLookup,
        anchors: TrustAnchors,
        fetch_missing: Callable[[Quote, list[str]], None] | None = None,
    ) -> None:
        self._store = store
        self._anchors = anchors
        self._fetch_missing = fetch_missing  # an upstream PCS/PCCS, if configured
        self._cache: OrderedDict[tuple[Any, ...], _Assembled] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def anchors(self) -> TrustAnchors:
        return self._anchors

    def verify(self, data: bytes, now: datetime) -> VerifiedQuote:
        """Verify ``data`` at ``now``. Raises ``AttestationFailed`` (with the reason) or
        ``CollateralUnavailable``."""
        quote = parse_quote(data)
        simulated = self._anchors.classify(quote.root_pem)
        assembled = self._collateral(quote, now)
        root = self._anchors.simulated if simulated else self._anchors.intel
        try:
            report = dcap_qvl.verify_with_root_ca(quote.raw, assembled.collateral, root, int(now.timestamp()))
        except (ValueError, TypeError) as exc:
            headline, cause = _split_message(str(exc))
            # The cause (CrlExpired, CertRevoked, ...) is more specific than the headline when there is one.
            reason = reason_for(cause) if cause and reason_for(cause) != "verification_failed" else reason_for(headline)
            detail = f"{headline} ({cause})" if cause else headline
            raise AttestationFailed(f"the quote did not verify: {detail}", reason=reason) from None
        if quote.report.debug:  # dcap-qvl refuses these too; never rely on one check for this
            raise AttestationFailed("debug enclaves and TDs are never trusted", reason="debug_enclave")
        status = str(report.status)
        if status == "Revoked":
            raise AttestationFailed("the platform's TCB is revoked", reason="tcb_revoked")
        return VerifiedQuote(
            quote=quote,
            tcb_status=status,
            advisory_ids=tuple(report.advisory_ids),
            simulated=simulated,
            root_key_id=_root_key_id(quote.root_pem),
            tcb_date=_tcb_date(quote, assembled.tcb_levels),
            collateral=assembled.hashes,
        )

    def _collateral(self, quote: Quote, now: datetime) -> _Assembled:
        keys = [tcb_key(quote.tee, quote.fmspc), qe_key(quote.tee), pck_crl_key(quote.pck_ca), ROOT_CRL_KEY]
        items = [self._store.select(key, now) for key in keys]
        missing = [key for key, item in zip(keys, items, strict=True) if item is None]
        if missing:
            # A forged PCK chain must be refused before it can make us fetch anything upstream.
            _check_pck_chain(quote)
        if missing and self._fetch_missing is not None:
            self._fetch_missing(quote, missing)
            items = [self._store.select(key, now) for key in keys]
            missing = [key for key, item in zip(keys, items, strict=True) if item is None]
        if missing:
            raise CollateralUnavailable(
                f"no collateral for {', '.join(missing)}; import a bundle or configure an upstream PCS/PCCS",
                code="collateral_unavailable",
            )
        tcb, qe, pck_crl, root_crl = (item for item in items if item is not None)
        cache_key = tuple((item.key, item.issue_date) for item in (tcb, qe, pck_crl, root_crl))
        with self._cache_lock:
            hit = self._cache.get(cache_key)
            if hit is not None:
                self._cache.move_to_end(cache_key)
                return hit
        assembled = _assemble(tcb, qe, pck_crl, root_crl)
        with self._cache_lock:
            self._cache[cache_key] = assembled
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return assembled


def _assemble(tcb: CollateralItem, qe: CollateralItem, pck_crl: CollateralItem, root_crl: CollateralItem) -> _Assembled:
    tcb_text, tcb_signature = inner_object(tcb.body.decode(), "tcbInfo")
    qe_text, qe_signature = inner_object(qe.body.decode(), "enclaveIdentity")
    collateral = dcap_qvl.QuoteCollateralV3(
        pck_crl_issuer_chain=pck_crl.issuer_chain,
        root_ca_crl=root_crl.body,
        pck_crl=pck_crl.body,
        tcb_info_issuer_chain=tcb.issuer_chain,
        tcb_info=tcb_text,
        tcb_info_signature=tcb_signature,
        qe_identity_issuer_chain=qe.issuer_chain,
        qe_identity=qe_text,
        qe_identity_signature=qe_signature,
    )
    hashes = {item.key: hashlib.sha256(item.body).hexdigest() for item in (tcb, qe, pck_crl, root_crl)}
    return _Assembled(collateral, json.loads(tcb_text).get("tcbLevels", []), hashes)


@lru_cache(maxsize=1024)
def _pck_svns(pck_pem: bytes) -> tuple[bytes, int]:
    extension = dcap_qvl.parse_pck_extension_from_pem(pck_pem)
    return bytes(extension.cpu_svn), int(extension.pce_svn)


def _tcb_date(quote: Quote, levels: list[dict[str, Any]]) -> str | None:
    """The tcbDate of the first TCB level the platform meets (the level dcap-qvl matched)."""
    try:
        cpu_svn, pce_svn = _pck_svns(quote.cert_chain[0])
    except (ValueError, TypeError):
        return None
    tee_tcb_svn = quote.report.tee_tcb_svn if isinstance(quote.report, TdReport) else None
    for level in levels:
        tcb = level.get("tcb", {})
        sgx = [c.get("svn", 0) for c in tcb.get("sgxtcbcomponents", [])]
        if any(cpu_svn[i] < svn for i, svn in enumerate(sgx[:16])) or pce_svn < tcb.get("pcesvn", 0):
            continue
        if tee_tcb_svn is not None:
            tdx = [c.get("svn", 0) for c in tcb.get("tdxtcbcomponents", [])]
            if any(tee_tcb_svn[i] < svn for i, svn in enumerate(tdx[:16])):
                continue
        date = level.get("tcbDate")
        return str(date) if date else None
    return None


def utc(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _check_pck_chain(quote: Quote) -> None:
    certificates = [x509.load_pem_x509_certificate(pem) for pem in quote.cert_chain]
    for child, parent in itertools.pairwise(certificates):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise AttestationFailed(
                "the quote's PCK certificate chain does not verify", reason="certificate_invalid"
            ) from None
