"""The ``EvidenceVerifier`` contract, run against both verifiers a KBS can have: this process's attestation service
(``LocalVerifier``) and a separate keybroker attestation service process (``RemoteVerifier``, ``attestation.url``).
Evidence comes from the simulated TEE; each refusal is the one a transfer would meet, with its reason."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from keybroker.attestation.collateral import read_bundle
from keybroker.attestation.nonce import Nonce
from keybroker.cli.main import app
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.errors import BackendUnavailable, KeybrokerError
from keybroker.services import Services, build_services, initialise
from keybroker.transfer.verifiers import EvidenceVerifier, RemoteVerifier
from keybroker_client.evidence import SimulatedEvidence
from tests.integration.conftest import Server, start_server, stop
from tests.transfer.conftest import cached_workload_key

runner = CliRunner()
MRENCLAVE = b"\x42" * 32
pytestmark = pytest.mark.integration  # the remote verifier's attestation service is a process


@dataclass
class Sim:
    directory: Path
    remote: Server


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    base = tmp_path_factory.mktemp("verifiers")
    directory = base / "sim"
    assert runner.invoke(app, ["sim", "init", str(directory)]).exit_code == 0
    assert runner.invoke(app, ["sim", "collateral", str(directory), "--out", str(directory / "coll")]).exit_code == 0
    remote = start_server(
        base / "as",
        KEYBROKER_ATTESTATION__SIMULATED_ROOT=str(directory / "root-ca.pem"),
        KEYBROKER_SERVER__ROLE="attestation",
    )
    try:
        imported = runner.invoke(
            app,
            [
                *("collateral", "import", str(directory / "coll")),
                *("--addr", remote.url, "--token", remote.token, "--cacert", str(remote.ca_file)),
            ],
        )
        assert imported.exit_code == 0, imported.output
        yield Sim(directory, remote)
    finally:
        stop(remote.process)


@dataclass
class Subject:
    verifier: EvidenceVerifier
    services: Services
    clock: FixedClock
    sim: Sim
    remote: bool

    def evidence(self) -> SimulatedEvidence:
        return SimulatedEvidence(self.sim.directory, "sgx", mrenclave=MRENCLAVE)

    def token(self, nonce: Nonce, user_data: bytes) -> str:
        """An attestation token of the verifier's own attestation service, bound to ``nonce`` and ``user_data``."""
        quote = self.evidence().quote(_report_data(nonce, user_data))
        if not self.remote:
            return self.services.attestation.attest(quote, nonce, user_data, [])
        response = httpx.post(
            f"{self.sim.remote.url}/appraisal/v1/attest",
            json={
                "quote": base64.b64encode(quote).decode(),
                "verifier_nonce": nonce.as_json(),
                "runtime_data": base64.b64encode(user_data).decode(),
            },
            verify=self.sim.remote.verify(),
        )
        assert response.status_code == 200, response.text
        return str(response.json()["token"])


@pytest.fixture(params=["local", "remote"])
def subject(request: pytest.FixtureRequest, sim: Sim, tmp_path: Path) -> Iterator[Subject]:
    attestation: dict[str, str] = {"simulated_root": str(sim.directory / "root-ca.pem")}
    if request.param == "remote":
        attestation |= {"url": sim.remote.url, "url_ca_file": str(sim.remote.ca_file)}
    settings = load_settings(data_dir=tmp_path / "kbs", overrides={"attestation": attestation})
    clock = FixedClock(datetime.now(UTC).replace(microsecond=0))
    initialise(settings, clock)
    services = build_services(settings, clock)
    roots = services.attestation.verifier.anchors.roots()
    services.collateral.put(read_bundle(sim.directory / "coll" / "sgx", roots), "test")
    try:
        yield Subject(services.transfer.verifier, services, clock, sim, request.param == "remote")
    finally:
        services.close()


def _report_data(nonce: Nonce, user_data: bytes) -> bytes:
    return hashlib.sha512(nonce.val + nonce.iat + user_data).digest()


def _refused(call: object, code: str) -> KeybrokerError:
    with pytest.raises(KeybrokerError) as refused:
        call()
    error = refused.value
    reasons = [reason["code"] for reason in error.extra.get("reasons", [])]
    assert code in {error.instance_code, *reasons}, (error, reasons)
    return error


