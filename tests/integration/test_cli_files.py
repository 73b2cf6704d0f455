"""Every file and directory argument of the CLI, given as a user gets them wrong: missing, a directory where a file
is expected (or a file where a directory is), not UTF-8 (the tests run as root, where chmod 000 does not bite), or
invalid content. Each is run as a user runs it (``.venv/bin/keybroker``, ``COLUMNS=60``, stderr a pipe) and must
give one line that names the file and says what is wrong, exit 1 or 2, and no traceback.

The server-side commands read and check their files before they connect: most cases run against an address where
nothing listens (the file's error must come first); the contents only the server can judge run against a real one.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import Server, clean_env, start_server, stop
from tests.peers.process import free_port

KEYBROKER = str(REPO / ".venv" / "bin" / "keybroker")
BUNDLE_FILES = (
    "tcb_info.json",
    "qe_identity.json",
    "pck_crl.der",
    "root_ca_crl.der",
    "tcb_info_issuer_chain.pem",
    "qe_identity_issuer_chain.pem",
    "pck_crl_issuer_chain.pem",
)


@dataclass(frozen=True)
class Files:
    base: Path
    missing: Path  # does not exist
    directory: Path  # an (empty) directory
    binary: Path  # not UTF-8
    garbage: Path  # UTF-8 text that is neither JSON, PEM, TOML nor a quote
    bad_json: Path
    bad_toml: Path
    plain: Path  # a file where a directory is expected
    no_parent: Path  # in a directory that does not exist
    under_file: Path  # "a-file/x": a file where a directory of the path should be
    bad_bundle: Path  # a bundle folder whose files are garbage
    bundles: Path  # a folder with a good bundle and a bad one
    sim: Path  # a simulated TEE (keybroker sim init)
    collateral: Path  # its collateral bundles (keybroker sim collateral)
    quote: Path  # one of its quotes
    data: Path  # an initialised data directory (keybroker init)


def keybroker(*args: str, env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([KEYBROKER, *args], input=stdin, capture_output=True, env=env, timeout=120, check=False)
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    base = tmp_path_factory.mktemp("cli-files")
    directory = base / "a-directory"
    directory.mkdir()
    (base / "binary.json").write_bytes(b"\xff\xfe\x00\x81 not text")
    (base / "garbage.txt").write_text("neither JSON, PEM, TOML nor a quote\n")
    (base / "bad.json").write_text("{not json")
    (base / "bad.toml").write_text("x = [\n")
    (base / "a-file").write_text("x")
    bad_bundle = base / "bad-bundle"
    bad_bundle.mkdir()
    for name in BUNDLE_FILES:
        (bad_bundle / name).write_text("garbage")
    env = clean_env(COLUMNS="60")
    sim, collateral, quote, data = base / "sim", base / "collateral", base / "quote.bin", base / "data"
    for args in (
        ["sim", "init", str(sim)],
        ["sim", "collateral", str(sim), "--out", str(collateral)],
        ["sim", "quote", str(sim), "--out", str(quote)],
        ["init", "--data-dir", str(data)],
    ):
        done = keybroker(*args, env=env)
        assert done.returncode == 0, done.stderr
    bundles = base / "bundles"
    shutil.copytree(collateral / "sgx", bundles / "a-good")
    shutil.copytree(bad_bundle, bundles / "b-bad")
    return Files(
        base=base,
        missing=base / "missing.json",
        directory=directory,
        binary=base / "binary.json",
        garbage=base / "garbage.txt",
        bad_json=base / "bad.json",
        bad_toml=base / "bad.toml",
        plain=base / "a-file",
        no_parent=base / "no-such-dir" / "out.pem",
        under_file=base / "a-file" / "out",
        bad_bundle=bad_bundle,
        bundles=bundles,
        sim=sim,
        collateral=collateral,
        quote=quote,
        data=data,
    )


@pytest.fixture(scope="module")
def nowhere() -> dict[str, str]:
    """The environment of a user whose server is down: the file's error must come before any connection."""
    return clean_env(
        COLUMNS="60",
        KEYBROKER_ADDR=f"https://127.0.0.1:{free_port()}",
        KEYBROKER_TOKEN="kb_unused",
        KEYBROKER_DATA_DIR="/nonexistent-data-dir",  # (a variable, not --data-dir: never read by these)
    )


