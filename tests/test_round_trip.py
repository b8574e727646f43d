"""DICOM round trip: a CT series in over C-STORE, SEG and SR back out, database rows checked.

``livernode serve`` runs as a separate process with the real networks; a pynetdicom storage
SCP in the test plays the PACS. The database is a throwaway PostgreSQL cluster when its
binaries are installed (CI installs them), otherwise the embedded SQLite default. The run is
the session fixture ``round_trip`` of ``conftest.py``, shared with the browser test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from dicom_io.sr_writer import read_sr_measurements
from node.db import session_scope
from node.models import AuditEvent, Instance, Job, JobState, Series, SeriesState, Study
from tests.conftest import REFERENCE_LIVER_LABEL, TOTALSEG, canonical_array, dice
from tests.node_process import COMPREHENSIVE_3D_SR_SOP_CLASS, SEG_SOP_CLASS

pytestmark = pytest.mark.slow


def test_round_trip_statuses(round_trip: dict) -> None:
    assert round_trip["statuses"]
    assert set(round_trip["statuses"]) == {0x0000}


def test_round_trip_seg_and_sr_in_source_study(round_trip: dict) -> None:
    source = pydicom.dcmread(next(round_trip["series_folder"].iterdir()), stop_before_pixels=True)
    received = [pydicom.dcmread(path, stop_before_pixels=True) for path in round_trip["received"]]
    assert sorted(ds.SOPClassUID for ds in received) == sorted([SEG_SOP_CLASS, COMPREHENSIVE_3D_SR_SOP_CLASS])
    for dataset in received:
        assert dataset.StudyInstanceUID == source.StudyInstanceUID
        assert dataset.PatientID == source.PatientID
    seg = next(ds for ds in received if ds.SOPClassUID == SEG_SOP_CLASS)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


def test_round_trip_database_rows(round_trip: dict) -> None:
    instance_count = len(list(round_trip["series_folder"].iterdir()))
    with session_scope(round_trip["engine"]) as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        series = session.scalars(select(Series)).one()
        assert session.scalar(select(func.count()).select_from(Instance)) == instance_count
        job = session.scalars(select(Job)).one()
        kinds = {event.kind for event in session.scalars(select(AuditEvent))}
        job_state, job_result, stage_seconds = job.state, job.result, job.stage_seconds
        series_state = series.state

    assert job_state == JobState.SUCCEEDED
    assert series_state == SeriesState.DONE
    assert {"received", "series_complete", "job_started", "job_finished", "sent", "delivery_confirmed"} <= kinds
    assert job_result["liver_volume_ml"] > 0
    assert stage_seconds
    print(f"round trip stage seconds: {stage_seconds}; peak RSS {job_result['peak_rss_mb']} MiB")


def test_round_trip_volumes_and_dice(round_trip: dict) -> None:
    with session_scope(round_trip["engine"]) as session:
        job = session.scalars(select(Job)).one()
        result, output_dir = job.result, Path(job.output_dir)

    sr_path = next(
        path for path in round_trip["received"]
        if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == COMPREHENSIVE_3D_SR_SOP_CLASS
    )
    measured = read_sr_measurements(sr_path)
    on_disk = json.loads((output_dir / "result.json").read_text())
    for key in ("liver_volume_ml", "tumor_volume_ml", "tumor_burden_percent"):
        assert measured[key] == pytest.approx(result[key], abs=1e-6), key
        assert on_disk[key] == result[key], key

    reference = canonical_array(TOTALSEG / "example_seg.nii.gz") == REFERENCE_LIVER_LABEL
    labels = canonical_array(output_dir / "mask.nii.gz")
    score = dice(labels >= 1, reference)
    print(f"round trip liver Dice: {score:.4f}")
    assert score >= 0.94
