"""Copying a deployment's database: the SQLite database of one host into an empty PostgreSQL database (``keybroker
db migrate``), and consistent online backups of a SQLite database (``keybroker db backup``).

The copy is exact: every table of ``tables.Base.metadata`` (discovered, never listed by hand: ``copy_plan``), in
foreign-key order, every row with its primary key and every column as stored (BLOBs, timestamps to the
microsecond, JSON by value), so that the audit chain (seq, timestamps, hashes) still verifies. The target gets the
schema from the Alembic migrations, then the rows, in ONE transaction under the migration lock: whatever fails
(a check, a row, the verification) leaves the target as empty as it was. The source is read from a snapshot made
with SQLite's backup API, so that a process writing to it meanwhile cannot make the copy inconsistent.

Nothing here decrypts anything: key material, CA keys and service secrets travel wrapped by the KEK, which is not
in the database (the KEK must be given to the new deployment separately).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, Integer, Table, create_engine, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from keybroker.errors import BackendUnavailable, ConfigurationError, CopyFailed
from keybroker.storage import migrations
from keybroker.storage.db import MIGRATION_LOCK, Database, schema_head
from keybroker.storage.tables import Base, CertificateAuthorityRow, DeploymentRow

BATCH_ROWS = 500
_ALEMBIC_TABLE = "alembic_version"
_SHM_DEADMAN_BYTE = 128  # SQLite's unix VFS: every connection holds a shared lock on this byte of DB-shm
_CAS = ("service", "workload")
Verify = Callable[[Connection], None]


@dataclass(frozen=True, slots=True)
class TableCount:
    name: str
    rows: int


@dataclass(frozen=True, slots=True)
class CopyResult:
    revision: str
    tables: tuple[TableCount, ...]
    seconds: float

    @property
    def rows(self) -> int:
        return sum(table.rows for table in self.tables)


def copy_plan() -> list[Table]:
    """Every table keybroker has, parents before children (foreign keys): what a copy copies, in that order."""
    return list(Base.metadata.sorted_tables)


# --- SQLite: the source --------------------------------------------------------------------------------------


def sqlite_file(engine_url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL; None for any other database."""
    url = make_url(engine_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def sqlite_in_use(path: Path) -> bool:
    """Whether another process has the (WAL-mode) database open, e.g. a running ``keybroker serve``: each
    connection holds a shared lock on a byte of ``PATH-shm`` while it is open. Best effort (SQLite's unix VFS).

    Call it before this process opens the database itself: POSIX locks belong to the process, and closing the file
    here would drop the locks of this process's own connections to it."""
    try:
        fd = os.open(f"{path}-shm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # removed by the last connection to close
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DEADMAN_BYTE, os.SEEK_SET)
        except OSError:
            return True
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DEADMAN_BYTE, os.SEEK_SET)
        return False
    finally:
        os.close(fd)


def backup_sqlite(source: Path, out: Path, *, replace: bool = False, verify: Verify | None = None) -> int:
    """Write a consistent copy of the SQLite database ``source`` to ``out`` (mode 0600) with SQLite's online backup
    API, which reads one snapshot while other processes go on reading and writing; returns its size in bytes.

    The copy is a single file (rollback journal mode; keybroker turns WAL on again when it opens it), checked
    (``PRAGMA quick_check``, then ``verify`` on a connection to it) before it appears under ``out``: atomically,
    never overwriting an existing file unless ``replace``."""
    if not replace and out.exists():
        raise FileExistsError(errno.EEXIST, "exists already", str(out))
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(handle)
    partial = Path(name)
    try:
        _sqlite_backup(source, partial)
        if verify is not None:
            engine = create_engine(f"sqlite:///{partial}", hide_parameters=True)
            try:
                with engine.connect() as connection:
                    verify(connection)
            finally:
                engine.dispose()
        with partial.open("rb+") as written:
            os.fsync(written.fileno())
        _publish(partial, out, replace)
        _fsync_directory(out.parent)
        return out.stat().st_size
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _publish(partial: Path, out: Path, replace: bool) -> None:
    if replace:
        os.replace(partial, out)
        return
    try:
        os.link(partial, out)  # fails if ``out`` appeared meanwhile: never clobbered
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name first, then fill it
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(partial, out)


