"""deploy/: the examples an operator copies to real hosts load through keybroker's own settings loader, and the
commands the systemd unit and the container image run are real commands of the CLI with real options."""

from __future__ import annotations

import configparser
import datetime
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keybroker.cli.main import app
from keybroker.config import EmbeddedBackendSettings, LocalWrapperSettings, load_settings
from keybroker.errors import ConfigurationError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "systemd" / "keybroker.service"
CREDENTIALS = "/run/credentials/keybroker.service/"


@pytest.fixture(autouse=True)
def _no_keybroker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.upper().startswith("KEYBROKER_")]:
        monkeypatch.delenv(name)


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    # systemd allows a key several times (LoadCredential=); the last one is enough to read single-valued keys here.
    parser.read_string(UNIT.read_text())
    return parser


def _unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def _check_cli(argv: list[str]) -> Any:
    """Parse argv as the CLI would, without running it: an unknown command or option raises a UsageError."""
    # (typer 0.29 carries its own copy of click: its classes, not the click package's.)
    command = typer.main.get_command(app)
    args = list(argv)
    while isinstance(command, typer.core.TyperGroup):
        name = args.pop(0)
        sub = command.get_command(typer.Context(command), name)
        assert sub is not None, f"{name!r} is not a keybroker command"
        command = sub
    return command.make_context(command.name or "", args)


@pytest.mark.parametrize("name", ["keybroker.toml", "keybroker-openbao.toml"])
def test_example_configurations_load(name: str, tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, config_file=DEPLOY / name)
    assert settings.database.url is not None  # (database_url would read the password: not on this host)
    assert settings.database.url.startswith(
        "postgresql+psycopg://keybroker@db.example.internal/keybroker?sslmode=verify-full"
    )
    assert settings.database.password is not None
    assert settings.database.password.file is not None
    assert str(settings.database.password.file).startswith(CREDENTIALS)
    assert settings.server.public_url == "https://kbs.example.internal"
    assert settings.limits.trusted_proxies
    embedded = settings.backends["embedded"]
    assert isinstance(embedded, EmbeddedBackendSettings)
    if name == "keybroker.toml":
        assert isinstance(embedded.wrapper, LocalWrapperSettings)
        assert str(embedded.wrapper.master_key_file) == CREDENTIALS + "kek"
    else:
        assert settings.keys.default_backend == "vault"
        assert embedded.wrapper.type == "vault-transit"


@pytest.mark.parametrize(
    ("name", "line", "misspelt"),
    [
        ("keybroker.toml", "statement_timeout_seconds = 8", "statement_timeout_second = 8"),
        ("keybroker-openbao.toml", "failover_seconds = 10", "failover_secs = 10"),
    ],
)
def test_a_misspelt_key_in_an_example_is_refused(name: str, line: str, misspelt: str, tmp_path: Path) -> None:
    text = (DEPLOY / name).read_text()
    assert line in text
    broken = tmp_path / name
    broken.write_text(text.replace(line, misspelt))
    with pytest.raises(ConfigurationError, match=misspelt.split(maxsplit=1)[0]):
        load_settings(data_dir=tmp_path, config_file=broken)


def test_every_credential_the_configurations_read_is_loaded_by_the_unit() -> None:
    loaded = {value.split(":", 1)[0] for value in _unit_values("LoadCredential")}
    commented = {
        line.split("=", 1)[1].split(":", 1)[0]
        for line in UNIT.read_text().splitlines()
        if line.startswith("#LoadCredential=")
    }
    assert loaded == {"kek", "db-password"}
    for name, available in (("keybroker.toml", loaded), ("keybroker-openbao.toml", loaded | commented)):
        wanted = set(re.findall(re.escape(CREDENTIALS) + r"([\w.-]+)", (DEPLOY / name).read_text()))
        assert wanted, name
        assert wanted <= available, (name, wanted - available)


def test_the_unit_runs_real_commands_with_hardening() -> None:
    unit = _unit()
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/keybroker/bin/keybroker"
    context = _check_cli(argv[1:])
    assert context.info_name == "serve"
    assert context.params["config"] == Path("/etc/keybroker/keybroker.toml")
    assert context.params["data_dir"] == Path(service["StateDirectory"].join(["/var/lib/", ""]))
    assert service["User"] == "keybroker"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "LimitCORE": "0",
    }.items():
        assert service[key] == value, key
    secret = re.compile(r"PASSWORD|MASTER_KEY|SECRET|TOKEN|PIN", re.IGNORECASE)
    assert not any(secret.search(value) for value in _unit_values("Environment"))  # credentials only


def test_a_wrong_option_would_be_caught() -> None:
    with pytest.raises(Exception, match="No such option: --data-directory") as raised:
        _check_cli(["serve", "--data-directory", "/var/lib/keybroker"])
    assert type(raised.value).__name__ == "NoSuchOption"
    with pytest.raises(AssertionError):
        _check_cli(["serv"])


def test_the_container_image_runs_real_commands() -> None:
    text = DEPLOY.joinpath("Containerfile").read_text()
    instructions = dict(re.findall(r"^(ENTRYPOINT|CMD) (\[.*\])$", text, re.MULTILINE))
    argv = json.loads(instructions["ENTRYPOINT"]) + json.loads(instructions["CMD"])
    assert argv[0] == "keybroker"
    context = _check_cli(argv[1:])
    assert context.info_name == "serve"
    assert context.params["data_dir"] == Path("/var/lib/keybroker")
    assert re.search(r"^USER keybroker$", text, re.MULTILINE)
    healthcheck = re.search(r'"python", "-c", "(.*)"\]$', text, re.MULTILINE)
    assert healthcheck is not None
    compile(healthcheck.group(1), "HEALTHCHECK", "exec")
    for path in re.findall(r"^COPY (.*) /src/", text, re.MULTILINE):
        for item in path.split():
            assert (DEPLOY.parent / item).exists(), item


@pytest.mark.integration
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    keybroker = Path(sys.executable).with_name("keybroker")
    assert keybroker.exists()
    unit = tmp_path / "keybroker.service"
    unit.write_text(UNIT.read_text().replace("/opt/keybroker/bin/keybroker", str(keybroker)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result
    assert not (result.stderr + result.stdout).strip(), result  # unknown keys are only warnings: none either


def _self_signed(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kbs.example.internal")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "kbs.pem").write_bytes(pem)
    (directory / "ca.pem").write_bytes(pem)
    (directory / "kbs.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.mark.integration
def test_the_load_balancer_configuration_passes_nginx_t(tmp_path: Path) -> None:
    _self_signed(tmp_path)
    text = (DEPLOY / "nginx" / "keybroker-lb.conf").read_text()
    local, replicas = re.subn(r"server 10\.0\.1\.1\d:9443", "server 127.0.0.1:9443", text)
    local, files = re.subn(r"/etc/nginx/keybroker/", f"{tmp_path}/", local)
    local, listens = re.subn(r"listen 443 ssl;", "listen 127.0.0.1:8443 ssl;", local)
    assert (replicas, files, listens) == (3, 3, 1)  # the example changed: update the substitutions
    (tmp_path / "keybroker-lb.conf").write_text(local)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {tmp_path}/keybroker-lb.conf;\n}}\n"
    )
    result = subprocess.run(
        ["nginx", "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr, result.stderr
