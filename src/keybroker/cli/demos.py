"""``keybroker demo [nginx]``: the command group of the two demos (loaded only when ``keybroker demo`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keybroker.cli.demo_nginx import demo_nginx

demo_app = typer.Typer(
    help="See keybroker work end to end on this machine (simulated TEE).\n\n"
    "Without a command: releases an AES-256 and an RSA-3072 key to an attested workload and refuses another.\n\n"
    "Example: keybroker demo --dir /tmp/keybroker-demo",
    invoke_without_command=True,
)


@demo_app.callback()
def demo_main(
    ctx: typer.Context,
    directory: Annotated[
        Path | None, typer.Option("--dir", metavar="DIR", help="Keep everything here (default: a temp dir).")
    ] = None,
    port: Annotated[
        int,
        typer.Option(
            "--port", metavar="PORT", help="keybroker's HTTPS port (default: a free one).", show_default=False
        ),
    ] = 0,
) -> None:
    """Without a subcommand: release an AES-256 and an RSA-3072 key to an attested workload, refuse another."""
    if ctx.invoked_subcommand is None:
        from keybroker.cli.demo import demo

        demo(directory, port)


demo_app.command("nginx")(demo_nginx)
