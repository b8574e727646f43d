"""Periodic sweeps: complete series after the quiet time, and queue due delivery retries.

Both sweeps run every ``series.sweep_interval_s`` seconds in an APScheduler
``BackgroundScheduler``. They are plain functions as well, so tests and tools can run one
sweep at a chosen time.
"""

from __future__ import annotations

import datetime as dt
import logging

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dicom_io.selection import SelectionRules, select_series
from node.audit import add_audit_event
from node.config import Settings
from node.db import session_scope
from node.jobs import JobQueue
from node.models import AuditKind, Job, JobState, Series, SeriesState, utc_now
from node.spool import Spool

logger = logging.getLogger(__name__)

SWEEP_JOB_ID = "livernode-sweep"


def sweep_complete_series(
    engine: Engine,
    queue: JobQueue,
    quiet_time_s: float,
    now: dt.datetime | None = None,
    *,
    spool: Spool | None = None,
    selection: SelectionRules | None = None,
) -> list[int]:
    """Mark receiving series without a new instance for ``quiet_time_s`` as complete.

    Each such series gets state ``complete``, a ``series_complete`` audit event and one new
    job. The job is then handed to ``queue``, which moves the series on to ``queued``.
    With ``spool`` and ``selection`` given, a series that the selection rules reject (see
    :func:`dicom_io.selection.select_series`) gets state ``skipped`` and a
    ``series_skipped`` audit event with the reason instead of a job.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Node database.
    queue : JobQueue
        Receives the new job ids.
    quiet_time_s : float
        Seconds since the last received instance after which a series is complete.
    now : datetime, optional
        Current UTC time without time zone; default :func:`node.models.utc_now`.
    spool : Spool, optional
        Where the series folders are read for the selection rules.
    selection : SelectionRules, optional
        The rules; without them (or without ``spool``) every complete series gets a job.

    Returns
    -------
    list of int
        Ids of the jobs created.
    """
    now = now or utc_now()
    cutoff = now - dt.timedelta(seconds=quiet_time_s)
    job_ids: list[int] = []

    with session_scope(engine) as session:
        complete = list(
            session.scalars(
                select(Series)
                .where(Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff)
                .order_by(Series.last_received_at)
            )
        )
        for series in complete:
            series.completed_at = now
            if spool is not None and selection is not None and _skip_by_selection(
                session, series, spool, selection
            ):
                continue
            series.state = SeriesState.COMPLETE
            job = Job(series=series, state=JobState.QUEUED)
            session.add(job)
            session.flush()
            add_audit_event(
                session,
                AuditKind.SERIES_COMPLETE,
                study_uid=series.study.study_instance_uid,
                series_uid=series.series_instance_uid,
                job_id=job.id,
                calling_ae_title=series.calling_ae_title,
                message=f"{series.instance_count} instances, no new instance for "
                f"{quiet_time_s:g} s; job {job.id} queued",
            )
            logger.info(
                "Series %s complete with %d instances; job %d queued",
                series.series_instance_uid,
                series.instance_count,
                job.id,
            )
            job_ids.append(job.id)

    for job_id in job_ids:
        queue.enqueue(job_id)
    return job_ids


def _skip_by_selection(
    session: Session, series: Series, spool: Spool, selection: SelectionRules
) -> bool:
    """Apply the selection rules to one complete series; mark and audit it when skipped."""
    study_uid = series.study.study_instance_uid
    folder = spool.series_dir(study_uid, series.series_instance_uid)
    decision = select_series(folder, selection)
    if decision.analyse:
        for image in decision.dropped:
            logger.info("Series %s: %s left out by the selection rules", series.series_instance_uid, image)
        return False

    series.state = SeriesState.SKIPPED
    add_audit_event(
        session,
        AuditKind.SERIES_SKIPPED,
        study_uid=study_uid,
        series_uid=series.series_instance_uid,
        calling_ae_title=series.calling_ae_title,
        message=f"not analysed: {decision.reason}",
    )
    logger.info("Series %s skipped: %s", series.series_instance_uid, decision.reason)
    return True


