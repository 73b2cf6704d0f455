"""``keybroker kek rotate|status`` and ``keybroker ca rotate|activate|retire``: local commands, which read the data
directory and the configuration themselves (as ``init`` and ``serve`` do) and need the KEK (``kek status`` only
reads); they talk to no server.

The procedures, for one host and for replicas, are in docs/operations.md."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from keybroker.cli import output
from keybroker.cli.common import ConfigFile, DataDir, OutputOpt, handled
from keybroker.cli.output import Output

kek_app = typer.Typer(help="The KEK: move what it wraps under a new one; which KEK wraps what.", no_args_is_help=True)
# `keybroker ca rotate|activate|retire` (added to the ca group beside its remote commands).
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
    if report.removed_legacy:
        names = ", ".join(path.name for path in report.removed_legacy)
        say(f"removed the CA key files from before 0008 ({names}): the database holds those CAs", highlight=False)
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
    KEK rotation. Reads the database read-only (no migration) and opens nothing: no KEK is needed.

    Example: keybroker kek status -o json
    """
    from keybroker import ca_legacy
    from keybroker.backends.kek_records import ROTATE, census, last_rotation
    from keybroker.backends.kek_rotation import open_deployment
    from keybroker.config import load_settings

    settings = load_settings(data_dir=data_dir, config_file=config)
    database = open_deployment(settings, read_only=True)
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
    legacy = ca_legacy.leftovers(settings.data_dir)
    if legacy is not None:  # (removed at the next start, or by kek rotate: they must not outlive the KEK)
        what = f"legacy CA key files ({', '.join(p.name for p in legacy.files)}; removed at the next start)"
        rows.append({"what": what, "kek_id": legacy.kek_id or "?", "records": legacy.key_files})
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


@ca_rotation_app.command("rotate", short_help="Publish a new service CA beside the old one, which still issues.")
@handled
def ca_rotate(data_dir: DataDir = Path(".data"), config: ConfigFile = None) -> None:
    """Make a new service CA (the same name, a new key, 10 years) and publish it beside the old one: ca.pem and
    GET /cms/v1/ca-certificates hold both (the old one first), while the old CA still issues every certificate.
    Give the bundle (or the new fingerprint) to every client, then run 'keybroker ca activate'. Works with an
    expired CA too. Run again, it changes nothing (docs/operations.md).

    Example: keybroker ca rotate --data-dir /var/lib/keybroker
    """
    from keybroker import ca_rotation

    with _services(data_dir, config) as services:
        step = ca_rotation.rotate(services.ca, services.clock.now(), services.audit, _actor())
        published = services.ca.publish()
    say = output.stderr.print
    if step.done_before:
        say("the new service CA was published already; nothing was changed.", highlight=False)
    say(f"issuing CA (old): SHA-384 {step.issuing_sha384}", highlight=False)
    say(f"new service CA:   SHA-384 {step.other_sha384}", highlight=False)
    say(
        f"{published} and GET /cms/v1/ca-certificates hold both (the old one first); the old CA still issues. Next: "
        "give every client the bundle (or add the new fingerprint to their pins: --ca-fingerprint OLD,NEW), then "
        "run 'keybroker ca activate'.",
        highlight=False,
    )


@ca_rotation_app.command("activate", short_help="Issue from the new service CA that ca rotate published.")
@handled
def ca_activate(data_dir: DataDir = Path(".data"), config: ConfigFile = None) -> None:
    """Switch issuance to the new service CA that 'keybroker ca rotate' published: every certificate from now on
    (each replica's server certificate at its next start, 'keybroker ca issue') comes from it. The old CA stays
    published until 'keybroker ca retire'. Run it only once every client trusts the new CA; then restart each
    replica. Run again, it changes nothing (docs/operations.md).

    Example: keybroker ca activate --data-dir /var/lib/keybroker
    """
    from keybroker import ca_rotation

    with _services(data_dir, config) as services:
        step = ca_rotation.activate(services.ca, services.audit, _actor())
        published = services.ca.publish()
    say = output.stderr.print
    if step.done_before:
        say("the new service CA issues already; nothing was changed.", highlight=False)
    say(f"issuing CA (new): SHA-384 {step.issuing_sha384}", highlight=False)
    say(f"old service CA:   SHA-384 {step.other_sha384} (still published in {published})", highlight=False)
    say(
        "Next: restart each replica, one at a time (its server certificate then comes from the new CA); issue again "
        "the certificates of other services ('keybroker ca issue'); once no client needs the old CA, run 'keybroker "
        "ca retire'.",
        highlight=False,
    )


@ca_rotation_app.command("retire", short_help="Unpublish the old service CA and delete its key.")
@handled
def ca_retire(data_dir: DataDir = Path(".data"), config: ConfigFile = None) -> None:
    """Remove the old service CA (the one 'keybroker ca activate' replaced) from ca.pem and GET
    /cms/v1/ca-certificates, and delete its private key: clients that trust only the old CA fail from then on.

    Example: keybroker ca retire --data-dir /var/lib/keybroker
    """
    from keybroker import ca_rotation

    with _services(data_dir, config) as services:
        step = ca_rotation.retire(services.ca, services.audit, _actor())
        published = services.ca.publish()
    output.stderr.print(
        f"retired the CA with SHA-384 {step.retired_sha384} and deleted its key; {published} holds the new CA "
        "only. Restart each replica (its ca.pem is published at start); clients that pin fingerprints can drop the "
        "old one.",
        highlight=False,
    )


@contextlib.contextmanager
def _services(data_dir: Path, config: Path | None) -> Iterator[Any]:
    from keybroker.clock import SystemClock
    from keybroker.config import load_settings
    from keybroker.services import build_services

    os.umask(0o077)
    services = build_services(load_settings(data_dir=data_dir, config_file=config), SystemClock())
    try:
        yield services
    finally:
        services.close()
