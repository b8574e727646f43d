"""Scheduler, worker, delivery and command-line tests.

The worker runs a stand-in analysis (:class:`FakeAnalysis`) because the real networks take
minutes per series on CPU; the end-to-end test with the real ``node.analysis.segment``
lives with the analysis tests. Series arrive through the real SCP and results leave through
the real ``dicom_io.sender.send_files`` to a pynetdicom Storage SCP on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SegmentationStorage,
)
from sqlalchemy import Engine, func, select

try:
    from tests.pg import free_port
    from tests.test_scp import make_ct_series, make_settings, send_datasets
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from pg import free_port
    from test_scp import make_ct_series, make_settings, send_datasets

from dicom_io.sender import send_files
from node.audit import list_audit_events
from node.cli import main
from node.config import Settings
from node.db import init_db, session_scope
from node.jobs import DatabaseJobQueue
from node.models import AuditKind, Job, JobState, Series, SeriesState, utc_now
from node.scheduler import SeriesScheduler, sweep_complete_series, sweep_delivery_retries
from node.scp import StorageSCP
from node.worker import Worker

DESTINATION_AE_TITLE = "DESTSCP"


class FakeAnalysis:
    """Stand-in for ``node.analysis.segment`` that writes a small SEG and SR.

    The real networks need minutes per series; this double keeps the worker tests to
    seconds. It reads the spooled series like the real analysis, writes placeholder
    ``seg.dcm`` and ``sr.dcm`` files with the right SOP classes, and returns a result with
    the keys of ``result.json``. With ``error`` set it raises that instead.
    """

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[Path, Path]] = []
        self.input_files: list[list[str]] = []

    def __call__(
        self, input_path: Path, out_dir: Path, settings: Settings, progress: Any = None
    ) -> dict[str, Any]:
        self.calls.append((input_path, out_dir))
        self.input_files.append(sorted(path.name for path in input_path.iterdir()))
        if progress is not None:
            progress("conversion")
        if self.error is not None:
            raise self.error

        source = dcmread(next(input_path.iterdir()), stop_before_pixels=True)
        seg = _write_placeholder(out_dir / "seg.dcm", SegmentationStorage, "SEG", source)
        sr = _write_placeholder(out_dir / "sr.dcm", Comprehensive3DSRStorage, "SR", source)
        mask = out_dir / "mask.nii.gz"
        mask.write_bytes(b"placeholder mask")

        return {
            "liver_volume_ml": 1510.25,
            "tumor_volume_ml": 30.5,
            "tumor_burden_percent": 2.02,
            "tumor_count": 2,
            "stage_seconds": {"conversion": 0.5, "liver": 2.0, "lesion": 1.0},
            "peak_rss_mb": 250.0,
            "warnings": [],
            "outputs": {"mask": mask, "seg": seg, "sr": sr},
        }


def _write_placeholder(path: Path, sop_class_uid: str, modality: str, source: Dataset) -> Path:
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = source.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = source.PatientID
    ds.Modality = modality
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.save_as(path, enforce_file_format=True)
    return path


class DestinationSCP:
    """Storage SCP on 127.0.0.1 that accepts SEG and SR and records what it received."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.ae = AE(ae_title=DESTINATION_AE_TITLE)
        self.ae.add_supported_context(SegmentationStorage, ExplicitVRLittleEndian)
        self.ae.add_supported_context(Comprehensive3DSRStorage, ExplicitVRLittleEndian)
        self.server = None

    def _handle_store(self, event: evt.Event) -> int:
        self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def __enter__(self) -> DestinationSCP:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._handle_store)],
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Engine, DatabaseJobQueue]]:
    settings = make_settings(tmp_path)
    engine = init_db(settings.database_url)
    queue = DatabaseJobQueue(engine)
    scp = StorageSCP(settings, engine)
    scp.start()
    yield settings, engine, queue
    scp.stop()
    engine.dispose()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def receive_and_complete(
    settings: Settings, engine: Engine, queue: DatabaseJobQueue, count: int = 3
) -> tuple[list[Dataset], int]:
    """Send a synthetic series to the node, run the completion sweep and return the job id."""
    datasets = make_ct_series(count)
    assert send_datasets(settings, datasets) == [0x0000] * count

    after_quiet_time = utc_now() + dt.timedelta(seconds=settings.series.quiet_time_s + 1)
    job_ids = sweep_complete_series(engine, queue, settings.series.quiet_time_s, now=after_quiet_time)
    assert len(job_ids) == 1
    return datasets, job_ids[0]


