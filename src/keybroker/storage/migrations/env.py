"""Alembic environment: keybroker always passes an open connection in ``config.attributes``."""

from __future__ import annotations

from alembic import context

from keybroker.storage.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("keybroker migrations run through keybroker.storage.db.Database.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
