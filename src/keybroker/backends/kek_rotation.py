"""Moving everything a KEK wraps under another KEK (``keybroker kek rotate --to FILE``).

FILE holds the backend's new section exactly as it will stand in ``keybroker.toml`` (``[backends.<name>]`` with its
new ``wrapper``); the configuration still names the current KEK while the rotation runs. Moved: the data keys of
that backend and, when the same KEK wraps them, keybroker's own secrets (``kek_records``). For each record the
secret is unwrapped by the current KEK, wrapped by the new one, opened again by the new one and only then written,
with its new ``kek_id``, by a conditional update (the row still holds what was read): a record is always wholly
under one KEK or the other, so a crash at any moment loses nothing and a second run moves only what is left, never
anything twice. The data keys go first, in batches of one transaction each; keybroker's own secrets last, in one
transaction, so that the KEK the deployment records for them (``ca.recorded_kek_id``) changes once, at the end.

Before anything changes: every replica stopped (one running with the current KEK would go on wrapping new keys with
it: on PostgreSQL no heartbeat for 30 s, on SQLite no other process has the database open), the current and the new
KEK usable and not the same, no record of the backend under a third KEK, no material without its key record, and
every record to move opened once under the current KEK. Audited: ``kek_rotation.start`` when records begin to move,
``kek_rotation.finish`` when none is left (target ``kek``); ``kek_records.check_keks`` reads them to tell a replica
started meanwhile what to do.
"""

from __future__ import annotations

import contextlib
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.backends.base import KeyWrapper
from keybroker.backends.kek_records import (
    AUDIT_TARGET,
    FINISH,
    START,
    Wrapped,
    census,
    last_rotation,
    material,
    orphans,
    own_secrets,
)
from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.backends.registry import build_wrapper
from keybroker.ca import recorded_kek_id
from keybroker.clock import Clock
from keybroker.config import EmbeddedBackendSettings, LocalWrapperSettings, Settings, WrapperSettings
from keybroker.errors import BackendUnavailable, ConfigurationError, Conflict, KeybrokerError, StoredKeyCorrupt
from keybroker.storage.cluster import HEARTBEAT, Replicas
from keybroker.storage.copy import sqlite_file, sqlite_in_use
from keybroker.storage.db import Database
from keybroker.storage.tables import Base

BATCH = 100
STOPPED_AFTER = 3 * HEARTBEAT  # a replica silent this long counts as stopped (as in ``keybroker cluster status``)
Progress = Callable[[int, int], None]  # (moved so far, to move): after every committed batch


@dataclass(frozen=True, slots=True)
class Target:
    """The ``--to`` file: the backend whose KEK changes and its new wrapper."""

    backend: str
    wrapper: WrapperSettings
    file: Path


@dataclass(frozen=True, slots=True)
class Report:
    backend: str
    from_kek: str
    to_kek: str
    moved: int  # records re-wrapped by this run
    total: int  # records under the new KEK now (this backend's and keybroker's own)
    created_key_file: Path | None = None  # a new local master key this run created
    finished_before: str | None = None  # nothing to move: when the rotation finished (None: it never began)


def open_deployment(settings: Settings, exclusive: bool = False) -> Database:
    """The deployment's database, migrated as ``serve`` would; ``ConfigurationError`` when there is none.
    ``exclusive``: refused (``replicas_running``) while another process has a SQLite database open."""
    missing = ConfigurationError(f"{settings.data_dir} is not initialised; run 'keybroker init --data-dir DIR' first")
    if not settings.data_dir.is_dir():
        raise missing
    path = sqlite_file(settings.database_url)
    if exclusive and path is not None and sqlite_in_use(path):  # (before this process opens it: see sqlite_in_use)
        raise Conflict(
            f"{path} is open in another process (a keybroker serve?): stop it first; nothing was changed",
            code="replicas_running",
        )
    database = Database.from_url(
        settings.database_url, settings.database.connect_timeout_seconds, settings.database.statement_timeout_seconds
    )
    try:
        if not database.is_migrated():
            raise missing
        database.migrate()
        if recorded_kek_id(database, settings.data_dir) is None:
            raise missing
    except BaseException:
        database.close()
        raise
    return database