def load_job(engine: Engine, job_id: int) -> Job:
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_sweep_completes_series_once(node) -> None:
    settings, engine, queue = node
    datasets = make_ct_series(3)
    send_datasets(settings, datasets)
    quiet_time_s = settings.series.quiet_time_s

    before_quiet_time = sweep_complete_series(engine, queue, quiet_time_s, now=utc_now())
    later = utc_now() + dt.timedelta(seconds=quiet_time_s + 1)
    first = sweep_complete_series(engine, queue, quiet_time_s, now=later)
    second = sweep_complete_series(engine, queue, quiet_time_s, now=later)

    assert before_quiet_time == []
    assert len(first) == 1
    assert second == []
    with session_scope(engine) as session:
        assert session.scalar(select(func.count(Job.id))) == 1
        series = session.scalar(select(Series))
        assert series.state == SeriesState.QUEUED
        assert series.completed_at is not None
    events = list_audit_events(engine, kind=AuditKind.SERIES_COMPLETE)
    assert len(events) == 1
    assert events[0].series_instance_uid == datasets[0].SeriesInstanceUID
    assert events[0].job_id == first[0]
    assert queue.claim_next("worker-test") == first[0]


def test_late_instance_reopens_series(node) -> None:
    settings, engine, queue = node
    datasets, job_id = receive_and_complete(settings, engine, queue)
    late = make_ct_series(1, datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID)

    send_datasets(settings, late)

    with session_scope(engine) as session:
        series = session.scalar(select(Series))
        assert series.state == SeriesState.RECEIVING
        assert series.instance_count == 4
    assert len(list_audit_events(engine, kind=AuditKind.LATE_INSTANCE)) == 1


def test_worker_delivers_to_folder(node) -> None:
    settings, engine, queue = node
    datasets, job_id = receive_and_complete(settings, engine, queue)
    study_uid = datasets[0].StudyInstanceUID
    series_uid = datasets[0].SeriesInstanceUID
    analysis = FakeAnalysis()
    worker = Worker(settings, engine, queue, analyse=analysis, sender=send_files)

    assert worker.run_once() == job_id

    spool_series = Path(settings.spool_dir) / study_uid / series_uid
    out_dir = Path(settings.output_dir) / study_uid / series_uid
    assert analysis.calls == [(spool_series, out_dir)]
    assert analysis.input_files[0] == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in datasets)

    job = load_job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.attempts == 1
    assert job.stage_seconds == {"conversion": 0.5, "liver": 2.0, "lesion": 1.0}
    assert job.result["liver_volume_ml"] == 1510.25
    assert job.output_dir == str(out_dir)
    assert job.delivered_at is not None
    assert json.loads((out_dir / "result.json").read_text())["tumor_count"] == 2

    delivered = Path(settings.destination.path) / study_uid
    assert sorted(path.name for path in delivered.iterdir()) == [
        f"{series_uid}_seg.dcm",
        f"{series_uid}_sr.dcm",
    ]
    assert (delivered / f"{series_uid}_seg.dcm").read_bytes() == (out_dir / "seg.dcm").read_bytes()

    kinds = [event.kind for event in list_audit_events(engine, job_id=job_id)]
    assert kinds == [
        AuditKind.SERIES_COMPLETE,
        AuditKind.JOB_STARTED,
        AuditKind.JOB_FINISHED,
        AuditKind.SENT,
        AuditKind.SENT,
    ]
    with session_scope(engine) as session:
        assert session.scalar(select(Series.state)) == SeriesState.DONE


