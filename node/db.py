"""Database engine and session setup for SQLite and PostgreSQL.

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

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node.models import Base

logger = logging.getLogger(__name__)

#: Milliseconds a SQLite connection waits for a lock held by another connection.
SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseError(RuntimeError):
    """Raised when the database cannot be opened or reached."""


def init_db(url: str, *, echo: bool = False) -> Engine:
    """Create an engine for ``url``, check the connection and create missing tables.

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
        The engine, with all node tables present.

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
    Base.metadata.create_all(engine)

    logger.info(
        "Database ready: %s (%s)",
        parsed.render_as_string(hide_password=True),
        server_version,
    )
    return engine


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
