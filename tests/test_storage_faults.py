"""Storage faults while receiving: an unwritable spool, a database outage, JPEG Baseline
pixel data and a killed ``livernode serve`` process.

Real associations run on 127.0.0.1 between pynetdicom SCUs and the node's
:class:`~node.scp.StorageSCP`; the database outage uses a throwaway PostgreSQL server, and the
restart runs ``livernode serve`` as a subprocess. A series too large for
``analysis.memory_budget_mb`` is covered by ``test_memory_budget_fails_before_inference`` in
``tests/test_messy_outputs.py``.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID, generate_uid
from sqlalchemy import Engine, func, select

from dicom_io.convert import series_to_nifti
from dicom_io.series import load_series
from node.audit import list_audit_events
from node.db import init_db, session_scope
from node.jobs import DatabaseJobQueue
from node.models import AuditKind, Instance, Job, Series, SeriesState, utc_now
from node.scheduler import sweep_complete_series
from node.scp import STATUS_SUCCESS, StorageSCP
from node.spool import Spool
from tests.node_process import NODE_AE_TITLE, start_serve, stop_serve, wait_for_echo
from tests.pg import PostgresUnavailable, free_port, postgres_server
from tests.test_scp import make_ct_series, make_settings, send_datasets

#: Quiet time of the restarted ``livernode serve``. It must exceed the time the node takes to
#: restart (a few seconds on 2 busy cores), or the first half of the series completes alone.
RESTART_QUIET_TIME_S = 12

#: C-STORE "Refused: Out of resources" statuses (PS3.4 Annex B.2.3).
OUT_OF_RESOURCES_RANGE = range(0xA700, 0xA800)

JPEG_ROWS = JPEG_COLUMNS = 64
JPEG_QUALITY = 75
JPEG_RESCALE_SLOPE = 8.0
JPEG_RESCALE_INTERCEPT = -1024.0


def instance_rows(engine: Engine) -> list[str]:
    """Return the SOP Instance UID of every row of the ``instances`` table."""
    with session_scope(engine) as session:
        return list(session.scalars(select(Instance.sop_instance_uid)))


def spooled_files(settings, study_uid: str, series_uid: str) -> list[str]:
    """Return the names of all files, temporary ones included, in a series spool folder."""
    folder = Spool(settings.spool_dir).series_dir(study_uid, series_uid)
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def sqlite_node(tmp_path: Path) -> Iterator[tuple]:
    settings = make_settings(tmp_path)
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    yield settings, engine
    scp.stop()
    engine.dispose()


# Unwritable spool


def test_unwritable_spool_rejected_then_stored(sqlite_node, caplog):
    """A spool root replaced by a regular file makes every C-STORE fail with 0xA7xx.

    The tests run as root, so folder permissions would not stop the write. A file in place
    of the spool folder makes creating the series folder fail for any user.
    """
    settings, engine = sqlite_node
    spool_root = Path(settings.spool_dir)
    shutil.rmtree(spool_root)
    spool_root.write_bytes(b"a regular file where the spool folder belongs")
    datasets = make_ct_series(3)
    sop_uids = [str(ds.SOPInstanceUID) for ds in datasets]

    with caplog.at_level(logging.ERROR, logger="node.scp"):
        refused = send_datasets(settings, datasets)

    assert len(refused) == 3, "the association ended after the first refused instance"
    assert all(status in OUT_OF_RESOURCES_RANGE for status in refused), [hex(s) for s in refused]
    assert instance_rows(engine) == []
    events = list_audit_events(engine, kind=AuditKind.REJECTED)
    assert [event.sop_instance_uid for event in events] == sop_uids
    for event in events:
        assert "out of resources" in event.message
        assert "NotADirectoryError" in event.message or "FileExistsError" in event.message
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for sop_uid in sop_uids:
        assert sop_uid in logged, f"no error logged for SOP instance {sop_uid}"

    spool_root.unlink()
    spool_root.mkdir()
    resent = send_datasets(settings, datasets)

    assert resent == [STATUS_SUCCESS] * 3
    assert sorted(instance_rows(engine)) == sorted(sop_uids)
    study_uid, series_uid = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    assert spooled_files(settings, study_uid, series_uid) == sorted(f"{uid}.dcm" for uid in sop_uids)
    with session_scope(engine) as session:
        assert session.scalar(select(Series.instance_count)) == 3


# Database outage


@pytest.fixture
def postgres():
    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as error:
        pytest.skip(f"PostgreSQL is not available for the database outage test: {error}")


def test_database_outage_rejected_then_stored(tmp_path, postgres):
    settings = make_settings(tmp_path)
    settings.database_url = postgres.url
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    datasets = make_ct_series(3)
    study_uid, series_uid = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    sop_uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    try:
        # One instance before the outage leaves pooled connections that the outage breaks.
        assert send_datasets(settings, datasets[:1]) == [STATUS_SUCCESS]
        postgres.stop()
        refused = send_datasets(settings, datasets[1:])
        files_during_outage = spooled_files(settings, study_uid, series_uid)
        postgres.start()
        resent = send_datasets(settings, datasets)
    finally:
        scp.stop()

    assert all(status in OUT_OF_RESOURCES_RANGE for status in refused), [hex(s) for s in refused]
    assert len(refused) == 2
    # Whatever reached the spool during the outage is still there after the resend.
    assert set(files_during_outage) <= set(spooled_files(settings, study_uid, series_uid))
    assert resent == [STATUS_SUCCESS] * 3
    assert sorted(instance_rows(engine)) == sop_uids
    assert spooled_files(settings, study_uid, series_uid) == [f"{uid}.dcm" for uid in sop_uids]

    later = utc_now() + dt.timedelta(seconds=settings.series.quiet_time_s + 1)
    job_ids = sweep_complete_series(
        engine, DatabaseJobQueue(engine), settings.series.quiet_time_s, now=later
    )
    assert len(job_ids) == 1
    with session_scope(engine) as session:
        series = session.scalar(select(Series))
        assert series.instance_count == 3
        assert series.state in (SeriesState.COMPLETE, SeriesState.QUEUED)
    engine.dispose()


# JPEG Baseline


def jpeg_ct_series(count: int) -> tuple[list[Dataset], list[np.ndarray]]:
    """Build an 8-bit CT series in JPEG Baseline with Pillow's encoder.

    Returns the data sets and, per slice, the HU that Pillow's decoder gives for the
    encoded bytes (the reference, since the encoding is lossy).
    """
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rows, columns = np.mgrid[0:JPEG_ROWS, 0:JPEG_COLUMNS]
    datasets, reference_hu = [], []

    for index in range(count):
        # A body-like disc of soft tissue with a brighter organ, on air.
        body = (rows - 32) ** 2 + (columns - 32) ** 2 < 28**2
        organ = (rows - 28 - index) ** 2 + (columns - 36) ** 2 < 10**2
        stored = np.where(body, 133, 3).astype(np.uint8)
        stored[organ] = 153
        stored = (stored.astype(np.int16) + (columns % 7)).astype(np.uint8)

        buffer = io.BytesIO()
        Image.fromarray(stored, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        encoded = buffer.getvalue()
        decoded = np.asarray(Image.open(io.BytesIO(encoded)), dtype=np.float64)
        reference_hu.append(decoded * JPEG_RESCALE_SLOPE + JPEG_RESCALE_INTERCEPT)

        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = "SYN-JPEG"
        ds.Modality = "CT"
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-32.0, -32.0, index * 2.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.0
        ds.Rows = JPEG_ROWS
        ds.Columns = JPEG_COLUMNS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.RescaleSlope = JPEG_RESCALE_SLOPE
        ds.RescaleIntercept = JPEG_RESCALE_INTERCEPT
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([encoded])
        ds["PixelData"].VR = "OB"

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        datasets.append(ds)
    return datasets, reference_hu


def test_jpeg_baseline_received_and_decoded(sqlite_node):
    settings, engine = sqlite_node
    datasets, reference_hu = jpeg_ct_series(3)

    statuses = send_datasets(settings, datasets, transfer_syntax=JPEGBaseline8Bit)

    assert statuses == [STATUS_SUCCESS] * 3
    folder = Spool(settings.spool_dir).series_dir(
        datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    )
    series = load_series(folder)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in series.datasets} == {JPEGBaseline8Bit}
    volume = np.asarray(series_to_nifti(series).dataobj)
    # Axial LPS slices in ascending position: RAS reorientation flips rows and columns.
    expected = np.stack([hu.T[::-1, ::-1] for hu in reference_hu], axis=2)
    assert volume.shape == expected.shape
    assert np.array_equal(volume, expected)


# Restart of livernode serve


def write_serve_config(work: Path, port: int, min_slices: int) -> Path:
    """Write a ``livernode serve`` configuration with SQLite and a ``[selection]
    min_slices`` that skips the test series."""
    config = work / "livernode.toml"
    config.write_text(
        "\n".join(
            [
                f'data_dir = "{work / "data"}"',
                f'database_url = "sqlite:///{work / "livernode.db"}"',
                "[scp]",
                f'ae_title = "{NODE_AE_TITLE}"',
                f"port = {port}",
                "[series]",
                f"quiet_time_s = {RESTART_QUIET_TIME_S}",
                "sweep_interval_s = 0.5",
                "[selection]",
                f"min_slices = {min_slices}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return config


def series_state(engine: Engine, series_uid: str) -> str | None:
    """Return the state of one series, or None before its first instance is recorded."""
    with session_scope(engine) as session:
        return session.scalar(select(Series.state).where(Series.series_instance_uid == series_uid))


def test_killed_serve_resumes_series(tmp_path):
    """Half a series, SIGKILL of ``livernode serve``, restart, the other half: all recorded.

    ``[selection] min_slices`` is set above the series' slice count, so after completion the
    scheduler skips the series with an audited reason instead of queueing the real analysis,
    which takes minutes on CPU. A single skip audit event for all six instances shows that
    the series completed once, as a whole, after the restart.
    """

    slice_count = 6
    port = free_port()
    config = write_serve_config(tmp_path, port, min_slices=slice_count + 10)
    log_path = tmp_path / "serve.log"
    datasets = make_ct_series(slice_count)
    series_uid = str(datasets[0].SeriesInstanceUID)
    settings = make_settings(tmp_path / "client")
    settings.scp.port = port
    settings.scp.ae_title = NODE_AE_TITLE

    first = start_serve(config, log_path)
    try:
        wait_for_echo(port, deadline_s=60)
        first_half = send_datasets(settings, datasets[: slice_count // 2])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

    second = start_serve(config, log_path)
    try:
        wait_for_echo(port, deadline_s=60)
        second_half = send_datasets(settings, datasets[slice_count // 2 :])
        engine = init_db(f"sqlite:///{tmp_path / 'livernode.db'}")
        stop_at = time.monotonic() + RESTART_QUIET_TIME_S + 60
        while series_state(engine, series_uid) != SeriesState.SKIPPED and time.monotonic() < stop_at:
            time.sleep(0.5)
    finally:
        stop_serve(second)

    assert first.returncode == -signal.SIGKILL
    assert first_half + second_half == [STATUS_SUCCESS] * slice_count, log_path.read_text()[-4000:]
    with session_scope(engine) as session:
        recorded = list(session.scalars(select(Instance.sop_instance_uid)))
        series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        job_total = session.scalar(select(func.count(Job.id)))
    assert sorted(recorded) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert series.instance_count == slice_count
    assert series.state == SeriesState.SKIPPED
    skipped = list_audit_events(engine, kind=AuditKind.SERIES_SKIPPED)
    assert len(skipped) == 1, "the first half completed alone during the restart"
    assert skipped[0].series_instance_uid == series_uid
    assert str(slice_count) in skipped[0].message
    assert job_total == 0
    engine.dispose()
