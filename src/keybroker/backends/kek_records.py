"""Everything keybroker keeps wrapped by a KEK, and which KEK wrapped each record (every row names its ``kek_id``):

* the key material of each embedded backend (``embedded_key_material``: one data key per key, its context the key
  id, the row and the key's spec, ``backends.embedded``);
* keybroker's own secrets: the token signing keys, the service secrets (the nonce key) and the CA private keys (a
  row each, also the successor or predecessor of a CA during its rotation). The service CA's row is where the
  deployment records the KEK of its own secrets (``ca.recorded_kek_id``).

``census`` counts them per KEK without opening anything. ``check_keks`` runs at every start and refuses a
configuration whose KEKs do not open them all, saying what to do: after an interrupted or a finished
``keybroker kek rotate`` (whose audit entries, target ``kek`` and actions ``kek_rotation.*``, tell from which KEK
to which), the command that finishes it or the KEK to configure. While the newest rotation has begun and not
finished it refuses to start at all, even when every record still opens (one started then would wrap new keys
with the old KEK behind the rotation's back). ``material`` and ``own_secrets`` list the records with their wrap
contexts, for the rotation (``backends.kek_rotation``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from sqlalchemy import func, select, text

from keybroker.attestation.tokens import _context as token_key_context  # the one definition of that context
from keybroker.backends.embedded import _context as material_context  # the one definition of that context
from keybroker.ca import ca_key_context
from keybroker.errors import ConfigurationError
from keybroker.keys.models import Algorithm, Curve, KeySpec
from keybroker.storage.db import Database
from keybroker.storage.tables import AuditEventRow, Base, EmbeddedMaterialRow

AUDIT_TARGET = "kek"  # the audit entries of KEK rotations: START when one begins, FINISH when everything moved
START, FINISH = "kek_rotation.start", "kek_rotation.finish"
ROTATE = "keybroker kek rotate --to"
OWN = "keybroker's own keys (CA, token signing and nonce keys)"


def service_secret_context(name: str) -> bytes:
    """The context of a service secret (``services._service_secret``, which keeps it inline)."""
    return f"keybroker/service-secret/v1\0{name}".encode()


@dataclass(frozen=True, slots=True)
class Wrapped:
    """One wrapped secret: its row (table, primary key), the column of the blob, the KEK that wrapped it and the
    context it was wrapped with. Never shows the blob."""

    what: str  # for people: "key <id>", "service CA key", ...
    table: str  # its name in ``tables.Base.metadata``
    key: tuple[str, str]  # (primary key column, value)
    blob_column: str
    kek_id: str
    wrapped: bytes = field(repr=False)
    context: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Census:
    """Rows per KEK: ``material[backend][kek_id]`` (backend None: rows from before 0007, which every embedded store
    counts as its own, as ``EmbeddedKeyStore.kek_ids`` does) and ``own[what][kek_id]``."""

    material: Mapping[str | None, Counter[str]]
    own: Mapping[str, Counter[str]]

    def material_of(self, backend: str) -> Counter[str]:
        return self.material.get(backend, Counter()) + self.material.get(None, Counter())

    def own_total(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.own.values():
            total.update(counts)
        return total


# keybroker's own secrets: (what, table, primary key, wrapped column, wrap context). The CA keys last: the service
# CA's row records the KEK of them all (moved in one transaction anyway).
_OWN: tuple[tuple[str, str, str, str, Callable[[str], bytes]], ...] = (
    ("token signing key", "signing_keys", "kid", "wrapped_key", token_key_context),
    ("service secret", "service_secrets", "name", "wrapped", service_secret_context),
    ("CA key", "certificate_authorities", "name", "key_wrapped", ca_key_context),
)


def census(database: Database) -> Census:
    material: dict[str | None, Counter[str]] = {}
    own: dict[str, Counter[str]] = {}
    m = EmbeddedMaterialRow
    with database.transaction() as session:
        for backend, kek_id, rows in session.execute(
            select(m.backend, m.kek_id, func.count()).group_by(m.backend, m.kek_id)
        ):
            material.setdefault(backend, Counter())[str(kek_id)] += int(rows)
        for what, name, *_ in _OWN:
            counts = own.setdefault(f"{what}s", Counter())
            table = Base.metadata.tables[name]
            for kek_id, rows in session.execute(select(table.c.kek_id, func.count()).group_by(table.c.kek_id)):
                counts[str(kek_id)] += int(rows)
    return Census(material, own)


# --- the records, with their contexts (for the rotation) ------------------------------------------------------

_MATERIAL = text(
    "SELECT m.ref, m.kek_id, m.wrapped_dek, k.id, k.algorithm, k.key_length, k.curve_type"
    " FROM embedded_key_material m JOIN keys k ON k.backend_ref = m.ref AND k.backend = :backend"
    " WHERE m.kek_id = :kek_id AND (m.backend = :backend OR m.backend IS NULL) AND m.ref > :after"
    " ORDER BY m.ref LIMIT :limit"
)
_ORPHANS = text(
    "SELECT count(*) FROM embedded_key_material m LEFT JOIN keys k ON k.backend_ref = m.ref"
    " WHERE (m.backend = :backend OR m.backend IS NULL) AND k.id IS NULL"
)


def material(database: Database, backend: str, kek_id: str, after: str = "", limit: int = 100) -> list[Wrapped]:
    """The data keys of ``backend`` wrapped by ``kek_id``, in ``ref`` order after ``after``."""
    rows = database.query(_MATERIAL, {"backend": backend, "kek_id": kek_id, "after": after, "limit": limit})
    found = []
    for row in rows:
        ref, kek, wrapped, key_id, algorithm, length, curve = tuple(row)
        spec = KeySpec(Algorithm(algorithm), int(length), Curve(curve) if curve else None)
        context = material_context(str(key_id), str(ref), spec)
        where = ("ref", str(ref))
        found.append(
            Wrapped(f"key {key_id}", "embedded_key_material", where, "wrapped_dek", str(kek), bytes(wrapped), context)
        )
    return found


def orphans(database: Database, backend: str) -> int:
    """Material rows of ``backend`` that no key record points at (a create or delete interrupted by a crash,
    which ``keybroker backends reconcile`` finishes): their contexts are unknown, so they cannot be re-wrapped."""
    return int(database.query(_ORPHANS, {"backend": backend})[0][0])


def own_secrets(database: Database, kek_id: str) -> list[Wrapped]:
    """keybroker's own secrets wrapped by ``kek_id``: token signing keys, service secrets, then the CA keys."""
    found: list[Wrapped] = []
    with database.transaction() as session:
        for what, name, primary, column, context in _OWN:
            table = Base.metadata.tables[name]
            query = select(table.c[primary], table.c[column]).where(table.c.kek_id == kek_id)
            for key, blob in session.execute(query.order_by(table.c[primary].desc())):  # the service CA last
                found.append(Wrapped(f"{what} {key}", name, (primary, key), column, kek_id, bytes(blob), context(key)))
    return found


