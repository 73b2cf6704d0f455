"""``keybroker cluster``: the replicas of a deployment (over the API)."""

from __future__ import annotations

import typer

from keybroker.cli import answers, output
from keybroker.cli.common import OutputOpt, handled, remote
from keybroker.cli.http import AdminApi
from keybroker.cli.output import Output

cluster_app = typer.Typer(help="The replicas that serve this deployment.", no_args_is_help=True)

COLUMNS = ("ID", "ADDRESS", "VERSION", "SCHEMA", "STARTED", "HEARTBEAT", "ALIVE")


@cluster_app.command("status")
@handled
@remote
def cluster_status(api: AdminApi, output_format: OutputOpt = Output.TABLE) -> None:
    """List the replicas: id, address, version, schema revision, start and last heartbeat.

    Example: keybroker cluster status -o json
    """
    with api:
        replicas = api.get_json("/kbs/v1/cluster/replicas", shape=answers.REPLICAS)
    rows = [
        [
            r["id"],
            r["address"],
            r["version"],
            r["schema_revision"],
            output.short_time(r["started_at"]),
            output.short_time(r["heartbeat_at"]),
            "yes" if r["alive"] else "no",
        ]
        for r in replicas
    ]
    if output_format is Output.TABLE:
        output.table(COLUMNS, rows)
    else:
        output.emit(replicas, output_format, lambda: None)
