"""X.509 certificates issued by the service CA for broker-held RSA/EC keys (PROTOCOL.md §1, the Nginx flow).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keybroker.storage.db import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_certificates",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(36), sa.ForeignKey("keys.id", ondelete="CASCADE"), nullable=False),
        sa.Column("chain_pem", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_key_certificates_key", "key_certificates", ["key_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_key_certificates_key", "key_certificates")
    op.drop_table("key_certificates")
