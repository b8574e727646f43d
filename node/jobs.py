"""Job queue interface and its implementation on the ``jobs`` table.

The queue state lives in the database, so queued jobs survive a restart. A worker claims
a job with a conditional update of one row from ``state = 'queued'`` to ``'running'``. The
database lets exactly one of two concurrent updates of the same row match. SQLite allows one
writer at a time, and on PostgreSQL the second update waits for the row lock, then re-reads
the row in its new state and matches nothing.
"""

from __future__ import annotations

import abc
import logging
import threading

from sqlalchemy import Engine, select, update

from node.audit import add_audit_event
from node.db import session_scope
from node.models import AuditKind, Job, JobState, SeriesState, utc_now

logger = logging.getLogger(__name__)

#: Candidate rows read per claim attempt; the next candidate is tried when another worker
#: took the first one.
CLAIM_CANDIDATES = 8


class JobQueue(abc.ABC):
    """Queue of job ids between the scheduler and the workers."""

    @abc.abstractmethod
    def enqueue(self, job_id: int) -> None:
        """Make job ``job_id`` available to workers."""

    @abc.abstractmethod
    def claim_next(self, worker_name: str) -> int | None:
        """Take the oldest queued job for ``worker_name``; return its id, or None when empty."""

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` seconds until a job may be available; return whether
        :meth:`enqueue` was called in the meantime."""

    @abc.abstractmethod
    def requeue_running(self) -> list[int]:
        """Put jobs left running by a stopped node back in the queue; return their ids."""


class DatabaseJobQueue(JobQueue):
    """:class:`JobQueue` stored in the ``jobs`` table.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wakeup = threading.Event()

    def enqueue(self, job_id: int) -> None:
        """Set job ``job_id`` to queued and wake a waiting worker in this process.

        A series in state complete moves to queued with its job.

        Raises
        ------
        ValueError
            When no job has that id.
        """
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            if job is None:
                raise ValueError(f"No job with id {job_id}")
            job.state = JobState.QUEUED
            job.claimed_by = None
            if job.series.state == SeriesState.COMPLETE:
                job.series.state = SeriesState.QUEUED
        self._wakeup.set()
        logger.info("Job %d queued", job_id)

    def claim_next(self, worker_name: str) -> int | None:
        """Set the oldest queued job to running for ``worker_name`` and return its id.

        Returns
        -------
        int or None
            The claimed job id, or None when no job is queued.
        """
        while True:
            with session_scope(self.engine) as session:
                candidates = list(
                    session.scalars(
                        select(Job.id)
                        .where(Job.state == JobState.QUEUED)
                        .order_by(Job.id)
                        .limit(CLAIM_CANDIDATES)
                    )
                )
            if not candidates:
                return None

            for job_id in candidates:
                if self._claim(job_id, worker_name):
                    logger.info("Job %d claimed by %s", job_id, worker_name)
                    return job_id
            # Every candidate was taken by another worker; read the queue again.

    def wait(self, timeout_s: float) -> bool:
        woken = self._wakeup.wait(timeout_s)
        self._wakeup.clear()
        return woken

    def requeue_running(self) -> list[int]:
        """Set every running job back to queued and audit it.

        Call once at startup, before any worker of this node runs. A running job at that
        point belongs to a node process that stopped without finishing it.
        """
        requeued: list[int] = []
        with session_scope(self.engine) as session:
            jobs = list(session.scalars(select(Job).where(Job.state == JobState.RUNNING)))
            for job in jobs:
                series = job.series
                job.state = JobState.QUEUED
                job.claimed_by = None
                series.state = SeriesState.QUEUED
                add_audit_event(
                    session,
                    AuditKind.JOB_REQUEUED,
                    study_uid=series.study.study_instance_uid,
                    series_uid=series.series_instance_uid,
                    job_id=job.id,
                    message="job was running when the node stopped; queued again",
                )
                requeued.append(job.id)

        for job_id in requeued:
            logger.warning("Job %d was left running by a stopped node; queued again", job_id)
        if requeued:
            self._wakeup.set()
        return requeued

    def _claim(self, job_id: int, worker_name: str) -> bool:
        with session_scope(self.engine) as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED)
                .values(
                    state=JobState.RUNNING,
                    claimed_by=worker_name,
                    started_at=utc_now(),
                    attempts=Job.attempts + 1,
                    updated_at=utc_now(),
                )
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1
