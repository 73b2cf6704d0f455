"""``keybroker``: the admin CLI (typer + rich)."""

from __future__ import annotations

import base64
import enum
import json
import os
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from keybroker import __version__
from keybroker.cli import output
from keybroker.cli.admin import audit_app, ca_app, role_app, token_app
from keybroker.cli.attestation import attestation_app, collateral_app
from keybroker.cli.common import ConfigFile, DataDir, OutputOpt, PlainWhenPiped, handled, remote, segment
from keybroker.cli.demo import demo
from keybroker.cli.demo_nginx import demo_nginx
from keybroker.cli.http import AdminApi
from keybroker.cli.output import Output
from keybroker.cli.sim import sim_app
from keybroker.config import Settings, load_settings

app = typer.Typer(
    name="keybroker",
    help="keybroker: releases keys only to attested Intel SGX / TDX workloads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=PlainWhenPiped,
)
key_app = typer.Typer(help="Create, import, list, show and delete keys.", no_args_is_help=True)
policy_app = typer.Typer(help="Manage key transfer policies.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
backends_app = typer.Typer(
    help="Check the configured KMS backends and finish interrupted writes.", no_args_is_help=True
)
app.add_typer(key_app, name="key")
app.add_typer(policy_app, name="policy")
app.add_typer(config_app, name="config")
app.add_typer(backends_app, name="backends")
app.add_typer(token_app, name="token")
app.add_typer(role_app, name="role")
app.add_typer(audit_app, name="audit")
app.add_typer(ca_app, name="ca")
app.add_typer(attestation_app, name="attestation")
app.add_typer(collateral_app, name="collateral")
app.add_typer(sim_app, name="sim")
demo_app = typer.Typer(
    help="See keybroker work end to end on this machine (simulated TEE).", invoke_without_command=True
)
app.add_typer(demo_app, name="demo")


@demo_app.callback()
def demo_main(
    ctx: typer.Context,
    directory: Annotated[Path | None, typer.Option("--dir", help="Keep everything here (default: a temp dir).")] = None,
) -> None:
    """Without a subcommand: release an AES-256 and an RSA-3072 key to an attested workload, refuse another."""
    if ctx.invoked_subcommand is None:
        demo(directory)


demo_app.command("nginx")(demo_nginx)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"keybroker {__version__}")
        raise typer.Exit


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """keybroker admin CLI."""


# --- local commands -------------------------------------------------------------------------------------------


@app.command()
@handled
def init(
    data_dir: DataDir = Path(".data"),
    config: ConfigFile = None,
    new_admin_token: Annotated[
        bool, typer.Option("--new-admin-token", help="Issue another admin token (recovery).")
    ] = False,
) -> None:
    """Initialise DATA_DIR: database, master key (0600), service CA (DATA_DIR/ca.pem) and the first admin token
    (printed once). Idempotent."""
    from keybroker.services import ADMIN_TOKEN_FILE, initialise

    os.umask(0o077)  # the database, its WAL and journal files are for keybroker's user only
    settings = load_settings(data_dir=data_dir, config_file=config)
    result = initialise(settings, new_admin_token=new_admin_token)
    if result.admin_token is None:
        output.stderr.print(f"{settings.data_dir} is already initialised.")
        return
    output.stderr.print(f"Initialised {settings.data_dir}.")
    output.stderr.print(
        f"Admin token (shown once; also in {settings.data_dir / ADMIN_TOKEN_FILE}, mode 0600):",
        highlight=False,
    )
    typer.echo(result.admin_token)


