"""Alembic environment of the node database.

:func:`node.db.upgrade_schema` runs the migrations on an open connection, handed over in
``config.attributes["connection"]``. Run from the ``alembic`` command line, the URL comes
from the ``sqlalchemy.url`` option or the ``LIVERNODE_DATABASE_URL`` environment variable.
"""

from __future__ import annotations

import logging
import os

from alembic import context
from sqlalchemy import Connection, create_engine

from node.models import Base

logger = logging.getLogger(__name__)

target_metadata = Base.metadata


def run_on_connection(connection: Connection) -> None:
    """Run the migrations in a transaction on ``connection``."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot alter most table properties; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run the migrations on the handed-over connection or on a new engine."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_on_connection(connection)
        return

    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get("LIVERNODE_DATABASE_URL")
    if not url:
        raise RuntimeError(
            "No database URL: set sqlalchemy.url in the Alembic configuration or "
            "LIVERNODE_DATABASE_URL"
        )
    engine = create_engine(url)
    try:
        with engine.connect() as new_connection:
            run_on_connection(new_connection)
            new_connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("Offline (SQL script) migrations are not supported; run them online")
run_online()
