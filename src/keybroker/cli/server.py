"""The local commands: ``keybroker init``, ``serve`` and ``config check`` (these read the data directory and
configuration themselves; ``db`` and ``backends reconcile`` do too, every other command talks to a server)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from keybroker import __version__
from keybroker.cli import output
from keybroker.cli.common import ConfigFile, DataDir, OutputOpt, handled
from keybroker.cli.output import Output
from keybroker.config import Settings, load_settings

server_app = typer.Typer()  # its commands are added to the top level
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@server_app.command()
@handled
def init(
    data_dir: DataDir = Path(".data"),
    config: ConfigFile = None,
    new_admin_token: Annotated[
        bool, typer.Option("--new-admin-token", help="Issue another admin token (recovery).")
    ] = False,
) -> None:
    """Initialise DATA_DIR: database, master key (0600), service CA (DATA_DIR/ca.pem) and the first admin token
    (printed once). Idempotent.

    Example: keybroker init --data-dir /var/lib/keybroker
    """
    from keybroker.services import ADMIN_TOKEN_FILE, initialise

    os.umask(0o077)  # the database, its WAL and journal files are for keybroker's user only
    settings = load_settings(data_dir=data_dir, config_file=config)
    result = initialise(settings, new_admin_token=new_admin_token)
    if result.admin_token is None and result.joined:
        output.stderr.print(
            f"{settings.data_dir} joined deployment {result.deployment} (the database had it already): "
            f"{settings.data_dir / 'ca.pem'} is its CA; no admin token was written, an existing one works here.",
            highlight=False,
        )
        return
    if result.admin_token is None:
        output.stderr.print(f"{settings.data_dir} is already initialised.")
        return
    output.stderr.print(f"Initialised {settings.data_dir}.")
    output.stderr.print(
        f"Admin token (shown once; also in {settings.data_dir / ADMIN_TOKEN_FILE}, mode 0600):",
        highlight=False,
    )
    typer.echo(result.admin_token)


@server_app.command()
@handled
def serve(
    data_dir: DataDir = Path(".data"),
    listen: Annotated[
        str | None, typer.Option("--listen", metavar="HOST:PORT", help="Where to listen (default 127.0.0.1:9443).")
    ] = None,
    config: ConfigFile = None,
    role: Annotated[
        str | None,
        typer.Option(
            "--role", metavar="ROLE", help="all (default), kbs, or attestation (the attestation service alone)."
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", metavar="N", help="Server processes (default 1).")] = None,
) -> None:
    """Serve the API.

    Example: keybroker serve --data-dir /var/lib/keybroker --listen 0.0.0.0:9443
    """
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
        services.join()  # heartbeat, then the KEK checks again (a kek rotate begun meanwhile: see Services.join)
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
    services.ca.publish()  # this replica's copy of the CA certificate, for its clients
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
    """Validate the configuration (file + KEYBROKER_* environment) and print the effective settings.

    Example: keybroker config check --data-dir /var/lib/keybroker -o json
    """
    settings: Settings = load_settings(data_dir=data_dir, config_file=config)
    if output_format is Output.JSON:
        output.emit_json(settings.redacted())
    else:
        output.stderr.print("configuration OK")
        output.details(settings.redacted())


# --- keys -----------------------------------------------------------------------------------------------------