def test_worker_sends_to_dicom_destination(node) -> None:
    settings, engine, queue = node
    datasets, job_id = receive_and_complete(settings, engine, queue)
    settings.destination.kind = "dicom"
    settings.destination.ae_title = DESTINATION_AE_TITLE
    settings.destination.host = "127.0.0.1"
    settings.destination.send_timeout_s = 5
    # This storage SCP does not support C-FIND; confirmed delivery is tested against Orthanc.
    settings.destination.confirm_delivery = False

    with DestinationSCP() as destination:
        settings.destination.port = destination.port
        worker = Worker(settings, engine, queue, analyse=FakeAnalysis(), sender=send_files)
        assert worker.run_once() == job_id

    job = load_job(engine, job_id)
    out_dir = Path(job.output_dir)
    expected = [
        str(dcmread(out_dir / name, stop_before_pixels=True).SOPInstanceUID)
        for name in ("seg.dcm", "sr.dcm")
    ]
    assert job.state == JobState.SUCCEEDED
    assert destination.received == expected
    assert [record["status"] for record in job.delivery] == ["0x0000", "0x0000"]
    sent = list_audit_events(engine, kind=AuditKind.SENT)
    assert [event.sop_instance_uid for event in sent] == expected
    assert all(DESTINATION_AE_TITLE in event.message for event in sent)


def test_unreachable_destination_retries_then_fails(node) -> None:
    settings, engine, queue = node
    datasets, job_id = receive_and_complete(settings, engine, queue)
    settings.destination.kind = "dicom"
    settings.destination.ae_title = DESTINATION_AE_TITLE
    settings.destination.host = "127.0.0.1"
    settings.destination.port = free_port()  # nothing listens there
    settings.destination.send_timeout_s = 5
    settings.destination.send_retries = 2
    settings.destination.retry_backoff_s = 0
    analysis = FakeAnalysis()
    worker = Worker(settings, engine, queue, analyse=analysis, sender=send_files)

    states = [load_job(engine, worker.run_once()).state]
    retries = []
    for _ in range(3):
        requeued = sweep_delivery_retries(engine, queue, now=utc_now() + dt.timedelta(seconds=1))
        retries.append(requeued)
        if requeued:
            states.append(load_job(engine, worker.run_once()).state)

    assert states == [JobState.DELIVERY_FAILED] * 3
    assert retries == [[job_id], [job_id], []]
    assert len(analysis.calls) == 1, "a delivery retry ran the analysis again"

    job = load_job(engine, job_id)
    assert job.delivery_attempts == 3
    assert job.next_delivery_at is None
    assert "SendError" in job.error

    failures = list_audit_events(engine, kind=AuditKind.SEND_FAILED)
    assert len(failures) == 3
    assert "attempt 1 of 3" in failures[0].message
    assert "no retries left" in failures[-1].message
    assert "SendError" in failures[-1].message
    assert f"127.0.0.1:{settings.destination.port}" in failures[-1].message
    assert len(list_audit_events(engine, kind=AuditKind.DELIVERY_RETRY)) == 2


