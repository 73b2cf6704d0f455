"""The attestation service as users run it: the offline CLI, collateral import/export over the API, keybroker as
a PCCS for Intel's libraries (dcap-qvl's own collateral fetcher), an upstream with background refresh, and the
attestation role alone."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import dcap_qvl
import httpx
import pytest
from typer.testing import CliRunner

from keybroker.attestation.pcs import PcsClient, refresh_due
from keybroker.attestation.store import CollateralStore
from keybroker.attestation.verifier import QuoteVerifier, TrustAnchors, intel_root_der
from keybroker.cli.main import app
from keybroker.clock import FixedClock
from keybroker.errors import AttestationFailed
from keybroker.storage.db import Database
from tests.attestation.conftest import POSITIVE, REAL, RealQuote, real_quotes
from tests.integration.conftest import Server, start_server, stop

runner = CliRunner()


@pytest.mark.parametrize("real", real_quotes(), ids=lambda q: q.name)
def test_cli_verify_offline(real: RealQuote) -> None:
    result = runner.invoke(
        app,
        [
            "attestation",
            "verify",
            str(real.folder / "quote.bin"),
            "--collateral",
            str(REAL),
            "--at",
            real.expected["now_iso"],
            "--output",
            "json",
        ],
    )
    out = json.loads(result.stdout)
    if not real.positive:
        assert result.exit_code == 1
        assert out == {
            "verified": False,
            "reason": "debug_enclave",
            "detail": "the quote did not verify: Debug mode is enabled",
        }
        return
    assert result.exit_code == 0, result.output
    assert out["verified"] is True
    assert out["attester_tcb_status"] == real.expected["expected"]["status"]
    assert out["attester_advisory_ids"] == real.expected["expected"]["advisory_ids"]
    key = "sgx_mrenclave" if real.expected["tee"] == "SGX" else "tdx_mrtd"
    assert out[key] == real.expected["measurements"]["mr_enclave" if real.expected["tee"] == "SGX" else "mr_td"]


def test_cli_verify_refuses_expired_collateral() -> None:
    real = POSITIVE[0]
    result = runner.invoke(
        app,
        ["attestation", "verify", str(real.folder / "quote.bin"), "--collateral", str(real.folder), "--output", "json"],
    )  # now: long after the collateral expired
    assert result.exit_code == 1
    assert json.loads(result.stdout)["reason"] in ("collateral_expired", "crl_expired")


@pytest.fixture
def plain_server(tmp_path: Path) -> Server:
    return start_server(tmp_path / ".data", KEYBROKER_TLS__ENABLED="false")


def _cli(server: Server, *args: str) -> str:
    result = runner.invoke(app, [*args, "--addr", server.url, "--token", server.token])
    assert result.exit_code == 0, result.output
    return result.stdout + result.stderr


def test_import_status_export_and_pccs_for_intel_libraries(plain_server: Server, tmp_path: Path) -> None:
    try:
        assert "4 new of 4 items" in _cli(plain_server, "collateral", "import", str(REAL / "sgx-v3-phala-00a067110000"))
        out = _cli(plain_server, "collateral", "import", str(REAL))
        assert "0 new of 4 items" in out  # the SGX bundle again
        status = json.loads(
            runner.invoke(
                app, ["collateral", "status", "--addr", plain_server.url, "--token", plain_server.token, "-o", "json"]
            ).stdout
        )
        assert len(status) == 11  # 4 bundles, 16 items, 5 of them the same version twice
        assert {s["state"] for s in status} == {"expired"}  # real collateral from 2025, checked in 2026
        _cli(plain_server, "collateral", "export", str(tmp_path / "export"))
        exported = sorted(p.name for p in (tmp_path / "export").iterdir())
        assert "tdx-b0c06f000000-platform" in exported
        # The exported bundles are good offline collateral again.
        real = next(q for q in POSITIVE if q.name.startswith("tdx-v4-phala"))
        result = runner.invoke(
            app,
            [
                "attestation",
                "verify",
                str(real.folder / "quote.bin"),
                "--collateral",
                str(tmp_path / "export"),
                "--at",
                real.expected["now_iso"],
            ],
        )
        assert result.exit_code == 0, result.output
        # dcap-qvl's own PCCS client fetches everything it needs from keybroker and verifies with it.
        for real in (q for q in POSITIVE if not q.name.startswith("tdx-v4-zkdcap")):

            async def fetch(quote: bytes = real.quote) -> object:
                return await dcap_qvl.get_collateral(plain_server.url, quote)

            collateral = asyncio.run(fetch())
            report = dcap_qvl.verify(real.quote, collateral, real.expected["now"])
            assert report.status == real.expected["expected"]["status"]
    finally:
        stop(plain_server.process)


def test_upstream_fetch_cache_and_refresh(plain_server: Server, tmp_path: Path) -> None:
    """A keybroker with an upstream (here another keybroker as PCCS) fetches on a miss, then verifies from its
    cache with the upstream gone; the refresher asks again for items about to expire."""
    _cli(plain_server, "collateral", "import", str(REAL))
    real = next(q for q in POSITIVE if q.name.startswith("tdx-v4-phala"))
    database = Database.from_url(f"sqlite:///{tmp_path / 'b.db'}")
    database.migrate()
    clock = FixedClock(real.now)
    store = CollateralStore(database, clock)
    anchors = TrustAnchors(intel_root_der())
    upstream = PcsClient(plain_server.url, anchors.roots(), store, timeout=5.0)
    verifier = QuoteVerifier(store, anchors, upstream.fetch_missing)
    try:
        assert verifier.verify(real.quote, real.now).tcb_status == "UpToDate"
        assert len(store.status()) == 4
        clock.set(real.now + timedelta(days=25))  # within a day of the earliest nextUpdate
        fetched = refresh_due(upstream, store, clock.now(), timedelta(days=2))
        assert sorted(fetched) == sorted(s.key for s in store.status() if s.key != "rootcacrl")
        metrics = httpx.get(f"{plain_server.url}/metrics").text
        assert 'route="/tdx/certification/v4/tcb",status="200"} 2.0' in metrics
    finally:
        stop(plain_server.process)
    # Upstream gone: cached collateral still verifies (no network I/O on the way).
    assert verifier.verify(real.quote, real.now).tcb_status == "UpToDate"
    other = next(q for q in POSITIVE if q.expected["tee"] == "SGX")
    with pytest.raises(Exception, match="did not provide"):
        verifier.verify(other.quote, other.now)
    upstream.close()
    database.close()
    _ = AttestationFailed


def test_attestation_role_alone(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.integration.conftest import clean_env, free_port, wait_until_serving

    server = start_server(tmp_path / "kbs" / ".data", KEYBROKER_TLS__ENABLED="false")
    stop(server.process)
    port = free_port()
    log = tmp_path / "attestation.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keybroker",
                "serve",
                "--data-dir",
                str(server.data_dir),
                "--listen",
                f"127.0.0.1:{port}",
                "--role",
                "attestation",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(KEYBROKER_TLS__ENABLED="false"),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        assert httpx.get(f"{url}/appraisal/v1/nonce").status_code == 200
        assert httpx.get(f"{url}/certs").status_code == 200
        headers = {"Authorization": f"Bearer {server.token}"}
        assert httpx.get(f"{url}/kbs/v1/keys", headers=headers).status_code == 404
    finally:
        stop(process)
