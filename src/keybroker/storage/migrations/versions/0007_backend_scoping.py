"""Scope stored material to its backend, and one key per adopted KMIP object.

* ``embedded_key_material.backend``: several embedded backends (each with its own KEK) share the table; the KEK
  check at start must only look at a backend's own rows. Rows written before this revision have NULL (they
  belong to whichever embedded backend held them; the check treats them as any backend's).
  Existing rows are given the backend of the key that points at them.
* ``ux_keys_backend_kmip``: a KMIP object registered by ``kmip_key_id`` backs at most one key, so that no second
  key with a laxer transfer policy can be laid over it (NULLs, keys not registered, do not collide). A database
  that already has such doubles is not changed: the upgrade stops and names them.
* ``pending_material.claimed_at``: the reconciler marks a row while it works on it and removes it only when the
  backend work is done, so the key id stays reserved meanwhile.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keybroker.storage.db import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    doubles = bind.execute(
        sa.text(
            "SELECT backend, kmip_key_id, COUNT(*) FROM keys WHERE kmip_key_id IS NOT NULL "
            "GROUP BY backend, kmip_key_id HAVING COUNT(*) > 1"
        )
    ).all()
    if doubles:
        listed = ", ".join(f"{backend}/{object_id} ({count} keys)" for backend, object_id, count in doubles)
        raise RuntimeError(
            f"several keys adopt the same KMIP object: {listed}. With the previous keybroker version, delete all "
            "but one of each (keybroker key delete; the KMIP objects stay), then start this version again."
        )
    # Each step checks what is already there: SQLite commits DDL as it goes, so an upgrade that failed half way
    # must be able to run again.
    inspector = sa.inspect(bind)
    if "backend" not in {column["name"] for column in inspector.get_columns("embedded_key_material")}:
        with op.batch_alter_table("embedded_key_material") as batch:
            batch.add_column(sa.Column("backend", sa.String(64), nullable=True))
    op.execute(
        "UPDATE embedded_key_material SET backend = "
        "(SELECT keys.backend FROM keys WHERE keys.backend_ref = embedded_key_material.ref) WHERE backend IS NULL"
    )
    if "claimed_at" not in {column["name"] for column in inspector.get_columns("pending_material")}:
        with op.batch_alter_table("pending_material") as batch:
            batch.add_column(sa.Column("claimed_at", UTCDateTime(), nullable=True))
    if "ux_keys_backend_kmip" not in {index["name"] for index in inspector.get_indexes("keys")}:
        op.create_index("ux_keys_backend_kmip", "keys", ["backend", "kmip_key_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_keys_backend_kmip", "keys")
    with op.batch_alter_table("pending_material") as batch:
        batch.drop_column("claimed_at")
    with op.batch_alter_table("embedded_key_material") as batch:
        batch.drop_column("backend")
