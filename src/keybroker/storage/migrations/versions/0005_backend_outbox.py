"""Crash-safe key creation and deletion across two systems (keybroker's database and an external KMS).

``pending_material`` is an outbox: a row is committed before material is written to a backend (create) or in the
same transaction that removes the key record (delete), and is removed once the key record exists (create) or the
material is gone (delete). Rows left behind by a crash or an unreachable backend are finished by the reconciler.
``embedded_key_material.key_id`` lets the embedded store find material by key id for that purpose.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keybroker.storage.db import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pending_material",
        sa.Column("key_id", sa.String(36), primary_key=True),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("backend_ref", sa.String(256), nullable=True),
        sa.Column("operation", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    with op.batch_alter_table("embedded_key_material") as batch:
        batch.add_column(sa.Column("key_id", sa.String(36), nullable=True))
        batch.create_index("ix_embedded_key_material_key_id", ["key_id"])


def downgrade() -> None:
    with op.batch_alter_table("embedded_key_material") as batch:
        batch.drop_index("ix_embedded_key_material_key_id")
        batch.drop_column("key_id")
    op.drop_table("pending_material")
