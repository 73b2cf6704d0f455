"""``--evidence auto`` (the workload CLI's default): TDX through configfs-tsm if its report directory exists, else
SGX under Gramine if ``/dev/attestation`` exists, else a usage error (exit 2) naming both paths. The paths are
monkeypatched to directories of the test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from keybroker_client import cli, evidence
from keybroker_client.evidence import GramineSgxEvidence, NoTeeError, TdxEvidence, auto_evidence, from_spec


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    tsm, gramine = tmp_path / "config" / "tsm" / "report", tmp_path / "dev" / "attestation"
    monkeypatch.setattr(evidence, "TSM_REPORT", tsm)
    monkeypatch.setattr(evidence, "GRAMINE_ATTESTATION", gramine)
    return tsm, gramine


def test_tdx_when_configfs_tsm_is_there(paths: tuple[Path, Path]) -> None:
    tsm, gramine = paths
    tsm.mkdir(parents=True)
    gramine.mkdir(parents=True)  # TDX comes first
    chosen = from_spec("auto")
    assert isinstance(chosen, TdxEvidence)
    assert chosen.tee_type == "TDX"
    assert chosen._root == tsm


def test_gramine_sgx_when_only_dev_attestation_is_there(paths: tuple[Path, Path]) -> None:
    _, gramine = paths
    gramine.mkdir(parents=True)
    chosen = auto_evidence()
    assert isinstance(chosen, GramineSgxEvidence)
    assert chosen.tee_type == "SGX"
    assert chosen._dir == gramine


def test_neither_is_an_error_naming_both_paths(paths: tuple[Path, Path]) -> None:
    tsm, gramine = paths
    tsm.parent.mkdir(parents=True)  # configfs-tsm without its report directory is not TDX
    with pytest.raises(NoTeeError) as caught:
        from_spec("auto")
    assert str(tsm) in str(caught.value)
    assert str(gramine) in str(caught.value)


def test_the_cli_defaults_to_auto_and_exits_2_without_a_tee(
    paths: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsm, gramine = paths
    key_id = str(uuid.uuid4())
    fetch = ["fetch-key", key_id, "--kbs", "https://127.0.0.1:9", "--out", str(tmp_path / "key.bin")]
    assert cli.main(fetch) == 2
    err = capsys.readouterr().err
    assert "--evidence auto found no TEE" in err
    assert str(tsm) in err
    assert str(gramine) in err
    assert not (tmp_path / "key.bin").exists()

    keys = tmp_path / "keys.txt"
    keys.write_text(f"pkcs11:token=KMS;id={key_id};object=RSAKEY;type=private;pin-value=1234\n")
    module = tmp_path / "libfake.so"
    module.write_bytes(b"")
    provision = ["provision", "--keys", str(keys), "--pkcs11-module", str(module), "--kbs", "https://127.0.0.1:9"]
    assert cli.main(provision) == 2
    err = capsys.readouterr().err
    assert "--evidence auto found no TEE" in err
    assert str(tsm) in err
    assert str(gramine) in err