def test_analysis_error_fails_job(node) -> None:
    settings, engine, queue = node
    datasets, job_id = receive_and_complete(settings, engine, queue)
    analysis = FakeAnalysis(error=ValueError("series has 3 slices; at least 16 are needed"))
    worker = Worker(settings, engine, queue, analyse=analysis, sender=send_files)

    worker.run_once()

    job = load_job(engine, job_id)
    assert job.state == JobState.FAILED
    assert "at least 16 are needed" in job.error
    failed = list_audit_events(engine, kind=AuditKind.FAILED)
    assert len(failed) == 1
    assert "ValueError" in failed[0].message
    assert failed[0].series_instance_uid == datasets[0].SeriesInstanceUID
    with session_scope(engine) as session:
        assert session.scalar(select(Series.state)) == SeriesState.FAILED
    spool_series = Path(settings.spool_dir) / datasets[0].StudyInstanceUID / datasets[0].SeriesInstanceUID
    assert len(list(spool_series.iterdir())) == 3
    assert list_audit_events(engine, kind=AuditKind.SENT) == []


def test_node_threads_process_series(node, tmp_path: Path, capsys, restore_logging) -> None:
    settings, engine, queue = node
    # The quiet time must outlast the gaps between instances on a loaded machine, or the sweep
    # completes the series after its first instance.
    settings.series.quiet_time_s = 3.0
    settings.series.sweep_interval_s = 0.2
    settings.worker.poll_interval_s = 0.2
    scheduler = SeriesScheduler(settings, engine, queue)
    worker = Worker(settings, engine, queue, analyse=FakeAnalysis(), sender=send_files)
    datasets = make_ct_series(3)
    series_uid = datasets[0].SeriesInstanceUID

    scheduler.start()
    worker.start()
    try:
        send_datasets(settings, datasets)
        # On a loaded machine an instance may arrive after the quiet time and re-open the series
        # for a second job, so wait until every job has ended and the series is done.
        deadline = time.monotonic() + 60
        states: list[str] = []
        series_state = None
        final_states = (JobState.SUCCEEDED, JobState.FAILED, JobState.DELIVERY_FAILED)
        while time.monotonic() < deadline:
            with session_scope(engine) as session:
                states = list(session.scalars(select(Job.state).order_by(Job.id)))
                series_state = session.scalar(select(Series.state))
            if states and all(state in final_states for state in states) and series_state == SeriesState.DONE:
                break
            time.sleep(0.1)
    finally:
        scheduler.stop()
        worker.stop(timeout_s=30)

    assert states and states[-1] == JobState.SUCCEEDED

    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{settings.data_dir}"\n')
    assert main(["--config", str(config), "studies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    assert rows[0]["series_instance_uid"] == series_uid
    assert rows[0]["state"] == SeriesState.DONE
    assert rows[0]["instances"] == 3
    assert rows[0]["liver_volume_ml"] == 1510.25
    assert rows[0]["seconds"] == 3.5

    assert main(["--config", str(config), "studies", "--state", "failed"]) == 0
    assert capsys.readouterr().out.strip() == "No series found."
    assert main(["--config", str(config), "studies"]) == 0
    table = capsys.readouterr().out
    assert series_uid in table
    assert "1510.2" in table or "1510.3" in table


def test_cli_usage_error_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["studies", "--limit", "0"])

    assert raised.value.code == 2
    assert "out of range" in capsys.readouterr().err


def test_cli_failure_one_line(tmp_path: Path, capsys, restore_logging) -> None:
    status = main(["--config", str(tmp_path / "absent.toml"), "studies"])

    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1
    assert err[0].startswith("livernode: error: Configuration file")
    assert "not found" in err[0]


def test_restart_quiet_times_at_start(node) -> None:
    settings, engine, queue = node
    from node.scheduler import restart_quiet_times

    long_ago = utc_now() - dt.timedelta(hours=1)
    with session_scope(engine) as session:
        from node.models import Study

        study = Study(study_instance_uid=generate_uid())
        session.add(study)
        session.flush()
        session.add(
            Series(
                study_id=study.id,
                series_instance_uid=generate_uid(),
                state=SeriesState.RECEIVING,
                last_received_at=long_ago,
            )
        )

    assert restart_quiet_times(engine) == 1
    # The series is no longer past its quiet time, so the sweep must not complete it yet.
    assert sweep_complete_series(engine, queue, quiet_time_s=60) == []
