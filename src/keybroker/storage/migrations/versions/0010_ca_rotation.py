"""CA rotation in two phases (``keybroker.ca_rotation``): besides the row of each CA that issues (``service``,
``workload``), a rotation keeps its successor (``NAME:next``: published beside it, not issuing yet) or its
predecessor (``NAME:old``: published until retired, its key deleted then) as rows of their own, each a key wrapped
by the KEK like any other. The names a row may have are fixed here; code older than this revision would not know
those rows, and refuses the schema.

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

NAMES = ("service", "service:next", "service:old", "workload", "workload:next", "workload:old")
CONSTRAINT = "ck_certificate_authorities_name"


def upgrade() -> None:
    with op.batch_alter_table("certificate_authorities") as table:
        table.create_check_constraint(CONSTRAINT, "name IN (" + ", ".join(f"'{name}'" for name in NAMES) + ")")


def downgrade() -> None:
    rotating = op.get_bind().execute(
        sa.text("SELECT name FROM certificate_authorities WHERE name NOT IN ('service', 'workload')")
    )
    names = sorted(str(name) for (name,) in rotating)
    if names:  # a revision before this one has no place for them: finish (or retire) the rotation first
        raise RuntimeError(f"a CA rotation is in progress ({', '.join(names)}): finish it before downgrading")
    with op.batch_alter_table("certificate_authorities") as table:
        table.drop_constraint(CONSTRAINT, type_="check")
