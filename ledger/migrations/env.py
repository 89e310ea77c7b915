"""Alembic environment of the ledger schema.

Two ways in:

* ``ledger.db.upgrade()`` passes an open connection, already in a transaction, in
  ``config.attributes["connection"]``; the caller commits.
* the ``alembic`` CLI (``alembic.ini`` at the repository root): the URL is ``-x db=URL``, else
  ``sqlalchemy.url`` from the ini, else ``QUOTA_LEDGER_DATABASE_URL`` (the app's settings).
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import JSON, Connection, text
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from ledger.db import MIGRATION_LOCK_NAME, advisory_key, make_engine, normalize_url
from ledger.tables import UTCDateTime  # importing ledger.tables registers every table

config = context.config
target_metadata = SQLModel.metadata

# Only the CLI has an ini file; a programmatic run must not reconfigure the app's logging.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        from ledger.settings import get_settings

        url = get_settings().database_url
    return url


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Autogenerate plain SQLAlchemy types, so revisions never import the app's classes
    (a revision must keep meaning the same thing when ``ledger.tables`` changes)."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, AutoString):
        length = obj.impl.length  # type: ignore[attr-defined]
        return f"sa.String({length})" if length else "sa.String()"
    if type_ == "type" and isinstance(obj, JSON) and "postgresql" in obj._variant_mapping:
        # Alembic would render JSONB(astext_type=Text()) without importing Text.
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return 'sa.JSON().with_variant(postgresql.JSONB(), "postgresql")'
    return False


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Serialise concurrent migration runs; released at the end of the transaction.
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(MIGRATION_LOCK_NAME)}
        )
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        # engine.begin(): the whole run is one transaction (BEGIN IMMEDIATE on SQLite).
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=normalize_url(_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
