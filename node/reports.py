"""Read-side views of the database for the command line and the web page.

The functions here list series with their latest job, collect everything known about one
study (audit trail, job attempts, errors, output files), queue failed jobs again and check
the node's health. They return plain dictionaries, so the command line can print them as JSON
and the web page can render them in templates.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, or_, select

from node.audit import add_audit_event
from node.db import DatabaseError, check_database, session_scope
from node.models import AuditEvent, AuditKind, Job, JobState, Series, SeriesState, Study, utc_now

logger = logging.getLogger(__name__)

#: States a row of the series list may show: the series states plus ``delivery_failed``.
DISPLAY_STATES = (
    SeriesState.RECEIVING,
    SeriesState.COMPLETE,
    SeriesState.QUEUED,
    SeriesState.PROCESSING,
    SeriesState.DONE,
    SeriesState.FAILED,
    SeriesState.SKIPPED,
    JobState.DELIVERY_FAILED,
)

#: Audit event kinds that report an error; the newest one is the health page's last error.
ERROR_EVENT_KINDS = (
    AuditKind.ASSOCIATION_REJECTED,
    AuditKind.REJECTED,
    AuditKind.CONFLICT,
    AuditKind.ASSOCIATION_ABORTED,
    AuditKind.SEND_FAILED,
    AuditKind.FAILED,
)

#: Seconds the health check waits for the SCP's TCP port to accept a connection.
SCP_CONNECT_TIMEOUT_S = 2.0

#: Characters kept of a UID shortened in the middle, at least.
MIN_SHORTENED_UID_LENGTH = 11

#: Mark that replaces the middle of a shortened UID.
ELLIPSIS = "\u2026"


class StudyNotFoundError(LookupError):
    """Raised when no received series belongs to the requested Study Instance UID."""


@dataclass(frozen=True)
class SeriesFilter:
    """Filters of the series list; None means no filter.

    Attributes
    ----------
    since, until : datetime.date or None
        First and last day (UTC, both included) on which the series was first received.
    state : str or None
        One of :data:`DISPLAY_STATES`.
    calling_ae_title : str or None
        Calling AE title of the association that sent the series.
    """

    since: dt.date | None = None
    until: dt.date | None = None
    state: str | None = None
    calling_ae_title: str | None = None


def list_series_rows(
    engine: Engine,
    *,
    state: str | None = None,
    limit: int = 50,
    offset: int = 0,
    since: dt.date | None = None,
    until: dt.date | None = None,
    calling_ae_title: str | None = None,
) -> list[dict[str, Any]]:
    """Return one row per series, most recently received first, with its latest job's result.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.
    state, since, until, calling_ae_title
        Filters as described by :class:`SeriesFilter`.
    limit, offset : int
        Page of rows to return.

    Returns
    -------
    list of dict
        Keys ``received_at``, ``study_date``, ``accession_number``, ``study_instance_uid``,
        ``series_instance_uid``, ``series_description``, ``calling_ae_title``, ``instances``,
        ``state`` (the series state, or ``delivery_failed`` when the latest job could not
        deliver its results), ``liver_volume_ml``, ``tumor_volume_ml``,
        ``tumor_burden_percent``, ``seconds`` (the analysis' ``total_seconds``, else the sum
        of its stage seconds), ``job_id`` and ``error``.
    """
    filters = SeriesFilter(since=since, until=until, state=state, calling_ae_title=calling_ae_title)
    rows, _ = query_series(engine, filters, limit=limit, offset=offset)
    return rows


def query_series(
    engine: Engine, filters: SeriesFilter, *, limit: int = 50, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Return one page of series rows and the number of rows that match ``filters``.

    The rows are those of :func:`list_series_rows`.
    """
    latest_job_ids = (
        select(Job.series_id, func.max(Job.id).label("job_id")).group_by(Job.series_id).subquery()
    )
    statement = (
        select(Series, Study, Job)
        .join(Study, Series.study_id == Study.id)
        .outerjoin(latest_job_ids, latest_job_ids.c.series_id == Series.id)
        .outerjoin(Job, Job.id == latest_job_ids.c.job_id)
        .order_by(Series.first_received_at.desc(), Series.id.desc())
    )
    if filters.since is not None:
        statement = statement.where(Series.first_received_at >= _day_start(filters.since))
    if filters.until is not None:
        statement = statement.where(
            Series.first_received_at < _day_start(filters.until + dt.timedelta(days=1))
        )
    if filters.calling_ae_title:
        statement = statement.where(Series.calling_ae_title == filters.calling_ae_title)

    with session_scope(engine) as session:
        rows = [_series_row(series, study, job) for series, study, job in session.execute(statement)]

    # The displayed state depends on the latest job, so this filter runs after the query.
    if filters.state is not None:
        rows = [row for row in rows if row["state"] == filters.state]
    return rows[offset : offset + limit], len(rows)