def test_a_nonce_it_issued_is_accepted(subject: Subject) -> None:
    nonce = subject.verifier.issue_nonce()
    subject.verifier.check_nonce(nonce)
    assert len(nonce.val) == 32


def test_background_check_returns_the_verified_claims(subject: Subject) -> None:
    user_data = cached_workload_key()[1]
    nonce = subject.verifier.issue_nonce()
    quote = subject.evidence().quote(_report_data(nonce, user_data))
    claims, matched = subject.verifier.background(quote, nonce, user_data, [])
    assert claims["attester_type"] == "SGX"
    assert claims["sgx_mrenclave"] == MRENCLAVE.hex()
    assert claims["keybroker_simulated"] is True
    assert matched == []


def test_evidence_bound_to_other_data_is_refused(subject: Subject) -> None:
    user_data = cached_workload_key()[1]
    nonce = subject.verifier.issue_nonce()
    quote = subject.evidence().quote(_report_data(nonce, b"something else"))
    _refused(lambda: subject.verifier.background(quote, nonce, user_data, []), "report_data_mismatch")


def test_a_forged_nonce_is_refused_before_anything_is_released(subject: Subject) -> None:
    user_data = cached_workload_key()[1]
    issued = subject.verifier.issue_nonce()
    forged = replace(issued, signature=bytes(len(issued.signature)))

    def verify() -> None:
        subject.verifier.check_nonce(forged)
        subject.verifier.background(subject.evidence().quote(_report_data(forged, user_data)), forged, user_data, [])

    _refused(verify, "nonce_invalid")


def test_an_expired_nonce_is_refused(subject: Subject) -> None:
    nonce = subject.verifier.issue_nonce()
    subject.clock.advance(timedelta(seconds=301))
    _refused(lambda: subject.verifier.check_nonce(nonce), "nonce_expired")


def test_an_iat_not_as_issued_is_refused(subject: Subject) -> None:
    issued = subject.verifier.issue_nonce()
    odd = replace(issued, iat=issued.iat.replace(b"T", b" "))  # strptime-like leniency is not accepted
    _refused(lambda: subject.verifier.check_nonce(odd), "nonce_invalid")


def test_using_a_nonce_up_is_the_verifiers_to_say(subject: Subject) -> None:
    nonce = subject.verifier.issue_nonce()
    use = subject.verifier.nonce_use(nonce, "attest", "transfer")
    assert (use.digest, use.purposes) == (nonce.digest, ("attest", "transfer"))
    assert use.expires_at == subject.clock.now() + timedelta(seconds=300)  # kept until it would expire anyway


def test_a_passport_token_is_verified(subject: Subject) -> None:
    user_data = cached_workload_key()[1]
    nonce = subject.verifier.issue_nonce()
    claims, _ = subject.verifier.passport(subject.token(nonce, user_data), [])
    assert claims["verifier_nonce"] == nonce.as_json()
    assert claims["attester_held_data"] == base64.b64encode(user_data).decode()


def test_a_forged_or_expired_token_is_refused(subject: Subject) -> None:
    user_data = cached_workload_key()[1]
    token = subject.token(subject.verifier.issue_nonce(), user_data)
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, options={"verify_signature": False})
    # The same key id and algorithm, signed by a key of the forger's own: refused on the signature.
    forged = jwt.encode(
        {**claims, "sgx_mrenclave": "00" * 32},
        ec.generate_private_key(ec.SECP384R1()),
        algorithm="ES384",
        headers={"kid": kid},
    )
    _refused(lambda: subject.verifier.passport(forged, []), "attestation_failed")
    subject.clock.advance(timedelta(seconds=301))
    _refused(lambda: subject.verifier.passport(token, []), "token_expired")


def test_an_unreachable_attestation_service_fails_closed() -> None:
    from tests.peers.process import free_port

    verifier = RemoteVerifier(
        f"https://127.0.0.1:{free_port()}", FixedClock(datetime.now(UTC)), timedelta(seconds=300), timeout=2.0
    )
    try:
        with pytest.raises(BackendUnavailable):
            verifier.issue_nonce()
        with pytest.raises(BackendUnavailable):
            verifier.background(b"\0" * 600, Nonce(b"v" * 32, b"2026-01-01T00:00:00Z", b"s" * 32), b"", [])
    finally:
        verifier.close()
