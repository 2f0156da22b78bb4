"""Alembic environment for the message store and the central record (``rec_*`` tables)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from engine.record.models import record_metadata
from engine.store.db import make_engine
from engine.store.schema import metadata

config = context.config
TARGET = [metadata, record_metadata]  # autogenerate compares both
ADVISORY_LOCK = 7_201_775  # serialises concurrent upgrades on PostgreSQL (several engines starting)


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK})
    context.configure(
        connection=connection,
        target_metadata=TARGET,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=TARGET,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