def _sqlite_backup(source: Path, destination: Path) -> None:
    try:
        # mode=rw: a missing source is an error, never an empty database made here.
        reader = sqlite3.connect(f"file:{quote(str(source))}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot open the SQLite database {source}: {exc}") from None
    try:
        writer = sqlite3.connect(destination)
        try:
            reader.backup(writer)  # in one step: one read transaction, one snapshot
            writer.execute("PRAGMA journal_mode=DELETE")
            check = writer.execute("PRAGMA quick_check").fetchone()
            if check != ("ok",):
                raise CopyFailed(f"the backup of {source} does not pass SQLite's quick_check: {check}")
        finally:
            writer.close()
    except sqlite3.Error as exc:
        raise CopyFailed(f"backing up {source} failed: {exc}") from None
    finally:
        reader.close()
    destination.chmod(0o600)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def sqlite_snapshot(source: Path) -> Iterator[Engine]:
    """An engine over a consistent snapshot of ``source`` (a backup beside it, mode 0600, removed afterwards)."""
    handle, name = tempfile.mkstemp(prefix=f".{source.name}.snapshot-", suffix=".db", dir=source.parent)
    os.close(handle)
    snapshot = Path(name)
    try:
        _sqlite_backup(source, snapshot)
        engine = create_engine(f"sqlite:///{snapshot}", hide_parameters=True)
        try:
            yield engine
        finally:
            engine.dispose()
    finally:
        with contextlib.suppress(FileNotFoundError):
            snapshot.unlink()


# --- the copy ------------------------------------------------------------------------------------------------


def check_source(connection: Connection) -> str:
    """Raise ``ConfigurationError`` unless ``connection`` holds a complete keybroker deployment at this code's
    schema head; its schema revision."""
    tables = set(inspect(connection).get_table_names())
    if _ALEMBIC_TABLE not in tables:
        raise ConfigurationError("the source database holds no keybroker deployment (run 'keybroker init' first)")
    revision = MigrationContext.configure(connection).get_current_revision()
    head = schema_head()
    if revision != head:
        raise ConfigurationError(
            f"the source database's schema is revision {revision}, this keybroker's is {head}: copy only a "
            "deployment at this version's schema (if it is older, run 'keybroker init' or 'serve' on it with this "
            "version first, which upgrades it; if it is newer, use that newer keybroker)"
        )
    unknown = sorted(tables - set(Base.metadata.tables) - {_ALEMBIC_TABLE})
    if unknown:
        raise ConfigurationError(f"the source database has tables this keybroker does not know: {', '.join(unknown)}")
    if connection.execute(select(DeploymentRow.id)).first() is None:
        raise ConfigurationError("the source database holds no keybroker deployment (run 'keybroker init' first)")
    names = set(connection.execute(select(CertificateAuthorityRow.name)).scalars())
    if not names.issuperset(_CAS):
        raise ConfigurationError(
            "the source's CAs are still in its data directory (from before they moved into the database): run "
            "'keybroker init' on it once with this version, which imports them, then copy"
        )
    return head


def copy_database(source: Engine, target: Database, verify: Verify | None = None) -> CopyResult:
    """Copy the deployment in ``source`` (SQLite; read from a snapshot, ``sqlite_snapshot``) into ``target``, an
    empty PostgreSQL database (module docstring). ``verify`` runs on the target connection after the rows are in,
    before the commit: raising there undoes everything."""
    started = time.monotonic()
    if target.engine.dialect.name != "postgresql":
        raise ConfigurationError("the target must be a PostgreSQL database (postgresql://USER@HOST:PORT/DATABASE)")
    with source.connect() as reading:
        try:
            revision = check_source(reading)
            expected = {table.name: _count(reading, table) for table in copy_plan()}
        except SQLAlchemyError as exc:
            raise ConfigurationError(f"cannot read the source database: {error_reason(exc, None)}") from None
        # Connectivity errors keep their cause (SQLAlchemy's hide bound values; libpq never quotes the password):
        # the CLI shows an operator the driver's reason. Others are summarised here, without the cause.
        try:
            connection = target.engine.connect()
        except (OperationalError, InterfaceError) as exc:
            raise BackendUnavailable("cannot connect to the target database", code="database_unavailable") from exc
        with connection as writing:
            try:
                with writing.begin():
                    copied = _copy_into(reading, writing, expected, verify)
            except (OperationalError, InterfaceError) as exc:
                raise BackendUnavailable(
                    "the target database failed during the copy (nothing was written)", code="database_unavailable"
                ) from exc
            except SQLAlchemyError as exc:
                reason = error_reason(exc, target.engine.url.password)
                raise CopyFailed(f"copying into the target failed, nothing was written: {reason}") from None
    return CopyResult(revision, copied, time.monotonic() - started)


