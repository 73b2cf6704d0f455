"""The workload client refuses wrong arguments where they are given, each with its reason, as a local error
(``ConfigurationError``, a ``ValueError``), never as a ``TransportError``: SimulatedEvidence (the TEE, every
measurement, version, the directory and its files), the hardware providers, Client and fetch_key.

Measurements and report data are accepted as hex strings or bytes alike (issue #15: ``mrenclave="ab" * 32``, as the
README writes it, used to reach the server and come back as ``TransportError: unexpected answer ...: TypeError``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from keybroker.sim.pki import PlatformSpec, add_platform, init_pki
from keybroker_client import Client, ConfigurationError, Retry, TransportError
from keybroker_client.evidence import GramineSgxEvidence, SimulatedEvidence, TdxEvidence, from_spec
from keybroker_client.sim_quotes import SgxMeasurements, TdxMeasurements
from tests.conftest import NOW

SGX_BODY = 48  # the report body follows the 48-byte quote header
HEX = "ab" * 32


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("client-args") / "sim"
    pki = init_pki(directory, NOW - timedelta(days=1))
    add_platform(pki, PlatformSpec(), NOW - timedelta(days=1))
    return directory


def _refused(make: Callable[[], object], reason: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        make()
    assert reason in str(caught.value), str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert not isinstance(caught.value, TransportError)
    return caught.value


# --- accepted: hex strings and bytes alike -----------------------------------------------------------------------


def test_hex_strings_and_bytes_make_the_same_quote(sim: Path) -> None:
    given = {
        "hex": SimulatedEvidence(sim, "sgx", mrenclave=HEX, mrsigner="CD" * 32, config_id="01" * 64),
        "bytes": SimulatedEvidence(
            sim, "sgx", mrenclave=bytes.fromhex(HEX), mrsigner=b"\xcd" * 32, config_id=b"\1" * 64
        ),
        "bytearray": SimulatedEvidence(
            sim, "sgx", mrenclave=bytearray.fromhex(HEX), mrsigner=memoryview(b"\xcd" * 32), config_id=b"\1" * 64
        ),
    }
    quotes = {name: evidence.quote(bytes(64)) for name, evidence in given.items()}
    signed = {quote[: SGX_BODY + 384] for quote in quotes.values()}  # header and report body; signatures differ
    assert len(signed) == 1
    assert quotes["hex"][SGX_BODY + 64 : SGX_BODY + 96] == bytes.fromhex(HEX)
    assert quotes["hex"][SGX_BODY + 128 : SGX_BODY + 160] == b"\xcd" * 32


def test_tdx_measurements_and_report_data_as_hex(sim: Path) -> None:
    rtmrs = ["11" * 48, b"\x22" * 48, "33" * 48, "44" * 48]
    quote = SimulatedEvidence(sim, "tdx", mrtd="6b" * 48, rtmrs=rtmrs, version=5, td_report_15=True).quote("ee" * 64)
    body = quote[SGX_BODY + 6 :]  # a v5 quote: body type and size first
    assert body[136:184] == b"\x6b" * 48
    assert body[328 + 48 : 376 + 48] == b"\x22" * 48
    assert body[520:584] == b"\xee" * 64
    assert SgxMeasurements(mrenclave=HEX).mrenclave == bytes.fromhex(HEX)  # type: ignore[arg-type]  # hex, as checked at run time
    assert TdxMeasurements(mrtd="00" * 48).mrtd == bytes(48)  # type: ignore[arg-type]  # as above


def test_the_spec_form_takes_rtmrs(sim: Path) -> None:
    evidence = from_spec(f"sim:{sim}:tdx:mrtd={'6b' * 48},rtmr2={'99' * 48}")
    body = evidence.quote(bytes(64))[SGX_BODY:]
    assert body[328 + 96 : 376 + 96] == b"\x99" * 48
    assert body[328:376] == bytes(48)


# --- refused at construction, each with its reason ---------------------------------------------------------------

WRONG_SIMULATED: dict[str, tuple[dict[str, Any], str]] = {
    "tee unknown": ({"tee": "sev"}, "tee is 'sgx' or 'tdx', not 'sev'"),
    "tee not a string": ({"tee": 1}, "tee is 'sgx' or 'tdx'"),
    "mrenclave not hex": ({"mrenclave": "zz" * 32}, "mrenclave is not hexadecimal: give 64 hex digits or 32 bytes"),
    "mrenclave odd hex": ({"mrenclave": "abc"}, "mrenclave is not hexadecimal"),
    "mrenclave short hex": ({"mrenclave": "ab" * 31}, "mrenclave must be 32 bytes (64 hex digits), not 31"),
    "mrenclave long bytes": ({"mrenclave": b"\1" * 33}, "mrenclave must be 32 bytes (64 hex digits), not 33"),
    "mrenclave an int": ({"mrenclave": 5}, "mrenclave is a int: give 64 hex digits or 32 bytes"),
    "mrsigner short": ({"mrsigner": "ab"}, "mrsigner must be 32 bytes"),
    "config_id short": ({"config_id": "ab" * 32}, "config_id must be 64 bytes"),
    "attributes short": ({"attributes": "07"}, "attributes must be 16 bytes"),
    "isvsvn negative": ({"isvsvn": -1}, "isvsvn is an integer from 0 to 65535, not -1"),
    "isvprodid too big": ({"isvprodid": 65536}, "isvprodid is an integer from 0 to 65535"),
    "config_svn a string": ({"config_svn": "2"}, "config_svn is an integer from 0 to 65535, not '2'"),
    "isvsvn a bool": ({"isvsvn": True}, "isvsvn is an integer"),
    "debug not a bool": ({"debug": "yes"}, "debug is True or False"),
    "a TDX measurement for SGX": ({"mrtd": "00" * 48}, "mrtd: not a measurement of SGX (those are attributes"),
    "a misspelt name": ({"mr_enclave": HEX}, "mr_enclave: not a measurement of SGX"),
    "an SGX measurement for TDX": ({"tee": "tdx", "mrenclave": HEX}, "mrenclave: not a measurement of TDX"),
    "mrtd short": ({"tee": "tdx", "mrtd": HEX}, "mrtd must be 48 bytes (96 hex digits), not 32"),
    "mrowner not hex": ({"tee": "tdx", "mrowner": "x" * 96}, "mrowner is not hexadecimal"),
    "xfam long": ({"tee": "tdx", "xfam": "00" * 9}, "xfam must be 8 bytes"),
    "rtmrs three": ({"tee": "tdx", "rtmrs": ["00" * 48] * 3}, "rtmrs is 4 values (RTMR0 to RTMR3)"),
    "rtmrs a string": ({"tee": "tdx", "rtmrs": "00" * 192}, "rtmrs is 4 values"),
    "an rtmr short": ({"tee": "tdx", "rtmrs": ["00" * 48, "00", "00" * 48, "00" * 48]}, "rtmrs[1] must be 48 bytes"),
    "SGX version 4": ({"version": 4}, "version: SGX quotes are version 3, not 4"),
    "TDX version 3": ({"tee": "tdx", "version": 3}, "version: TDX quotes are version 4 or 5, not 3"),
    "td_report_15 on v4": ({"tee": "tdx", "td_report_15": True}, "td_report_15 is for TDX quotes of version 5"),
    "td_report_15 on SGX": ({"td_report_15": True}, "td_report_15 is for TDX quotes of version 5"),
    "platform a path": ({"platform": "../default"}, "platform '../default' is not a platform name"),
    "platform absent": ({"platform": "tdx-host"}, "no simulated platform 'tdx-host' in"),
}


@pytest.mark.parametrize("case", list(WRONG_SIMULATED))
def test_wrong_simulated_evidence_is_refused_at_construction(sim: Path, case: str) -> None:
    arguments, reason = WRONG_SIMULATED[case]
    arguments = dict(arguments)
    tee = arguments.pop("tee", "sgx")
    _refused(lambda: SimulatedEvidence(sim, tee, **arguments), reason)


def test_an_absent_platform_names_those_there_are(sim: Path) -> None:
    error = _refused(lambda: SimulatedEvidence(sim, "sgx", platform="other"), "it has: default")
    assert f"keybroker sim init {sim} --platform other" in str(error)


def _copy(sim: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "sim"
    shutil.copytree(sim, copy)
    return copy


def _remove(path: Path) -> None:
    path.unlink()


def _garble(path: Path) -> None:
    path.write_text("not a key")


def _platform_json(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        info = json.loads(path.read_text())
        change(info)
        path.write_text(json.dumps(info))

    return edit


WRONG_DIRECTORY: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "no root": ("root-ca.pem", _remove, "is not a simulated TEE: it has no root-ca.pem"),
    "no PCK key": ("platforms/default/pck.key", _remove, "pck.key: No such file or directory"),
    "a garbled PCK key": ("platforms/default/pck.key", _garble, "pck.key is not an unencrypted PEM private key"),
    "a garbled attestation key": ("platforms/default/ak.key", _garble, "ak.key is not an unencrypted PEM private key"),
    "no PCK certificate": ("platforms/default/pck.pem", _remove, "pck.pem: No such file or directory"),
    "a PCK certificate that is not one": ("platforms/default/pck.pem", _garble, "pck.pem holds no PEM certificate"),
    "no PCK CA": ("pki/platform.pem", _remove, "platform.pem: No such file or directory"),
    "platform.json not JSON": ("platforms/default/platform.json", _garble, "is not a simulated platform's description"),
    "platform.json without cpusvn": (
        "platforms/default/platform.json",
        _platform_json(lambda info: info.pop("cpusvn")),
        "has no 'cpusvn'",
    ),
    "platform.json with a short cpusvn": (
        "platforms/default/platform.json",
        _platform_json(lambda info: info.update(cpusvn="0a")),
        "cpusvn must be 16 bytes",
    ),
    "platform.json with a path for its CA": (
        "platforms/default/platform.json",
        _platform_json(lambda info: info.update(ca="../../etc")),
        "ca '../../etc' is not a CA name",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_DIRECTORY))
def test_a_broken_simulated_tee_directory_is_refused_at_construction(sim: Path, tmp_path: Path, case: str) -> None:
    name, damage, reason = WRONG_DIRECTORY[case]
    copy = _copy(sim, tmp_path)
    damage(copy / name)
    _refused(lambda: SimulatedEvidence(copy, "sgx", mrenclave=HEX), reason)


def test_a_missing_directory_says_how_to_make_one(tmp_path: Path) -> None:
    error = _refused(lambda: SimulatedEvidence(tmp_path / "absent", "sgx"), "no such directory")
    assert f"keybroker sim init {tmp_path / 'absent'}" in str(error)
    _refused(lambda: SimulatedEvidence(3, "sgx"), "directory is a path, not 3")  # type: ignore[arg-type]  # the wrong type is the test
    _refused(lambda: SimulatedEvidence("", "sgx"), "directory is a path")
    _refused(lambda: from_spec("sim:"), "sim: needs the simulated TEE's directory")


@pytest.mark.parametrize(
    ("report_data", "reason"),
    [
        (bytes(63), "report data must be 64 bytes (128 hex digits), not 63"),
        ("00" * 65, "report data must be 64 bytes (128 hex digits), not 65"),
        ("zz" * 64, "report data is not hexadecimal"),
        (None, "report data is a NoneType"),
    ],
)
def test_wrong_report_data_is_refused_by_every_provider(
    sim: Path, tmp_path: Path, report_data: object, reason: str
) -> None:
    for evidence in (SimulatedEvidence(sim, "sgx"), TdxEvidence(tmp_path / "tsm"), GramineSgxEvidence(tmp_path)):
        _refused(lambda evidence=evidence: evidence.quote(report_data), reason)  # type: ignore[misc]  # a loop variable bound as a default
    assert not (tmp_path / "tsm").exists()  # refused before configfs-tsm was touched
    assert not (tmp_path / "user_report_data").exists()  # nor Gramine's files


def test_wrong_hardware_provider_arguments(tmp_path: Path) -> None:
    _refused(lambda: TdxEvidence(None), "tsm_root is a path, not None")  # type: ignore[arg-type]  # wrong on purpose
    _refused(lambda: TdxEvidence(tmp_path, entry_name="../escape"), "entry_name '../escape' is not one directory name")
    _refused(lambda: GramineSgxEvidence(7), "attestation_dir is a path, not 7")  # type: ignore[arg-type]  # as above


# --- Client and fetch_key ----------------------------------------------------------------------------------------


class Recorder:
    """A transport that fails the test if anything is sent."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(500)


