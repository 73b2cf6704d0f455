"""Scope stored material to its backend, and one key per adopted KMIP object.

* ``embedded_key_material.backend``: several embedded backends (each with its own KEK) share the table; the KEK
  check at start must only look at a backend's own rows. Rows written before this revision have NULL (they
  belong to whichever embedded backend held them; the check treats them as any backend's).
* ``ux_keys_backend_kmip``: a KMIP object registered by ``kmip_key_id`` backs at most one key, so that no second
  key with a laxer transfer policy can be laid over it (NULLs, keys not registered, do not collide).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("embedded_key_material") as batch:
        batch.add_column(sa.Column("backend", sa.String(64), nullable=True))
    op.create_index("ux_keys_backend_kmip", "keys", ["backend", "kmip_key_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_keys_backend_kmip", "keys")
    with op.batch_alter_table("embedded_key_material") as batch:
        batch.drop_column("backend")
