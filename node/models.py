"""ORM tables of the node: studies, series, instances, jobs and the audit log.

Patient names are never stored; a study keeps only the Patient ID.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: DICOM UIDs are at most 64 characters (PS3.5, value representation UI).
UID_LENGTH = 64

#: AE titles are at most 16 characters (PS3.5, value representation AE).
AE_TITLE_LENGTH = 16


class SeriesState:
    """Values of :attr:`Series.state`."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    #: Not analysed by the series selection rules (``[selection]``); the reason is audited.
    SKIPPED = "skipped"


class JobState:
    """Values of :attr:`Job.state`.

    ``delivery_failed`` with :attr:`Job.next_delivery_at` set means a delivery retry is
    due at that time; with it unset the retries are used up.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DELIVERY_FAILED = "delivery_failed"


class AuditKind:
    """Values of :attr:`AuditEvent.kind`."""

    ASSOCIATION_REJECTED = "association_rejected"
    ASSOCIATION_ABORTED = "association_aborted"
    RECEIVED = "received"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    LATE_INSTANCE = "late_instance"
    SERIES_COMPLETE = "series_complete"
    SERIES_SKIPPED = "series_skipped"
    JOB_REQUEUED = "job_requeued"
    JOB_STARTED = "job_started"
    JOB_FINISHED = "job_finished"
    NOT_ANALYSABLE = "not_analysable"
    RESULT_REPLACED = "result_replaced"
    SENT = "sent"
    SEND_FAILED = "send_failed"
    DELIVERY_RETRY = "delivery_retry"
    DELIVERY_CONFIRMED = "delivery_confirmed"
    RESEND_REQUESTED = "resend_requested"
    FAILED = "failed"


def utc_now() -> dt.datetime:
    """Return the current time in UTC, without time zone, as every timestamp column stores it."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of all node tables."""


class Study(Base):
    """One DICOM study, identified by its Study Instance UID."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """One received series and where it is in the receive, analyse, deliver flow."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(String(AE_TITLE_LENGTH))
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now, onupdate=utc_now)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class Instance(Base):
    """One received SOP instance and its spooled file."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    spool_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str | None] = mapped_column(String(AE_TITLE_LENGTH))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One analysis and delivery of a complete series."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_delivery_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    stage_seconds: Mapped[dict[str, float] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_dir: Mapped[str | None] = mapped_column(Text)
    output_paths: Mapped[dict[str, str | None] | None] = mapped_column(JSON)
    delivery: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now, onupdate=utc_now)

    series: Mapped[Series] = relationship(back_populates="jobs")


class AuditEvent(Base):
    """One entry of the audit log; rows are only ever inserted."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime, default=utc_now, server_default=func.current_timestamp(), index=True
    )
    kind: Mapped[str] = mapped_column(String(32), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(String(AE_TITLE_LENGTH))
    message: Mapped[str | None] = mapped_column(Text)