POLICY = "00000000-0000-4000-8000-000000000000"
Case = tuple[Callable[[Files], list[str]], int, Callable[[Files], str]]

# (arguments, exit status, what the error line must say)
CASES: dict[str, Case] = {
    # --- transfer policies (JSON; '-' is stdin: see the test below)
    "policy create: missing": (
        lambda f: ["policy", "create", str(f.missing)],
        1,
        lambda f: f"cannot read {f.missing}: No such file or directory",
    ),
    "policy create: a directory": (
        lambda f: ["policy", "create", str(f.directory)],
        1,
        lambda f: f"cannot read {f.directory}: it is a directory, not a file",
    ),
    "policy create: not UTF-8": (
        lambda f: ["policy", "create", str(f.binary)],
        1,
        lambda f: f"cannot read {f.binary}: it is not UTF-8 JSON",
    ),
    "policy create: not JSON": (
        lambda f: ["policy", "create", str(f.bad_json)],
        2,
        lambda f: f"{f.bad_json} is not valid JSON",
    ),
    "policy update: missing": (
        lambda f: ["policy", "update", POLICY, str(f.missing)],
        1,
        lambda f: f"cannot read {f.missing}: No such file or directory",
    ),
    "policy update: not UTF-8": (
        lambda f: ["policy", "update", POLICY, str(f.binary)],
        1,
        lambda f: f"cannot read {f.binary}: it is not UTF-8 JSON",
    ),
    # --- key import
    "key import: missing": (
        lambda f: ["key", "import", "-a", "AES", "-l", "256", "-p", POLICY, "--file", str(f.missing)],
        1,
        lambda f: f"cannot read {f.missing}: No such file or directory",
    ),
    "key import: a directory": (
        lambda f: ["key", "import", "-a", "AES", "-l", "256", "-p", POLICY, "--file", str(f.directory)],
        1,
        lambda f: f"cannot read {f.directory}: it is a directory, not a file",
    ),
    "key import: PEM that is not text": (
        lambda f: ["key", "import", "-a", "RSA", "-l", "3072", "-p", POLICY, "--file", str(f.binary)],
        2,
        lambda f: "the key file is not pem text",
    ),
    # --- certificates written with --out: checked before the certificate is issued
    "key certify --out: a directory": (
        lambda f: ["key", "certify", POLICY, "--subject", "CN=x", "--out", str(f.directory)],
        1,
        lambda f: f"cannot write {f.directory}: it is a directory; give a file name",
    ),
    "key certify --out: no such directory": (
        lambda f: ["key", "certify", POLICY, "--subject", "CN=x", "--out", str(f.no_parent)],
        1,
        lambda f: f"cannot write {f.no_parent}: the directory {f.no_parent.parent} does not exist",
    ),
    "key certificate --out: under a file": (
        lambda f: ["key", "certificate", POLICY, "--out", str(f.under_file)],
        1,
        lambda f: f"cannot write {f.under_file}: the directory {f.plain} is a file, not a directory",
    ),
    # --- the service CA
    "ca fingerprint --cacert: missing": (
        lambda f: ["ca", "fingerprint", "--cacert", str(f.missing)],
        1,
        lambda f: f"cannot read {f.missing}: No such file or directory",
    ),
    "ca fingerprint --cacert: a directory": (
        lambda f: ["ca", "fingerprint", "--cacert", str(f.directory)],
        1,
        lambda f: f"cannot read {f.directory}: it is a directory, not a file",
    ),
    "ca fingerprint --cacert: not a certificate": (
        lambda f: ["ca", "fingerprint", "--cacert", str(f.garbage)],
        1,
        lambda f: f"cannot read {f.garbage}: it holds no PEM certificate",
    ),
    "ca fingerprint --cacert: not UTF-8": (
        lambda f: ["ca", "fingerprint", "--cacert", str(f.binary)],
        1,
        lambda f: f"cannot read {f.binary}: it holds no PEM certificate",
    ),
    "ca fingerprint --data-dir: not initialised": (
        lambda f: ["ca", "fingerprint", "--data-dir", str(f.directory)],
        1,
        lambda f: f"cannot read {f.directory / 'ca.pem'}: No such file or directory (give the data directory",
    ),
    "ca issue: CSR missing": (
        lambda f: ["ca", "issue", str(f.missing), "--out", str(f.base / "x.pem")],
        1,
        lambda f: f"cannot read {f.missing}: No such file or directory",
    ),
    "ca issue: CSR a directory": (
        lambda f: ["ca", "issue", str(f.directory), "--out", str(f.base / "x.pem")],
        1,
        lambda f: f"cannot read {f.directory}: it is a directory, not a file",
    ),
    "ca issue: CSR not UTF-8": (
        lambda f: ["ca", "issue", str(f.binary), "--out", str(f.base / "x.pem")],
        1,
        lambda f: f"cannot read {f.binary}: it is not UTF-8 PEM",
    ),
    "ca issue --out: a directory": (
        lambda f: ["ca", "issue", str(f.garbage), "--out", str(f.directory)],
        1,
        lambda f: f"cannot write {f.directory}: it is a directory; give a file name",
    ),
    "ca issue --out: no such directory": (
        lambda f: ["ca", "issue", str(f.garbage), "--out", str(f.no_parent)],
        1,
        lambda f: f"cannot write {f.no_parent}: the directory {f.no_parent.parent} does not exist",
    ),
    # --- offline quote verification
    "attestation verify: quote missing": (
        lambda f: ["attestation", "verify", str(f.missing), "--collateral", str(f.collateral)],
        1,
        lambda f: f"cannot read {f.missing}: No such file or directory",
    ),
    "attestation verify: quote a directory": (
        lambda f: ["attestation", "verify", str(f.directory), "--collateral", str(f.collateral)],
        1,
        lambda f: f"cannot read {f.directory}: it is a directory, not a file",
    ),
    "attestation verify: quote garbage": (
        lambda f: [
            "attestation",
            "verify",
            str(f.garbage),
            "--collateral",
            str(f.collateral),
            "--simulated-root",
            str(f.sim / "root-ca.pem"),
        ],
        1,
        lambda f: "refused (",  # (a quote that does not parse is refused as any other is, with its reason)
    ),
    "attestation verify --collateral: missing": (
        lambda f: ["attestation", "verify", str(f.quote), "--collateral", str(f.missing)],
        1,
        lambda f: f"cannot read {f.missing}: no such directory",
    ),
    "attestation verify --collateral: a file": (
        lambda f: ["attestation", "verify", str(f.quote), "--collateral", str(f.plain)],
        1,
        lambda f: f"cannot read {f.plain}: it is a file, not a directory",
    ),
    "attestation verify --collateral: no bundle": (
        lambda f: ["attestation", "verify", str(f.quote), "--collateral", str(f.directory)],
        1,
        lambda f: f"{f.directory} is neither a collateral bundle nor a folder of bundles",
    ),
    "attestation verify --collateral: garbage bundle": (
        lambda f: ["attestation", "verify", str(f.quote), "--collateral", str(f.bad_bundle)],
        1,
        lambda f: f"cannot read the collateral bundle {f.bad_bundle}:",
    ),
    "attestation verify --simulated-root: missing": (
        lambda f: [
            "attestation",
            "verify",
            str(f.quote),
            "--collateral",
            str(f.collateral),
            "--simulated-root",
            str(f.missing),
        ],
        1,
        lambda f: f"cannot read {f.missing}: No such file or directory",
    ),
    "attestation verify --simulated-root: not a certificate": (
        lambda f: [
            "attestation",
            "verify",
            str(f.quote),
            "--collateral",
            str(f.collateral),
            "--simulated-root",
            str(f.binary),
        ],
        1,
        lambda f: f"cannot read {f.binary}: it holds no PEM certificate",
    ),
    "attestation policy create: missing": (
        lambda f: ["attestation", "policy", "create", "p", str(f.missing)],
        1,
        lambda f: f"cannot read {f.missing}: No such file or directory",
    ),
    "attestation policy create: not UTF-8": (
        lambda f: ["attestation", "policy", "create", "p", str(f.binary)],
        1,
        lambda f: f"cannot read {f.binary}: it is not UTF-8 Rego",
    ),
    # --- collateral bundles
    "collateral import: missing": (
        lambda f: ["collateral", "import", str(f.missing)],
        1,
        lambda f: f"cannot read {f.missing}: no such directory",
    ),
    "collateral import: a file": (
        lambda f: ["collateral", "import", str(f.plain)],
        1,
        lambda f: f"cannot read {f.plain}: it is a file, not a directory",
    ),
    "collateral import: no bundle": (
        lambda f: ["collateral", "import", str(f.directory)],
        1,
        lambda f: f"{f.directory} is neither a collateral bundle nor a folder of bundles",
    ),
    "collateral import: one bad bundle of two": (  # (read before any is sent: not 'cannot reach')
        lambda f: ["collateral", "import", str(f.bundles)],
        1,
        lambda f: f"cannot read the collateral bundle {f.bundles / 'b-bad'}:",
    ),
    "collateral export: a file": (
        lambda f: ["collateral", "export", str(f.plain)],
        1,
        lambda f: f"cannot write into {f.plain}: it is a file, not a directory",
    ),
    "collateral export: under a file": (
        lambda f: ["collateral", "export", str(f.under_file)],
        1,
        lambda f: f"cannot write into {f.under_file}: {f.plain} is a file, not a directory",
    ),
    # --- the simulated TEE
    "sim init: a file": (
        lambda f: ["sim", "init", str(f.plain)],
        1,
        lambda f: f"cannot write into {f.plain}: it is a file, not a directory",
    ),
    "sim quote: no simulator": (
        lambda f: ["sim", "quote", str(f.directory), "--out", str(f.base / "q.bin")],
        1,
        lambda f: f"{f.directory} is not a simulated TEE",
    ),
    "sim quote --out: a directory": (
        lambda f: ["sim", "quote", str(f.sim), "--out", str(f.directory)],
        1,
        lambda f: f"cannot write {f.directory}: it is a directory; give a file name",
    ),
    "sim quote --out: no such directory": (
        lambda f: ["sim", "quote", str(f.sim), "--out", str(f.no_parent)],
        1,
        lambda f: f"cannot write {f.no_parent}: the directory {f.no_parent.parent} does not exist",
    ),
    "sim collateral: simulator missing": (
        lambda f: ["sim", "collateral", str(f.missing), "--out", str(f.base / "c")],
        1,
        lambda f: f"cannot read {f.missing}: no such directory",
    ),
    "sim collateral: simulator a file": (
        lambda f: ["sim", "collateral", str(f.plain), "--out", str(f.base / "c")],
        1,
        lambda f: f"cannot read {f.plain}: it is a file, not a directory",
    ),
    "sim collateral --out: a file": (
        lambda f: ["sim", "collateral", str(f.sim), "--out", str(f.plain)],
        1,
        lambda f: f"cannot write into {f.plain}: it is a file, not a directory",
    ),
    # --- configuration files and data directories
    "config check --config: missing": (
        lambda f: ["config", "check", "--data-dir", str(f.data), "--config", str(f.missing)],
        2,
        lambda f: f"configuration file {f.missing} does not exist",
    ),
    "config check --config: a directory": (
        lambda f: ["config", "check", "--data-dir", str(f.data), "--config", str(f.directory)],
        1,
        lambda f: f"cannot use {f.directory}: it is a directory, not a file",
    ),
    "config check --config: not UTF-8": (
        lambda f: ["config", "check", "--data-dir", str(f.data), "--config", str(f.binary)],
        2,
        lambda f: f"{f.binary}: not valid TOML",
    ),
    "config check --config: not TOML": (
        lambda f: ["config", "check", "--data-dir", str(f.data), "--config", str(f.bad_toml)],
        2,
        lambda f: f"{f.bad_toml}: not valid TOML",
    ),
    "init --data-dir: a file": (
        lambda f: ["init", "--data-dir", str(f.plain)],
        1,
        lambda f: f"cannot use {f.plain}: File exists",
    ),
    "serve --data-dir: not initialised": (
        lambda f: ["serve", "--data-dir", str(f.directory), "--listen", f"127.0.0.1:{free_port()}"],
        2,
        lambda f: f"{f.directory} is not initialised; run 'keybroker init",
    ),
    "serve --config: missing": (
        lambda f: ["serve", "--data-dir", str(f.data), "--config", str(f.missing)],
        2,
        lambda f: f"configuration file {f.missing} does not exist",
    ),
    "backends check --data-dir: not initialised": (
        lambda f: ["backends", "check", "--data-dir", str(f.directory)],
        2,
        lambda f: f"{f.directory} is not initialised; run 'keybroker init",
    ),
    "backends reconcile --config: not TOML": (
        lambda f: ["backends", "reconcile", "--data-dir", str(f.data), "--config", str(f.bad_toml)],
        2,
        lambda f: f"{f.bad_toml}: not valid TOML",
    ),
    "db status --data-dir: not initialised": (
        lambda f: ["db", "status", "--data-dir", str(f.directory)],
        2,
        lambda f: f"{f.directory} is not initialised",
    ),
    "db backup --out: a directory": (
        lambda f: ["db", "backup", "--data-dir", str(f.data), "--out", str(f.directory)],
        1,
        lambda f: f"{f.directory} is a directory; give the backup file's name",
    ),
    "db backup --out: no such directory": (
        lambda f: ["db", "backup", "--data-dir", str(f.data), "--out", str(f.no_parent)],
        1,
        lambda f: f"cannot write {f.no_parent}: the directory {f.no_parent.parent} does not exist",
    ),
    "db migrate --password-file: missing": (
        lambda f: [
            "db",
            "migrate",
            "--data-dir",
            str(f.data),
            "--to",
            "postgresql://kb@127.0.0.1:1/kb",
            "--password-file",
            str(f.missing),
        ],
        2,
        lambda f: f"cannot read {f.missing}",
    ),
    "db migrate --password-file: a directory": (
        lambda f: [
            "db",
            "migrate",
            "--data-dir",
            str(f.data),
            "--to",
            "postgresql://kb@127.0.0.1:1/kb",
            "--password-file",
            str(f.directory),
        ],
        2,
        lambda f: f"cannot read {f.directory}",
    ),
    "demo --dir: a file": (
        lambda f: ["demo", "--dir", str(f.plain)],
        1,
        lambda f: f"cannot use {f.plain}",
    ),
    # --- the CA file that verifies the server (every server-side command)
    "--cacert: missing": (
        lambda f: ["key", "list", "--cacert", str(f.missing)],
        1,
        lambda f: f"cannot use the CA certificate {f.missing} (--cacert/KEYBROKER_CACERT): No such file or directory",
    ),
    "--cacert: a directory": (
        lambda f: ["key", "list", "--cacert", str(f.directory)],
        1,
        lambda f: f"cannot use the CA certificate {f.directory} (--cacert/KEYBROKER_CACERT): it is a directory",
    ),
    "--cacert: not a certificate": (
        lambda f: ["policy", "list", "--cacert", str(f.garbage)],
        1,
        lambda f: f"cannot use the CA certificate {f.garbage} (--cacert/KEYBROKER_CACERT): it holds no PEM certificate",
    ),
}


