"""The transfer's hot statements straight on the DB-API driver (sqlite3, psycopg), without SQLAlchemy's per-call
work (statement compilation, result processing, ORM sessions): a revision read costs about 5 µs this way instead
of 150 µs, the nonce-use and audit write 155 µs instead of 776 µs.

Connections are taken from the database's engine (so they have its connect-time set-up: SQLite's WAL and busy
timeout, PostgreSQL's statement/lock timeouts and keepalives) and kept here, in autocommit, in a small LIFO stack;
they never go back to the engine's pool (closing one closes it), so the engine's own sessions never see one.
A read is one statement; PostgreSQL prepares it on the connection (``prepare=True``) so that a repeated
statement is neither parsed nor planned again. A write is a function of a cursor run as one
transaction: on SQLite ``BEGIN IMMEDIATE`` … ``COMMIT`` under the database's writer lock (``Database.writer``),
on PostgreSQL the caller's single statement, atomic by itself.

Vendor exceptions are translated once, in ``_translate``: a connection that fails is discarded (never returned to
the stack); one that was lost discards every idle one too (they all predate the same restart); a read whose
connection was lost is retried once on a fresh connection (safe to repeat), a write never (whether it committed is
unknown); what remains is ``BackendUnavailable``. Thread-safety: any thread may call any method; a connection is
used by one thread at a time.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from keybroker.errors import BackendUnavailable

T = TypeVar("T")
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")  # ":name", not the "::" of a PostgreSQL cast
_MAX_IDLE = 16


@dataclass(frozen=True)
class Statement:
    """SQL with ``:name`` parameters, in each driver's own parameter style (no ``:word`` inside string literals:
    they are rewritten too)."""

    sql: str
    postgres: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "postgres", _NAMED.sub(r"%(\1)s", self.sql))


class _Lost(Exception):
    """The connection was lost under a statement (PostgreSQL): ``error`` is the driver's exception."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def _conflict_in(error: BaseException, table: str) -> bool:
    """Whether a unique-constraint refusal is about ``table`` (sqlite3 names it in the message, psycopg in diag)."""
    diagnostics = getattr(error, "diag", None)
    if diagnostics is not None:
        return bool(getattr(diagnostics, "table_name", None) == table)
    return f"UNIQUE constraint failed: {table}." in str(error)


class Cursor(Protocol):
    """What a write function gets: ``execute`` one statement, ``rows`` of the last one."""

    def execute(self, statement: Statement, params: Mapping[str, Any]) -> None: ...

    def rows(self) -> list[tuple[Any, ...]]: ...


class _SqliteCursor:
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    def execute(self, statement: Statement, params: Mapping[str, Any]) -> None:
        self._cursor.execute(statement.sql, params)

    def rows(self) -> list[tuple[Any, ...]]:
        return self._cursor.fetchall()


class _PostgresCursor:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, statement: Statement, params: Mapping[str, Any]) -> None:
        self._cursor.execute(statement.postgres, params, prepare=True)

    def rows(self) -> list[tuple[Any, ...]]:
        return list(self._cursor.fetchall())


def _driver_errors(
    dialect: str,
) -> tuple[type[BaseException], tuple[type[BaseException], ...], type[BaseException]]:
    """The driver's exceptions: a constraint refused a statement; the database could not be reached or the
    statement could not finish in time (``database_unavailable``; PostgreSQL's ``OperationalError``: sqlite3's
    covers a missing table too, so on SQLite every failed write is the caller's code); anything it could not do."""
    if dialect == "sqlite":
        return sqlite3.IntegrityError, (), sqlite3.Error
    import psycopg  # only with a PostgreSQL URL

    return psycopg.IntegrityError, (psycopg.OperationalError,), psycopg.Error


def _translate(error: BaseException, code: str) -> BackendUnavailable:
    """THE translation of a driver's exception (see ``_driver_errors``): the detail names no address."""
    failed = BackendUnavailable("the database is unavailable", code=code)
    failed.__cause__ = error
    return failed


