"""Persistence: SQLAlchemy 2 models and engine, Alembic migrations. Portable SQL only (SQLite and PostgreSQL)."""
