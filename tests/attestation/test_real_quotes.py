"""Every real quote verifies exactly as expected.json says, at its ``now``; the debug enclave is refused; any
single flipped byte in the signed parts is refused; collateral one second past its earliest nextUpdate fails."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from keybroker.attestation.quote import parse_quote
from keybroker.attestation.verifier import QuoteVerifier
from keybroker.errors import AttestationFailed
from tests.attestation.conftest import POSITIVE, RealQuote, real_quotes


def _measurements(real: RealQuote, claims: dict[str, object]) -> None:
    m = real.expected["measurements"]
    if real.expected["tee"] == "SGX":
        assert claims["sgx_mrenclave"] == m["mr_enclave"]
        assert claims["sgx_mrsigner"] == m["mr_signer"]
        assert claims["sgx_isvprodid"] == m["isv_prod_id"]
        assert claims["sgx_isvsvn"] == m["isv_svn"]
        assert claims["sgx_report_data"] == m["report_data"]
        assert claims["sgx_is_debuggable"] is False
    else:
        pairs = {
            "tdx_mrtd": "mr_td",
            "tdx_mrseam": "mr_seam",
            "tdx_rtmr0": "rtmr0",
            "tdx_rtmr1": "rtmr1",
            "tdx_rtmr2": "rtmr2",
            "tdx_rtmr3": "rtmr3",
            "tdx_td_attributes": "td_attributes",
            "tdx_xfam": "xfam",
            "tdx_report_data": "report_data",
            "tdx_mrconfigid": "mr_config_id",
            "tdx_mrowner": "mr_owner",
            "tdx_mrownerconfig": "mr_owner_config",
            "tdx_tee_tcb_svn": "tee_tcb_svn",
        }
        assert set(pairs.values()) == set(m)  # every expected measurement is compared, none skipped
        for ours, theirs in pairs.items():
            assert claims[ours] == m[theirs], ours
        assert claims["tdx_is_debuggable"] is False


@pytest.mark.parametrize("real", POSITIVE, ids=lambda q: q.name)
def test_real_quote_verifies_as_expected(verifier: QuoteVerifier, real: RealQuote) -> None:
    verified = verifier.verify(real.quote, real.now)
    assert verified.tcb_status == real.expected["expected"]["status"]
    assert list(verified.advisory_ids) == real.expected["expected"]["advisory_ids"]
    assert verified.quote.fmspc == real.expected["fmspc"]
    assert verified.quote.pck_ca == real.expected["pck_ca"]
    assert verified.simulated is False
    claims = verified.claims()
    assert claims["attester_type"] == real.expected["tee"]
    assert claims["root_key_id"].startswith("46e403bd34f05a3f")
    assert claims["tcb_date"] is not None
    _measurements(real, claims)


def test_the_debug_enclave_is_refused(verifier: QuoteVerifier) -> None:
    real = next(q for q in real_quotes() if q.name.startswith("neg-sgx-v3-automata-debug"))
    with pytest.raises(AttestationFailed) as caught:
        verifier.verify(real.quote, real.now)
    assert caught.value.reason == "debug_enclave"


@pytest.mark.parametrize("real", POSITIVE, ids=lambda q: q.name)
def test_collateral_expiry_edge(verifier: QuoteVerifier, real: RealQuote) -> None:
    from datetime import UTC, datetime

    end = datetime.fromtimestamp(real.expected["valid_window"]["end"], UTC)
    verifier.verify(real.quote, end - timedelta(seconds=1))
    with pytest.raises(AttestationFailed) as caught:
        verifier.verify(real.quote, end + timedelta(seconds=1))
    assert caught.value.reason in ("collateral_expired", "crl_expired")


def _positions(quote: bytes) -> list[int]:
    """At least 200 offsets spread over header, body, signature data and certification data, plus every byte of
    the header and of the first 64 bytes of the body."""
    parsed = parse_quote(quote)
    length = len(parsed.raw)
    body_end = 48 + (384 if parsed.tee == "SGX" else 584) + (6 if parsed.version == 5 else 0)
    cert_start = parsed.raw.find(b"-----BEGIN CERTIFICATE-----")
    rng = random.Random(20261127)
    regions = [(0, 48), (48, body_end), (body_end, cert_start), (cert_start, length)]
    picked = set(range(48)) | set(range(48, 112))
    for start, end in regions:
        picked |= set(rng.sample(range(start, end), min(60, end - start)))
    return sorted(picked)


@pytest.mark.parametrize("real", [POSITIVE[0], POSITIVE[1]], ids=lambda q: q.name)
def test_every_flipped_byte_is_refused(verifier: QuoteVerifier, real: RealQuote) -> None:
    positions = _positions(real.quote)
    assert len(positions) >= 200
    reasons: dict[str, int] = {}
    for position in positions:
        flipped = bytearray(real.quote)
        flipped[position] ^= 0x01
        with pytest.raises(AttestationFailed) as caught:
            verifier.verify(bytes(flipped), real.now)
        reasons[caught.value.reason] = reasons.get(caught.value.reason, 0) + 1
    assert "verification_failed" not in reasons, reasons  # every refusal has a specific reason
    assert reasons.get("quote_signature_invalid", 0) > 20  # the ISV signature covers header and body


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda q: q[:40], "quote_truncated"),
        (lambda q: q[:1000], "quote_truncated"),
        (lambda q: q[:-10], "quote_truncated"),
        (lambda q: q + b"\x00" * 100, None),  # zero padding, as real quote buffers have: accepted
        (lambda q: q + b"\x01", "quote_trailing_data"),
        (lambda q: q + b"\x00" * 70_000, "quote_too_large"),
        (lambda q: b"\x07\x00" + q[2:], "quote_unsupported_version"),
        (lambda q: q[:2] + b"\x03\x00" + q[4:], "unsupported_key_type"),
        (lambda q: q[:4] + b"\x81\x00\x00\x00" + q[8:], "unsupported_tee"),
        (lambda q: bytes(4600), "quote_unsupported_version"),
        (lambda q: b"", "quote_truncated"),
    ],
    ids=[
        "header-only",
        "body-cut",
        "signature-cut",
        "zero-padded",
        "trailing-garbage",
        "oversized",
        "version-7",
        "p384-key-type",
        "sgx-v3-as-tdx",
        "zeros",
        "empty",
    ],
)
def test_structural_refusals(verifier: QuoteVerifier, mutate: object, reason: str | None) -> None:
    real = next(q for q in POSITIVE if q.expected["tee"] == "SGX")
    data = mutate(real.quote)
    if reason is None:
        assert verifier.verify(data, real.now).tcb_status == real.expected["expected"]["status"]
        return
    with pytest.raises(AttestationFailed) as caught:
        verifier.verify(data, real.now)
    assert caught.value.reason == reason


def test_the_zero_padded_real_quote_is_trimmed() -> None:
    real = next(q for q in real_quotes() if q.name == "tdx-v4-zkdcap-00806f050000")
    assert len(real.quote) == 8000
    assert len(parse_quote(real.quote).raw) == 4935