def test_wrong_client_arguments_are_refused_at_construction(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello")
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: Client("https://kbs:9443", ca=tmp_path / "absent.pem"), "ca: cannot read"),
        (lambda: Client("https://kbs:9443", ca=""), "ca is the CA certificate file (PEM)"),
        (lambda: Client("https://kbs:9443", ca=not_pem), f"ca: {not_pem} holds no PEM certificate"),
        (lambda: Client(["https://a:9443", "https://b:9443"], ca=not_pem), "holds no PEM certificate"),
        (lambda: Client("https://kbs:9443", ca=not_pem, ca_fingerprint="ab" * 48), "not both"),
        (
            lambda: Client("http://kbs:9080", ca=not_pem),
            "http://kbs:9080 is plain HTTP: the CA given would not be used",
        ),
        (lambda: Client("http://kbs:9080", ca_fingerprint="ab" * 48), "use https://"),
        (lambda: Client("https://kbs:9443", ca_fingerprint="ab" * 47), "96 hexadecimal digits"),
        (lambda: Client("https://kbs:9443", token="two words"), "visible ASCII without spaces"),
        (lambda: Client("https://kbs:9443", token="line\nbreak"), "visible ASCII"),
        (lambda: Client("https://kbs:9443", timeout=0), "timeout is a number of seconds above 0"),
        (lambda: Client("https://kbs:9443", timeout="30"), "timeout is a number"),  # type: ignore[arg-type]  # wrong on purpose
        (lambda: Client("https://kbs:port"), "is not a valid URL"),
        (lambda: Client("https://:9443"), "names no host"),
        (lambda: Client("https://[::1]x:9443"), "is not a valid URL"),
        (lambda: Client("https://[::1"), "is not a valid URL"),
        (lambda: Client("https://a..b:9443"), "'a..b' is not a host name or address"),
        (lambda: Client(f"https://{'a' * 64}.example:9443"), "is not a host name or address"),
        (lambda: Client("https://[::zz]:9443"), "is not a"),
        (lambda: Client(9443), "base_url is a URL"),  # type: ignore[arg-type]  # as above
        (lambda: Client([b"https://kbs"]), "is not a URL"),  # type: ignore[list-item]  # as above
        (lambda: Client("https://kbs:9443", retry=4), "retry is a keybroker_client.Retry"),  # type: ignore[arg-type]  # as above
        (lambda: Retry(attempts=True), "attempts must be at least 1"),
        (lambda: Retry(budget_seconds=float("nan")), "backoff and budget must be positive"),
    ]
    for make, reason in cases:
        _refused(make, reason)


