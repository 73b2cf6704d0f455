"""``keybroker backends check|reconcile``: is every KMS backend reachable now; finish writes an outage interrupted.

``check`` asks the server (``GET /kbs/v1/backends``, permission ``backends:read``): the replica that answers runs
every check now and says, per backend, ok or the error's code and sentence. ``--offline`` (or ``--data-dir`` /
``--config`` on the command line) checks from this host with a data directory's configuration instead, for a
server that does not run. ``reconcile`` works on a data directory's database and backends, like ``init``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from keybroker.cli import answers, output
from keybroker.cli.common import ConfigFile, DataDir, OutputOpt, handled, remote
from keybroker.cli.http import AdminApi
from keybroker.cli.output import Output

backends_app = typer.Typer(
    help="Check the configured KMS backends and finish interrupted writes.", no_args_is_help=True
)

COLUMNS = ("BACKEND", "TYPE", "KEK", "DEFAULT", "STATUS", "SECONDS", "DETAIL")


@backends_app.command("check")
@handled
@remote
def backends_check(
    api: AdminApi,
    ctx: typer.Context,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline",
            help="Check from this host with DATA_DIR's configuration, not through the server (also when --data-dir "
            "or --config is given).",
        ),
    ] = False,
    data_dir: DataDir = Path(".data"),
    config: ConfigFile = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Have the server (--addr/KEYBROKER_ADDR) check every backend and its KEK holder now: ok, or why not (exit 1
    if any fails).

    Example: keybroker backends check -o json
    """
    given = [name for name in ("data_dir", "config") if _on_command_line(ctx, name)]
    if offline or given:
        report = _offline_report(data_dir, config)
    else:
        with api:
            report = api.get_json("/kbs/v1/backends", shape=answers.BACKENDS_REPORT)
    _show(report, output_format)
    if not report["ok"]:
        raise typer.Exit(1)


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"  # (not KEYBROKER_DATA_DIR, not the default)


def _offline_report(data_dir: Path, config: Path | None) -> dict[str, Any]:
    from keybroker.backends.checks import check_backends
    from keybroker.config import load_settings
    from keybroker.services import build_services

    settings = load_settings(data_dir=data_dir, config_file=config)
    services = build_services(settings)
    try:
        checked = check_backends(services.keys.backends, settings)
        now = services.clock.now()
    finally:
        services.close()
    return {
        "replica": f"this host, offline ({settings.data_dir})",
        "checked_at": now.isoformat().replace("+00:00", "Z"),
        "ok": all(entry["ok"] for entry in checked),
        "backends": checked,
    }


def _show(report: dict[str, Any], output_format: Output) -> None:
    backends: list[dict[str, Any]] = report["backends"]
    if output_format is Output.JSON:
        output.emit_json(report)
        return
    if output_format is Output.ID:
        for entry in backends:
            typer.echo(output.printable(entry["name"]))
        return
    output.table(COLUMNS, [_row(entry) for entry in backends])
    failed = sum(1 for entry in backends if not entry["ok"])
    verdict = f"{failed} of {len(backends)} failed" if failed else f"all {len(backends)} ok"
    where = output.printable(report["replica"])
    output.stderr.print(f"checked by {where} at {output.short_time(report['checked_at'])}: {verdict}")


def _row(entry: dict[str, Any]) -> list[str]:
    return [
        entry["name"],
        entry["type"],
        entry.get("kek") or "-",
        "yes" if entry["default"] else "no",
        "ok" if entry["ok"] else entry.get("code") or "failed",
        f"{entry['seconds']:.3f}",
        entry.get("detail") or "",
    ]


@backends_app.command("reconcile")
@handled
def backends_reconcile(
    data_dir: DataDir = Path(".data"),
    config: ConfigFile = None,
    older_than: Annotated[
        int,
        typer.Option("--older-than", min=0, metavar="AGE", help="Only writes interrupted at least AGE seconds ago."),
    ] = 600,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Finish key writes interrupted by a crash or an unreachable backend, here, with DATA_DIR's database and
    backends (the server also does this on its own; exit 1 while some still wait for their backend).

    Example: keybroker backends reconcile --data-dir /var/lib/keybroker --older-than 60
    """
    from datetime import timedelta

    from keybroker.config import load_settings
    from keybroker.services import build_services

    settings = load_settings(data_dir=data_dir, config_file=config)
    services = build_services(settings)
    try:
        result = services.keys.reconcile(timedelta(seconds=older_than))
        pending = Counter((row.backend, row.operation) for row in services.keys.pending())
    finally:
        services.close()
    left = [{"backend": b, "operation": op, "count": n} for (b, op), n in sorted(pending.items())]
    if output_format is Output.JSON:
        output.emit_json({"finished": result.finished, "waiting": result.waiting, "pending": left})
    else:
        say = output.stderr.print
        say(
            f"finished {result.finished} interrupted write(s); {result.waiting} still wait(s) for a backend; "
            f"{sum(pending.values())} pending in all",
            highlight=False,
        )
        for item in left:
            say(f"  {item['backend']}: {item['count']} {item['operation']}", highlight=False)
        if result.waiting:
            interval = settings.keys.reconcile_interval_seconds
            say(
                f"The server retries them every {interval} s; 'keybroker backends check' says what a backend lacks.",
                highlight=False,
            )
    if result.waiting:
        raise typer.Exit(1)
