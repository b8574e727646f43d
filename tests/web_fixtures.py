"""Database rows and settings shared by the web page and command-line report tests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from node.audit import add_audit_event
from node.config import Settings
from node.db import init_db, session_scope
from node.models import AuditKind, Job, JobState, Series, SeriesState, Study

WEB_USER = "admin"
WEB_PASSWORD = "correct horse battery staple"

DONE_STUDY_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000001"
DONE_SERIES_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000002"
FAILED_STUDY_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000003"
FAILED_SERIES_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000004"

DONE_RESULT = {
    "liver_volume_ml": 1523.47,
    "tumor_volume_ml": 12.5,
    "tumor_burden_percent": 0.81,
    "tumor_count": 2,
    "total_seconds": 61.234,
    "warnings": [],
}
ANALYSIS_ERROR = "SeriesValidationError: ImagePositionPatient missing in 3 instances"


@dataclass
class ReportDatabase:
    """A SQLite database with one analysed and one failed series, and its settings."""

    settings: Settings
    engine: Engine
    done_job_id: int
    failed_job_id: int


def make_report_database(tmp_path: Path, users: dict[str, str] | None = None) -> ReportDatabase:
    """Create settings under ``tmp_path`` and fill the database with two series.

    The analysed series came from ``PACS_A`` on 2024-03-01; the failed one from ``PACS_B``
    on 2024-03-05 and has a failed analysis job.
    """
    settings = Settings(data_dir=tmp_path / "data")
    settings.web.users = dict(users or {})
    settings.validate()
    engine = init_db(settings.database_url)

    received_done = dt.datetime(2024, 3, 1, 9, 30, 0)
    received_failed = dt.datetime(2024, 3, 5, 14, 0, 0)
    output_dir = tmp_path / "data" / "output" / DONE_STUDY_UID / DONE_SERIES_UID
    output_dir.mkdir(parents=True)
    (output_dir / "result.json").write_text("{}\n", encoding="utf-8")

    with session_scope(engine) as session:
        done_study = Study(
            study_instance_uid=DONE_STUDY_UID,
            patient_id="LN-0001",
            accession_number="ACC-DONE",
            study_date="20240229",
            first_received_at=received_done,
            last_received_at=received_done,
        )
        done_series = Series(
            study=done_study,
            series_instance_uid=DONE_SERIES_UID,
            modality="CT",
            series_description="abdomen portal venous",
            instance_count=120,
            state=SeriesState.DONE,
            calling_ae_title="PACS_A",
            first_received_at=received_done,
            last_received_at=received_done,
            completed_at=received_done + dt.timedelta(seconds=30),
        )
        done_job = Job(
            series=done_series,
            state=JobState.SUCCEEDED,
            attempts=1,
            delivery_attempts=1,
            result=dict(DONE_RESULT),
            stage_seconds={"conversion": 3.2, "liver": 40.1, "lesion": 18.0},
            output_dir=str(output_dir),
            output_paths={"mask": str(output_dir / "mask.nii.gz"), "seg": None, "sr": None},
            started_at=received_done + dt.timedelta(seconds=31),
            finished_at=received_done + dt.timedelta(seconds=92),
        )
        failed_study = Study(
            study_instance_uid=FAILED_STUDY_UID,
            patient_id="LN-0002",
            accession_number="ACC-FAIL",
            study_date="20240305",
            first_received_at=received_failed,
            last_received_at=received_failed,
        )
        failed_series = Series(
            study=failed_study,
            series_instance_uid=FAILED_SERIES_UID,
            modality="CT",
            instance_count=3,
            state=SeriesState.FAILED,
            calling_ae_title="PACS_B",
            first_received_at=received_failed,
            last_received_at=received_failed,
        )
        failed_job = Job(
            series=failed_series,
            state=JobState.FAILED,
            attempts=1,
            error=ANALYSIS_ERROR,
            started_at=received_failed + dt.timedelta(seconds=40),
            finished_at=received_failed + dt.timedelta(seconds=41),
        )
        session.add_all([done_job, failed_job])
        session.flush()

        add_audit_event(
            session, AuditKind.RECEIVED, study_uid=DONE_STUDY_UID, series_uid=DONE_SERIES_UID,
            calling_ae_title="PACS_A", message="120 instances received",
        ).created_at = received_done
        add_audit_event(
            session, AuditKind.JOB_FINISHED, study_uid=DONE_STUDY_UID, series_uid=DONE_SERIES_UID,
            job_id=done_job.id, message="analysis finished",
        ).created_at = received_done + dt.timedelta(seconds=92)
        add_audit_event(
            session, AuditKind.SERIES_COMPLETE, study_uid=DONE_STUDY_UID, series_uid=DONE_SERIES_UID,
            message="quiet time elapsed",
        ).created_at = received_done + dt.timedelta(seconds=30)
        add_audit_event(
            session, AuditKind.FAILED, study_uid=FAILED_STUDY_UID, series_uid=FAILED_SERIES_UID,
            job_id=failed_job.id, message=f"analysis failed: {ANALYSIS_ERROR}; spool files kept",
        ).created_at = received_failed + dt.timedelta(seconds=41)
        done_job_id, failed_job_id = done_job.id, failed_job.id

    return ReportDatabase(settings, engine, done_job_id, failed_job_id)