# --- what the configuration must hold -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RotationNote:
    """The newest KEK rotation, from its audit entry: finished or not, of which backend, from and to which KEK."""

    finished: bool
    at: str
    backend: str
    from_kek: str
    to_kek: str
    to_file: str


def last_rotation(database: Database) -> RotationNote | None:
    e = AuditEventRow
    with database.transaction() as session:
        row = session.execute(
            select(e.action, e.at, e.details)
            .where(e.target == AUDIT_TARGET, e.action.in_((START, FINISH)))  # (a role may be named "kek" too)
            .order_by(e.seq.desc())
            .limit(1)
        ).first()
    if row is None or row.action not in (START, FINISH) or not isinstance(row.details, dict):
        return None
    details = {k: str(row.details.get(k, "")) for k in ("backend", "from", "to", "to_file")}
    at = row.at.isoformat(timespec="seconds").replace("+00:00", "Z")
    return RotationNote(
        row.action == FINISH, at, details["backend"], details["from"], details["to"], details["to_file"]
    )


def check_keks(database: Database, backends: Mapping[str, str], service_kek: str) -> None:
    """Raise ``ConfigurationError`` unless every record is wrapped by the configured KEK of its place:
    ``backends`` maps each embedded backend to its KEK, ``service_kek`` is the wrapper of keybroker's own secrets."""
    counted = census(database)
    places = [(f"backend {name!r}", kek, counted.material_of(name)) for name, kek in backends.items()]
    for what, configured, counts in [*places, (OWN, service_kek, counted.own_total())]:
        foreign = {kek: rows for kek, rows in counts.items() if kek != configured}
        if foreign:
            raise ConfigurationError(_mismatch(database, what, configured, foreign, counts[configured]))
    note = last_rotation(database)
    if note is not None and not note.finished:
        raise ConfigurationError(
            f"the KEK rotation of backend {note.backend!r} from {note.from_kek} to {note.to_kek} begun {note.at} has "
            "not finished, and nothing may start until it has (it would wrap new keys with the old KEK behind the "
            f"rotation's back). Finish it: {ROTATE} {note.to_file} (with KEK {note.from_kek} still configured), then "
            f"configure KEK {note.to_kek}"
        )