def read_target(path: Path) -> Target:
    """Parse and validate ``--to FILE``. ``ConfigurationError`` naming the problem; reads no credential."""
    where = f"--to {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"{where}: no such file") from None
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{where}: not valid TOML: {exc}") from None
    shape = "one [backends.<name>] section with the new wrapper, as it will be in keybroker.toml"
    other = sorted(set(data) - {"backends"})
    if other:
        raise ConfigurationError(f"{where}: holds {', '.join(other)}; it must hold only {shape}")
    sections = data.get("backends")
    if not isinstance(sections, dict) or len(sections) != 1:
        found = len(sections) if isinstance(sections, dict) else 0
        raise ConfigurationError(f"{where}: holds {found} backend sections; it must hold {shape}")
    ((name, section),) = sections.items()
    if not isinstance(section, dict) or section.get("type", "embedded") != "embedded":
        raise ConfigurationError(f"{where}: backends.{name} is not an embedded backend; only those have a KEK")
    if "wrapper" not in section:
        raise ConfigurationError(f"{where}: backends.{name} gives no wrapper = {{ type = ... }} (the new KEK)")
    if isinstance(section["wrapper"], dict) and "master_key" in section["wrapper"]:
        raise ConfigurationError(
            f"{where}: a master key does not go into a file of settings; give master_key_file (32 random bytes, "
            "mode 0600; created if it does not exist)"
        )
    try:
        parsed = EmbeddedBackendSettings.model_validate(section)
    except ValidationError as exc:
        problems = [
            f"backends.{name}.{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        raise ConfigurationError(f"{where}: " + "; ".join(problems)) from None
    return Target(str(name), parsed.wrapper, path.resolve())


def rotate(
    settings: Settings,
    target: Target,
    database: Database,
    audit: AuditLog,
    context: AuditContext,
    clock: Clock,
    progress: Progress | None = None,
) -> Report:
    """Move every record of ``target.backend``'s KEK under the new one (module docstring). Raises before anything
    changes when a check fails; after a failure later on, running it again finishes the work."""
    backend = settings.backends.get(target.backend)
    if not isinstance(backend, EmbeddedBackendSettings):
        configured = sorted(n for n, b in settings.backends.items() if isinstance(b, EmbeddedBackendSettings))
        raise ConfigurationError(
            f"--to {target.file}: backend {target.backend!r} is not an embedded backend of this configuration "
            f"(embedded backends: {', '.join(configured) or 'none'}; one holding keybroker's own keys can be added as "
            '[backends.embedded] with wrapper = { type = "local", master_key_file = "master.key" })'
        )
    if not database.is_sqlite:  # (SQLite: open_deployment(exclusive=True) asked the one host's processes)
        _refuse_running_replicas(database, clock)
    old = _usable(lambda: _checked(build_wrapper(settings, backend.wrapper, clock)), "the current KEK", target,
                  "it is needed until the rotation finishes: restore it, or configure it as it was")  # fmt: skip
    try:
        return _rotate(settings, target, database, audit, context, clock, old, progress)
    finally:
        old.close()


def _rotate(
    settings: Settings,
    target: Target,
    database: Database,
    audit: AuditLog,
    context: AuditContext,
    clock: Clock,
    old: KeyWrapper,
    progress: Progress | None,
) -> Report:
    name = target.backend
    counts = census(database).material_of(name)
    stray = orphans(database, name)
    if stray:
        raise Conflict(
            f"backend {name!r} holds {stray} material row(s) without a key record (a create or delete a crash "
            "interrupted): run 'keybroker backends reconcile --older-than 0' first; nothing was changed",
            code="material_pending",
        )
    created = _new_key_file(settings, target.wrapper)
    began = False
    try:
        new = _usable(lambda: _checked(build_wrapper(settings, target.wrapper, clock), prepare=True), "the new KEK",
                      target, "nothing was changed")  # fmt: skip
        try:
            _refuse_same_or_third(database, name, old.kek_id, new.kek_id, counts, target)
            pending = counts[old.kek_id] + len(own_secrets(database, old.kek_id))
            details: dict[str, Any] = {"backend": name, "from": old.kek_id, "to": new.kek_id,
                                       "to_file": str(target.file)}  # fmt: skip
            if pending == 0:
                return _nothing_to_move(database, audit, context, details, old, new, created)
            for page in _pages(database, name, old.kek_id):  # every record opens under the current KEK, or none moves
                for record in page:
                    with _naming(record, "nothing was changed"):
                        old.unwrap(record.wrapped, record.context, record.kek_id)
            audit.record(context, AuditEvent(START, "success", AUDIT_TARGET, {**details, "records": pending}))
            began = True
            moved = _move_all(database, name, old, new, pending, progress)
            total = census(database).material_of(name)[new.kek_id] + len(own_secrets(database, new.kek_id))
            finish = {**details, "moved": moved, "records": total}
            audit.record(context, AuditEvent(FINISH, "success", AUDIT_TARGET, finish))
            return Report(name, old.kek_id, new.kek_id, moved, total, created)
        finally:
            new.close()
    except BaseException:
        if created is not None and not began:
            created.unlink(missing_ok=True)  # nothing was wrapped with it
        raise


def _refuse_same_or_third(
    database: Database, name: str, old: str, new: str, counts: Mapping[str, int], target: Target
) -> None:
    if new == old:
        raise ConfigurationError(_same_kek(database, name, old, counts, target))
    third = {kek: rows for kek, rows in counts.items() if kek not in (old, new)}
    if third:
        raise ConfigurationError(
            f"backend {name!r} holds "
            + ", ".join(f"{rows} record(s) under KEK {kek}" for kek, rows in sorted(third.items()))
            + f", neither the current KEK {old} nor the new {new}: finish the rotation that put them there first "
            "(keybroker kek status); nothing was changed"
        )


def _move_all(
    database: Database, name: str, old: KeyWrapper, new: KeyWrapper, pending: int, progress: Progress | None
) -> int:
    """Move every record under ``old``; a second pass only if records appeared under it meanwhile."""
    moved = 0
    for _ in range(3):
        for page in _pages(database, name, old.kek_id):
            with _naming(page[0], "what has moved stays moved: run the command again to finish", of_page=True):
                moved += _move(database, page, old, new)
            if progress is not None:
                progress(moved, pending)
        if census(database).material_of(name)[old.kek_id] + len(own_secrets(database, old.kek_id)) == 0:
            return moved
    raise Conflict(
        f"records keep appearing under KEK {old.kek_id}: a replica is still running with it; stop it and run the "
        "command again",
        code="replicas_running",
    )


@contextlib.contextmanager
def _naming(record: Wrapped, then: str, of_page: bool = False) -> Iterator[None]:
    """A backend's error about ``record`` (or the page it begins), said with which record it was and what now."""
    try:
        yield
    except KeybrokerError as exc:
        where = f"the batch from {record.what}" if of_page else record.what
        detail = f"{where}: {exc.detail}; {then}"
        if isinstance(exc, StoredKeyCorrupt):
            raise StoredKeyCorrupt(detail, code=exc.instance_code) from None
        if isinstance(exc, BackendUnavailable):
            raise BackendUnavailable(detail, code=exc.instance_code) from None
        if isinstance(exc, ConfigurationError):
            raise ConfigurationError(detail) from None
        raise


def _pages(database: Database, backend: str, kek_id: str) -> Iterable[Sequence[Wrapped]]:
    """The records under ``kek_id``: the backend's data keys by pages, then keybroker's own secrets together."""
    after = ""
    while page := material(database, backend, kek_id, after, BATCH):
        yield page
        after = page[-1].key[1]
    if own := own_secrets(database, kek_id):
        yield own


def _move(database: Database, records: Sequence[Wrapped], old: KeyWrapper, new: KeyWrapper) -> int:
    """Re-wrap ``records`` under ``new`` and write them in one transaction; returns how many were written."""
    rewrapped: list[tuple[Wrapped, bytes]] = []
    for record in records:
        secret = old.unwrap(record.wrapped, record.context, record.kek_id)
        blob = new.wrap(secret, record.context)
        if new.unwrap(blob, record.context, new.kek_id) != secret:
            raise StoredKeyCorrupt(f"{record.what}: wrapped by KEK {new.kek_id}, it did not open again; not written")
        rewrapped.append((record, blob))
    written = 0
    with database.transaction(write=True) as session:
        for record, blob in rewrapped:
            table, (column, value) = Base.metadata.tables[record.table], record.key
            done = session.execute(
                update(table)
                .where(table.c[column] == value, table.c.kek_id == record.kek_id)
                .where(table.c[record.blob_column] == record.wrapped)
                .values({"kek_id": new.kek_id, record.blob_column: blob})
            )
            written += int(getattr(done, "rowcount", 0) or 0)  # 0: another run moved it meanwhile
    return written


def _nothing_to_move(
    database: Database,
    audit: AuditLog,
    context: AuditContext,
    details: dict[str, Any],
    old: KeyWrapper,
    new: KeyWrapper,
    created: Path | None,
) -> Report:
    """Everything is under the new KEK already: a run that moved the last record and died before it could say so
    (the finish entry is written now), or one that finished already."""
    note = last_rotation(database)
    matches = note is not None and (note.from_kek, note.to_kek) == (old.kek_id, new.kek_id)
    total = census(database).material_of(details["backend"])[new.kek_id] + len(own_secrets(database, new.kek_id))
    if matches and note is not None and note.finished:
        return Report(details["backend"], old.kek_id, new.kek_id, 0, total, created, finished_before=note.at)
    if matches:
        audit.record(context, AuditEvent(FINISH, "success", AUDIT_TARGET, {**details, "moved": 0, "records": total}))
    return Report(details["backend"], old.kek_id, new.kek_id, 0, total, created)


def _same_kek(database: Database, name: str, kek_id: str, counts: Mapping[str, int], target: Target) -> str:
    stale = Counter({kek: rows for kek, rows in counts.items() if kek != kek_id})
    note = last_rotation(database)
    if note is not None and note.backend == name:  # keybroker's own keys moved with this backend's
        stale.update({kek: rows for kek, rows in census(database).own_total().items() if kek != kek_id})
    same = f"{target.file} names KEK {kek_id}, which backend {name!r} is configured with already"
    if not stale:
        return (
            f"{same}: give another KEK (for Transit another key_name or mount, for PKCS#11 another key_label, for a "
            "local key another master_key_file)"
        )
    under = ", ".join(f"{rows} record(s) under KEK {kek}" for kek, rows in sorted(stale.items()))
    if note is not None and note.finished and (note.from_kek, note.to_kek) == (kek_id, next(iter(stale))):
        return f"{same}, but the rotation to KEK {note.to_kek} finished {note.at}: configure that KEK ({note.to_file})"
    return (
        f"{same}, but it holds {under}: configure the KEK they are under again (it is needed until the rotation "
        "finishes) and run this command again to finish it; 'keybroker kek status' shows which KEK wraps what"
    )


def _refuse_running_replicas(database: Database, clock: Clock) -> None:
    now = clock.now()
    alive = [r for r in Replicas(database, clock).all() if now - r.heartbeat_at <= STOPPED_AFTER]
    if alive:
        seen = ", ".join(f"{r.id} ({r.address}, {int((now - r.heartbeat_at).total_seconds())} s ago)" for r in alive)
        raise Conflict(
            f"replicas are running (last heartbeat: {seen}): stop every replica of the deployment first (a replica "
            f"counts as stopped {int(STOPPED_AFTER.total_seconds())} s after its last heartbeat); nothing was changed",
            code="replicas_running",
        )


def _new_key_file(settings: Settings, wrapper: WrapperSettings) -> Path | None:
    """A new local master key: its file is created (32 random bytes, mode 0600) unless it exists."""
    if not isinstance(wrapper, LocalWrapperSettings):
        return None
    path = settings.resolve(wrapper.master_key_file)
    if path.exists():
        return None
    try:
        LocalKeyWrapper.create_file(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot create the new master key file {path}: {exc.strerror}") from None
    return path


def _checked(wrapper: KeyWrapper, prepare: bool = False) -> KeyWrapper:
    """``wrapper`` proven usable by a round trip; ``prepare``: its KEK created in the holder first if missing (as
    ``keybroker init`` does: a Transit key, a PKCS#11 key)."""
    try:
        if prepare:
            wrapper.prepare()
        wrapper.check()
    except BaseException:
        wrapper.close()
        raise
    return wrapper


def _usable(build: Callable[[], KeyWrapper], which: str, target: Target, then: str) -> KeyWrapper:
    """``build()``, with its failure said as ``which`` KEK's (of ``target.backend``)."""
    try:
        return build()
    except KeybrokerError as exc:
        detail = f"{which} of backend {target.backend!r} cannot be used ({exc.detail}); {then}"
        if isinstance(exc, ConfigurationError):
            raise ConfigurationError(detail) from None
        raise BackendUnavailable(detail, code=exc.instance_code) from None
