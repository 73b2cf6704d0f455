"""Rotating a CA in two phases, without cross certificates (``keybroker ca rotate``, ``ca activate``, ``ca retire``):

1. ``rotate``: a new CA (a new EC P-384 key, the same name, 10 years from now) is made and PUBLISHED beside the old
   one (the bundle, old first), while certificates are still issued by the old CA. Operators give the bundle (or
   the new pin) to every client.
2. ``activate``: the new CA issues from now on; each replica's server certificate comes from it at its next start.
   The old CA stays published (clients that fetch the bundle keep trusting certificates it issued), its key kept.
3. ``retire``: the old CA leaves the bundle and its key is deleted. A client that trusts only the old CA then fails
   with any verifier: nothing chains to it any more.

Nothing needs the old CA's key, so a CA that has expired can be replaced (emergency: rotate, then activate at once).
Each step is audited (target ``ca:NAME``), refused out of order with what to run instead, and the same step again
changes nothing (``rotate`` and ``activate`` say it was done; ``retire`` has nothing left to retire). Every step
writes in one transaction that first locks the issuing CA's row, and checks that the rows are still what it read:
two operators at once cannot leave a CA half rotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from keybroker.audit.log import AuditContext, AuditEvent, AuditLog
from keybroker.ca import NEXT, OLD, CaRows, ServiceCA, ca_certificate, ca_key_context, fingerprint, pkcs8, row_name
from keybroker.errors import Conflict
from keybroker.storage.tables import CertificateAuthorityRow


@dataclass(frozen=True, slots=True)
class Step:
    """Where a rotation stands after a step: the CA that issues, the other one published beside it (None once
    retired), whether the step had been done already (then nothing changed), and the CA that ``retire`` removed."""

    issuing_sha384: str
    other_sha384: str | None
    done_before: bool = False
    retired_sha384: str | None = None


def _sha(row: CertificateAuthorityRow | None) -> str | None:
    return fingerprint(row.cert_pem.encode("ascii")) if row is not None else None


def _issuing(ca: ServiceCA, rows: CaRows) -> CertificateAuthorityRow:
    if rows.issuing is None:
        raise Conflict(f"the deployment has no {ca.name} CA; run 'keybroker init'", code="no_ca")
    return rows.issuing


def rotate(ca: ServiceCA, now: datetime, audit: AuditLog, context: AuditContext) -> Step:
    """Publish a new CA beside the issuing one (which goes on issuing). Refused while a rotation has not been
    retired; done already (nothing changes) while the new CA waits for ``activate``."""
    rows = ca.rows()
    issuing = _issuing(ca, rows)
    if rows.old is not None:
        raise Conflict(
            f"the {ca.name} CA's last rotation is not finished: the CA it replaced (SHA-384 {_sha(rows.old)}) is still "
            "published; once no client needs it, run 'keybroker ca retire' first",
            code="ca_rotation_in_progress",
        )
    if rows.next is not None:
        return Step(_sha(issuing) or "", _sha(rows.next), done_before=True)
    subject = x509.load_pem_x509_certificate(issuing.cert_pem.encode("ascii")).subject
    key = ec.generate_private_key(ec.SECP384R1())
    cert_pem = ca_certificate(key, subject, now).public_bytes(serialization.Encoding.PEM).decode("ascii")
    new = CertificateAuthorityRow(
        name=row_name(ca.name, NEXT),
        cert_pem=cert_pem,
        key_wrapped=ca.wrapper.wrap(pkcs8(key), ca_key_context(ca.name)),
        kek_id=ca.wrapper.kek_id,
        created_at=now,
    )
    step = Step(_sha(issuing) or "", fingerprint(cert_pem.encode("ascii")))
    details = {"issuing_sha384": step.issuing_sha384, "sha384": step.other_sha384}
    try:
        with ca.database.transaction(write=True) as session:
            _still(session, ca, rows)
            session.add(new)
            session.flush()
            audit.append(session, context, AuditEvent("ca.rotate", "success", f"ca:{ca.name}", details))
    except IntegrityError:  # another rotation inserted its new CA first
        raise _changed(ca) from None
    return step


def activate(ca: ServiceCA, audit: AuditLog, context: AuditContext) -> Step:
    """The published new CA issues from now on; the old one stays published until ``retire``. Refused before
    ``rotate``; done already (nothing changes) once activated."""
    rows = ca.rows()
    issuing = _issuing(ca, rows)
    if rows.next is None:
        if rows.old is not None:
            return Step(_sha(issuing) or "", _sha(rows.old), done_before=True)
        raise Conflict(
            f"the {ca.name} CA has no new CA to activate: run 'keybroker ca rotate' first, give every client the "
            "bundle it publishes, then activate",
            code="no_ca_rotation",
        )
    ca.opens(rows.next)  # its key opens under the KEK and is its certificate's, before anything switches
    step = Step(_sha(rows.next) or "", _sha(issuing))
    details = {"sha384": step.issuing_sha384, "previous_sha384": step.other_sha384}
    with ca.database.transaction(write=True) as session:
        current, successor = _still(session, ca, rows)
        assert successor is not None  # (checked by _still: the rows are as read)
        session.add(
            CertificateAuthorityRow(
                name=row_name(ca.name, OLD),
                cert_pem=current.cert_pem,
                key_wrapped=current.key_wrapped,
                kek_id=current.kek_id,
                created_at=current.created_at,
            )
        )
        current.cert_pem, current.key_wrapped = successor.cert_pem, successor.key_wrapped
        current.kek_id, current.created_at = successor.kek_id, successor.created_at
        session.delete(successor)
        session.flush()
        audit.append(session, context, AuditEvent("ca.activate", "success", f"ca:{ca.name}", details))
    return step


def retire(ca: ServiceCA, audit: AuditLog, context: AuditContext) -> Step:
    """The old CA leaves the bundle and its key is deleted. Refused before ``activate`` (the old CA still issues)
    and when there is nothing to retire."""
    rows = ca.rows()
    issuing = _issuing(ca, rows)
    if rows.old is None:
        if rows.next is not None:
            raise Conflict(
                f"the new {ca.name} CA (SHA-384 {_sha(rows.next)}) is published but does not issue yet, and the old "
                "one still does: run 'keybroker ca activate' first (then restart each replica), and retire the old CA "
                "once no client needs it",
                code="ca_not_activated",
            )
        raise Conflict(
            f"the {ca.name} CA has no predecessor to retire ('keybroker ca rotate' makes one)", code="no_ca_rotation"
        )
    step = Step(_sha(issuing) or "", None, retired_sha384=_sha(rows.old))
    details = {"retired_sha384": step.retired_sha384, "sha384": step.issuing_sha384}
    with ca.database.transaction(write=True) as session:
        _still(session, ca, rows)
        old = session.get(CertificateAuthorityRow, row_name(ca.name, OLD))
        session.delete(old)
        session.flush()
        audit.append(session, context, AuditEvent("ca.retire", "success", f"ca:{ca.name}", details))
    return step


def _still(
    session: Session, ca: ServiceCA, rows: CaRows
) -> tuple[CertificateAuthorityRow, CertificateAuthorityRow | None]:
    """Lock the issuing CA's row, and check that this CA's rows are those in ``rows``: else ``Conflict``, and the
    transaction rolls back. Returns the issuing row and its successor (as session objects)."""
    table = CertificateAuthorityRow
    issuing = session.get(table, ca.name, with_for_update=True)
    successor = session.get(table, row_name(ca.name, NEXT))
    old = session.get(table, row_name(ca.name, OLD))
    now = [(row.cert_pem, row.key_wrapped) if row is not None else None for row in (issuing, successor, old)]
    read = [(row.cert_pem, row.key_wrapped) if row is not None else None for row in (rows.issuing, rows.next, rows.old)]
    if issuing is None or now != read:
        raise _changed(ca)
    return issuing, successor


def _changed(ca: ServiceCA) -> Conflict:
    return Conflict(
        f"the {ca.name} CA changed meanwhile (another rotation step, or a KEK rotation); nothing was changed: run it "
        "again",
        code="ca_changed",
    )
