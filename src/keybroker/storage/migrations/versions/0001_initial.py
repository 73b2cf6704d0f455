"""Initial schema: transfer policies, keys, embedded key material, API tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keybroker.storage.db import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transfer_policies",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("immutable", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_transfer_policies_created", "transfer_policies", ["created_at", "id"])
    op.create_table(
        "keys",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("algorithm", sa.String(8), nullable=False),
        sa.Column("key_length", sa.Integer(), nullable=False),
        sa.Column("curve_type", sa.String(16), nullable=True),
        sa.Column("label", sa.String(256), nullable=True),
        sa.Column("usage", sa.String(256), nullable=True),
        sa.Column(
            "transfer_policy_id",
            sa.String(36),
            sa.ForeignKey("transfer_policies.id", ondelete="RESTRICT"),
            nullable=False,
        ),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("backend_ref", sa.String(512), nullable=False),
        sa.Column("kmip_key_id", sa.String(256), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_keys_created", "keys", ["created_at", "id"])
    op.create_index("ix_keys_transfer_policy", "keys", ["transfer_policy_id"])
    op.create_table(
        "embedded_key_material",
        sa.Column("ref", sa.String(36), primary_key=True),
        sa.Column("kek_id", sa.String(128), nullable=False),
        sa.Column("wrapped_dek", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_table("embedded_key_material")
    op.drop_index("ix_keys_transfer_policy", "keys")
    op.drop_index("ix_keys_created", "keys")
    op.drop_table("keys")
    op.drop_index("ix_transfer_policies_created", "transfer_policies")
    op.drop_table("transfer_policies")
