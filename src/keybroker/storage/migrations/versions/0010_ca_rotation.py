"""CA rotation: while a rotated CA is not retired, its row keeps the retiring CA's certificate (published beside
it) and the new CA's key certified by the retiring CA (the chain for clients that trust only the old one).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("certificate_authorities") as table:
        table.add_column(sa.Column("retiring_pem", sa.Text(), nullable=True))
        table.add_column(sa.Column("cross_pem", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("certificate_authorities") as table:
        table.drop_column("cross_pem")
        table.drop_column("retiring_pem")
