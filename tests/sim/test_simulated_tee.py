"""The simulated TEE: every quote variant verifies with dcap-qvl and with keybroker's verifier against the
simulated root; every TCB status comes out as generated; every negative variant is refused with its reason; and
nothing simulated is trusted without the simulated root."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keybroker.attestation.collateral import bundle_to_qvl, read_bundle
from keybroker.attestation.store import MemoryCollateral
from keybroker.attestation.verifier import QuoteVerifier, TrustAnchors, VerifiedQuote, intel_root_der
from keybroker.errors import AttestationFailed, CollateralInvalid
from keybroker.sim.collateral import CollateralSpec, make_collateral
from keybroker.sim.pki import PlatformSpec, SimPki, add_platform, init_pki
from keybroker_client.sim_platform import load_platform
from keybroker_client.sim_quotes import SgxMeasurements, TdxMeasurements, build_quote

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Sim:
    directory: Path
    pki: SimPki
    root_der: bytes

    def anchors(self) -> TrustAnchors:
        return TrustAnchors(intel_root_der(), self.root_der)

    def collateral(self, out: Path, **spec: Any) -> MemoryCollateral:
        make_collateral(self.pki, out, CollateralSpec(**spec), NOW)
        roots = self.anchors().roots()
        return MemoryCollateral([i for tee in ("sgx", "tdx") for i in read_bundle(out / tee, roots)])

    def verifier(self, out: Path, **spec: Any) -> QuoteVerifier:
        return QuoteVerifier(self.collateral(out, **spec), self.anchors())


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    directory = tmp_path_factory.mktemp("sim")
    pki = init_pki(directory, NOW - timedelta(days=400))
    add_platform(pki, PlatformSpec(), NOW - timedelta(days=400))
    add_platform(pki, PlatformSpec(name="proc", fmspc="00A067110000", ca="processor"), NOW - timedelta(days=400))
    root = x509.load_pem_x509_certificate((directory / "root-ca.pem").read_bytes())
    return Sim(directory, pki, root.public_bytes(serialization.Encoding.DER))


VARIANTS: dict[str, dict[str, Any]] = {
    "sgx-v3": {"sgx": SgxMeasurements(mrenclave=b"\x11" * 32, mrsigner=b"\x22" * 32, isvprodid=3, isvsvn=7)},
    "tdx-v4": {"tdx": TdxMeasurements(mrtd=b"\x33" * 48)},
    "tdx-v5-td10": {"tdx": TdxMeasurements(mrtd=b"\x33" * 48), "version": 5},
    "tdx-v5-td15": {"tdx": TdxMeasurements(mrtd=b"\x33" * 48), "version": 5, "td_report_15": True},
}


def _qvl(sim: Sim, out: Path, tee: str, quote: bytes) -> str:
    collateral = bundle_to_qvl(out / tee)
    return str(dcap_qvl.verify_with_root_ca(quote, collateral, sim.root_der, int(NOW.timestamp())).status)


@pytest.mark.parametrize("platform", ["default", "proc"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_verifies(sim: Sim, tmp_path: Path, variant: str, platform: str) -> None:
    report_data = os.urandom(64)
    quote = build_quote(load_platform(sim.directory, platform), report_data, **VARIANTS[variant])
    tee = "tdx" if variant.startswith("tdx") else "sgx"
    verifier = sim.verifier(tmp_path, platform=platform)
    verified = verifier.verify(quote, NOW)
    assert _qvl(sim, tmp_path, tee, quote) == "UpToDate"
    assert verified.tcb_status == "UpToDate"
    assert verified.simulated is True
    claims = verified.claims()
    assert claims["keybroker_simulated"] is True
    assert verified.quote.report_data == report_data
    if tee == "sgx":
        assert (claims["sgx_mrenclave"], claims["sgx_isvprodid"], claims["sgx_isvsvn"]) == ("11" * 32, 3, 7)
    else:
        assert claims["tdx_mrtd"] == "33" * 48
        assert verified.quote.body_type == ("TD15" if VARIANTS[variant].get("td_report_15") else "TD10")


STATUSES = [
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
]


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_each_tcb_status_comes_out_as_generated(sim: Sim, tmp_path: Path, status: str, tee: str) -> None:
    advisories = ("INTEL-SA-00615",) if status != "UpToDate" else ()
    verifier = sim.verifier(tmp_path, tcb_status=status, advisories=advisories)
    variant = VARIANTS["sgx-v3" if tee == "sgx" else "tdx-v4"]
    verified = verifier.verify(build_quote(load_platform(sim.directory), os.urandom(64), **variant), NOW)
    assert verified.tcb_status == status
    assert verified.advisory_ids == advisories


def _refusal(sim: Sim, tmp_path: Path, collateral: dict[str, Any], at: datetime = NOW, **quote: Any) -> str:
    verifier = sim.verifier(tmp_path, **collateral)
    variant = dict(VARIANTS["sgx-v3"])
    variant.update(quote)
    with pytest.raises(AttestationFailed) as caught:
        verifier.verify(build_quote(load_platform(sim.directory), bytes(64), **variant), at)
    return caught.value.reason


def test_negative_variants(sim: Sim, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    past = NOW - timedelta(days=20)
    cases = {
        "debug": (_refusal(sim, tmp_path / "1", {}, sgx=SgxMeasurements(debug=True)), "debug_enclave"),
        "tdx-debug": (_refusal(sim, tmp_path / "2", {}, sgx=None, tdx=TdxMeasurements(debug=True)), "debug_enclave"),
        "revoked-tcb": (_refusal(sim, tmp_path / "3", {"tcb_status": "Revoked"}), "tcb_revoked"),
        "revoked-pck": (_refusal(sim, tmp_path / "4", {"revoked_pck": True}), "certificate_revoked"),
        "revoked-pck-ca": (_refusal(sim, tmp_path / "5", {"revoked_pck_ca": True}), "certificate_revoked"),
        "expired-crl": (
            _refusal(sim, tmp_path / "6", {"valid_from": past, "valid_days": 60, "crl_days": 10}),
            "crl_expired",
        ),
        "expired-tcb-info": (
            _refusal(sim, tmp_path / "7", {"valid_from": past, "valid_days": 10, "crl_days": 60}),
            "collateral_expired",
        ),
        "not-yet-valid": (
            _refusal(sim, tmp_path / "8", {"valid_from": NOW + timedelta(days=1)}),
            "collateral_not_yet_valid",
        ),
        "wrong-qe-identity": (_refusal(sim, tmp_path / "9", {"qe_mrsigner": "AB" * 32}), "qe_identity_mismatch"),
        "isv-signature-by-wrong-key": (
            _refusal(sim, tmp_path / "10", {}, signing_key=ec.generate_private_key(ec.SECP256R1())),
            "quote_signature_invalid",
        ),
    }
    wrong = {name: got for name, (got, want) in cases.items() if got != want}
    assert not wrong, wrong


def test_report_data_mismatch(sim: Sim, tmp_path: Path, services: Any) -> None:
    from keybroker.attestation.service import check_binding

    nonce = services.attestation.nonces.issue()
    held = b"workload public key"
    good = hashlib.sha512(nonce.val + nonce.iat + held).digest()
    verifier = sim.verifier(tmp_path)
    platform = load_platform(sim.directory)
    check_binding(verifier.verify(build_quote(platform, good, **VARIANTS["sgx-v3"]), NOW), nonce, held)
    other = hashlib.sha512(nonce.val + nonce.iat + b"someone else's key").digest()
    bad: VerifiedQuote = verifier.verify(build_quote(platform, other, **VARIANTS["tdx-v4"]), NOW)
    with pytest.raises(AttestationFailed) as caught:
        check_binding(bad, nonce, held)
    assert caught.value.reason == "report_data_mismatch"


def test_nothing_simulated_is_trusted_by_default(sim: Sim, tmp_path: Path) -> None:
    intel_only = TrustAnchors(intel_root_der())
    make_collateral(sim.pki, tmp_path, CollateralSpec(), NOW)
    with pytest.raises(CollateralInvalid) as caught:
        read_bundle(tmp_path / "sgx", intel_only.roots())
    assert caught.value.instance_code == "untrusted_root"
    # Even with the simulated collateral somehow in the cache, the quote's own chain is refused.
    trusted_items = sim.collateral(tmp_path / "again")
    quote = build_quote(load_platform(sim.directory), bytes(64), **VARIANTS["sgx-v3"])
    with pytest.raises(AttestationFailed) as caught_quote:
        QuoteVerifier(trusted_items, intel_only).verify(quote, NOW)
    assert caught_quote.value.reason == "untrusted_root"
    # dcap-qvl's production entry point refuses it too.
    make_collateral(sim.pki, tmp_path / "q", CollateralSpec(), NOW)
    with pytest.raises(ValueError, match="Verification failed"):
        _qvl_intel(tmp_path / "q" / "sgx", quote)


def _qvl_intel(folder: Path, quote: bytes) -> None:
    dcap_qvl.verify(quote, bundle_to_qvl(folder), int(NOW.timestamp()))


def test_collateral_conflicts_and_crls_of_the_wrong_ca(sim: Sim, tmp_path: Path, services: Any) -> None:
    from keybroker.errors import Conflict

    roots = sim.anchors().roots()
    make_collateral(sim.pki, tmp_path / "a", CollateralSpec(valid_from=NOW), NOW)
    make_collateral(sim.pki, tmp_path / "b", CollateralSpec(valid_from=NOW, revoked_pck=True), NOW)
    store = services.collateral
    store.put(read_bundle(tmp_path / "a" / "sgx", roots), "a")
    store.put(read_bundle(tmp_path / "a" / "sgx", roots), "a again")  # same content: nothing new
    with pytest.raises(Conflict) as caught:
        store.put(read_bundle(tmp_path / "b" / "sgx", roots), "b")  # same date, a CRL that revokes more
    assert caught.value.instance_code == "collateral_conflict"
    # A CRL from the processor CA offered as the platform CA's is refused.
    from keybroker.attestation.collateral import item_from_pcs

    proc = tmp_path / "p"
    make_collateral(sim.pki, proc, CollateralSpec(platform="proc"), NOW)
    with pytest.raises(CollateralInvalid, match="not from the PCK platform CA"):
        item_from_pcs(
            "pckcrl:platform",
            (proc / "sgx" / "pck_crl.der").read_bytes(),
            (proc / "sgx" / "pck_crl_issuer_chain.pem").read_text(),
            roots,
        )


def test_malformed_collateral_is_refused_not_crashed(sim: Sim) -> None:
    from keybroker.attestation.collateral import item_from_pcs

    for body in (b"\xff\xfe", b'{"tcbInfo":[1],"signature":"00"}', b'{"tcbInfo":{"issueDate":1},"signature":"zz"}'):
        with pytest.raises(CollateralInvalid):
            item_from_pcs("tcb:SGX:00906ED50000", body, "", sim.anchors().roots())


def test_a_forged_pck_chain_fetches_nothing_upstream(sim: Sim, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.sim.pki import _KEY_USAGE_SIGN, NAMES, _certificate, _name, _sgx_extension

    fetched: list[list[str]] = []
    verifier = QuoteVerifier(MemoryCollateral([]), sim.anchors(), lambda _q, keys: fetched.append(keys))
    platform = load_platform(sim.directory)
    key = ec.generate_private_key(ec.SECP256R1())
    forged_ca = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(
        _name("Forged PCK"),
        key,
        NAMES["platform"],
        forged_ca,
        NOW - timedelta(days=1),
        30,
        None,
        _KEY_USAGE_SIGN,
        [_sgx_extension(PlatformSpec(fmspc="0000000000AB"), bytes(16))],
    )
    ca_pem = (sim.directory / "pki" / "platform.pem").read_bytes()
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca_pem + (sim.directory / "root-ca.pem").read_bytes()
    from dataclasses import replace

    forged = replace(platform, pck_key=key, pem_chain=chain)
    with pytest.raises(AttestationFailed) as caught:
        verifier.verify(build_quote(forged, bytes(64), **VARIANTS["sgx-v3"]), NOW)
    assert caught.value.reason == "certificate_invalid"
    assert fetched == []