def assert_one_clear_line(result: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    """Exit ``code``; stderr has no traceback, and exactly one error line, which says ``says``."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    errors = [
        line for line in result.stderr.splitlines() if line.startswith(("Error:", "Configuration error:", "refused"))
    ]
    assert len(errors) == 1, result.stderr
    assert says in errors[0], result.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_file_argument_is_one_clear_line(name: str, files: Files, nowhere: dict[str, str]) -> None:
    args, code, says = CASES[name]
    assert_one_clear_line(keybroker(*args(files), env=nowhere), code, says(files))


def test_stdin_that_is_not_utf8(files: Files, nowhere: dict[str, str]) -> None:
    result = keybroker("policy", "create", "-", env=nowhere, stdin=b"\xff\xfe{}")
    assert_one_clear_line(result, 1, "cannot read stdin: it is not UTF-8 JSON (byte 0 is 0xff)")


def test_nothing_was_written_where_the_output_was_refused(files: Files, nowhere: dict[str, str]) -> None:
    """A refused --out leaves no file behind, and a refused input nothing in the output directory."""
    assert not files.no_parent.parent.exists()
    assert sorted(p.name for p in files.directory.iterdir()) == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, files: Files) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("cli-files-server") / ".data"
    running = start_server(data_dir, KEYBROKER_ATTESTATION__SIMULATED_ROOT=str(files.sim / "root-ca.pem"))
    try:
        yield running
    finally:
        stop(running.process)


@pytest.fixture(scope="module")
def connected(server: Server) -> dict[str, str]:
    return clean_env(
        COLUMNS="60", KEYBROKER_ADDR=server.url, KEYBROKER_TOKEN=server.token, KEYBROKER_CACERT=str(server.ca_file)
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            lambda f: ["key", "import", "-a", "RSA", "-l", "3072", "-p", "{policy}", "--file", str(f.garbage)],
            "HTTP 400)",
        ),
        (lambda f: ["ca", "issue", str(f.garbage), "--out", str(f.base / "issued.pem")], "(invalid_csr, HTTP 400)"),
        (lambda f: ["attestation", "policy", "create", "p", str(f.garbage)], "HTTP 400)"),
        (lambda f: ["policy", "create", str(f.garbage)], "is not valid JSON"),
    ],
    ids=["key import: not PEM", "ca issue: not a CSR", "attestation policy create: not Rego", "policy: not JSON"],
)
def test_content_only_the_server_can_judge(
    args: Callable[[Files], list[str]], says: str, files: Files, connected: dict[str, str]
) -> None:
    policy = keybroker("policy", "create", str(REPO / "examples" / "transfer-policy.json"), "-o", "id", env=connected)
    assert policy.returncode == 0, policy.stderr
    argv = [arg.replace("{policy}", policy.stdout.strip()) for arg in args(files)]
    result = keybroker(*argv, env=connected)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (1, 2), result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert says in errors[0], result.stderr
    assert not (files.base / "issued.pem").exists()


def test_the_files_that_are_right_work(files: Files, connected: dict[str, str]) -> None:
    """The same commands with good files succeed (what the cases above refuse is the files, nothing else)."""
    out = files.base / "out"
    for args in (
        [
            "attestation",
            "verify",
            str(files.quote),
            "--collateral",
            str(files.collateral),
            "--simulated-root",
            str(files.sim / "root-ca.pem"),
        ],
        ["collateral", "import", str(files.collateral)],
        ["collateral", "export", str(out / "exported")],
        ["ca", "fingerprint", "--data-dir", str(files.data)],
        ["sim", "quote", str(files.sim), "--out", str(out / "q.bin")],
    ):
        result = keybroker(*args, env=connected)
        assert result.returncode == 0, (args, result.stderr)
    assert (out / "q.bin").stat().st_size > 1000
    assert any((out / "exported").iterdir())
