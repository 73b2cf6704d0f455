"""``keybroker db``: move a one-host (SQLite) deployment to PostgreSQL, back up SQLite online, show the schema.

These commands read the data directory's configuration and database themselves, like ``init`` and ``serve``. The
copying is ``keybroker.storage.copy``; here are the options, the checks of the audit chain (which the storage
layer cannot import) and what the operator reads. No password and no key is ever printed.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from keybroker.audit.chain import verify_chain
from keybroker.audit.log import entry_dict
from keybroker.cli import output
from keybroker.cli.common import ConfigFile, DataDir, OutputOpt, handled, output_file
from keybroker.cli.output import Output
from keybroker.config import (
    EmbeddedBackendSettings,
    LocalWrapperSettings,
    SecretReader,
    SecretSource,
    Settings,
    load_settings,
)
from keybroker.config.sections import DATABASE_SCHEMES
from keybroker.errors import BackendUnavailable, ConfigurationError, CopyFailed
from keybroker.storage.copy import (
    CopyResult,
    backup_sqlite,
    check_source,
    copy_database,
    error_reason,
    sqlite_file,
    sqlite_in_use,
    sqlite_snapshot,
)
from keybroker.storage.db import Database, schema_head
from keybroker.storage.tables import AuditEventRow, AuditHeadRow, DeploymentRow, KeyRow

db_app = typer.Typer(
    help="The database: move to PostgreSQL, back up SQLite, show the schema revision.", no_args_is_help=True
)

TARGET = "Target"  # (a panel of its own in the help: at 60 columns one table of all the options cuts their names)
PasswordEnv = Annotated[
    str | None,
    typer.Option(
        "--password-env",
        metavar="VAR",
        help="Environment variable holding the target's password.",
        show_default=False,
        rich_help_panel=TARGET,
    ),
]
PasswordFile = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        metavar="FILE",
        help="File (mode 0600) holding the target's password.",
        show_default=False,
        rich_help_panel=TARGET,
    ),
]


def _connect_timeout(seconds: float) -> float:
    """1 to 60 seconds. (Checked here rather than by typer's min and max, whose range in the help's type column
    leaves no room for the option's name at 60 columns.)"""
    if not 1 <= seconds <= 60:
        raise typer.BadParameter(f"{seconds:g} is not between 1 and 60 seconds")
    return seconds


@dataclass(frozen=True, slots=True)
class AuditSummary:
    entries: int
    head: str


def verify_audit(connection: Connection, where: str) -> AuditSummary:
    """Recompute the audit hash chain of the database behind ``connection`` (as ``keybroker audit verify`` does
    with the API's entries); ``CopyFailed`` naming the first bad entry if it does not verify."""
    with Session(bind=connection) as session:
        head = session.execute(select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.id == 1)).one_or_none()
        if head is None:
            raise CopyFailed(f"the audit chain of {where} has no head row")
        entries = session.scalars(select(AuditEventRow).order_by(AuditEventRow.seq).execution_options(yield_per=1000))
        report = verify_chain((entry_dict(row) for row in entries), int(head.seq), str(head.hash))
    if not report.ok:
        raise CopyFailed(f"the audit chain of {where} is BROKEN at entry {report.first_bad_seq}: {report.reason}")
    return AuditSummary(report.checked, str(head.hash))


def _sqlite_of(settings: Settings) -> Path | None:
    """The SQLite database file of the settings; None for PostgreSQL (whose password is not read for this)."""
    return sqlite_file(settings.database.url or settings.database_url)


def _source_file(settings: Settings) -> Path:
    path = _sqlite_of(settings)
    if path is None:
        raise ConfigurationError(
            f"the deployment of {settings.data_dir} uses PostgreSQL already (database.url); back it up and move it "
            "with pg_dump and pg_restore (docs/backup-and-migration.md)"
        )
    if not path.is_file():
        raise ConfigurationError(
            f"{settings.data_dir} is not initialised ({path} does not exist); run 'keybroker init --data-dir "
            f"{settings.data_dir}'"
        )
    return path


