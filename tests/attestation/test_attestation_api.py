"""The attestation service over the API: collateral import, attest (with and without a nonce), every refusal
with its reason, tokens and their keys, appraisal policies, the PCCS endpoints."""

from __future__ import annotations

import base64
import hashlib
import threading
from datetime import timedelta
from typing import Any
from urllib.parse import quote, unquote

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from keybroker.attestation.nonce import Nonce
from keybroker.clock import FixedClock
from keybroker.errors import AttestationFailed, Conflict
from keybroker.services import Services
from tests.attestation.conftest import POSITIVE, RealQuote, real_quotes
from tests.conftest import assert_problem


def _items(real: RealQuote) -> list[dict[str, str]]:
    from keybroker.attestation.collateral import bundle_upload

    return bundle_upload(real.folder)


@pytest.fixture
def imported(api: TestClient) -> None:
    for real in real_quotes():
        response = api.post("/collateral/v1/items", json={"items": _items(real), "source": real.name})
        assert response.status_code == 200, response.text


def _attest(api: TestClient, real: RealQuote, **extra: Any) -> Any:
    return api.post("/appraisal/v1/attest", json={"quote": base64.b64encode(real.quote).decode(), **extra})


def _claims(api: TestClient, token: str) -> dict[str, Any]:
    jwks = api.get("/certs").json()
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid))
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["ES384"], options={"verify_exp": False})
    return claims


@pytest.mark.parametrize("real", POSITIVE, ids=lambda q: q.name)
def test_attest_real_quotes(api: TestClient, clock: FixedClock, imported: None, real: RealQuote) -> None:
    clock.set(real.now)
    response = _attest(api, real)
    assert response.status_code == 200, response.text
    claims = _claims(api, response.json()["token"])
    assert claims["attester_type"] == real.expected["tee"]
    assert claims["attester_tcb_status"] == real.expected["expected"]["status"]
    assert claims["attester_advisory_ids"] == real.expected["expected"]["advisory_ids"]
    assert claims["keybroker_simulated"] is False
    assert "verifier_nonce" not in claims  # nothing bound: such a token can never release a key
    assert claims["exp"] - claims["iat"] == 300
    assert set(claims["collateral"]) == {
        "rootcacrl",
        f"pckcrl:{real.expected['pck_ca']}",
        f"qe:{real.expected['tee']}",
        f"tcb:{real.expected['tee']}:{real.expected['fmspc']}",
    }
    measurement = "sgx_mrenclave" if real.expected["tee"] == "SGX" else "tdx_mrtd"
    expected = real.expected["measurements"]["mr_enclave" if real.expected["tee"] == "SGX" else "mr_td"]
    assert claims[measurement] == expected


def test_attest_refusals(api: TestClient, clock: FixedClock, imported: None, services: Services) -> None:
    sgx = next(q for q in POSITIVE if q.expected["tee"] == "SGX")
    debug = next(q for q in real_quotes() if not q.positive)
    clock.set(sgx.now)
    problem = assert_problem(_attest(api, debug), 401, "attestation_failed")
    assert problem["reasons"][0]["code"] == "debug_enclave"
    problem = assert_problem(
        api.post("/appraisal/v1/attest", json={"quote": base64.b64encode(b"x" * 100).decode()}),
        401,
        "attestation_failed",
    )
    assert problem["reasons"][0]["code"] == "quote_unsupported_version"
    assert_problem(api.post("/appraisal/v1/attest", json={"quote": "not base64!"}), 400, "invalid_request")
    runtime = base64.b64encode(b"my public key").decode()
    problem = assert_problem(_attest(api, sgx, runtime_data=runtime), 401, "attestation_failed")
    assert problem["reasons"][0]["code"] == "report_data_mismatch"
    # With a nonce: the real quote was not made for it, so the binding fails (after verification).
    nonce = api.get("/appraisal/v1/nonce").json()
    problem = assert_problem(_attest(api, sgx, verifier_nonce=nonce, runtime_data=runtime), 401, "attestation_failed")
    assert problem["reasons"][0]["code"] == "report_data_mismatch"
    forged = {**nonce, "signature": base64.b64encode(b"\x00" * 32).decode()}
    assert_problem(_attest(api, sgx, verifier_nonce=forged), 401, "nonce_invalid")
    assert_problem(_attest(api, sgx, verifier_nonce={"val": "AA=="}), 400, "invalid_request")  # malformed: bad input
    clock.advance(timedelta(seconds=301))
    assert_problem(_attest(api, sgx, verifier_nonce=nonce), 401, "nonce_expired")


