"""The audit head keeps the hash before its newest too, so that PostgreSQL can append an entry in one statement
(``AuditLog.append_guarded``: ``UPDATE ... SET prev_hash = hash, hash = ... RETURNING``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    with op.batch_alter_table("audit_head") as table:
        table.add_column(sa.Column("prev_hash", sa.String(64), nullable=False, server_default=GENESIS))
    op.execute(
        sa.text(
            "UPDATE audit_head SET prev_hash = COALESCE("
            "(SELECT e.prev_hash FROM audit_events e WHERE e.seq = audit_head.seq), :genesis)"
        ).bindparams(genesis=GENESIS)
    )


def downgrade() -> None:
    with op.batch_alter_table("audit_head") as table:
        table.drop_column("prev_hash")