def test_a_secret_token_is_not_echoed_when_refused() -> None:
    error = _refused(lambda: Client("https://kbs:9443", token="s3cret value"), "token")
    assert "s3cret" not in str(error)


class Provider:
    tee_type = "SGX"

    def quote(self, report_data: bytes) -> bytes:
        return b"quote"


class NoTee:
    tee_type = "SEV"

    def quote(self, report_data: bytes) -> bytes:
        return b"quote"


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"key_id": ""}, "key_id is the key's id"),
        ({"key_id": 7}, "key_id is the key's id"),
        ({"mode": "passprot"}, "mode is 'background' or 'passport', not 'passprot'"),
        ({"key_bits": 2048}, "key_bits is 3072 or 4096"),
        ({"evidence": NoTee()}, "evidence is an EvidenceProvider"),
        ({"evidence": "sim:sim"}, "evidence is an EvidenceProvider"),
    ],
)
def test_wrong_fetch_key_arguments_are_refused_before_anything_is_sent(arguments: dict[str, Any], reason: str) -> None:
    recorder = Recorder()
    call: dict[str, Any] = {"key_id": "k", "evidence": Provider(), **arguments}
    with Client("https://kbs:9443", transport=httpx.MockTransport(recorder.handle)) as client:
        _refused(lambda: client.fetch_key(**call), reason)
    assert recorder.requests == []
