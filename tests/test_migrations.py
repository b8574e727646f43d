"""Alembic migrations: a fresh database is migrated to head and matches ``node.models``.

Runs on SQLite and on a throwaway PostgreSQL cluster (``tests/pg.py``; skipped when its
binaries are not installed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from node.cli import main
from node.db import current_revision, head_revision, init_db, schema_differences
from node.models import Base
from tests.pg import PostgresUnavailable, postgres_cluster

NODE_TABLES = {"studies", "series", "instances", "jobs", "audit_events"}


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    try:
        with postgres_cluster() as url:
            yield url
    except PostgresUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = create_engine(url)
    with engine.begin() as connection:
        Base.metadata.drop_all(connection)
        connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    engine.dispose()


def test_fresh_database_migrated_to_head_matches_models(database_url: str) -> None:
    engine = init_db(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
        revision = current_revision(engine)
        differences = schema_differences(engine)
    finally:
        engine.dispose()

    assert NODE_TABLES | {"alembic_version"} <= tables
    assert revision == head_revision()
    assert differences == []


def test_database_made_by_create_all_is_stamped_and_kept(database_url: str) -> None:
    legacy = create_engine(database_url)
    Base.metadata.create_all(legacy)
    with legacy.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at) "
            "VALUES ('1.2.3', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
        )
    legacy.dispose()

    engine = init_db(database_url)
    try:
        revision = current_revision(engine)
        with engine.connect() as connection:
            kept = connection.exec_driver_sql("SELECT study_instance_uid FROM studies").scalars().all()
        differences = schema_differences(engine)
    finally:
        engine.dispose()

    assert revision == head_revision()
    assert kept == ["1.2.3"]
    assert differences == []


def test_db_upgrade_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path}"\ndatabase_url = "{url}"\n', encoding="utf-8")

    assert main(["--config", str(config), "db", "upgrade"]) == 0
    assert main(["--config", str(config), "db", "upgrade"]) == 0

    engine = create_engine(url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    assert "newest revision" in capsys.readouterr().out