def test_another_deployments_nonce_is_invalid(api: TestClient, services: Services, clock: FixedClock) -> None:
    from keybroker.attestation.nonce import NonceService, parse_nonce

    other = NonceService(b"k" * 32, services.database, clock, timedelta(seconds=300)).issue()
    with pytest.raises(AttestationFailed) as caught:
        services.attestation.nonces.check(parse_nonce(other.as_json()))
    assert caught.value.instance_code == "nonce_invalid"


def test_a_nonce_is_used_once_even_concurrently(services: Services) -> None:
    nonces = services.attestation.nonces
    first = nonces.issue()
    nonces.consume(first, "attest")
    with pytest.raises(Conflict) as caught:
        nonces.consume(first, "attest")
    assert caught.value.instance_code == "nonce_replayed"
    nonces.consume(first, "transfer")  # another purpose keeps its own single use
    for _ in range(5):
        nonce = nonces.issue()
        outcomes: list[str] = []
        barrier = threading.Barrier(4)

        def use(n: Nonce = nonce, outcomes: list[str] = outcomes, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                nonces.consume(n, "attest")
                outcomes.append("ok")
            except Conflict:
                outcomes.append("replayed")

        threads = [threading.Thread(target=use) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["ok", "replayed", "replayed", "replayed"]


def test_missing_collateral_is_503(api: TestClient, clock: FixedClock) -> None:
    real = POSITIVE[0]
    clock.set(real.now)
    assert_problem(_attest(api, real), 503, "collateral_unavailable")


def _tampered(real: RealQuote, how: str) -> list[dict[str, str]]:
    items = _items(real)
    tcb = items[0]
    body = base64.b64decode(tcb["body"])
    if how == "altered-text":
        body = body.replace(b'"tcbEvaluationDataNumber":17', b'"tcbEvaluationDataNumber":18', 1)
        assert body != base64.b64decode(tcb["body"])
    elif how == "bad-signature":
        body = body[:-10] + (b"0" if body[-10:-9] != b"0" else b"1") + body[-9:]
    elif how == "foreign-chain":
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX Root CA")])
        from datetime import UTC, datetime

        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
            .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
            .sign(key, hashes.SHA256())
        )
        tcb["issuer_chain"] = cert.public_bytes(serialization.Encoding.PEM).decode()
    elif how == "wrong-key":
        tcb["key"] = tcb["key"].replace(real.expected["fmspc"], "000000000000")
    tcb["body"] = base64.b64encode(body).decode()
    return items


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("altered-text", "collateral_signature_invalid"),
        ("bad-signature", "collateral_signature_invalid"),
        ("foreign-chain", "untrusted_root"),
        ("wrong-key", "collateral_invalid"),
    ],
)
def test_collateral_import_refusals(api: TestClient, services: Services, how: str, code: str) -> None:
    real = POSITIVE[0]
    response = api.post("/collateral/v1/items", json={"items": _tampered(real, how)})
    assert_problem(response, 400, code)
    assert services.collateral.status() == []  # all or nothing


def test_pccs_endpoints_serve_the_bytes_as_imported(api: TestClient, clock: FixedClock, imported: None) -> None:
    tdx = next(q for q in POSITIVE if q.name.startswith("tdx-v4-phala"))
    clock.set(tdx.now)
    response = api.get("/tdx/certification/v4/tcb", params={"fmspc": tdx.expected["fmspc"]})
    assert response.status_code == 200
    assert response.content == (tdx.folder / "tcb_info.json").read_bytes()
    assert unquote(response.headers["tcb-info-issuer-chain"]) == (tdx.folder / "tcb_info_issuer_chain.pem").read_text()
    response = api.get("/tdx/certification/v4/qe/identity")
    assert response.content == (tdx.folder / "qe_identity.json").read_bytes()
    response = api.get("/sgx/certification/v4/pckcrl", params={"ca": "platform", "encoding": "der"})
    assert response.content == (tdx.folder / "pck_crl.der").read_bytes()
    assert "sgx-pck-crl-issuer-chain" in response.headers
    assert api.get("/sgx/certification/v4/rootcacrl").text == (tdx.folder / "root_ca_crl.der").read_bytes().hex()
    assert_problem(api.get("/sgx/certification/v4/tcb", params={"fmspc": "FFFFFFFFFFFF"}), 404, "collateral_not_found")
    assert_problem(api.get("/sgx/certification/v4/tcb", params={"fmspc": "xyz"}), 400, "invalid_request")
    status = api.get("/collateral/v1/status").json()
    assert {s["state"] for s in status} >= {"valid", "expired"}


