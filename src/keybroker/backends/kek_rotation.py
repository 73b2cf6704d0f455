"""Moving everything a KEK wraps under another KEK (``keybroker kek rotate --to FILE``).

FILE holds the backend's new section exactly as it will stand in ``keybroker.toml`` (``[backends.<name>]`` with its
new ``wrapper``); the configuration still names the current KEK while the rotation runs. Moved: the data keys of
that backend and, when the same KEK wraps them, keybroker's own secrets (``kek_records``). For each record the
secret is unwrapped by the current KEK, wrapped by the new one, opened again by the new one and only then written,
with its new ``kek_id``, by a conditional update (the row still holds what was read): a record is always wholly
under one KEK or the other, so a crash at any moment loses nothing and a second run moves only what is left, never
anything twice. The data keys go first, in batches of one transaction each; keybroker's own secrets last, in one
transaction, so that the KEK the deployment records for them (``ca.recorded_kek_id``) changes once, at the end.

Before anything changes: every replica stopped (``kek_guard``: checked again after every batch and before the end),
the CAs in the database (not in the files of a data directory from before 0008), the current and the new KEK usable
and not the same (a new local master key synced to disk and read back), no record of the backend under a third
KEK, no material without its key record, and every record to move opened once under the current KEK. The CA key
files left by a version before 0008 (wrapped by the current KEK) are removed before it begins. Audited:
``kek_rotation.start`` when records begin to move, ``kek_rotation.finish`` when none is left (target ``kek``);
``kek_records.check_keks`` reads them to keep servers from starting meanwhile and to tell them what to do.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update

from keybroker import ca_legacy
from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.backends.base import KeyWrapper
from keybroker.backends.kek_guard import Guard
from keybroker.backends.kek_inputs import Target, open_deployment, read_target
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
from keybroker.ca import SERVICE, ServiceCA, forget_legacy_files
from keybroker.clock import Clock
from keybroker.config import EmbeddedBackendSettings, LocalWrapperSettings, Settings, WrapperSettings
from keybroker.errors import BackendUnavailable, ConfigurationError, Conflict, KeybrokerError, StoredKeyCorrupt
from keybroker.storage.copy import sqlite_file
from keybroker.storage.db import Database
from keybroker.storage.tables import Base

__all__ = ["BATCH", "Progress", "Report", "Target", "open_deployment", "read_target", "rotate"]

BATCH = 100
AGAIN = "what has moved stays moved: once it is stopped, run the command again to finish (no server starts till then)"
Progress = Callable[[int, int], None]  # (moved so far, to move): after every committed batch


@dataclass(frozen=True, slots=True)
class Report:
    backend: str
    from_kek: str
    to_kek: str
    moved: int  # records re-wrapped by this run
    total: int  # records under the new KEK now (this backend's and keybroker's own)
    created_key_file: Path | None = None  # a new local master key this run created
    finished_before: str | None = None  # nothing to move: when the rotation finished (None: it never began)
    removed_legacy: tuple[Path, ...] = ()  # CA key files from before 0008 removed before it began


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
    guard = Guard(database, sqlite_file(settings.database_url))
    guard.refuse_running()
    old = _usable(lambda: _checked(build_wrapper(settings, backend.wrapper, clock)), "the current KEK", target,
                  "it is needed until the rotation finishes: restore it, or configure it as it was")  # fmt: skip
    try:
        return _rotate(settings, target, database, audit, context, clock, old, progress, guard)
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
    guard: Guard,
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
    legacy = ca_legacy.leftovers(settings.data_dir)
    service_ca = ServiceCA(database, old, settings.data_dir).rows().issuing
    if legacy is not None and service_ca is None:
        raise ConfigurationError(
            f"{settings.data_dir} keeps the CAs of a version before 0008 in files "
            f"({', '.join(path.name for path in legacy.files)}), which a KEK rotation cannot move: run 'keybroker "
            f"init --data-dir {settings.data_dir}' once with this version (it imports them into the database), then "
            "this command again; nothing was changed"
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
            removed = _forget_legacy(database, settings, service_ca, (old, new))
            if pending == 0:
                return _nothing_to_move(database, audit, context, details, old, new, created, removed)
            for page in _pages(database, name, old.kek_id):  # every record opens under the current KEK, or none moves
                for record in page:
                    with _naming(record, "nothing was changed"):
                        old.unwrap(record.wrapped, record.context, record.kek_id)
            guard.check("nothing was changed")
            audit.record(context, AuditEvent(START, "success", AUDIT_TARGET, {**details, "records": pending}))
            began = True
            moved = _move_all(database, name, old, new, pending, progress, guard)
            guard.check(AGAIN)
            total = census(database).material_of(name)[new.kek_id] + len(own_secrets(database, new.kek_id))
            finish = {**details, "moved": moved, "records": total}
            audit.record(context, AuditEvent(FINISH, "success", AUDIT_TARGET, finish))
            return Report(name, old.kek_id, new.kek_id, moved, total, created, removed_legacy=removed)
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


def _forget_legacy(
    database: Database, settings: Settings, service_ca: Any, wrappers: Sequence[KeyWrapper]
) -> tuple[Path, ...]:
    """Remove the CA key files a version before 0008 left (their passphrase is wrapped by the current KEK) once the
    database's CAs open under one of ``wrappers``; refuse (nothing changed) if some cannot be removed."""
    if ca_legacy.leftovers(settings.data_dir) is None:
        return ()
    removed: tuple[Path, ...] = ()
    for wrapper in wrappers:
        if service_ca is not None and service_ca.kek_id == wrapper.kek_id:
            removed = forget_legacy_files(database, wrapper, settings.data_dir)
    left = ca_legacy.leftovers(settings.data_dir)
    if left is not None:
        raise ConfigurationError(
            f"{settings.data_dir} holds CA key files from before 0008 ({', '.join(p.name for p in left.files)}) that "
            f"the database's {SERVICE} and workload CAs do not replace (run 'keybroker init --data-dir "
            f"{settings.data_dir}' once with this version to import them); nothing was changed"
        )
    return removed