@app.command()
@handled
def serve(
    data_dir: DataDir = Path(".data"),
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT (default 127.0.0.1:9443).")] = None,
    config: ConfigFile = None,
    role: Annotated[
        str | None, typer.Option("--role", help="all (default), kbs, or attestation (the attestation service alone).")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Server processes (default 1).")] = None,
) -> None:
    """Serve the API."""
    from keybroker.api import server
    from keybroker.api.app import create_app
    from keybroker.logs import configure_logging
    from keybroker.services import build_services

    os.umask(0o077)
    if role not in (None, "all", "kbs", "attestation"):
        raise typer.BadParameter("use all, kbs or attestation", param_hint="--role")
    server_overrides = {k: v for k, v in (("listen", listen), ("role", role), ("workers", workers)) if v is not None}
    overrides: dict[str, Any] = {"server": server_overrides} if server_overrides else {}
    settings = load_settings(data_dir=data_dir, config_file=config, overrides=overrides)
    configure_logging(settings.logging)
    services = build_services(settings)
    if settings.attestation.simulated_root is not None:
        structlog.get_logger("keybroker").warning(
            "simulated_tee_trusted",
            detail="quotes of the simulated TEE are accepted (attestation.simulated_root); never in production",
            root=str(settings.resolve(settings.attestation.simulated_root)),
        )
    try:
        tls: dict[str, Any] = {}
        if settings.tls.enabled:
            tls = _tls_files(settings, services)
        else:
            structlog.get_logger("keybroker").warning(
                "tls_disabled", detail="serving plain HTTP because tls.enabled is false; tokens cross the wire in clear"
            )
        scheme = "https" if tls else "http"
        output.stderr.print(
            f"keybroker {__version__} listening on {scheme}://{settings.server.listen}"
            f" ({settings.server.workers} process(es))",
            highlight=False,
        )
        if settings.server.workers > 1:
            services.close()  # each worker process builds its own from the same settings
            server.run(
                settings,
                None,
                tls,
                reload=lambda: load_settings(data_dir=data_dir, config_file=config, overrides=overrides),
            )
        else:
            server.run(settings, create_app(services, settings.server.role), tls)
    finally:
        services.close()


def _tls_files(settings: Settings, services: Any) -> dict[str, Any]:
    if settings.tls.cert_file is not None and settings.tls.key_file is not None:
        password = settings.tls.key_password.get_secret_value() if settings.tls.key_password else None
        return {
            "ssl_certfile": str(settings.resolve(settings.tls.cert_file)),
            "ssl_keyfile": str(settings.resolve(settings.tls.key_file)),
            "ssl_keyfile_password": password,
        }
    issued = services.ca.server_certificate(settings.tls.san, services.clock.now(), settings.tls.server_cert_days)
    return {
        "ssl_certfile": str(issued.cert_file),
        "ssl_keyfile": str(issued.key_file),
        "ssl_keyfile_password": issued.key_password,
    }


@config_app.command("check")
@handled
def config_check(
    data_dir: DataDir = Path(".data"), config: ConfigFile = None, output_format: OutputOpt = Output.TABLE
) -> None:
    """Validate the configuration (file + KEYBROKER_* environment) and print the effective settings."""
    settings: Settings = load_settings(data_dir=data_dir, config_file=config)
    if output_format is Output.JSON:
        output.emit_json(settings.redacted())
    else:
        output.stderr.print("configuration OK")
        output.details(settings.redacted())


@backends_app.command("check")
@handled
def backends_check(data_dir: DataDir = Path(".data"), config: ConfigFile = None) -> None:
    """Connect to every configured backend and its KEK holder and say whether each can serve now (exit 1 if not)."""
    from keybroker.errors import KeybrokerError
    from keybroker.services import build_services

    services = build_services(load_settings(data_dir=data_dir, config_file=config))
    failed = False
    try:
        for name, store in services.keys.backends.items():
            try:
                store.check()
                output.stderr.print(f"{name}: ok ({store!r})")
            except KeybrokerError as exc:
                failed = True
                output.stderr.print(f"{name}: {exc.instance_code}: {exc.detail}")
    finally:
        services.close()
    if failed:
        raise typer.Exit(1)


@backends_app.command("reconcile")
@handled
def backends_reconcile(
    data_dir: DataDir = Path(".data"),
    config: ConfigFile = None,
    older_than: Annotated[
        int, typer.Option("--older-than", min=0, help="Only writes interrupted at least this many seconds ago.")
    ] = 600,
) -> None:
    """Finish key writes interrupted by a crash or an unreachable backend (the server also does this on its own)."""
    from datetime import timedelta

    from keybroker.services import build_services

    services = build_services(load_settings(data_dir=data_dir, config_file=config))
    try:
        result = services.keys.reconcile(timedelta(seconds=older_than))
        left = len(services.keys.pending())
    finally:
        services.close()
    output.stderr.print(f"finished {result.finished}, waiting for a backend {result.waiting}, pending {left}")
    if result.waiting:
        raise typer.Exit(1)


# --- keys -----------------------------------------------------------------------------------------------------


class ImportFormat(enum.StrEnum):
    AUTO = "auto"
    PEM = "pem"
    BASE64 = "base64"
    RAW = "raw"


def _key_information(
    algorithm: str, length: int | None, curve: str | None, key_id: str | None = None
) -> dict[str, Any]:
    info: dict[str, Any] = {"algorithm": algorithm}
    if length is not None:
        info["key_length"] = length
    if curve is not None:
        info["curve_type"] = curve
    if key_id is not None:
        info["id"] = key_id
    return info


def _create(
    api: AdminApi,
    info: dict[str, Any],
    policy: str,
    label: str | None,
    usage: str | None,
    backend: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"key_information": info, "transfer_policy_id": policy}
    for name, value in (("label", label), ("usage", usage), ("backend", backend)):
        if value is not None:
            body[name] = value
    created: dict[str, Any] = api.request("POST", "/kbs/v1/keys", json=body).json()
    return created


def _show_key(key: dict[str, Any], output_format: Output) -> None:
    output.emit(key, output_format, lambda: output.table(output.KEY_COLUMNS, [output.key_row(key)]))


Algo = Annotated[str, typer.Option("--algorithm", "-a", help="AES, RSA or EC.")]
Length = Annotated[int | None, typer.Option("--length", "-l", help="Bits: AES 128/192/256, RSA 2048-7680.")]
Curve = Annotated[str | None, typer.Option("--curve", help="EC curve: secp256r1, secp384r1, secp521r1.")]
Policy = Annotated[str, typer.Option("--policy", "-p", help="Transfer policy id.")]
Label = Annotated[str | None, typer.Option("--label")]
Usage = Annotated[str | None, typer.Option("--usage")]
Backend = Annotated[str | None, typer.Option("--backend", help="Configured backend (default: the default).")]


@key_app.command("create")
@handled
@remote
def key_create(
    api: AdminApi,
    algorithm: Algo,
    policy: Policy,
    length: Length = None,
    curve: Curve = None,
    label: Label = None,
    usage: Usage = None,
    backend: Backend = None,
    key_id: Annotated[str | None, typer.Option("--id", help="Choose the key id (UUID).")] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Generate a new key inside keybroker."""
    with api:
        key = _create(api, _key_information(algorithm, length, curve, key_id), policy, label, usage, backend)
    _show_key(key, output_format)


@key_app.command("import")
@handled
@remote
def key_import(
    api: AdminApi,
    algorithm: Algo,
    policy: Policy,
    file: Annotated[Path, typer.Option("--file", "-f", help="Key file ('-' for stdin).", allow_dash=True)],
    length: Length = None,
    curve: Curve = None,
    key_format: Annotated[
        ImportFormat,
        typer.Option("--format", help="auto: PEM for RSA/EC, raw bytes for AES; or base64 for AES text."),
    ] = ImportFormat.AUTO,
    label: Label = None,
    usage: Usage = None,
    backend: Backend = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Import existing key material (PEM private key for RSA/EC; raw or base64 bytes for AES)."""
    data = typer.get_binary_stream("stdin").read() if str(file) == "-" else file.read_bytes()
    key_string = _key_string(algorithm, data, key_format)
    info = {**_key_information(algorithm, length, curve), "key_string": key_string}
    with api:
        key = _create(api, info, policy, label, usage, backend)
    _show_key(key, output_format)


@key_app.command("register")
@handled
@remote
def key_register(
    api: AdminApi,
    algorithm: Algo,
    policy: Policy,
    kmip_key_id: Annotated[str, typer.Option("--kmip-key-id", help="Unique identifier of the existing KMIP object.")],
    backend: Annotated[str | None, typer.Option("--backend", help="A configured KMIP backend.")] = None,
    length: Length = None,
    curve: Curve = None,
    label: Label = None,
    usage: Usage = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Register an object that already exists in a KMIP server (deleting the key later leaves the object)."""
    info = {**_key_information(algorithm, length, curve), "kmip_key_id": kmip_key_id}
    with api:
        key = _create(api, info, policy, label, usage, backend)
    _show_key(key, output_format)


def _write_certificate(certificate: dict[str, Any], out: Path | None, output_format: Output) -> None:
    if out is not None:
        out.write_text(certificate["certificate"], encoding="ascii")
    summary = {name: certificate[name] for name in ("key_id", "serial", "subject", "san", "not_after", "sha384")}
    if output_format is Output.JSON:
        output.emit_json(certificate if out is None else summary)
    elif out is None:
        typer.echo(certificate["certificate"], nl=False)
    else:
        output.stderr.print(f"certificate for key {certificate['key_id']} written to {out}")
        output.details(summary)


@key_app.command("certify")
@handled
@remote
def key_certify(
    api: AdminApi,
    key_id: Annotated[str, typer.Argument(help="An RSA or EC key held by keybroker.")],
    subject: Annotated[str, typer.Option("--subject", help='RFC 4514 subject, e.g. "CN=web.example,O=Example".')],
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="DNS:name or IP:address; repeat it or separate with commas."),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, max=825)] = 365,
    out: Annotated[Path | None, typer.Option("--out", "-O", help="Write the PEM chain here (default: stdout).")] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Issue a certificate for a broker-held key, signed by the service CA (the guide's run.sh step for Nginx)."""
    sans = [entry.strip() for value in san or [] for entry in value.split(",") if entry.strip()]
    body = {"subject": subject, "san": sans, "days": days}
    with api:
        certificate = api.request("POST", f"/kbs/v1/keys/{segment(key_id)}/certificate", json=body).json()
    _write_certificate(certificate, out, output_format)


@key_app.command("certificate")
@handled
@remote
def key_certificate(
    api: AdminApi,
    key_id: Annotated[str, typer.Argument()],
    out: Annotated[Path | None, typer.Option("--out", "-O", help="Write the PEM chain here (default: stdout).")] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Fetch the newest certificate issued for a key."""
    with api:
        certificate = api.request("GET", f"/kbs/v1/keys/{segment(key_id)}/certificate").json()
    _write_certificate(certificate, out, output_format)


def _key_string(algorithm: str, data: bytes, key_format: ImportFormat) -> str:
    if key_format is ImportFormat.AUTO:
        key_format = ImportFormat.RAW if algorithm.upper() == "AES" else ImportFormat.PEM
    if key_format is ImportFormat.RAW:
        return base64.b64encode(data).decode()
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise typer.BadParameter(f"the key file is not {key_format} text", param_hint="--file") from None


@key_app.command("list")
@handled
@remote
def key_list(
    api: AdminApi,
    algorithm: Annotated[str | None, typer.Option("--algorithm", "-a")] = None,
    length: Length = None,
    curve: Curve = None,
    policy: Annotated[str | None, typer.Option("--policy", "-p", help="Only keys with this policy.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Page size.")] = 100,
    fetch_all: Annotated[bool, typer.Option("--all", help="Follow pages to the end.")] = False,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List keys (metadata only)."""
    params: dict[str, Any] = {"limit": limit}
    for name, value in (
        ("algorithm", algorithm),
        ("keyLength", length),
        ("curveType", curve),
        ("transferPolicyId", policy),
    ):
        if value is not None:
            params[name] = value
    with api:
        keys = api.list_all("/kbs/v1/keys", params, fetch_all)
    output.emit(keys, output_format, lambda: output.table(output.KEY_COLUMNS, [output.key_row(k) for k in keys]))


KeyIdArg = Annotated[str, typer.Argument(help="Key id.")]


@key_app.command("show")
@handled
@remote
def key_show(
    api: AdminApi,
    key_id: KeyIdArg,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Show one key's metadata."""
    with api:
        key = api.get_json(f"/kbs/v1/keys/{segment(key_id)}")
    output.emit(key, output_format, lambda: output.details(key))


@key_app.command("set-policy")
@handled
@remote
def key_set_policy(
    api: AdminApi,
    key_id: KeyIdArg,
    policy: Annotated[str, typer.Argument(help="New transfer policy id.")],
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Re-assign a key's transfer policy."""
    with api:
        key = api.request("PUT", f"/kbs/v1/keys/{segment(key_id)}", json={"transfer_policy_id": policy}).json()
    _show_key(key, output_format)


@key_app.command("delete")
@handled
@remote
def key_delete(
    api: AdminApi,
    key_id: KeyIdArg,
) -> None:
    """Delete a key and its material in the backend."""
    with api:
        api.request("DELETE", f"/kbs/v1/keys/{segment(key_id)}")
    output.stderr.print(f"deleted key {key_id}", highlight=False)


# --- policies -------------------------------------------------------------------------------------------------

PolicyFile = Annotated[Path, typer.Argument(help="Policy JSON file ('-' for stdin).", allow_dash=True)]
PolicyIdArg = Annotated[str, typer.Argument(help="Policy id.")]


def _read_policy(file: Path) -> Any:
    text = typer.get_text_stream("stdin").read() if str(file) == "-" else file.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{file} is not valid JSON: {exc}", param_hint="FILE") from None


def _show_policy(policy: dict[str, Any], output_format: Output) -> None:
    output.emit(policy, output_format, lambda: output.details(policy))


@policy_app.command("create")
@handled
@remote
def policy_create(
    api: AdminApi,
    file: PolicyFile,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Create a key transfer policy from a JSON file."""
    with api:
        policy = api.request("POST", "/kbs/v1/key-transfer-policies", json=_read_policy(file)).json()
    _show_policy(policy, output_format)


@policy_app.command("update")
@handled
@remote
def policy_update(
    api: AdminApi,
    policy_id: PolicyIdArg,
    file: PolicyFile,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Replace a (mutable) key transfer policy with the JSON file's content."""
    with api:
        policy = api.request(
            "PUT", f"/kbs/v1/key-transfer-policies/{segment(policy_id)}", json=_read_policy(file)
        ).json()
    _show_policy(policy, output_format)


@policy_app.command("list")
@handled
@remote
def policy_list(
    api: AdminApi,
    limit: Annotated[int, typer.Option("--limit", help="Page size.")] = 100,
    fetch_all: Annotated[bool, typer.Option("--all", help="Follow pages to the end.")] = False,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List key transfer policies."""
    with api:
        policies = api.list_all("/kbs/v1/key-transfer-policies", {"limit": limit}, fetch_all)
    output.emit(
        policies,
        output_format,
        lambda: output.table(output.POLICY_COLUMNS, [output.policy_row(p) for p in policies]),
    )


@policy_app.command("show")
@handled
@remote
def policy_show(
    api: AdminApi,
    policy_id: PolicyIdArg,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Show one key transfer policy."""
    with api:
        _show_policy(api.get_json(f"/kbs/v1/key-transfer-policies/{segment(policy_id)}"), output_format)


@policy_app.command("delete")
@handled
@remote
def policy_delete(
    api: AdminApi,
    policy_id: PolicyIdArg,
) -> None:
    """Delete a key transfer policy (refused while a key uses it, or if it is immutable)."""
    with api:
        api.request("DELETE", f"/kbs/v1/key-transfer-policies/{segment(policy_id)}")
    output.stderr.print(f"deleted policy {policy_id}", highlight=False)


def main() -> None:
    app()