def test_token_key_rotation(api: TestClient, services: Services, clock: FixedClock, imported: None) -> None:
    tdx = next(q for q in POSITIVE if q.name.startswith("tdx-v4-phala"))
    clock.set(tdx.now)
    before = _attest(api, tdx).json()["token"]
    old_kid = jwt.get_unverified_header(before)["kid"]
    new_kid = api.post("/appraisal/v1/keys/rotate").json()["kid"]
    after = _attest(api, tdx).json()["token"]
    assert jwt.get_unverified_header(after)["kid"] == new_kid != old_kid
    assert {k["kid"] for k in api.get("/certs").json()["keys"]} == {old_kid, new_kid}
    assert services.attestation.tokens.verify(before)["attester_type"] == "TDX"  # old tokens stay verifiable
    clock.advance(timedelta(seconds=301))
    assert {k["kid"] for k in api.get("/certs").json()["keys"]} == {new_kid}
    with pytest.raises(AttestationFailed) as caught:
        services.attestation.tokens.verify(after)
    assert caught.value.reason == "token_expired"
    forged = jwt.encode({"iss": "x"}, "s" * 32, algorithm="HS256", headers={"kid": "unknown"})
    with pytest.raises(AttestationFailed) as caught:
        services.attestation.tokens.verify(forged)
    assert caught.value.reason == "token_unknown_key"


def test_appraisal_policies(api: TestClient, clock: FixedClock, imported: None) -> None:
    rego = 'package policy\nimport rego.v1\ndefault allow := false\nallow if input.attester_tcb_status == "UpToDate"\n'
    created = api.post("/appraisal/v1/policies", json={"name": "up to date", "policy": rego})
    assert created.status_code == 201, created.text
    policy_id = created.json()["id"]
    assert_problem(
        api.post("/appraisal/v1/policies", json={"name": "x", "policy": "package policy\nallow if {{"}),
        400,
        "invalid_rego",
    )
    assert_problem(
        api.post("/appraisal/v1/policies", json={"name": "x", "policy": "package other\nallow := true"}),
        400,
        "invalid_rego",
    )
    for real, matched in (
        (next(q for q in POSITIVE if q.name.startswith("tdx-v4-phala")), True),
        (next(q for q in POSITIVE if q.expected["tee"] == "SGX"), False),
    ):
        clock.set(real.now)
        claims = _claims(api, _attest(api, real, policy_ids=[policy_id]).json()["token"])
        assert claims["policy_ids_matched"] == ([policy_id] if matched else [])
        assert claims["policy_ids_unmatched"] == ([] if matched else [policy_id])
    assert [p["id"] for p in api.get("/appraisal/v1/policies").json()] == [policy_id]
    assert api.delete(f"/appraisal/v1/policies/{policy_id}").status_code == 204
    assert_problem(api.get(f"/appraisal/v1/policies/{policy_id}"), 404, "appraisal_policy_not_found")


def test_binding_accepts_sha512_and_sgx_sha256(services: Services) -> None:
    from dataclasses import replace

    from keybroker.attestation.service import check_binding
    from keybroker.attestation.verifier import VerifiedQuote
    from tests.attestation.conftest import real_quotes as reals

    sgx_quote = next(q for q in reals() if q.positive and q.expected["tee"] == "SGX")
    from keybroker.attestation.quote import parse_quote

    parsed = parse_quote(sgx_quote.quote)
    nonce = services.attestation.nonces.issue()
    data = b"held"
    for report_data, ok in (
        (hashlib.sha512(nonce.val + nonce.iat + data).digest(), True),
        (hashlib.sha256(nonce.val + nonce.iat + data).digest() + bytes(32), True),
        (hashlib.sha256(nonce.val + nonce.iat + data).digest() + b"\x01" * 32, False),
        (hashlib.sha512(nonce.val + data).digest(), False),
    ):
        report = replace(parsed.report, report_data=report_data)
        fake = VerifiedQuote(replace(parsed, report=report), "UpToDate", (), False, "", None)
        if ok:
            check_binding(fake, nonce, data)
        else:
            with pytest.raises(AttestationFailed):
                check_binding(fake, nonce, data)


