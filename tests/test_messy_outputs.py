"""Outcomes of series that cannot give a reliable result: short coverage, memory budget.

These tests run the real :func:`node.analysis.segment` with the real weights. The series
are synthetic (:mod:`tests.synthetic_series`) and rejected before inference, so no network
runs and each test takes seconds.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pydicom
import pytest

from dicom_io.sender import send_files
from dicom_io.sr_not_analysable import read_comments
from node.analysis import segment
from node.audit import list_audit_events
from node.config import Settings
from node.db import init_db, session_scope
from node.jobs import DatabaseJobQueue
from node.models import AuditKind, Job, JobState, utc_now
from node.scheduler import sweep_complete_series
from node.scp import StorageSCP
from node.worker import Worker
from pipeline.inference import MemoryBudgetError
from pipeline.settings import DEFAULT_MIN_ANALYSABLE_COVERAGE_MM
from tests.synthetic_series import SeriesSpec, write_synthetic_series
from tests.test_messy_ingest import send_files_as_stored
from tests.test_scp import make_settings

#: 10 slices of 2.5 mm: 25 mm of coverage, far below the threshold.
SHORT_SPEC = SeriesSpec(slice_count=10, first_position_mm=-12.0)


def test_short_coverage_not_analysable(tmp_path, weights_cache):
    settings = Settings(data_dir=tmp_path / "data", weights_cache_dir=weights_cache)
    write_synthetic_series(tmp_path / "ct", SHORT_SPEC)

    result = segment(tmp_path / "ct", tmp_path / "out", settings)

    assert result["not_analysable"].startswith("not analysable: coverage 25 mm")
    assert f"{DEFAULT_MIN_ANALYSABLE_COVERAGE_MM:.0f} mm" in result["not_analysable"]
    assert result["liver_volume_ml"] is None
    assert result["tumor_volume_ml"] is None
    assert result["tumor_burden_percent"] is None
    assert "liver_inference" not in result["stage_seconds"], "the networks ran"
    assert result["outputs"]["seg"] is None
    assert json.loads((tmp_path / "out" / "result.json").read_text())["not_analysable"] == result["not_analysable"]

    sr = pydicom.dcmread(result["outputs"]["sr"])
    comments = read_comments(sr)
    assert len(comments) == 1
    assert comments[0].startswith("not analysable: coverage 25 mm")
    numeric = [item for item in sr.ContentSequence if item.ValueType == "NUM"]
    assert numeric == []
    assert "VOLUME" not in str(sr).upper().replace("VOLUMETRY", "")


def test_not_analysable_audited_through_worker(tmp_path, weights_cache):
    settings = make_settings(tmp_path)
    settings.weights_cache_dir = weights_cache
    engine = init_db(settings.database_url)
    queue = DatabaseJobQueue(engine)
    scp = StorageSCP(settings, engine)
    scp.start()
    try:
        synthetic = write_synthetic_series(tmp_path / "ct", SHORT_SPEC)
        send_files_as_stored(settings, synthetic.slice_files)
        later = utc_now() + dt.timedelta(seconds=settings.series.quiet_time_s + 1)
        (job_id,) = sweep_complete_series(engine, queue, settings.series.quiet_time_s, now=later)
        Worker(settings, engine, queue, sender=send_files).run_once()
    finally:
        scp.stop()

    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.SUCCEEDED
        assert job.result["liver_volume_ml"] is None
        delivered = Path(job.output_paths["sr"])
    (event,) = list_audit_events(engine, kind=AuditKind.NOT_ANALYSABLE)
    assert "not analysable: coverage 25 mm" in event.message
    assert event.series_instance_uid == synthetic.series_uid
    assert delivered.is_file()
    assert [p.name for p in (Path(settings.destination.path) / synthetic.study_uid).iterdir()] == [
        f"{synthetic.series_uid}_sr.dcm"
    ]
    engine.dispose()


def test_coverage_threshold_configurable(tmp_path, weights_cache):
    settings = Settings(data_dir=tmp_path / "data", weights_cache_dir=weights_cache)
    settings.analysis.min_analysable_coverage_mm = 300.0
    write_synthetic_series(tmp_path / "ct", SeriesSpec())

    result = segment(tmp_path / "ct", tmp_path / "out", settings)

    assert result["not_analysable"].startswith("not analysable: coverage 100 mm, below the 300 mm")


def test_memory_budget_fails_before_inference(tmp_path, weights_cache):
    """A series too large for the budget fails before any network runs, naming the setting.

    A 512 x 512 x 1000 series would need about 0.5 GB of files, so it is not written here.
    A budget far below one network tile gives the same early check on a small series.
    """
    settings = Settings(data_dir=tmp_path / "data", weights_cache_dir=weights_cache)
    settings.analysis.memory_budget_mb = 200
    settings.analysis.min_analysable_coverage_mm = 0.0
    write_synthetic_series(tmp_path / "ct", SeriesSpec())
    stages: list[str] = []

    with pytest.raises(MemoryBudgetError) as raised:
        segment(tmp_path / "ct", tmp_path / "out", settings, progress=stages.append)

    assert "memory_budget_mb is 200" in str(raised.value)
    assert "liver_inference" not in stages
