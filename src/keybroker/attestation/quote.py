"""DCAP quotes (SGX v3, TDX v4 and v5) parsed once into typed, frozen structures. Layout: dcap-test-pki.md §9.

Parsing checks structure only (lengths, versions, types); signatures are the verifier's job. Trailing bytes: real
quote buffers are sometimes zero-padded (one in the test set is padded to 8000 bytes), so trailing zeros are
trimmed; any non-zero trailing byte is refused, since it would ride along unsigned.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keybroker.errors import AttestationFailed

MAX_QUOTE_BYTES = 64 * 1024
_HEADER = 48
_SGX_BODY = 384
_TD10_BODY = 584
_TD15_BODY = 648
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081


def QuoteMalformed(detail: str, code: str = "quote_malformed") -> AttestationFailed:
    """The evidence is not a well-formed DCAP quote."""
    return AttestationFailed(detail, reason=code)


@dataclass(frozen=True, slots=True)
class SgxReport:
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    report_data: bytes

    @property
    def debug(self) -> bool:
        return bool(self.attributes[0] & 0x02)


@dataclass(frozen=True, slots=True)
class TdReport:
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None  # TD report 1.5
    mr_service_td: bytes | None = None

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & 0x01)

    @property
    def seam_svn(self) -> int:
        """The TDX module's SVN (TEE_TCB_SVN byte 0)."""
        return self.tee_tcb_svn[0]


@dataclass(frozen=True, slots=True)
class Quote:
    raw: bytes  # exactly the quote, trailing padding removed
    version: int
    attestation_key_type: int
    tee: str  # "SGX" | "TDX"
    body_type: str  # "SgxEnclave" | "TD10" | "TD15"
    report: SgxReport | TdReport
    fmspc: str  # upper-case hex
    pck_ca: str  # "processor" | "platform"
    cert_chain: tuple[bytes, ...]  # PEM certificates from the quote: PCK leaf, PCK CA, root

    @property
    def report_data(self) -> bytes:
        return self.report.report_data

    @property
    def root_pem(self) -> bytes:
        return self.cert_chain[-1]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def _sgx(body: bytes) -> SgxReport:
    (misc_select,) = struct.unpack_from("<I", body, 16)
    isv_prod_id, isv_svn, config_svn = struct.unpack_from("<HHH", body, 256)
    return SgxReport(
        cpu_svn=body[0:16],
        misc_select=misc_select,
        attributes=body[48:64],
        mr_enclave=body[64:96],
        mr_signer=body[128:160],
        config_id=body[192:256],
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        config_svn=config_svn,
        report_data=body[320:384],
    )


def _td(body: bytes) -> TdReport:
    rtmrs = tuple(body[328 + 48 * i : 376 + 48 * i] for i in range(4))
    return TdReport(
        tee_tcb_svn=body[0:16],
        mr_seam=body[16:64],
        mr_signer_seam=body[64:112],
        seam_attributes=body[112:120],
        td_attributes=body[120:128],
        xfam=body[128:136],
        mr_td=body[136:184],
        mr_config_id=body[184:232],
        mr_owner=body[232:280],
        mr_owner_config=body[280:328],
        rtmrs=(rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]),
        report_data=body[520:584],
        tee_tcb_svn2=body[584:600] if len(body) == _TD15_BODY else None,
        mr_service_td=body[600:648] if len(body) == _TD15_BODY else None,
    )