def study_detail(engine: Engine, study_uid: str) -> dict[str, Any]:
    """Collect what the node recorded about one study.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.
    study_uid : str
        Study Instance UID.

    Returns
    -------
    dict
        ``study`` (UIDs, date, accession number, Patient ID), ``series`` (each with its
        ``jobs``: attempts, state, error, stage seconds, volumes, output files and whether
        each file exists) and ``events`` (every audit event of the study or its series,
        oldest first).

    Raises
    ------
    StudyNotFoundError
        When the node has received no series of that study.
    """
    with session_scope(engine) as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            raise StudyNotFoundError(
                f"Study Instance UID {study_uid!r} not found: the node has received no series "
                "of that study (list them with livernode studies)"
            )

        series_list = list(
            session.scalars(
                select(Series).where(Series.study_id == study.id).order_by(Series.first_received_at)
            )
        )
        series_rows = []
        for series in series_list:
            jobs = list(session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.id)))
            series_rows.append(
                {
                    "series_instance_uid": series.series_instance_uid,
                    "series_description": series.series_description,
                    "modality": series.modality,
                    "instances": series.instance_count,
                    "state": series.state,
                    "calling_ae_title": series.calling_ae_title,
                    "received_at": _isoformat(series.first_received_at),
                    "completed_at": _isoformat(series.completed_at),
                    "jobs": [_job_detail(job) for job in jobs],
                }
            )

        series_uids = [series.series_instance_uid for series in series_list]
        events = session.scalars(
            select(AuditEvent)
            .where(
                or_(
                    AuditEvent.study_instance_uid == study_uid,
                    AuditEvent.series_instance_uid.in_(series_uids),
                )
            )
            .order_by(AuditEvent.created_at, AuditEvent.id)
        )
        event_rows = [_event_row(event) for event in events]

        return {
            "study": {
                "study_instance_uid": study.study_instance_uid,
                "study_date": _format_study_date(study.study_date),
                "accession_number": study.accession_number,
                "patient_id": study.patient_id,
                "first_received_at": _isoformat(study.first_received_at),
                "last_received_at": _isoformat(study.last_received_at),
            },
            "series": series_rows,
            "events": event_rows,
        }


def retryable_job_ids(engine: Engine, study_uid: str) -> list[int]:
    """Return the ids of the study's jobs that :func:`retry_study` would queue again."""
    with session_scope(engine) as session:
        return [job.id for job in _retryable_jobs(session, study_uid)]


def retry_study(engine: Engine, study_uid: str, *, requested_by: str) -> list[int]:
    """Queue the failed jobs of a study again and record one audit event per job.

    A job is retried when it is the latest job of its series and its analysis failed, or its
    delivery failed with no automatic retries left. A retried delivery gets a fresh set of
    ``destination.send_retries`` attempts; a failed analysis runs again from the spool.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.
    study_uid : str
        Study Instance UID.
    requested_by : str
        Who asked, for the audit log (``"command line"`` or ``"web user admin"``).

    Returns
    -------
    list of int
        Ids of the queued jobs; empty when no job of the study had failed.

    Raises
    ------
    StudyNotFoundError
        When the node has received no series of that study.
    """
    queued: list[int] = []
    with session_scope(engine) as session:
        for job in _retryable_jobs(session, study_uid):
            previous_state, previous_error = job.state, job.error
            series = job.series

            job.state = JobState.QUEUED
            job.claimed_by = None
            job.next_delivery_at = None
            if previous_state == JobState.DELIVERY_FAILED:
                job.delivery_attempts = 0
            series.state = SeriesState.QUEUED

            add_audit_event(
                session,
                AuditKind.JOB_REQUEUED,
                study_uid=study_uid,
                series_uid=series.series_instance_uid,
                job_id=job.id,
                message=f"queued again on request of {requested_by} after state "
                f"{previous_state}: {previous_error or 'no error recorded'}",
            )
            queued.append(job.id)

    for job_id in queued:
        logger.info("Job %d of study %s queued again on request of %s", job_id, study_uid, requested_by)
    if not queued:
        logger.info("Study %s has no failed job to queue again", study_uid)
    return queued


