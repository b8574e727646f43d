"""Database engine, schema migrations and session setup for SQLite and PostgreSQL.

The schema is created and upgraded by the Alembic migrations in ``node/migrations``;
:func:`init_db` upgrades every database it opens to the newest revision.

SQLite connections run in WAL mode with foreign keys on and a busy timeout, so the SCP, the
scheduler and the worker threads can share one database file. PostgreSQL is used through a
``postgresql+psycopg2://`` URL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node.models import Base

logger = logging.getLogger(__name__)

#: Milliseconds a SQLite connection waits for a lock held by another connection.
SQLITE_BUSY_TIMEOUT_MS = 30_000

#: Folder of the Alembic environment and revisions.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Revision matching the tables that ``Base.metadata.create_all`` made before migrations
#: existed; such a database is stamped with it before upgrading.
BASELINE_REVISION = "0001"

#: Table Alembic keeps the applied revision in.
VERSION_TABLE = "alembic_version"


class DatabaseError(RuntimeError):
    """Raised when the database cannot be opened or reached."""


def init_db(url: str, *, echo: bool = False) -> Engine:
    """Create an engine for ``url``, check the connection and upgrade the schema to head.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, for example ``sqlite:///livernode-data/livernode.db`` or
        ``postgresql+psycopg2://user:password@127.0.0.1:5432/livernode``.
    echo : bool, optional
        Log every SQL statement (SQLAlchemy's ``echo``).

    Returns
    -------
    sqlalchemy.Engine
        The engine, with the schema at the newest Alembic revision.

    Raises
    ------
    DatabaseError
        When the URL is invalid or the database cannot be reached; the message shows the
        URL without its password.
    """
    try:
        parsed = make_url(url)
    except (SQLAlchemyError, ValueError) as error:
        raise DatabaseError(f"Invalid database URL {url!r}: {error}") from None

    engine_options: dict[str, Any] = {"echo": echo, "future": True}

    if parsed.get_backend_name() == "sqlite":
        # Threads of the SCP, scheduler and worker each take connections from the pool.
        engine_options["connect_args"] = {"check_same_thread": False}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_options["pool_pre_ping"] = True

    engine = create_engine(parsed, **engine_options)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _configure_sqlite_connection)

    server_version = check_database(engine)
    upgrade_schema(engine)

    logger.info(
        "Database ready: %s (%s)",
        parsed.render_as_string(hide_password=True),
        server_version,
    )
    return engine


def alembic_config(connection: Connection | None = None) -> Config:
    """Return an Alembic configuration for the node migrations.

    Parameters
    ----------
    connection : sqlalchemy.Connection, optional
        Connection the migrations run on (handed to ``env.py``).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """Return the newest revision of the node migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise DatabaseError(f"No Alembic revision found in {MIGRATIONS_DIR / 'versions'}")
    return head


def current_revision(engine: Engine) -> str | None:
    """Return the revision the database is at, or None when it was never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(engine: Engine) -> str:
    """Apply the Alembic migrations to ``engine`` up to the newest revision.

    A database whose tables were made by ``create_all`` before the migrations existed (node
    tables but no ``alembic_version`` table) is first stamped with the baseline revision; one
    with a revision but without the node tables is migrated from the start.

    Returns
    -------
    str
        The revision the database is at afterwards.

    Raises
    ------
    DatabaseError
        When a migration fails; the message names the URL without its password.
    """
    safe_url = engine.url.render_as_string(hide_password=True)
    try:
        with engine.begin() as connection:
            config = alembic_config(connection)
            tables = set(inspect(connection).get_table_names())
            if VERSION_TABLE not in tables and "studies" in tables:
                logger.warning(
                    "Database %s has node tables but no revision; stamping it with the "
                    "baseline revision %s",
                    safe_url,
                    BASELINE_REVISION,
                )
                command.stamp(config, BASELINE_REVISION)
            elif VERSION_TABLE in tables and "studies" not in tables:
                # The tables were dropped but the revision row was left behind.
                logger.warning(
                    "Database %s has a revision but no node tables; migrating it from the start",
                    safe_url,
                )
                command.stamp(config, "base")
            command.upgrade(config, "head")
    except SQLAlchemyError as error:
        raise DatabaseError(
            f"Migrating the database {safe_url} failed: {error.__class__.__name__}: "
            f"{str(error).splitlines()[0]}"
        ) from error

    revision = current_revision(engine) or ""
    logger.info("Database %s schema at revision %s", safe_url, revision)
    return revision


def schema_differences(engine: Engine) -> list[Any]:
    """Return the differences between the database schema and :mod:`node.models`.

    An empty list means the migrated schema matches the models (what ``alembic revision
    --autogenerate`` compares).
    """
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    return [item for item in differences if not _is_version_table(item)]


def _is_version_table(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) > 1 and getattr(item[1], "name", None) == VERSION_TABLE


def check_database(engine: Engine) -> str:
    """Run a trivial query on ``engine`` and return the server's name and version.

    Raises
    ------
    DatabaseError
        When no connection can be made, naming the URL without its password.
    """
    safe_url = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                version = connection.execute(text("select sqlite_version()")).scalar_one()
                return f"SQLite {version}"
            if engine.dialect.name == "postgresql":
                version = connection.execute(text("show server_version")).scalar_one()
                return f"PostgreSQL {version}"
            connection.execute(text("select 1"))
            return engine.dialect.name
    except SQLAlchemyError as error:
        raise DatabaseError(
            f"Cannot connect to the database {safe_url}: {error.__class__.__name__}: "
            f"{str(error).splitlines()[0]}. Check database_url and that the server is running."
        ) from error


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """Open a session that commits when the block ends and rolls back on an exception.

    Objects stay readable after the commit (``expire_on_commit=False``).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Engine from :func:`init_db`.

    Yields
    ------
    sqlalchemy.orm.Session
    """
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _configure_sqlite_connection(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()