class DirectStatements:
    def __init__(self, engine: Engine, writer: Callable[[], AbstractContextManager[None]] | None) -> None:
        self._engine = engine
        self._writer = writer  # SQLite: the context manager that orders writers (Database.writer)
        self._sqlite = engine.dialect.name == "sqlite"
        self._conflict, self._unreachable, self._errors = _driver_errors(engine.dialect.name)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def fetch(self, statement: Statement, params: Mapping[str, Any] | None = None) -> Sequence[tuple[Any, ...]]:
        """One read-only statement's rows. Retried once, on a fresh connection, only when the connection was lost
        (a database restart); a statement that timed out is not run again (the outage bound stays one timeout)."""
        for attempt in (1, 2):
            try:
                with self._connection() as connection:
                    if self._sqlite:
                        rows: list[tuple[Any, ...]] = connection.execute(statement.sql, params or {}).fetchall()
                        return rows
                    with connection.cursor() as cursor:
                        cursor.execute(statement.postgres, params or {}, prepare=True)
                        return list(cursor.fetchall())
            except _Lost as lost:
                if attempt == 2:
                    raise _translate(lost.error, "database_unavailable") from lost.error
            except self._errors as exc:
                raise _translate(exc, "database_unavailable") from exc
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def write(
        self, work: Callable[[Cursor], T | None], code: str = "database_unavailable", conflict_table: str = ""
    ) -> T | None:
        """``work`` as one transaction, committed if it returns a value; None, with nothing written, when a unique
        constraint of ``conflict_table`` refuses one of its statements (any other constraint is a failure). On
        SQLite a ``work`` that returns None is rolled back too; on PostgreSQL ``work`` is a single statement in
        autocommit, atomic by itself, so there is nothing to roll back. Never retried (whether it committed would be
        unknown). A database that cannot be reached, or a statement that timed out, is ``BackendUnavailable``
        ``database_unavailable``; any other failure of the database ``BackendUnavailable`` with ``code``."""
        try:
            with self._connection() as connection:
                try:
                    return self._write(connection, work)
                except self._conflict as exc:
                    if conflict_table and _conflict_in(exc, conflict_table):
                        return None  # rolled back (PostgreSQL: the statement, atomic by itself, did nothing)
                    raise _translate(exc, code) from exc
        except _Lost as lost:
            raise _translate(lost.error, "database_unavailable") from lost.error
        except self._unreachable as exc:
            raise _translate(exc, "database_unavailable") from exc
        except self._errors as exc:
            raise _translate(exc, code) from exc

    def _write(self, connection: Any, work: Callable[[Cursor], T | None]) -> T | None:
        if not self._sqlite:  # autocommit: work issues one statement, atomic by itself
            with connection.cursor() as pg_cursor:
                return work(_PostgresCursor(pg_cursor))
        assert self._writer is not None
        with self._writer():
            cursor = connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                result = work(_SqliteCursor(cursor))
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("ROLLBACK" if result is None else "COMMIT")
            return result

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection of the stack (or a new one). One that fails is closed; one that was lost (PostgreSQL:
        the server went away) takes every idle one with it, as SQLAlchemy's pool does on a disconnect, since they
        were made before the same restart: the caller sees ``_Lost``."""
        with self._lock:
            proxy = self._idle.pop() if self._idle else None
        if proxy is None:
            proxy = self._open()
        try:
            yield proxy.driver_connection
        except BaseException as exc:
            lost = not self._sqlite and isinstance(exc, self._errors) and bool(proxy.driver_connection.broken)
            proxy.invalidate()  # its state is unknown: closed, a fresh one next time
            if lost:
                self._discard_idle()
                raise _Lost(exc) from exc
            raise
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(proxy)
                return
        proxy.invalidate()

    def _discard_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for proxy in idle:
            proxy.invalidate()

    def _open(self) -> Any:
        try:
            proxy = self._engine.raw_connection()
        except (DBAPIError, PoolTimeout) as exc:  # SQLAlchemy wraps the driver's connect errors
            raise _translate(exc, "database_unavailable") from exc
        driver: Any = proxy.driver_connection
        if self._sqlite:
            driver.isolation_level = None  # autocommit; writes BEGIN IMMEDIATE themselves
        else:
            driver.autocommit = True
        return proxy

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for proxy in idle:
            proxy.invalidate()  # not back into the engine's pool: it is in autocommit