def _target_url(to: str, password_env: str | None, password_file: Path | None, data_dir: Path) -> tuple[str, URL]:
    """The URL to connect with (password included) and the same without its password (to show)."""
    hint = "--to"
    try:
        url = make_url(to)
    except ArgumentError:
        raise typer.BadParameter(
            "not a database URL; use postgresql://USER@HOST:PORT/DATABASE", param_hint=hint
        ) from None
    if url.get_backend_name() != "postgresql" or url.drivername not in DATABASE_SCHEMES:
        raise typer.BadParameter(
            f"the target must be PostgreSQL (postgresql://USER@HOST:PORT/DATABASE), not {url.drivername}://",
            param_hint=hint,
        )
    if not url.database:
        raise typer.BadParameter("give the database: postgresql://USER@HOST:PORT/DATABASE", param_hint=hint)
    url = url.set(drivername=DATABASE_SCHEMES[url.drivername])
    if password_env is not None and password_file is not None:
        raise typer.BadParameter("give --password-env or --password-file, not both", param_hint="--password-env")
    source = (
        SecretSource(env=password_env) if password_env else SecretSource(file=password_file) if password_file else None
    )
    if source is not None:
        if url.password is not None:
            raise typer.BadParameter("the URL has a password already; give it in one place only", param_hint=hint)
        url = url.set(password=SecretReader(data_dir).read(source, "the target's password"))
    return url.render_as_string(hide_password=False), url


def _shown(url: URL) -> str:
    """``url`` without its password, in the form ``database.url`` takes (``URL.set(password=None)`` keeps it)."""
    bare = URL.create("postgresql", url.username, None, url.host, url.port, url.database, url.query)
    return bare.render_as_string(hide_password=False)


