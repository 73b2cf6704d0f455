"""``keybroker kek rotate|status`` and ``keybroker ca rotate|retire``: local commands, which read the data directory
and the configuration themselves (as ``init`` and ``serve`` do) and need the KEK; they talk to no server.

The procedures, for one host and for replicas, are in docs/operations.md."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from keybroker.cli import output
from keybroker.cli.common import ConfigFile, DataDir, OutputOpt, handled
from keybroker.cli.output import Output

kek_app = typer.Typer(help="The KEK: move what it wraps under a new one; which KEK wraps what.", no_args_is_help=True)
# `keybroker ca rotate|retire` (added to the ca group beside its remote commands).
ca_rotation_app = typer.Typer()

ToFile = Annotated[
    Path,
    typer.Option(
        "--to",
        metavar="FILE",
        help="A TOML file holding the backend's new section (backends.NAME with its new wrapper) as it will be in "
        "keybroker.toml.",
        show_default=False,
    ),
]


def _actor() -> Any:
    import getpass

    from keybroker.audit.log import AuditContext

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid
        user = str(os.getuid())
    return AuditContext(actor=f"local:{user}")


@kek_app.command("rotate", short_help="Re-wrap every data key and keybroker's own keys under a new KEK.")
@handled
def kek_rotate(to: ToFile, data_dir: DataDir = Path(".data"), config: ConfigFile = None) -> None:
    """Re-wrap every data key of an embedded backend, and keybroker's own keys, under a new KEK. Stop every
    replica first; the configuration keeps naming the current KEK until this has finished. Run it again after a
    crash: it finishes the work. Then configure the new KEK on every replica (docs/operations.md).

    Example: keybroker kek rotate --to new-kek.toml
    """
    from keybroker.audit.log import AuditLog
    from keybroker.backends.kek_rotation import open_deployment, read_target, rotate
    from keybroker.clock import SystemClock
    from keybroker.config import LocalWrapperSettings, load_settings

    os.umask(0o077)
    settings = load_settings(data_dir=data_dir, config_file=config)
    target = read_target(to)
    clock = SystemClock()
    database = open_deployment(settings, exclusive=True)
    shown = [0.0]

    def progress(moved: int, pending: int) -> None:
        if time.monotonic() - shown[0] >= 2.0 or moved >= pending:
            shown[0] = time.monotonic()
            output.stderr.print(f"moved {moved} of {pending} records", highlight=False)

    try:
        report = rotate(settings, target, database, AuditLog(database, clock), _actor(), clock, progress)
    finally:
        database.close()
    say = output.stderr.print
    if report.created_key_file is not None:
        say(f"created the new master key {report.created_key_file} (32 random bytes, mode 0600)")
    if report.finished_before is not None:
        say(f"nothing to move: the rotation to KEK {report.to_kek} finished at {report.finished_before}.")
    else:
        say(
            f"moved {report.moved} records of backend {report.backend!r} and keybroker's own keys from KEK "
            f"{report.from_kek} to KEK {report.to_kek}; {report.total} records are under it now."
        )
    current = getattr(settings.backends[report.backend], "wrapper", None)
    from_env = isinstance(current, LocalWrapperSettings) and current.master_key is not None
    variable = f"KEYBROKER_BACKENDS__{report.backend.upper()}__WRAPPER__MASTER_KEY"
    steps = [
        f"Next, on every replica: replace [backends.{report.backend}] of its configuration with the section in "
        f"{target.file} and give it what the new KEK needs (its key file, token or PIN), then start it. A replica "
        f"still configured with KEK {report.from_kek} refuses to start and says why."
    ]
    if from_env:
        steps.append(
            f"The current KEK comes from {variable}: unset it (it takes precedence over the file), or set it to the "
            "new key in base64."
        )
    steps.append("Keep the old KEK as long as you keep backups from before the rotation: restoring one needs it.")
    for step in steps:
        say(step, highlight=False)


@kek_app.command("status", short_help="Which KEK wraps how many records; the newest KEK rotation.")
@handled
def kek_status(
    data_dir: DataDir = Path(".data"), config: ConfigFile = None, output_format: OutputOpt = Output.TABLE
) -> None:
    """Which KEK wraps how many records (each embedded backend's data keys, keybroker's own keys), and the newest
    KEK rotation. Opens nothing: no KEK is needed.

    Example: keybroker kek status -o json
    """
    from keybroker.backends.kek_records import ROTATE, census, last_rotation
    from keybroker.backends.kek_rotation import open_deployment
    from keybroker.config import load_settings

    database = open_deployment(load_settings(data_dir=data_dir, config_file=config))
    try:
        counted, note = census(database), last_rotation(database)
    finally:
        database.close()
    rows: list[dict[str, Any]] = [
        {"what": f"data keys of backend {backend or '(any)'}", "kek_id": kek, "records": n}
        for backend, counts in sorted(counted.material.items(), key=lambda item: item[0] or "")
        for kek, n in sorted(counts.items())
    ] + [
        {"what": what, "kek_id": kek, "records": n}
        for what, counts in counted.own.items()
        for kek, n in sorted(counts.items())
    ]
    rotation = None
    if note is not None:
        rotation = {"finished": note.finished, "at": note.at, "backend": note.backend, "from": note.from_kek,
                    "to": note.to_kek, "to_file": note.to_file}  # fmt: skip
    if output_format is Output.JSON:
        output.emit_json({"records": rows, "last_rotation": rotation})
        return
    output.table(("WHAT", "KEK", "RECORDS"), [[r["what"], r["kek_id"], str(r["records"])] for r in rows])
    if note is not None and note.finished:
        output.stderr.print(f"last KEK rotation: {note.from_kek} -> {note.to_kek}, finished {note.at}")
    elif note is not None:
        output.stderr.print(
            f"a KEK rotation from {note.from_kek} to {note.to_kek} began {note.at} and has not finished: "
            f"{ROTATE} {note.to_file}"
        )


@ca_rotation_app.command("rotate", short_help="A new service CA, trusted beside the old one until it is retired.")
@handled
def ca_rotate(data_dir: DataDir = Path(".data"), config: ConfigFile = None) -> None:
    """Make a new service CA (the same name, a new key) that issues every certificate from now on. Until 'keybroker
    ca retire', ca.pem and GET /cms/v1/ca-certificates hold both CAs (the old one first) and certificates chain to
    either: clients that trust only the old CA keep working. Restart each replica to give it a server certificate
    of the new CA (docs/operations.md).

    Example: keybroker ca rotate --data-dir /var/lib/keybroker
    """
    from keybroker.clock import SystemClock
    from keybroker.config import load_settings
    from keybroker.services import build_services

    os.umask(0o077)
    services = build_services(load_settings(data_dir=data_dir, config_file=config), SystemClock())
    try:
        done = services.ca.rotate(services.clock.now(), services.audit, _actor())
        published = services.ca.publish()
    finally:
        services.close()
    say = output.stderr.print
    say(f"new service CA: SHA-384 {done.new_sha384}", highlight=False)
    say(f"retiring CA:    SHA-384 {done.old_sha384}", highlight=False)
    say(
        f"{published} now holds both (the retiring one first). Next: restart each replica (its server certificate "
        "then comes from the new CA, and its ca.pem holds both), give every client the new ca.pem (clients that pin "
        "a fingerprint keep the old one until the retirement, then take the new one), then run 'keybroker ca retire'.",
        highlight=False,
    )


@ca_rotation_app.command("retire", short_help="Stop publishing the service CA that ca rotate replaced.")
@handled
def ca_retire(data_dir: DataDir = Path(".data"), config: ConfigFile = None) -> None:
    """Stop publishing and chaining the service CA that 'keybroker ca rotate' replaced: clients that trust only the
    old CA fail from then on (once each replica has restarted).

    Example: keybroker ca retire --data-dir /var/lib/keybroker
    """
    from keybroker.clock import SystemClock
    from keybroker.config import load_settings
    from keybroker.services import build_services

    os.umask(0o077)
    services = build_services(load_settings(data_dir=data_dir, config_file=config), SystemClock())
    try:
        retired = services.ca.retire(services.audit, _actor())
        published = services.ca.publish()
    finally:
        services.close()
    output.stderr.print(
        f"retired the CA with SHA-384 {retired}; {published} holds the new CA only. Restart each replica: its "
        "certificate chain and ca.pem then name the new CA alone.",
        highlight=False,
    )
