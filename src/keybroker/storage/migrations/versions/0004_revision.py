"""A revision counter bumped by every change to keys or transfer policies, so that readers can cache both and
know, with one small query, whether anything changed (in any replica).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revision",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("counter", sa.BigInteger(), nullable=False),
    )
    table = sa.table("revision", sa.column("id", sa.Integer), sa.column("counter", sa.BigInteger))
    op.bulk_insert(table, [{"id": 1, "counter": 0}])


def downgrade() -> None:
    op.drop_table("revision")
