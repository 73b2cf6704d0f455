"""Byte-exact DCAP quotes for the simulated TEE (dcap-test-pki.md §9): SGX v3, TDX v4, TDX v5 with TD report 1.0
or 1.5, signed by a simulated platform's attestation key and QE (PCK key). Only ``cryptography`` is needed.

Public: workloads use it through ``evidence.SimulatedEvidence``; keybroker's simulator (``keybroker sim``) and the
benchmarks use ``build_quote``, the measurements and the QE constants directly, so that one implementation makes
every simulated quote."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from keybroker_client._errors import ConfigurationError
from keybroker_client._values import flag, hex_or_bytes, uint16
from keybroker_client._values import report_data as checked_report_data

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
QE_AUTH_DATA = bytes(range(32))
TD_ATTRIBUTES_DEFAULT = bytes.fromhex("0000001000000000")  # SEPT_VE_DISABLE only
XFAM_DEFAULT = bytes.fromhex("e702060000000000")


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 as 64 raw bytes r‖s (never DER)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    numbers = key.public_key().public_numbers()
    return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


_SGX_BYTES = {"mrenclave": 32, "mrsigner": 32, "config_id": 64}
_SGX_INTS = ("isvprodid", "isvsvn", "config_svn")
_TDX_BYTES = {
    "mrtd": 48,
    "mrconfigid": 48,
    "mrowner": 48,
    "mrownerconfig": 48,
    "td_attributes": 8,
    "xfam": 8,
    "mrseam": 48,
}


@dataclass(frozen=True)
class SgxMeasurements:
    """An enclave's identity. Every field is checked at construction (``ConfigurationError`` with its reason);
    byte fields may also be given as hex strings (``mrenclave="ab" * 32``) and are kept as bytes."""

    mrenclave: bytes = bytes(32)
    mrsigner: bytes = bytes(32)
    isvprodid: int = 0
    isvsvn: int = 0
    config_id: bytes = bytes(64)
    config_svn: int = 0
    debug: bool = False
    attributes: bytes | None = None  # default: INIT | MODE64BIT (| DEBUG)

    def __post_init__(self) -> None:
        for name, length in _SGX_BYTES.items():
            object.__setattr__(self, name, hex_or_bytes(name, getattr(self, name), length))
        for name in _SGX_INTS:
            uint16(name, getattr(self, name))
        flag("debug", self.debug)
        if self.attributes is not None:
            object.__setattr__(self, "attributes", hex_or_bytes("attributes", self.attributes, 16))


@dataclass(frozen=True)
class TdxMeasurements:
    mrtd: bytes = bytes(48)
    rtmrs: tuple[bytes, bytes, bytes, bytes] = (bytes(48), bytes(48), bytes(48), bytes(48))
    mrconfigid: bytes = bytes(48)
    mrowner: bytes = bytes(48)
    mrownerconfig: bytes = bytes(48)
    td_attributes: bytes = TD_ATTRIBUTES_DEFAULT
    xfam: bytes = XFAM_DEFAULT
    mrseam: bytes = bytes.fromhex(
        "5b38e33a6487958b72c3c12a938eaa5e3fd4510c51aeeab58c7d5ecee41d7c436489d6c8e4f92f160b7cad34207b00c1"
    )
    debug: bool = False

    def __post_init__(self) -> None:
        for name, length in _TDX_BYTES.items():
            object.__setattr__(self, name, hex_or_bytes(name, getattr(self, name), length))
        rtmrs = self.rtmrs
        if isinstance(rtmrs, str | bytes | bytearray) or not isinstance(rtmrs, Sequence) or len(rtmrs) != 4:
            raise ConfigurationError("rtmrs is 4 values (RTMR0 to RTMR3), each 96 hex digits or 48 bytes")
        checked = tuple(hex_or_bytes(f"rtmrs[{i}]", rtmr, 48) for i, rtmr in enumerate(rtmrs))
        object.__setattr__(self, "rtmrs", checked)
        flag("debug", self.debug)


def measurements(tee: str, values: Mapping[str, object]) -> SgxMeasurements | TdxMeasurements:
    """The measurements of a simulated SGX enclave or TDX guest from keyword values (hex strings or bytes for
    byte fields); a name that is not one of ``tee``'s, or a wrong value, is a ``ConfigurationError``."""
    if tee not in ("SGX", "TDX"):
        raise ConfigurationError(f"tee is 'SGX' or 'TDX', not {tee!r}")
    kind: type[SgxMeasurements] | type[TdxMeasurements] = SgxMeasurements if tee == "SGX" else TdxMeasurements
    known = sorted(f.name for f in dataclasses.fields(kind))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigurationError(f"{', '.join(unknown)}: not a measurement of {tee} (those are {', '.join(known)})")
    return kind(**values)  # type: ignore[arg-type]  # the names are checked above, the values by __post_init__