@db_app.command("migrate")
@handled
def migrate(
    to: Annotated[
        str,
        typer.Option(
            "--to", metavar="URL", help="An EMPTY PostgreSQL database: postgresql://...", rich_help_panel=TARGET
        ),
    ],
    data_dir: DataDir = Path(".data"),
    config: ConfigFile = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
    connect_timeout: Annotated[
        float,
        typer.Option(
            "--connect-timeout",
            callback=_connect_timeout,
            metavar="SECONDS",
            help="How long to wait for the target (1 to 60).",
            rich_help_panel=TARGET,
        ),
    ] = 5.0,
    allow_running: Annotated[
        bool,
        typer.Option(
            "--allow-running",
            help="Copy a snapshot even though a process has the database open (what it writes later is not copied).",
        ),
    ] = False,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Copy this host's (SQLite) deployment into an empty PostgreSQL database: keys, policies, tokens, roles, CAs and
    the audit chain, exactly. Stop the server first. DATA_DIR is left as it is.

    Example: keybroker db migrate --data-dir /var/lib/keybroker --to postgresql://kb@db/kb --password-env PGPASSWORD
    """
    os.umask(0o077)
    settings = load_settings(data_dir=data_dir, config_file=config)
    path = _source_file(settings)
    connect_url, shown = _target_url(to, password_env, password_file, settings.data_dir)
    if sqlite_in_use(path) and not allow_running:  # (before this process opens the database: see sqlite_in_use)
        raise CopyFailed(
            f"{path} is open in another process (a running 'keybroker serve'?): stop it first, so that nothing it "
            "writes after the copy is lost (or pass --allow-running to copy a snapshot anyway)"
        )
    target = Database.from_url(connect_url, connect_timeout, settings.database.statement_timeout_seconds)
    audits: list[AuditSummary] = []
    try:
        with sqlite_snapshot(path) as snapshot:
            try:
                with snapshot.connect() as connection:
                    check_source(connection)  # (clearer refusals than a broken chain of a database that is none)
                    source_audit = verify_audit(connection, f"the source {path}")
            except SQLAlchemyError as exc:
                raise ConfigurationError(f"cannot read {path}: {error_reason(exc, None)}") from None
            result = copy_database(snapshot, target, verify=lambda c: audits.append(_same_audit(c, source_audit)))
    finally:
        target.close()
    _report(result, audits[0], path, _shown(shown), output_format)
    _next_steps(settings, _shown(shown), password_env, password_file)


def _same_audit(connection: Connection, source: AuditSummary) -> AuditSummary:
    copied = verify_audit(connection, "the target")
    if copied != source:
        raise CopyFailed(f"the target's audit chain ends at {copied.entries}, the source's at {source.entries}")
    return copied


def _report(result: CopyResult, audit: AuditSummary, source: Path, target: str, fmt: Output) -> None:
    if fmt is Output.JSON:
        output.emit_json(
            {
                "source": str(source),
                "target": target,
                "schema_revision": result.revision,
                "tables": {table.name: table.rows for table in result.tables},
                "rows": result.rows,
                "audit": {"entries": audit.entries, "head": audit.head},
                "seconds": round(result.seconds, 3),
            }
        )
    say = output.stderr.print
    say(f"Copied {source} into {target} (schema {result.revision}) in {result.seconds:.1f} s:")
    width = max(len(table.name) for table in result.tables)
    for table in result.tables:
        say(f"  {table.name:<{width}}  {table.rows:>9}")
    say(f"  {'total':<{width}}  {result.rows:>9} rows in {len(result.tables)} tables")
    say(f"Audit chain intact on the target: {audit.entries} entries, head {audit.head[:16]}…")


def _next_steps(settings: Settings, target: str, password_env: str | None, password_file: Path | None) -> None:
    if password_env:
        source_line = f"KEYBROKER_DATABASE__PASSWORD__ENV={password_env}"
    elif password_file:
        source_line = f"KEYBROKER_DATABASE__PASSWORD__FILE={shlex.quote(str(password_file.resolve()))}"
    else:
        source_line = "KEYBROKER_DATABASE__PASSWORD__ENV=NAME   (or ..._FILE=PATH, mode 0600)"
    lines = [
        "",
        "Next steps:",
        f"  1. Keep the SQLite deployment stopped: what it would record from now on is not in PostgreSQL. Keep "
        f"{settings.data_dir} (and its master key) until the new deployment serves.",
        "  2. On every replica, the database and where its password comes from (never in the URL):",
        f"       export KEYBROKER_DATABASE__URL={shlex.quote(target)}",
        f"       export {source_line}",
        "  3. On every replica, this deployment's KEK (the same on all; it is NOT in the database):",
        *_kek_lines(settings),
        "  4. On every replica: keybroker init --data-dir DIR (joins the deployment and checks the KEK; it issues no "
        "new admin token: the existing tokens are valid), then keybroker serve --data-dir DIR.",
    ]
    if (settings.data_dir / "keybroker.toml").is_file():
        lines.append(f"     Give each replica the settings of {settings.data_dir / 'keybroker.toml'} as well.")
    for line in lines:
        output.stderr.print(line)


def _kek_lines(settings: Settings) -> list[str]:
    lines: list[str] = []
    embedded = False
    for name, backend in settings.backends.items():
        if not isinstance(backend, EmbeddedBackendSettings):
            lines.append(f"       backend {name!r} keeps the keys itself: give every replica its settings and access.")
            continue
        embedded = True
        wrapper = backend.wrapper
        variable = f"KEYBROKER_BACKENDS__{name.upper()}__WRAPPER__MASTER_KEY"
        if not isinstance(wrapper, LocalWrapperSettings):
            lines.append(
                f"       backend {name!r}: its KEK is in {wrapper.type}; give every replica the same settings."
            )
        elif wrapper.master_key is not None:
            lines.append(f"       backend {name!r}: set the same {variable} on every replica.")
        else:
            key_file = shlex.quote(str(settings.resolve(wrapper.master_key_file)))
            lines.append(f'       export {variable}="$(base64 -w0 < {key_file})"')
            lines.append(f"     or copy {key_file} (mode 0600) into each replica's data directory.")
    if not embedded:
        key_file = shlex.quote(str(settings.resolve(LocalWrapperSettings().master_key_file)))
        lines.append(f"       copy {key_file} (keybroker's own keys) into each replica's data directory, mode 0600.")
    return lines


@db_app.command("backup")
@handled
def backup(
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The backup file to write (mode 0600).")],
    data_dir: DataDir = Path(".data"),
    config: ConfigFile = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --out file if it exists.")] = False,
) -> None:
    """Back up the SQLite database online (the server may keep running) into one file, and verify the copy. For
    PostgreSQL, use pg_dump (the command prints how). The master key is NOT in the backup: back it up apart.

    Example: keybroker db backup --data-dir /var/lib/keybroker --out /backup/keybroker.db
    """
    os.umask(0o077)
    settings = load_settings(data_dir=data_dir, config_file=config)
    path = _sqlite_of(settings)
    if path is None:
        _refuse_postgresql(settings, out)
    if not path.is_file():
        _source_file(settings)  # (raises: not initialised)
    if out.is_dir():
        raise CopyFailed(f"{out} is a directory; give the backup file's name")
    if out.exists() and not force:
        raise CopyFailed(f"{out} exists already; pass --force to replace it")
    output_file(out)  # (its directory exists, before the backup is written next to it)
    checked: list[tuple[str, int, AuditSummary]] = []
    size = backup_sqlite(path, out, replace=force, verify=lambda c: checked.append(_check_backup(c, out)))
    revision, keys, audit = checked[0]
    say = output.stderr.print
    say(f"Backed up {path} to {out} ({size} bytes, mode 0600): schema {revision}, {keys} keys.")
    say(f"Audit chain intact in the backup: {audit.entries} entries, head {audit.head[:16]}…")
    say("The KEK (master key) is not in the backup: without it the backup is useless; back it up apart, securely.")


def _check_backup(connection: Connection, out: Path) -> tuple[str, int, AuditSummary]:
    """The backup opens, holds a deployment (of any schema revision: a backup before an upgrade is one to keep)
    and its audit chain verifies."""
    try:
        revision = MigrationContext.configure(connection).get_current_revision()
        if revision is None or connection.execute(select(DeploymentRow.id)).first() is None:
            raise CopyFailed(f"the backup {out} holds no keybroker deployment; nothing was written")
        keys = len(connection.execute(select(KeyRow.id)).all())
        return revision, keys, verify_audit(connection, f"the backup {out}")
    except SQLAlchemyError as exc:
        raise CopyFailed(f"the backup does not open as a keybroker database: {error_reason(exc, None)}") from None


def _refuse_postgresql(settings: Settings, out: Path) -> NoReturn:
    url = make_url(settings.database.url or "")
    command = ["pg_dump", "-Fc", "-h", url.host or "HOST", "-p", str(url.port or 5432)]
    command += ["-U", url.username or "USER", "-d", url.database or "DATABASE", "-f", str(out)]
    output.say(
        "Error:", "the database is PostgreSQL: back it up with pg_dump (the password from PGPASSWORD or ~/.pgpass):"
    )
    output.stderr.print(f"  {shlex.join(command)}")
    restore = ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction"]
    output.stderr.print(f"Restore into a new, empty database: {shlex.join([*restore, '-d', 'NEW_DATABASE', str(out)])}")
    output.stderr.print("The KEK (master key) is not in the dump: back it up apart, securely.")
    raise typer.Exit(1)


@db_app.command("status")
@handled
def status(
    data_dir: DataDir = Path(".data"), config: ConfigFile = None, output_format: OutputOpt = Output.TABLE
) -> None:
    """The database (kind, where; never its password), its schema revision and this keybroker's.

    Example: keybroker db status --data-dir /var/lib/keybroker -o json
    """
    settings = load_settings(data_dir=data_dir, config_file=config)
    path = _sqlite_of(settings)
    info: dict[str, Any] = {"kind": "postgresql" if path is None else "sqlite", "head": schema_head()}
    if path is not None:
        info["database"] = str(path)
        if not path.is_file():
            _source_file(settings)  # (raises: not initialised)
        info["open_elsewhere"] = sqlite_in_use(path)  # (before this process opens it)
    else:
        info["database"] = _shown(make_url(settings.database.url or ""))
    info.update(_read_status(settings))
    info["up_to_date"] = info["revision"] == info["head"]
    if output_format is Output.JSON:
        output.emit_json(info)
        return
    state = "up to date" if info["up_to_date"] else "differs: 'keybroker init' or 'serve' upgrades an older schema"
    say = output.stderr.print
    say(f"database:   {info['kind']} {info['database']}")
    say(f"schema:     {info['revision'] or 'none'} (this keybroker: {info['head']}, {state})")
    say(f"deployment: {info['deployment'] or 'none'}")
    if info.get("open_elsewhere"):
        say("in use:     another process has the database open (a running server?)")


def _read_status(settings: Settings) -> dict[str, Any]:
    url = settings.database_url
    database = Database.from_url(url, settings.database.connect_timeout_seconds)
    try:
        revision = database.schema_revision() if database.is_migrated() else None
        deployment = None
        if revision is not None:
            with database.engine.connect() as connection:
                deployment = connection.execute(select(DeploymentRow.deployment_id)).scalar()
        return {"revision": revision, "deployment": deployment}
    except SQLAlchemyError as exc:  # (its cause kept: the CLI shows the driver's reason, never a password)
        raise BackendUnavailable("cannot read the database", code="database_unavailable") from exc
    finally:
        database.close()
