"""``keybroker``: the admin CLI (typer + rich), assembled from one module per command group."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keybroker import __version__
from keybroker.cli.admin import audit_app, ca_app, role_app, token_app
from keybroker.cli.attestation import attestation_app, collateral_app
from keybroker.cli.cluster import cluster_app
from keybroker.cli.common import PlainWhenPiped
from keybroker.cli.db import db_app
from keybroker.cli.demo import demo
from keybroker.cli.demo_nginx import demo_nginx
from keybroker.cli.keys import key_app
from keybroker.cli.policies import policy_app
from keybroker.cli.server import backends_app, config_app, server_app
from keybroker.cli.sim import sim_app

app = typer.Typer(
    name="keybroker",
    help="keybroker: releases keys only to attested Intel SGX / TDX workloads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=PlainWhenPiped,
)
app.registered_commands += server_app.registered_commands  # init and serve, at the top level
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
app.add_typer(cluster_app, name="cluster")
app.add_typer(db_app, name="db")
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


def main() -> None:
    app()