def sweep_delivery_retries(
    engine: Engine, queue: JobQueue, now: dt.datetime | None = None
) -> list[int]:
    """Queue again every ``delivery_failed`` job whose ``next_delivery_at`` has passed.

    Returns
    -------
    list of int
        Ids of the jobs queued again.
    """
    now = now or utc_now()
    job_ids: list[int] = []

    with session_scope(engine) as session:
        due = list(
            session.scalars(
                select(Job).where(
                    Job.state == JobState.DELIVERY_FAILED,
                    Job.next_delivery_at.is_not(None),
                    Job.next_delivery_at <= now,
                )
            )
        )
        for job in due:
            job.next_delivery_at = None
            add_audit_event(
                session,
                AuditKind.DELIVERY_RETRY,
                study_uid=job.series.study.study_instance_uid,
                series_uid=job.series.series_instance_uid,
                job_id=job.id,
                message=f"delivery retry {job.delivery_attempts} queued after: {job.error}",
            )
            logger.info("Job %d: delivery retry %d queued", job.id, job.delivery_attempts)
            job_ids.append(job.id)

    for job_id in job_ids:
        queue.enqueue(job_id)
    return job_ids


class SeriesScheduler:
    """Runs both sweeps every ``settings.series.sweep_interval_s`` seconds.

    Parameters
    ----------
    settings : Settings
        Uses ``settings.series``, ``settings.selection`` and ``settings.spool_dir``.
    engine : sqlalchemy.Engine
        Node database.
    queue : JobQueue
        Receives new and retried jobs.
    """

    def __init__(self, settings: Settings, engine: Engine, queue: JobQueue) -> None:
        self.settings = settings
        self.engine = engine
        self.queue = queue
        self.spool = Spool(settings.spool_dir)  # type: ignore[arg-type]
        rules = settings.selection
        self.selection = SelectionRules(
            min_slices=rules.min_slices,
            image_type_values=tuple(rules.image_type_values),
            orientation_tolerance_deg=rules.orientation_tolerance_deg,
        )
        self._scheduler = BackgroundScheduler(timezone=dt.timezone.utc)

    def sweep(self) -> None:
        """Run both sweeps once; errors are logged so the next sweep still runs."""
        try:
            sweep_complete_series(
                self.engine,
                self.queue,
                self.settings.series.quiet_time_s,
                spool=self.spool,
                selection=self.selection,
            )
            sweep_delivery_retries(self.engine, self.queue)
        except Exception:  # noqa: BLE001 - keep sweeping, the error is logged
            logger.exception("Scheduler sweep failed; trying again at the next interval")

    def start(self) -> None:
        """Start sweeping in a background thread."""
        interval_s = self.settings.series.sweep_interval_s
        self._scheduler.add_job(
            self.sweep,
            "interval",
            seconds=interval_s,
            id=SWEEP_JOB_ID,
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )
        self._scheduler.start()
        logger.info(
            "Scheduler started: sweep every %g s, series quiet time %g s",
            interval_s,
            self.settings.series.quiet_time_s,
        )

    def stop(self) -> None:
        """Stop sweeping and wait for a running sweep to finish."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
            logger.info("Scheduler stopped")


def restart_quiet_times(engine: Engine, now: dt.datetime | None = None) -> int:
    """Restart the quiet time of every series still receiving, at node start.

    The quiet time counts from the last received instance, so without this a series whose
    sender was cut off while the node was down would count as complete at once, and the rest
    of it, sent again after the restart, would start a second analysis.

    Parameters
    ----------
    engine : Engine
        Database engine.
    now : datetime, optional
        Current UTC time; defaults to :func:`node.models.utc_now`.

    Returns
    -------
    int
        Number of series whose quiet time was restarted.
    """
    now = now or utc_now()
    with session_scope(engine) as session:
        receiving = session.scalars(select(Series).where(Series.state == SeriesState.RECEIVING)).all()
        for series in receiving:
            series.last_received_at = now
        count = len(receiving)
    if count:
        logger.info("Restarted the quiet time of %d series still receiving at node start", count)
    return count
