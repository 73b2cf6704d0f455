"""keybroker.transfer.requests: a transfer request is parsed at the edge into what it is, and every way its form
can be wrong is refused there (400 invalid_request) with what is wrong, before anything is verified."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.errors import InvalidRequest
from keybroker.transfer.requests import BackgroundTransfer, PassportTransfer, mode_of, parse_transfer


def _spki(key: Any) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


RSA_3072 = _spki(rsa.generate_private_key(public_exponent=65537, key_size=3072))
NONCE = {"val": base64.b64encode(b"v" * 32).decode(), "iat": base64.b64encode(b"2026-12-06T12:00:00Z").decode(),
         "signature": base64.b64encode(b"s" * 32).decode()}  # fmt: skip
GOOD = {"quote": base64.b64encode(b"quote bytes").decode(), "nonce": NONCE, "user_data": RSA_3072}


def test_a_background_transfer() -> None:
    parsed = parse_transfer("sgx", dict(GOOD))
    assert isinstance(parsed, BackgroundTransfer)
    assert (parsed.tee, parsed.header, parsed.mode, parsed.quote()) == ("SGX", "SGX", "background", b"quote bytes")
    assert parsed.nonce.iat == b"2026-12-06T12:00:00Z"
    assert parsed.public_key.key_size == 3072


def test_a_passport_transfer() -> None:
    parsed = parse_transfer(None, {"attestation_token": "a.b.c"})
    assert parsed == PassportTransfer("a.b.c", None)
    assert parsed.mode == "passport"
    assert mode_of({"attestation_token": 1}) == "passport"
    assert parse_transfer("TDX", {"attestation_token": "t"}).header == "TDX"  # checked against the token later


@pytest.mark.parametrize(("quote", "says"), [("", "quote is empty"), ("@@@", "quote must be standard base64")])
def test_a_bad_quote_is_refused_when_it_is_decoded(quote: str, says: str) -> None:
    parsed = parse_transfer("SGX", {**GOOD, "quote": quote})  # the nonce is checked first (401 if it is bad)
    assert isinstance(parsed, BackgroundTransfer)
    with pytest.raises(InvalidRequest, match=says):
        parsed.quote()


@pytest.mark.parametrize(
    ("header", "body", "says"),
    [
        (None, {"attestation_token": "t", "quote": "x"}, "exactly attestation_token"),
        (None, {"attestation_token": 5}, "exactly attestation_token"),
        ("SGX", {k: v for k, v in GOOD.items() if k != "nonce"}, "exactly quote, nonce and user_data"),
        ("SGX", {**GOOD, "extra": 1}, "exactly quote, nonce and user_data"),
        (None, GOOD, "needs the header Attestation-Type"),
        ("SEV", GOOD, "needs the header Attestation-Type"),
        ("SGX", {**GOOD, "quote": 5}, "base64 strings"),
        ("SGX", {**GOOD, "user_data": ["x"]}, "base64 strings"),
        ("SGX", {**GOOD, "user_data": "not base64!"}, "user_data must be standard base64"),
        ("SGX", {**GOOD, "user_data": base64.b64encode(b"junk").decode()}, "not a DER SubjectPublicKeyInfo"),
        ("SGX", {**GOOD, "user_data": _spki(ec.generate_private_key(ec.SECP256R1()))}, "3072 or 4096"),
        ("SGX", {**GOOD, "user_data": _spki(rsa.generate_private_key(65537, 2048))}, "3072 or 4096"),
        ("SGX", {**GOOD, "user_data": _spki(rsa.generate_private_key(3, 3072))}, "exponent must be 65537"),
        ("SGX", {**GOOD, "nonce": "n"}, "val, iat and signature"),
        ("SGX", {**GOOD, "nonce": {**NONCE, "val": "%%"}}, "standard base64"),
    ],
)
def test_every_malformed_request_is_refused_with_its_reason(
    header: str | None, body: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidRequest, match=says) as refused:
        parse_transfer(header, body)
    assert refused.value.instance_code == "invalid_request"


@pytest.mark.parametrize(
    "iat",
    [b"2026-12-6T12:00:00Z", b"2026-12-06T12:00:00", b"2026-12-06 12:00:00Z", b"2026-13-06T12:00:00Z",
     b"2026-02-30T12:00:00Z", b"2026-12-06T12:00:00+00:00", b"\xff", b""],
)  # fmt: skip
def test_a_signed_nonce_with_an_iat_not_as_issued_is_refused(iat: bytes) -> None:
    from datetime import UTC, datetime, timedelta

    from keybroker.attestation.nonce import Nonce, NonceService
    from keybroker.clock import FixedClock
    from keybroker.errors import AttestationFailed

    service = NonceService(b"k" * 32, None, FixedClock(datetime(2026, 12, 6, 12, tzinfo=UTC)), timedelta(minutes=5))  # type: ignore[arg-type]  # no database: check reads none
    good = service.issue()
    assert good.iat == b"2026-12-06T12:00:00Z"
    service.check(good)
    forged = Nonce(good.val, iat, service._sign(good.val, iat))  # signed with the deployment's key
    with pytest.raises(AttestationFailed) as refused:
        service.check(forged)
    assert refused.value.instance_code == "nonce_invalid"