def node_health(engine: Engine, scp_host: str, scp_port: int) -> dict[str, Any]:
    """Check the SCP port, the database, the queue length and the last recorded error.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.
    scp_host, scp_port
        Address of the node's C-STORE SCP (``0.0.0.0`` is checked on 127.0.0.1).

    Returns
    -------
    dict
        ``scp`` (``listening``, ``address``, ``detail``), ``database`` (``reachable``,
        ``detail``), ``queue`` (``queued``, ``running``, ``delivery_retries_due``) and
        ``last_error`` (the newest error audit event, or None). ``ok`` is true when the SCP
        listens and the database is reachable.
    """
    connect_host = "127.0.0.1" if scp_host in ("0.0.0.0", "") else scp_host
    try:
        with socket.create_connection((connect_host, scp_port), timeout=SCP_CONNECT_TIMEOUT_S):
            scp = {"listening": True, "detail": "accepts TCP connections"}
    except OSError as error:
        scp = {"listening": False, "detail": f"no connection: {error}"}
    scp["address"] = f"{scp_host}:{scp_port}"

    health: dict[str, Any] = {
        "scp": scp,
        "queue": None,
        "last_error": None,
        "checked_at": _isoformat(utc_now()),
    }
    try:
        health["database"] = {"reachable": True, "detail": check_database(engine)}
    except DatabaseError as error:
        logger.error("Health check: %s", error)
        health["database"] = {"reachable": False, "detail": str(error)}
        health["ok"] = False
        return health

    with session_scope(engine) as session:
        counts = dict(
            session.execute(select(Job.state, func.count()).group_by(Job.state)).all()  # type: ignore[arg-type]
        )
        due = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.state == JobState.DELIVERY_FAILED, Job.next_delivery_at.is_not(None))
        )
        last_error = session.scalar(
            select(AuditEvent)
            .where(AuditEvent.kind.in_(ERROR_EVENT_KINDS))
            .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
            .limit(1)
        )
        health["queue"] = {
            "queued": int(counts.get(JobState.QUEUED, 0)),
            "running": int(counts.get(JobState.RUNNING, 0)),
            "delivery_retries_due": int(due or 0),
        }
        health["last_error"] = _event_row(last_error) if last_error is not None else None

    health["ok"] = bool(scp["listening"])
    return health


# Tables ----------------------------------------------------------------------------------

#: Columns of the series table: title, row key, and whether the column contains a UID.
SERIES_TABLE_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("received (UTC)", "received_at", False),
    ("study date", "study_date", False),
    ("accession", "accession_number", False),
    ("study UID", "study_instance_uid", True),
    ("series UID", "series_instance_uid", True),
    ("state", "state", False),
    ("liver mL", "liver_volume_ml", False),
    ("tumour mL", "tumor_volume_ml", False),
    ("burden %", "tumor_burden_percent", False),
    ("total s", "seconds", False),
)