@dataclass(frozen=True)
class Platform:
    """What a simulated platform signs with: its PCK key and chain, its attestation key, and its TCB."""

    pck_key: ec.EllipticCurvePrivateKey = field(repr=False)
    ak: ec.EllipticCurvePrivateKey = field(repr=False)
    pem_chain: bytes  # PCK leaf, PCK CA, root
    cpusvn: bytes
    pcesvn: int
    qe_svn: int
    tee_tcb_svn: bytes


def _sgx_report(
    cpusvn: bytes,
    attributes: bytes,
    mrenclave: bytes,
    mrsigner: bytes,
    isvprodid: int,
    isvsvn: int,
    report_data: bytes,
    config_id: bytes = bytes(64),
    config_svn: int = 0,
) -> bytes:
    body = bytearray(384)
    body[0:16] = cpusvn
    body[48:64] = attributes
    body[64:96] = mrenclave
    body[128:160] = mrsigner
    body[192:256] = config_id
    struct.pack_into("<HHH", body, 256, isvprodid, isvsvn, config_svn)
    body[320:384] = report_data
    return bytes(body)


def _td_report(m: TdxMeasurements, tee_tcb_svn: bytes, report_data: bytes, v15: bool) -> bytes:
    body = bytearray(648 if v15 else 584)
    body[0:16] = tee_tcb_svn
    body[16:64] = m.mrseam
    attributes = bytearray(m.td_attributes)
    if m.debug:
        attributes[0] |= 0x01
    body[120:128] = attributes
    body[128:136] = m.xfam
    body[136:184] = m.mrtd
    body[184:232] = m.mrconfigid
    body[232:280] = m.mrowner
    body[280:328] = m.mrownerconfig
    for i, rtmr in enumerate(m.rtmrs):
        body[328 + 48 * i : 376 + 48 * i] = rtmr
    body[520:584] = report_data
    if v15:
        body[584:600] = tee_tcb_svn  # TEE_TCB_SVN2 = TEE_TCB_SVN
    return bytes(body)


def _qe_report(platform: Platform, tdx: bool) -> tuple[bytes, bytes]:
    ak_public = raw_public_key(platform.ak)
    report_data = hashlib.sha256(ak_public + QE_AUTH_DATA).digest() + bytes(32)
    report = _sgx_report(
        platform.cpusvn,
        QE_ATTRIBUTES,
        bytes(32),
        TD_QE_MRSIGNER if tdx else QE_MRSIGNER,
        2 if tdx else 1,
        platform.qe_svn,
        report_data,
    )
    return report, raw_signature(platform.pck_key, report)


def build_quote(
    platform: Platform,
    report_data: bytes,
    *,
    sgx: SgxMeasurements | None = None,
    tdx: TdxMeasurements | None = None,
    version: int | None = None,
    td_report_15: bool = False,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """A quote over ``report_data`` (64 bytes, or 128 hex digits). ``signing_key`` replaces the attestation key
    for the ISV signature only (a negative test: the quote then names one key and is signed by another)."""
    report_data = checked_report_data(report_data)
    if sgx is not None and tdx is not None:
        raise ConfigurationError("a quote is SGX (sgx=) or TDX (tdx=), not both")
    is_tdx = tdx is not None
    version = version or (4 if is_tdx else 3)
    if (version == 3) == is_tdx or version not in (3, 4, 5):
        raise ConfigurationError("SGX quotes are version 3; TDX quotes version 4 or 5")
    header = struct.pack("<HHIHH", version, 2, 0x81 if is_tdx else 0, platform.qe_svn, platform.pcesvn)
    header += INTEL_QE_VENDOR_ID + bytes(16) + bytes(4)
    if is_tdx:
        assert tdx is not None
        body = _td_report(tdx, platform.tee_tcb_svn, report_data, td_report_15 and version == 5)
        if version == 5:
            body = struct.pack("<HI", 3 if td_report_15 else 2, len(body)) + body
    else:
        m = sgx or SgxMeasurements()
        attributes = bytearray(m.attributes or bytes.fromhex("07000000000000000700000000000000"))
        attributes[0] = (attributes[0] | 0x02) if m.debug else (attributes[0] & ~0x02)
        body = _sgx_report(
            platform.cpusvn,
            bytes(attributes),
            m.mrenclave,
            m.mrsigner,
            m.isvprodid,
            m.isvsvn,
            report_data,
            m.config_id,
            m.config_svn,
        )
    signed = header + body
    isv_signature = raw_signature(signing_key or platform.ak, signed)
    qe_report, qe_signature = _qe_report(platform, is_tdx)
    chain = platform.pem_chain + b"\0"
    certification = struct.pack("<HI", 5, len(chain)) + chain
    qe_part = qe_report + qe_signature + struct.pack("<H", len(QE_AUTH_DATA)) + QE_AUTH_DATA
    if is_tdx:
        inner = qe_part + certification
        signature_data = isv_signature + raw_public_key(platform.ak) + struct.pack("<HI", 6, len(inner)) + inner
    else:
        signature_data = isv_signature + raw_public_key(platform.ak) + qe_part + certification
    return signed + struct.pack("<I", len(signature_data)) + signature_data
