"""Engine and session factory. The only dialect-specific code is the SQLite connection set-up (WAL, FKs)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicCommandError
from sqlalchemy import Connection, DateTime, Engine, Executable, Row, TypeDecorator, create_engine, event, inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from keybroker.errors import BackendUnavailable, ConfigurationError
from keybroker.storage.direct import DirectStatements

_MIGRATIONS = Path(__file__).with_name("migrations")
# The largest integer SQLite and PostgreSQL (BIGINT) can bind: integers that reach SQL are bounded by it at the edge.
SQL_INT_MAX = 2**63 - 1


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always returns timezone-aware datetimes (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def make_engine(url: str, connect_timeout: float = 5.0, statement_timeout: float = 8.0) -> Engine:
    """SQLite (one host) or PostgreSQL. On PostgreSQL every wait is bounded, so that an unreachable or stuck
    database answers 503 ``database_unavailable`` within about 10 s instead of hanging requests: connecting
    (``connect_timeout``), a statement including its lock waits (``statement_timeout``), a free pooled connection
    (``pool_timeout``). No pre-ping (it would cost a round trip on every checkout, the hot path's budget is three
    per transfer): a connection found broken is a disconnect, on which SQLAlchemy discards every pooled connection
    made before it, so after a database restart one request per process may fail (503) and ``read`` retries its
    statement once on a fresh connection. TCP keepalives notice a peer that vanished while the pool was idle."""
    if url.startswith("sqlite"):
        # The pool keeps as many connections as the server has worker threads (anyio's default is 40): opening a
        # SQLite connection runs the PRAGMAs below and closing one may checkpoint the WAL, so overflow connections
        # that are opened and thrown away per request cost more than the query they serve.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,
            pool_size=40,
            max_overflow=24,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    # hide_parameters: SQL errors never carry the bound values (ciphertexts, labels, token hashes) into logs.
    statement_ms = int(statement_timeout * 1000)
    return create_engine(
        url,
        pool_size=20,
        max_overflow=40,
        pool_timeout=connect_timeout,
        pool_recycle=1800,
        hide_parameters=True,
        connect_args={
            "connect_timeout": max(1, int(connect_timeout)),
            "options": f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms}",
            "application_name": "keybroker",
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        },
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


class _WriterLock:
    """Orders SQLite writers: threads of this process on an RLock, processes (``server.workers`` > 1, the CLI) on
    an ``flock`` of a file beside the database. SQLite itself resolves writer contention by sleeping and retrying
    (1, 2, 5 ... 100 ms), which turns a busy moment into long tail latencies; a blocked ``flock`` wakes as soon as
    the holder lets go."""

    def __init__(self, database_file: str | None) -> None:
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        if database_file:
            with contextlib.suppress(OSError):  # read-only or odd locations: threads are still ordered
                self._fd = os.open(f"{database_file}.writelock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> None:
        self._thread_lock.acquire()
        self._depth += 1
        if self._depth == 1 and self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._depth -= 1
                self._thread_lock.release()
                raise

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


MIGRATION_LOCK = 0x6B627200  # the advisory lock key of migrations ("kbr")


@functools.cache  # the migration scripts ship with the code: their head does not change while it runs
def schema_head() -> str:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def _refuse_newer(connection: Connection, config: Config) -> None:
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        return
    try:
        ScriptDirectory.from_config(config).get_revision(current)
    except AlembicCommandError:
        raise ConfigurationError(
            f"the database's schema is revision {current}, newer than this keybroker knows (up to {schema_head()}): "
            "a later keybroker has upgraded it; run that version (or restore a backup from before the upgrade)"
        ) from None


@contextmanager
def unavailable_as_domain_error() -> Iterator[None]:
    """The database's connectivity, timeout and locking errors as 503 ``database_unavailable`` (the one place they
    are translated). Integrity errors pass through: callers handle them. The client-safe detail says nothing of
    the database's address; ``database_reason`` of the cause tells an operator (the CLI, the logs) what failed."""
    try:
        yield
    except (OperationalError, InterfaceError, SQLAlchemyTimeoutError) as exc:
        raise BackendUnavailable("the database is unavailable", code="database_unavailable") from exc


