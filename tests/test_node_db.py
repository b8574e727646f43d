"""Database, job queue and settings tests, on SQLite and on a throwaway PostgreSQL server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

try:
    from tests.pg import PostgresUnavailable, free_port, postgres_cluster
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from pg import PostgresUnavailable, free_port, postgres_cluster

from node.audit import list_audit_events
from node.config import ConfigError, Settings, load_settings
from node.db import DatabaseError, init_db, session_scope
from node.jobs import DatabaseJobQueue
from node.models import (
    AuditKind,
    Base,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
)

NODE_TABLES = {"studies", "series", "instances", "jobs", "audit_events"}


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    try:
        with postgres_cluster() as url:
            yield url
    except PostgresUnavailable as error:
        pytest.skip(f"PostgreSQL tests skipped: {error}")


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
    else:
        url = request.getfixturevalue("postgres_url")

    engine = init_db(url)
    yield engine

    Base.metadata.drop_all(engine)
    engine.dispose()


def add_series(engine: Engine, series_uid: str = "1.2.3.4") -> int:
    with session_scope(engine) as session:
        study = Study(study_instance_uid="1.2.3", patient_id="P1")
        series = Series(
            study=study,
            series_instance_uid=series_uid,
            modality="CT",
            instance_count=1,
            state=SeriesState.QUEUED,
        )
        session.add(series)
        session.flush()
        return series.id


def add_jobs(engine: Engine, series_id: int, count: int, state: str = JobState.QUEUED) -> list[int]:
    with session_scope(engine) as session:
        jobs = [Job(series_id=series_id, state=state) for _ in range(count)]
        session.add_all(jobs)
        session.flush()
        return [job.id for job in jobs]


def test_init_db_creates_tables(engine: Engine) -> None:
    assert NODE_TABLES <= set(inspect(engine).get_table_names())


def test_init_db_idempotent(engine: Engine) -> None:
    series_id = add_series(engine)

    again = init_db(engine.url.render_as_string(hide_password=False))
    with session_scope(again) as session:
        assert session.get(Series, series_id) is not None
    again.dispose()


def test_sop_instance_uid_unique(engine: Engine) -> None:
    series_id = add_series(engine)
    fields = dict(
        series_id=series_id,
        sop_instance_uid="1.2.3.4.5",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        spool_path="/spool/x.dcm",
        sha256="0" * 64,
        size_bytes=10,
    )
    with session_scope(engine) as session:
        session.add(Instance(**fields))

    with pytest.raises(IntegrityError):
        with session_scope(engine) as session:
            session.add(Instance(**fields))


def test_foreign_keys_enforced(engine: Engine) -> None:
    with pytest.raises(IntegrityError):
        with session_scope(engine) as session:
            session.add(Job(series_id=999_999, state=JobState.QUEUED))


def test_sqlite_wal_mode(tmp_path: Path) -> None:
    engine = init_db(f"sqlite:///{tmp_path / 'node.db'}")
    with engine.connect() as connection:
        journal_mode = connection.execute(text("PRAGMA journal_mode")).scalar_one()
        foreign_keys = connection.execute(text("PRAGMA foreign_keys")).scalar_one()
    engine.dispose()

    assert journal_mode == "wal"
    assert foreign_keys == 1


def test_session_scope_rolls_back(engine: Engine) -> None:
    with pytest.raises(RuntimeError):
        with session_scope(engine) as session:
            session.add(Study(study_instance_uid="9.9.9"))
            session.flush()
            raise RuntimeError("abort the transaction")

    with session_scope(engine) as session:
        assert session.scalar(select(Study).where(Study.study_instance_uid == "9.9.9")) is None


def test_job_claim_exclusive(engine: Engine) -> None:
    series_id = add_series(engine)
    job_ids = add_jobs(engine, series_id, 24)
    queue = DatabaseJobQueue(engine)
    claimed: dict[str, list[int]] = {"worker-a": [], "worker-b": []}
    start = threading.Barrier(2)

    def claim_all(name: str) -> None:
        start.wait()
        while (job_id := queue.claim_next(name)) is not None:
            claimed[name].append(job_id)

    threads = [threading.Thread(target=claim_all, args=(name,)) for name in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    first, second = claimed["worker-a"], claimed["worker-b"]
    assert not set(first) & set(second), "two workers claimed the same job"
    assert sorted(first + second) == job_ids
    assert len(first) + len(second) == len(set(first + second))

    with session_scope(engine) as session:
        jobs = list(session.scalars(select(Job)))
    assert all(job.state == JobState.RUNNING for job in jobs)
    assert all(job.attempts == 1 for job in jobs)
    owners = {job.id: job.claimed_by for job in jobs}
    assert all(owners[job_id] == "worker-a" for job_id in first)
    assert all(owners[job_id] == "worker-b" for job_id in second)


def test_claim_empty_queue_returns_none(engine: Engine) -> None:
    series_id = add_series(engine)
    add_jobs(engine, series_id, 2, state=JobState.SUCCEEDED)

    assert DatabaseJobQueue(engine).claim_next("worker-a") is None


def test_requeue_running_jobs(engine: Engine) -> None:
    series_id = add_series(engine)
    running = add_jobs(engine, series_id, 2, state=JobState.RUNNING)
    finished = add_jobs(engine, series_id, 1, state=JobState.SUCCEEDED)
    queue = DatabaseJobQueue(engine)

    requeued = queue.requeue_running()

    assert sorted(requeued) == running
    with session_scope(engine) as session:
        states = {job.id: job.state for job in session.scalars(select(Job))}
    assert all(states[job_id] == JobState.QUEUED for job_id in running)
    assert states[finished[0]] == JobState.SUCCEEDED
    events = list_audit_events(engine, kind=AuditKind.JOB_REQUEUED)
    assert sorted(event.job_id for event in events) == running
    assert queue.claim_next("worker-a") == running[0]


def test_init_db_unreachable_server() -> None:
    url = f"postgresql+psycopg2://node:secret@127.0.0.1:{free_port()}/livernode"

    with pytest.raises(DatabaseError) as raised:
        init_db(url)

    assert "Cannot connect to the database" in str(raised.value)
    assert "secret" not in str(raised.value)


# Settings -------------------------------------------------------------------------------


def test_settings_defaults_derived_from_data_dir() -> None:
    settings = load_settings(environ={})

    assert settings.data_dir == Path("livernode-data")
    assert settings.spool_dir == Path("livernode-data/spool")
    assert settings.weights_cache_dir == Path("livernode-data/weights")
    assert settings.database_url == "sqlite:///livernode-data/livernode.db"
    assert settings.scp.ae_title == "LIVERNODE"
    assert settings.scp.host == "127.0.0.1"
    assert settings.scp.port == 11112
    assert settings.series.quiet_time_s == 30
    assert settings.series.sweep_interval_s == 5
    assert settings.destination.send_retries == 3
    assert settings.analysis.torch_threads == 2
    assert settings.analysis.memory_budget_mb == 6000
    assert settings.analysis.keep_empty_frames is False
    assert settings.analysis.precision == "auto"


def test_settings_from_toml_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'data_dir = "/srv/node"\n'
        "[scp]\nport = 4242\nallowed_calling_ae_titles = [\"PACS\"]\n"
        '[destination]\nkind = "dicom"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        "[analysis]\nkeep_empty_frames = true\n"
    )
    environ = {
        "LIVERNODE_CONFIG": str(config),
        "LIVERNODE_PORT": "5555",
        "LIVERNODE_WEIGHTS_CACHE": "/cache/weights",
        "LIVERNODE_PRECISION": "float32",
    }

    settings = load_settings(environ=environ)

    assert settings.scp.port == 5555
    assert settings.scp.allowed_calling_ae_titles == ["PACS"]
    assert settings.spool_dir == Path("/srv/node/spool")
    assert settings.weights_cache_dir == Path("/cache/weights")
    assert settings.destination.kind == "dicom"
    assert settings.analysis.keep_empty_frames is True
    assert settings.analysis.precision == "float32"


@pytest.mark.parametrize(
    ("toml", "named_key", "allowed"),
    [
        ("[scp]\nport = 70000\n", "scp.port", "1-65535"),
        ("[series]\nquiet_time_s = 0\n", "series.quiet_time_s", "above 0"),
        ("[scp]\ndimse_timeout_s = -1\n", "scp.dimse_timeout_s", "above 0"),
        ('[destination]\nkind = "ftp"\n', "destination.kind", "dicom, folder"),
        ('[destination]\nkind = "dicom"\nae_title = "PACS"\n', "destination.host", "host"),
        ("[scp]\nportt = 1\n", "scp.portt", "scp.port"),
        ('[scp]\nport = "high"\n', "scp.port", "int"),
        ('[analysis]\nprecision = "half"\n', "analysis.precision", "'bfloat16', 'float32'"),
    ],
)
def test_settings_invalid_value_named(tmp_path: Path, toml: str, named_key: str, allowed: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(toml)

    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})

    assert named_key in str(raised.value)
    assert allowed in str(raised.value)


def test_settings_missing_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_settings_retry_delay_doubles() -> None:
    destination = Settings().destination
    destination.retry_backoff_s = 5

    delays = [destination.retry_delay_s(attempt) for attempt in (1, 2, 3)]

    assert delays == [5, 10, 20]