def format_series_table(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """Format rows from :func:`list_series_rows` as an aligned text table.

    Parameters
    ----------
    rows : list of dict
        Rows to show.
    width : int, optional
        Terminal width in characters. When the table is wider, UIDs are shortened in the
        middle; None (default) never shortens.
    """
    if not rows:
        return "No series found."
    return format_table(rows, SERIES_TABLE_COLUMNS, width=width)


def format_table(
    rows: list[dict[str, Any]],
    columns: tuple[tuple[str, str, bool], ...],
    width: int | None = None,
) -> str:
    """Format ``rows`` as columns separated by two spaces, numbers aligned to the right.

    Parameters
    ----------
    rows : list of dict
        Values by key; None shows as ``-``, floats with two decimals.
    columns : tuple of (title, key, is_uid)
        Columns in order. UID columns are shortened in the middle when the table is wider
        than ``width``, down to :data:`MIN_SHORTENED_UID_LENGTH` characters.
    width : int, optional
        Terminal width in characters; None never shortens.
    """
    cells = [[_cell(row.get(key)) for _, key, _ in columns] for row in rows]
    titles = [title for title, _, _ in columns]
    widths = [
        max([len(title)] + [len(line[index]) for line in cells]) for index, title in enumerate(titles)
    ]

    if width is not None:
        _shrink_uid_columns(widths, columns, width)

    numeric = [
        all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
        and any(isinstance(row.get(key), (int, float)) for row in rows)
        for _, key, _ in columns
    ]
    lines = []
    for line in [titles, *cells]:
        parts = []
        for index, text in enumerate(line):
            text = shorten_middle(text, widths[index])
            parts.append(text.rjust(widths[index]) if numeric[index] else text.ljust(widths[index]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def shorten_middle(text: str, width: int) -> str:
    """Return ``text`` unchanged if it fits in ``width``, else its start and end around ``…``."""
    if len(text) <= width:
        return text
    if width < 3:
        return text[:width]
    kept = width - len(ELLIPSIS)
    head = (kept + 1) // 2
    tail = kept - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def _shrink_uid_columns(widths: list[int], columns: tuple[tuple[str, str, bool], ...], width: int) -> None:
    separators = 2 * (len(widths) - 1)
    excess = sum(widths) + separators - width
    uid_indexes = [index for index, (_, _, is_uid) in enumerate(columns) if is_uid]

    # Take one character at a time from the widest UID column until the table fits.
    while excess > 0 and uid_indexes:
        widest = max(uid_indexes, key=lambda index: widths[index])
        if widths[widest] <= MIN_SHORTENED_UID_LENGTH:
            break
        widths[widest] -= 1
        excess -= 1


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


# Rows ------------------------------------------------------------------------------------


def _series_row(series: Series, study: Study, job: Job | None) -> dict[str, Any]:
    display_state = series.state
    if job is not None and job.state == JobState.DELIVERY_FAILED:
        display_state = JobState.DELIVERY_FAILED

    result = (job.result if job is not None else None) or {}
    return {
        "received_at": _isoformat(series.first_received_at),
        "study_date": _format_study_date(study.study_date),
        "accession_number": study.accession_number or None,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "series_description": series.series_description,
        "calling_ae_title": series.calling_ae_title,
        "instances": series.instance_count,
        "state": display_state,
        "liver_volume_ml": result.get("liver_volume_ml"),
        "tumor_volume_ml": result.get("tumor_volume_ml"),
        "tumor_burden_percent": result.get("tumor_burden_percent"),
        "seconds": _total_seconds(job),
        "job_id": job.id if job is not None else None,
        "error": job.error if job is not None else None,
    }


def _job_detail(job: Job) -> dict[str, Any]:
    result = job.result or {}
    return {
        "job_id": job.id,
        "state": job.state,
        "attempts": job.attempts,
        "delivery_attempts": job.delivery_attempts,
        "claimed_by": job.claimed_by,
        "created_at": _isoformat(job.created_at),
        "started_at": _isoformat(job.started_at),
        "finished_at": _isoformat(job.finished_at),
        "delivered_at": _isoformat(job.delivered_at),
        "next_delivery_at": _isoformat(job.next_delivery_at),
        "error": job.error,
        "stage_seconds": job.stage_seconds or {},
        "total_seconds": _total_seconds(job),
        "liver_volume_ml": result.get("liver_volume_ml"),
        "tumor_volume_ml": result.get("tumor_volume_ml"),
        "tumor_burden_percent": result.get("tumor_burden_percent"),
        "tumor_count": result.get("tumor_count"),
        "warnings": list(result.get("warnings") or []),
        "output_dir": job.output_dir,
        "outputs": _output_files(job),
        "overlays": dict((job.output_paths or {}).get("overlays") or {}),
    }


def _output_files(job: Job) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = []
    if job.output_dir:
        result_path = Path(job.output_dir) / "result.json"
        files.append({"name": "result", "path": str(result_path), "exists": result_path.is_file()})

    for name, value in (job.output_paths or {}).items():
        if isinstance(value, dict):
            entries = [(f"{name}/{key}", path) for key, path in value.items()]
        else:
            entries = [(name, value)]
        for entry_name, path in entries:
            if path:
                files.append({"name": entry_name, "path": str(path), "exists": Path(path).is_file()})
    return files


def _event_row(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "created_at": _isoformat(event.created_at),
        "kind": event.kind,
        "study_instance_uid": event.study_instance_uid,
        "series_instance_uid": event.series_instance_uid,
        "sop_instance_uid": event.sop_instance_uid,
        "job_id": event.job_id,
        "calling_ae_title": event.calling_ae_title,
        "message": event.message,
    }


def _retryable_jobs(session: Any, study_uid: str) -> list[Job]:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise StudyNotFoundError(
            f"Study Instance UID {study_uid!r} not found: the node has received no series of "
            "that study (list them with livernode studies)"
        )

    retryable = []
    for series in session.scalars(select(Series).where(Series.study_id == study.id)):
        job = session.scalar(
            select(Job).where(Job.series_id == series.id).order_by(Job.id.desc()).limit(1)
        )
        if job is None:
            continue
        delivery_given_up = job.state == JobState.DELIVERY_FAILED and job.next_delivery_at is None
        if job.state == JobState.FAILED or delivery_given_up:
            retryable.append(job)
    return retryable


def _total_seconds(job: Job | None) -> float | None:
    if job is None:
        return None
    total = (job.result or {}).get("total_seconds")
    if isinstance(total, (int, float)):
        return round(float(total), 1)
    if job.stage_seconds:
        return round(sum(job.stage_seconds.values()), 1)
    return None


def _format_study_date(value: str | None) -> str | None:
    # Study Date is a DICOM DA value, YYYYMMDD; other text is shown unchanged.
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or None


def _isoformat(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min)