def _copy_into(
    reading: Connection, writing: Connection, expected: dict[str, int], verify: Verify | None
) -> tuple[TableCount, ...]:
    # Within this transaction only: DDL, batches and the checks may take longer than a request's statement.
    writing.exec_driver_sql("SET LOCAL statement_timeout = '30min'")
    writing.exec_driver_sql("SET LOCAL lock_timeout = '1min'")
    writing.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")  # replicas starting now wait
    _check_empty(writing)
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = writing
    command.upgrade(config, "head")  # joins this transaction: rolled back with it
    if MigrationContext.configure(writing).get_current_revision() != schema_head():
        raise CopyFailed("the target's schema did not reach this keybroker's revision; nothing was written")
    for table in reversed(copy_plan()):
        writing.execute(table.delete())  # rows the migrations seeded (the audit head, the revision counter)
    counts = []
    for table in copy_plan():
        try:
            rows = _copy_table(reading, writing, table)
        except SQLAlchemyError as exc:
            if isinstance(exc, (OperationalError, InterfaceError)):
                raise
            reason = error_reason(exc, writing.engine.url.password)
            raise CopyFailed(f"copying table {table.name} failed, nothing was written: {reason}") from None
        found = _count(writing, table)
        if rows != expected[table.name] or found != rows:
            raise CopyFailed(
                f"table {table.name}: {expected[table.name]} rows in the source, {found} in the target; "
                "nothing was written"
            )
        counts.append(TableCount(table.name, rows))
    _reset_sequences(writing)
    if verify is not None:
        verify(writing)
    return tuple(counts)


def _check_empty(connection: Connection) -> None:
    present = set(inspect(connection).get_table_names()) & (set(Base.metadata.tables) | {_ALEMBIC_TABLE})
    if not present:
        return
    deployment = None
    if DeploymentRow.__tablename__ in present:
        deployment = connection.execute(select(DeploymentRow.deployment_id)).scalar()
    if deployment is not None:
        raise ConfigurationError(
            f"the target database holds a keybroker deployment already (deployment {deployment}); nothing was "
            "changed. Copy into a new, empty database"
        )
    raise ConfigurationError(
        f"the target database is not empty (it has keybroker's tables: {', '.join(sorted(present))}); nothing was "
        "changed. Copy into a new, empty database"
    )


def _copy_table(reading: Connection, writing: Connection, table: Table) -> int:
    query = select(table).order_by(*table.primary_key.columns)
    copied = 0
    result = reading.execution_options(yield_per=BATCH_ROWS).execute(query)
    for batch in result.partitions():
        writing.execute(table.insert(), [row._asdict() for row in batch])
        copied += len(batch)
    return copied


def _count(connection: Connection, table: Table) -> int:
    return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def _reset_sequences(connection: Connection) -> None:
    """Integer primary keys the database numbers itself (SERIAL/IDENTITY): their sequence would hand out 1 again,
    so each is set to continue after the largest copied value."""
    preparer = connection.dialect.identifier_preparer
    for table in copy_plan():
        for column in table.primary_key.columns:
            if not isinstance(column.type, Integer):
                continue
            sequence = connection.execute(
                text("SELECT pg_get_serial_sequence(:table, :column)"),
                {"table": preparer.format_table(table), "column": column.name},
            ).scalar()
            if sequence is None:
                continue
            largest = connection.execute(select(func.max(column))).scalar()
            connection.execute(
                text("SELECT setval(CAST(:sequence AS regclass), :next, false)"),
                {"sequence": sequence, "next": int(largest or 0) + 1},
            )


def error_reason(exc: SQLAlchemyError, secret: str | None) -> str:
    """The database's own message (psycopg's: host, port, user, what failed; never bound values), on one line and
    without the password, even if a driver were to quote it."""
    cause: BaseException = getattr(exc, "orig", None) or exc
    diag = getattr(cause, "diag", None)
    message = getattr(diag, "message_primary", None) or str(cause) or type(cause).__name__
    message = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    if secret:
        message = message.replace(secret, "***")
    return message