def _move_all(
    database: Database,
    name: str,
    old: KeyWrapper,
    new: KeyWrapper,
    pending: int,
    progress: Progress | None,
    guard: Guard,
) -> int:
    """Move every record under ``old``; a second pass only if records appeared under it meanwhile. After every
    batch, ``guard`` checks that no server has appeared."""
    moved = 0
    for _ in range(3):
        for page in _pages(database, name, old.kek_id):
            with _naming(page[0], "what has moved stays moved: run the command again to finish", of_page=True):
                moved += _move(database, page, old, new)
            if progress is not None:
                progress(moved, pending)
            guard.check(AGAIN)
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
    removed: tuple[Path, ...],
) -> Report:
    """Everything is under the new KEK already: a run that moved the last record and died before it could say so
    (the finish entry is written now), or one that finished already."""
    note = last_rotation(database)
    matches = note is not None and (note.from_kek, note.to_kek) == (old.kek_id, new.kek_id)
    total = census(database).material_of(details["backend"])[new.kek_id] + len(own_secrets(database, new.kek_id))
    if matches and note is not None and note.finished:
        return Report(details["backend"], old.kek_id, new.kek_id, 0, total, created, note.at, removed)
    if matches:
        audit.record(context, AuditEvent(FINISH, "success", AUDIT_TARGET, {**details, "moved": 0, "records": total}))
    return Report(details["backend"], old.kek_id, new.kek_id, 0, total, created, removed_legacy=removed)


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


def _new_key_file(settings: Settings, wrapper: WrapperSettings) -> Path | None:
    """A new local master key: its file is created (32 random bytes, mode 0600) unless it exists."""
    if not isinstance(wrapper, LocalWrapperSettings):
        return None
    path = settings.resolve(wrapper.master_key_file)
    try:
        if path.exists():
            return None
        LocalKeyWrapper.create_file(path)  # (synced with its directory and read back: before anything is wrapped)
    except OSError as exc:
        raise ConfigurationError(f"cannot create the new master key file {path}: {exc.strerror}") from None
    except ValueError:  # "embedded null byte"
        raise ConfigurationError(f"the new master key file name {str(path)!r} holds a NUL byte") from None
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
