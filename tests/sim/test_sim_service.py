"""The simulated TEE through the service and the CLI: trusted only with ``attestation.simulated_root``, refused by
the default configuration; a full nonce -> quote -> attest round trip with a workload-side evidence provider."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from keybroker.api.app import create_app
from keybroker.cli.main import app
from keybroker.clock import FixedClock
from keybroker.config import load_settings
from keybroker.services import build_services, initialise
from keybroker_client.evidence import (
    EvidenceError,
    GramineSgxEvidence,
    SimulatedEvidence,
    TdxEvidence,
    from_spec,
)
from tests.conftest import assert_problem

runner = CliRunner()
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("simdir")
    for args in (
        ["sim", "init", str(directory)],
        [
            "sim",
            "collateral",
            str(directory),
            "--out",
            str(directory / "coll"),
            "--valid-from",
            (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S"),
        ],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return directory


def _client(tmp_path: Path, sim_dir: Path, trusted: bool) -> Iterator[TestClient]:
    overrides = {"attestation": {"simulated_root": str(sim_dir / "root-ca.pem")}} if trusted else {}
    settings = load_settings(data_dir=tmp_path / "data", overrides=overrides)
    clock = FixedClock(NOW)
    token = initialise(settings, clock).admin_token
    services = build_services(settings, clock)
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client
    services.close()


@pytest.fixture
def trusting(tmp_path: Path, sim_dir: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path, sim_dir, trusted=True)


@pytest.fixture
def default(tmp_path: Path, sim_dir: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path, sim_dir, trusted=False)


def _import(client: TestClient, folder: Path) -> Any:
    from keybroker.attestation.collateral import bundle_upload

    return client.post("/collateral/v1/items", json={"items": bundle_upload(folder)})


@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_attest_round_trip_with_a_simulated_workload(trusting: TestClient, sim_dir: Path, tee: str) -> None:
    assert _import(trusting, sim_dir / "coll" / tee).status_code == 200
    nonce = trusting.get("/appraisal/v1/nonce").json()
    held = b"-----BEGIN PUBLIC KEY----- workload"
    report_data = hashlib.sha512(base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"]) + held).digest()
    evidence = SimulatedEvidence(
        sim_dir, tee, **({"mrenclave": b"\x42" * 32} if tee == "sgx" else {"mrtd": b"\x42" * 48})
    )
    body = {
        "quote": base64.b64encode(evidence.quote(report_data)).decode(),
        "verifier_nonce": nonce,
        "runtime_data": base64.b64encode(held).decode(),
    }
    response = trusting.post("/appraisal/v1/attest", json=body)
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["token"], options={"verify_signature": False})
    assert claims["keybroker_simulated"] is True
    assert claims["attester_type"] == tee.upper()
    assert claims["verifier_nonce"] == nonce
    assert claims["attester_held_data"] == base64.b64encode(held).decode()
    assert claims["sgx_mrenclave" if tee == "sgx" else "tdx_mrtd"] == "42" * (32 if tee == "sgx" else 48)
    assert_problem(trusting.post("/appraisal/v1/attest", json=body), 409, "nonce_replayed")


def test_the_default_configuration_refuses_simulated_quotes(default: TestClient, sim_dir: Path) -> None:
    problem = assert_problem(_import(default, sim_dir / "coll" / "sgx"), 400, "untrusted_root")
    assert "trusted root" in problem["detail"]
    quote = SimulatedEvidence(sim_dir, "sgx").quote(bytes(64))
    response = default.post("/appraisal/v1/attest", json={"quote": base64.b64encode(quote).decode()})
    problem = assert_problem(response, 401, "attestation_failed")
    assert problem["reasons"][0]["code"] == "untrusted_root"


def test_cli_quote_options(sim_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.bin"
    result = runner.invoke(
        app,
        [
            "sim",
            "quote",
            str(sim_dir),
            "--tee",
            "sgx",
            "--mrenclave",
            "ab" * 32,
            "--isvsvn",
            "4",
            "--report-data",
            "cd" * 64,
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    verify = [
        "attestation",
        "verify",
        str(out),
        "--collateral",
        str(sim_dir / "coll"),
        "--simulated-root",
        str(sim_dir / "root-ca.pem"),
        "-o",
        "json",
    ]
    claims = json.loads(runner.invoke(app, verify).stdout)
    assert (claims["sgx_mrenclave"], claims["sgx_isvsvn"], claims["sgx_report_data"]) == ("ab" * 32, 4, "cd" * 64)
    assert claims["keybroker_simulated"] is True
    for extra, reason in ((["--debug"], "debug_enclave"), (["--wrong-key"], "quote_signature_invalid")):
        runner.invoke(app, ["sim", "quote", str(sim_dir), "--out", str(out), *extra])
        result = runner.invoke(app, verify)
        assert result.exit_code == 1
        assert json.loads(result.stdout)["reason"] == reason
    result = runner.invoke(app, ["sim", "quote", str(sim_dir), "--tee", "sgx", "--version", "4", "--out", str(out)])
    assert result.exit_code == 2
    result = runner.invoke(app, ["sim", "quote", str(sim_dir), "--mrenclave", "abc", "--out", str(out)])
    assert result.exit_code == 2


def test_tdx_evidence_through_configfs_tsm(tmp_path: Path) -> None:
    entry = tmp_path / "report" / "e1"
    entry.mkdir(parents=True)
    (entry / "provider").write_text("tdx_guest\n")
    (entry / "outblob").write_bytes(b"QUOTE")
    evidence = TdxEvidence(tmp_path / "report", entry_name="e1")
    assert evidence.quote(b"\x07" * 64) == b"QUOTE"
    assert (entry / "inblob").read_bytes() == b"\x07" * 64
    (entry / "provider").write_text("sev_guest\n")
    with pytest.raises(EvidenceError, match="not tdx_guest"):
        evidence.quote(b"\x07" * 64)
    with pytest.raises(EvidenceError, match="cannot create"):
        TdxEvidence(tmp_path / "absent").quote(b"\x07" * 64)
    with pytest.raises(ValueError, match="64 bytes"):
        evidence.quote(b"short")


def test_gramine_evidence(tmp_path: Path) -> None:
    (tmp_path / "quote").write_bytes(b"SGXQUOTE")
    (tmp_path / "user_report_data").write_bytes(b"")
    assert GramineSgxEvidence(tmp_path).quote(b"\x01" * 64) == b"SGXQUOTE"
    assert (tmp_path / "user_report_data").read_bytes() == b"\x01" * 64
    with pytest.raises(EvidenceError, match="outside an enclave"):
        GramineSgxEvidence(tmp_path / "none").quote(b"\x01" * 64)


def test_evidence_specs(sim_dir: Path) -> None:
    assert from_spec(f"sim:{sim_dir}:tdx").tee_type == "TDX"
    assert from_spec("tdx").tee_type == "TDX"
    assert from_spec("sgx-gramine").tee_type == "SGX"
    with pytest.raises(ValueError, match="unknown evidence"):
        from_spec("sev")
    # Measurements of a simulated workload: they end up in the quote.
    quote = from_spec(f"sim:{sim_dir}:sgx:mrenclave={'ab' * 32},isvsvn=7").quote(bytes(64))
    assert bytes.fromhex("ab" * 32) in quote
    assert from_spec(f"sim:{sim_dir}:mrenclave={'cd' * 32}").tee_type == "SGX"  # the TEE may be left out
    for bad, message in (
        (f"sim:{sim_dir}:sgx:mrenclave=zz", "must be hex"),
        (f"sim:{sim_dir}:sgx:isvsvn=-1", "decimal integer"),
        (f"sim:{sim_dir}:sgx:colour=red", "unknown evidence field"),
        (f"sim:{sim_dir}:sgx:mrenclave", "NAME=VALUE"),
        (f"sim:{sim_dir}:sgx:mrtd={'cd' * 48}", "not a measurement of SGX"),
    ):
        with pytest.raises(ValueError, match=message):
            from_spec(bad)