def _whole(response: Any) -> bytes:
    """The body, after checking that Content-Length announces exactly it (a client reads no more, no less)."""
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content), response.headers
    return bytes(response.content)


def _chain_header(value: str, expected_pem: str) -> None:
    """Intel PCS sends issuer chains URL-encoded with every reserved character escaped (``%20``, ``%0A``, ``%2F``,
    ``%2B``, ``%3D``); Intel's QCNL drops the last two characters unless they are part of an escape."""
    assert unquote(value) == expected_pem
    assert value == quote(expected_pem, safe="")
    assert value.endswith("%0A")
    assert not set(value) & set(" \n/+=")


def test_pccs_routes_follow_intel_pcs_v4_formats(api: TestClient, clock: FixedClock, imported: None) -> None:
    tdx = next(q for q in POSITIVE if q.name.startswith("tdx-v4-phala"))
    sgx = next(q for q in POSITIVE if q.name.startswith("sgx-v3-phala"))
    clock.set(tdx.now)
    for tee, real in (("tdx", tdx), ("sgx", sgx)):
        clock.set(real.now)
        response = api.get(
            f"/{tee}/certification/v4/tcb", params={"fmspc": real.expected["fmspc"], "update": "standard"}
        )
        assert _whole(response) == (real.folder / "tcb_info.json").read_bytes()
        assert response.headers["content-type"] == "application/json"
        _chain_header(
            response.headers["tcb-info-issuer-chain"], (real.folder / "tcb_info_issuer_chain.pem").read_text()
        )
        response = api.get(f"/{tee}/certification/v4/qe/identity", params={"update": "standard"})
        assert _whole(response) == (real.folder / "qe_identity.json").read_bytes()
        assert response.headers["content-type"] == "application/json"
        _chain_header(
            response.headers["sgx-enclave-identity-issuer-chain"],
            (real.folder / "qe_identity_issuer_chain.pem").read_text(),
        )

    clock.set(tdx.now)
    der = (tdx.folder / "pck_crl.der").read_bytes()
    chain = (tdx.folder / "pck_crl_issuer_chain.pem").read_text()
    response = api.get("/sgx/certification/v4/pckcrl", params={"ca": "platform", "encoding": "der"})
    assert _whole(response) == der
    assert response.headers["content-type"] == "application/pkix-crl"
    _chain_header(response.headers["sgx-pck-crl-issuer-chain"], chain)
    for params in ({"ca": "platform", "encoding": "pem"}, {"ca": "platform"}):  # PEM is Intel PCS's default
        response = api.get("/sgx/certification/v4/pckcrl", params=params)
        pem = _whole(response).decode("ascii")
        assert response.headers["content-type"] == "application/x-pem-file"
        _chain_header(response.headers["sgx-pck-crl-issuer-chain"], chain)
        lines = pem.split("\n")
        assert lines[0] == "-----BEGIN X509 CRL-----"
        assert lines[-2:] == ["-----END X509 CRL-----", ""]
        assert all(len(line) == 64 for line in lines[1:-3])
        assert 0 < len(lines[-3]) <= 64
        assert x509.load_pem_x509_crl(pem.encode()).public_bytes(serialization.Encoding.DER) == der
    response = api.get("/sgx/certification/v4/rootcacrl")
    assert _whole(response) == (tdx.folder / "root_ca_crl.der").read_bytes().hex().encode()
    assert response.headers["content-type"] == "application/pkix-crl"  # as Intel's PCCS labels its hex
    assert_problem(
        api.get("/sgx/certification/v4/pckcrl", params={"ca": "platform", "encoding": "b64"}), 400, "invalid_request"
    )
    assert_problem(api.get("/sgx/certification/v4/pckcrl", params={"ca": "other"}), 400, "invalid_request")