def parse_quote(data: bytes) -> Quote:
    """Parse ``data`` or raise ``QuoteMalformed`` naming what is wrong."""
    if len(data) > MAX_QUOTE_BYTES:
        raise QuoteMalformed(f"a quote is at most {MAX_QUOTE_BYTES} bytes", code="quote_too_large")
    if len(data) < _HEADER + 4:
        raise QuoteMalformed("the quote is truncated (no complete header)", code="quote_truncated")
    version, key_type, tee_type = struct.unpack_from("<HHI", data, 0)
    if version not in (3, 4, 5):
        raise QuoteMalformed(f"quote version {version} is not supported (3, 4, 5)", code="quote_unsupported_version")
    if key_type != 2:
        raise QuoteMalformed(
            f"attestation key type {key_type} is not supported (2: ECDSA P-256)", code="unsupported_key_type"
        )
    if tee_type not in (TEE_SGX, TEE_TDX) or (tee_type == TEE_SGX) != (version == 3):
        raise QuoteMalformed(f"TEE type {tee_type:#x} does not fit quote version {version}", code="unsupported_tee")
    offset = _HEADER
    if version == 5:
        body_type, body_size = struct.unpack_from("<HI", data, offset)
        expected = {1: _SGX_BODY, 2: _TD10_BODY, 3: _TD15_BODY}.get(body_type)
        if expected is None or body_size != expected or body_type == 1:
            raise QuoteMalformed(f"unsupported v5 body (type {body_type}, {body_size} bytes)", code="unsupported_tee")
        offset += 6
        size = body_size
        body_name = "TD10" if body_type == 2 else "TD15"
    else:
        size = _SGX_BODY if tee_type == TEE_SGX else _TD10_BODY
        body_name = "SgxEnclave" if tee_type == TEE_SGX else "TD10"
    end_of_body = offset + size
    if len(data) < end_of_body + 4:
        raise QuoteMalformed("the quote is truncated (report body)", code="quote_truncated")
    (signature_length,) = struct.unpack_from("<I", data, end_of_body)
    end = end_of_body + 4 + signature_length
    if len(data) < end:
        raise QuoteMalformed("the quote is truncated (signature data)", code="quote_truncated")
    if any(data[end:]):
        raise QuoteMalformed("non-zero bytes follow the quote's signature data", code="quote_trailing_data")
    raw = bytes(data[:end])
    body = raw[offset:end_of_body]
    report: SgxReport | TdReport = _sgx(body) if tee_type == TEE_SGX else _td(body)
    try:
        parsed = dcap_qvl.parse_quote(raw)
        pem_chain = parsed.cert_chain_pem_bytes()
    except (ValueError, TypeError) as exc:
        raise QuoteMalformed(f"the quote's signature data does not parse: {exc}", code="quote_malformed") from None
    fmspc, pck_ca, chain = _chain_facts(pem_chain)
    return Quote(
        raw=raw,
        version=version,
        attestation_key_type=key_type,
        tee="SGX" if tee_type == TEE_SGX else "TDX",
        body_type=body_name,
        report=report,
        fmspc=fmspc.upper(),
        pck_ca=pck_ca,
        cert_chain=chain,
    )


@lru_cache(maxsize=1024)
def _chain_facts(pem_chain: bytes) -> tuple[str, str, tuple[bytes, ...]]:
    """FMSPC, PCK CA type and certificates of a quote's PCK chain. A platform sends the same chain with every
    quote, and reading it costs more than the rest of parsing, so the answer is cached by the chain's bytes."""
    try:
        certificates = x509.load_pem_x509_certificates(pem_chain)
        extension = dcap_qvl.parse_pck_extension_from_pem(pem_chain)
        fmspc = bytes(extension.fmspc).hex().upper()
    except (ValueError, TypeError) as exc:
        raise QuoteMalformed(f"the quote's PCK certificate chain does not parse: {exc}") from None
    chain = tuple(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)
    if len(chain) < 2:
        raise QuoteMalformed("the quote carries no PCK certificate chain")
    # PEM tolerates variations no signature covers (other whitespace, for one); quoting enclaves write the
    # canonical form, so anything else is refused rather than silently normalised.
    if pem_chain != b"".join(chain):
        raise QuoteMalformed("the quote's PCK certificate chain is not canonical PEM")
    issuer = certificates[0].issuer.rfc4514_string()
    pck_ca = "platform" if "Platform CA" in issuer else "processor" if "Processor CA" in issuer else ""
    if not pck_ca:
        raise QuoteMalformed("the PCK certificate is not issued by a PCK Platform or Processor CA")
    return fmspc, pck_ca, chain