def _mismatch(database: Database, what: str, configured: str, foreign: Mapping[str, int], here: int) -> str:
    stale = ", ".join(f"{rows} record(s) under KEK {kek}" for kek, rows in sorted(foreign.items()))
    note = last_rotation(database)
    if note is not None and note.to_kek in foreign and configured == note.from_kek:
        if note.finished and here == 0:
            return (
                f"{what}: {stale}, moved there by 'keybroker kek rotate' (finished {note.at}), but this configuration "
                f"names KEK {configured}: configure KEK {note.to_kek} on this replica (the section in {note.to_file})"
            )
        return (
            f"{what}: {stale} and {here} under the configured KEK {configured}: the KEK rotation from "
            f"{note.from_kek} to {note.to_kek} begun {note.at} has not finished. Finish it: {ROTATE} {note.to_file} "
            f"(with KEK {configured} still configured), then configure KEK {note.to_kek}"
        )
    if note is not None and note.from_kek in foreign and configured == note.to_kek:
        late = " (or a replica still running with the old KEK wrapped keys after it finished)" if note.finished else ""
        return (
            f"{what}: {stale}, which this configuration no longer names: the KEK rotation from {note.from_kek} to "
            f"{note.to_kek} begun {note.at} has not finished{late}. Configure KEK {note.from_kek} again (it is needed "
            f"until every record has moved), run {ROTATE} {note.to_file}, then configure KEK {note.to_kek}"
        )
    if what == OWN:
        return (
            f"{what} are wrapped by KEK {', '.join(sorted(foreign))}, but the configured KEK is {configured}; "
            "refusing to start with the wrong KEK"
        )
    return (
        f"{what} holds keys wrapped by KEK {', '.join(sorted(foreign))}, but the configured KEK is {configured}; "
        "refusing to start with the wrong KEK"
    )


def unheld_service_kek(database: Database, recorded: str, configured: Collection[str]) -> str:
    """Why no configured wrapper holds ``recorded``, the KEK of keybroker's own secrets (``registry``)."""
    note = last_rotation(database)
    if note is not None and note.from_kek == recorded and note.to_kek in configured:
        return (
            f"{OWN} are still wrapped by KEK {recorded}, which this configuration no longer names: the KEK rotation "
            f"to {note.to_kek} begun {note.at} has not finished. Configure KEK {recorded} again (it is needed until "
            f"every record has moved), run {ROTATE} {note.to_file}, then configure KEK {note.to_kek}"
        )
    if note is not None and note.to_kek == recorded and note.from_kek in configured:
        return (
            f"{OWN} are wrapped by KEK {recorded} since 'keybroker kek rotate' moved them there ({note.at}), but this "
            f"configuration names KEK {note.from_kek}: configure KEK {recorded} (the section in {note.to_file})"
        )
    return (
        f"{OWN} are protected by KEK {recorded}, which no configured embedded backend holds: this is another KEK "
        "than the deployment's. Configure the backend whose wrapper has that KEK (every replica needs the same one)"
    )