def database_reason(cause: BaseException | None) -> str:
    """The driver's own one-line reason (e.g. 'password authentication failed for user "keybroker"'), for
    operators: SQLAlchemy hides bound parameters, and libpq never quotes the password in its messages."""
    original = getattr(cause, "orig", None) or cause
    if original is None:
        return "unknown"
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    reason = lines[0] if lines else type(original).__name__
    for line in lines:  # psycopg: 'connection failed: connection to server at ... failed: FATAL:  <reason>'
        if "FATAL:" in line:
            reason = line.split("FATAL:", 1)[1].strip()
            break
    return reason[:300]


class Database:
    """Owns the engine and hands out sessions; each ``transaction()`` commits or rolls back as a unit."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Single statements on PostgreSQL run in autocommit (the same pool): no BEGIN/COMMIT round trips.
        self._autocommit = (
            engine if engine.dialect.name == "sqlite" else engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        # SQLite has one writer at a time: writers queue on _WriterLock instead of SQLite's sleeping busy handler.
        self._write_lock: _WriterLock | None = None
        if engine.dialect.name == "sqlite":
            database = engine.url.database
            file_backed = bool(database) and database != ":memory:" and not str(database).startswith("file:")
            self._write_lock = _WriterLock(database if file_backed else None)

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Held around a SQLite write transaction (orders this process's threads and the other processes)."""
        lock = self._write_lock
        if lock is not None:
            lock.acquire()
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    @functools.cached_property
    def direct(self) -> DirectStatements:
        """The hot path's statements on the driver itself (``keybroker.storage.direct``)."""
        return DirectStatements(self.engine, self.writer if self.is_sqlite else None)

    @classmethod
    def from_url(cls, url: str, connect_timeout: float = 5.0, statement_timeout: float = 8.0) -> Database:
        return cls(make_engine(url, connect_timeout, statement_timeout))

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Session]:
        """A unit of work. ``write=True`` for transactions that change data (it orders SQLite writers)."""
        ordered = self.writer() if write else contextlib.nullcontext()
        with ordered, unavailable_as_domain_error(), self._sessions.begin() as session:
            yield session

    def query(self, statement: Executable, params: Mapping[str, Any] | None = None) -> Sequence[Row[Any]]:
        """One read-only statement outside any transaction: on PostgreSQL in autocommit, a single round trip with
        no BEGIN and COMMIT around it (the hot path's lookups). A connection found broken (a database restart)
        is retried once on a fresh one: a read is safe to repeat."""
        with unavailable_as_domain_error():
            for attempt in (1, 2):
                try:
                    return self._single(statement, params)
                except DBAPIError as exc:
                    if attempt == 2 or not exc.connection_invalidated:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _single(self, statement: Executable, params: Mapping[str, Any] | None) -> Sequence[Row[Any]]:
        with self._autocommit.connect() as connection:
            result = connection.execute(statement, dict(params or {}))
            rows = result.all() if result.returns_rows else []
            if self.is_sqlite:
                connection.rollback()
            return rows

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent). On PostgreSQL the whole upgrade is one transaction
        under an advisory lock, so replicas starting together migrate once: the others wait, then find it done.
        A schema newer than this code (written by a later keybroker) is refused, never touched."""
        with unavailable_as_domain_error(), self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Waiting for another replica's migration is fine; the usual statement bound is not meant for it.
                connection.exec_driver_sql("SET LOCAL statement_timeout = '10min'")
                connection.exec_driver_sql("SET LOCAL lock_timeout = '10min'")
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            config = Config()
            config.set_main_option("script_location", str(_MIGRATIONS))
            config.attributes["connection"] = connection
            _refuse_newer(connection, config)
            command.upgrade(config, "head")

    def schema_revision(self) -> str | None:
        with self.transaction() as session:
            return MigrationContext.configure(session.connection()).get_current_revision()

    def is_migrated(self) -> bool:
        with unavailable_as_domain_error():
            return inspect(self.engine).has_table("alembic_version")

    def ping(self) -> None:
        with self.transaction() as session:
            session.connection().exec_driver_sql("SELECT 1")

    def close(self) -> None:
        if "direct" in self.__dict__:
            self.direct.close()
        self.engine.dispose()
        if self._write_lock is not None:
            self._write_lock.close()
