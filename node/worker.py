"""Worker thread: analyses complete series and delivers the SEG and SR.

For each claimed job the worker runs the analysis on the series' spool folder, writes
``result.json`` into ``<output_dir>/<StudyInstanceUID>/<SeriesInstanceUID>/``, records the
result and per-stage seconds on the job and then delivers the SEG and SR to the configured
destination. A failed delivery leaves the job ``delivery_failed`` with
``next_delivery_at`` set. The scheduler queues it again at that time, and the worker then
repeats only the delivery, up to ``destination.send_retries`` times.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine

from node.audit import add_audit_event
from node.config import Settings
from node.db import session_scope
from node.jobs import JobQueue
from node.models import AuditKind, Job, JobState, SeriesState, utc_now
from node.spool import Spool, write_atomically

logger = logging.getLogger(__name__)

RESULT_FILE_NAME = "result.json"

#: Output keys of the analysis result that are delivered, in sending order.
DELIVERED_OUTPUTS = ("seg", "sr")

#: C-STORE statuses that count as stored: Success and the Warning statuses of PS3.4 B.2.3
#: (coercion of data elements, elements discarded, data set does not match SOP class).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

ProgressCallback = Callable[[str], None]


class AnalysisCallable(Protocol):
    """Signature of :func:`node.analysis.segment`."""

    def __call__(
        self,
        input_path: Path,
        out_dir: Path,
        settings: Settings,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]: ...


class SenderCallable(Protocol):
    """Signature of :func:`dicom_io.sender.send_files`."""

    def __call__(
        self,
        paths: list[Path],
        *,
        ae_title: str,
        host: str,
        port: int,
        calling_ae_title: str = "LIVERNODE",
        timeout_s: float = 30,
    ) -> Sequence[Any]: ...


class DeliveryError(RuntimeError):
    """Raised when the SEG and SR could not be delivered."""


def _default_analysis(
    input_path: Path,
    out_dir: Path,
    settings: Settings,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    from node.analysis import segment

    return segment(input_path, out_dir, settings, progress)


def _default_sender(paths: list[Path], **options: Any) -> Sequence[Any]:
    from dicom_io.sender import send_files

    return send_files(paths, **options)


class Worker:
    """Background thread that takes jobs from a :class:`~node.jobs.JobQueue` and runs them.

    Parameters
    ----------
    settings : Settings
        Uses ``spool_dir``, ``output_dir``, ``destination``, ``analysis`` and ``worker``.
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.
    queue : JobQueue
        Where jobs are claimed.
    analyse : callable, optional
        Analysis with the signature of :func:`node.analysis.segment`; default that function.
    sender : callable, optional
        Sender with the signature of :func:`dicom_io.sender.send_files`; default that function.
    name : str, optional
        Worker name stored on claimed jobs; default ``"worker-1"``.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        queue: JobQueue,
        *,
        analyse: AnalysisCallable | None = None,
        sender: SenderCallable | None = None,
        name: str = "worker-1",
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.queue = queue
        self.analyse: AnalysisCallable = analyse or _default_analysis
        self.sender: SenderCallable = sender or _default_sender  # type: ignore[assignment]
        self.name = name
        self.spool = Spool(settings.spool_dir)  # type: ignore[arg-type]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        logger.info("Worker %s started", self.name)

    def stop(self, timeout_s: float | None = None) -> bool:
        """Ask the thread to stop after its current job and wait up to ``timeout_s`` seconds.

        A job still running when the process exits stays ``running`` in the database and
        is queued again by :meth:`~node.jobs.JobQueue.requeue_running` at the next start.

        Returns
        -------
        bool
            True when the thread has ended, False when it is still running a job.
        """
        self._stop.set()
        if self._thread is None:
            return True

        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning(
                "Worker %s is still running a job after %s s; the job is queued again at "
                "the next start",
                self.name,
                timeout_s,
            )
            return False

        self._thread = None
        logger.info("Worker %s stopped", self.name)
        return True

    def run_once(self) -> int | None:
        """Claim one queued job and process it; return its id, or None when none is queued."""
        job_id = self.queue.claim_next(self.name)
        if job_id is None:
            return None
        self.process_job(job_id)
        return job_id

    def process_job(self, job_id: int) -> str:
        """Analyse (unless already done) and deliver one claimed job.

        Parameters
        ----------
        job_id : int
            A job in state running.

        Returns
        -------
        str
            The job's final state: succeeded, failed or delivery_failed.
        """
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            if job is None:
                raise ValueError(f"No job with id {job_id}")
            analysed = job.result is not None

        if not analysed and not self._analyse(job_id):
            return JobState.FAILED
        return self._deliver(job_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self.run_once()
            except Exception:  # noqa: BLE001 - keep the worker alive, the error is logged
                logger.exception("Worker %s: unexpected error while running a job", self.name)
                job_id = None
            if job_id is None:
                self.queue.wait(self.settings.worker.poll_interval_s)

    # Analysis ---------------------------------------------------------------------------

    def _analyse(self, job_id: int) -> bool:
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            series = job.series  # type: ignore[union-attr]
            study_uid = series.study.study_instance_uid
            series_uid = series.series_instance_uid
            series.state = SeriesState.PROCESSING
            add_audit_event(
                session,
                AuditKind.JOB_STARTED,
                study_uid=study_uid,
                series_uid=series_uid,
                job_id=job_id,
                message=f"analysis started by {self.name} ({series.instance_count} instances)",
            )

        input_dir = self.spool.series_dir(study_uid, series_uid)
        out_dir = Path(self.settings.output_dir) / study_uid / series_uid  # type: ignore[arg-type]
        out_dir.mkdir(parents=True, exist_ok=True)
        logger.info("Job %d: analysing series %s from %s", job_id, series_uid, input_dir)

        def progress(stage: str) -> None:
            logger.info("Job %d (series %s): %s", job_id, series_uid, stage)

        try:
            result = self.analyse(input_dir, out_dir, self.settings, progress)
            result = json.loads(json.dumps(result, default=str))
            write_atomically(
                out_dir / RESULT_FILE_NAME, (json.dumps(result, indent=2) + "\n").encode()
            )
        except Exception as error:  # noqa: BLE001 - any analysis error fails only this job
            reason = f"{error.__class__.__name__}: {error}"
            logger.error("Job %d: analysis of series %s failed: %s", job_id, series_uid, reason)
            self._finish_failed(job_id, reason)
            return False

        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            job.result = result  # type: ignore[union-attr]
            job.stage_seconds = result.get("stage_seconds")  # type: ignore[union-attr]
            job.output_paths = result.get("outputs")  # type: ignore[union-attr]
            job.output_dir = str(out_dir)  # type: ignore[union-attr]
            job.finished_at = utc_now()  # type: ignore[union-attr]
            series = job.series  # type: ignore[union-attr]
            if series.state == SeriesState.PROCESSING:
                series.state = SeriesState.DONE
            add_audit_event(
                session,
                AuditKind.JOB_FINISHED,
                study_uid=study_uid,
                series_uid=series_uid,
                job_id=job_id,
                message=_summarise_result(result),
            )
        logger.info("Job %d: %s", job_id, _summarise_result(result))
        return True

    def _finish_failed(self, job_id: int, reason: str) -> None:
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            job.state = JobState.FAILED  # type: ignore[union-attr]
            job.error = reason  # type: ignore[union-attr]
            job.finished_at = utc_now()  # type: ignore[union-attr]
            series = job.series  # type: ignore[union-attr]
            if series.state == SeriesState.PROCESSING:
                series.state = SeriesState.FAILED
            add_audit_event(
                session,
                AuditKind.FAILED,
                study_uid=series.study.study_instance_uid,
                series_uid=series.series_instance_uid,
                job_id=job_id,
                message=f"analysis failed: {reason}; spool files kept",
            )

    # Delivery ---------------------------------------------------------------------------

    def _deliver(self, job_id: int) -> str:
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            study_uid = job.series.study.study_instance_uid  # type: ignore[union-attr]
            series_uid = job.series.series_instance_uid  # type: ignore[union-attr]
            outputs = dict(job.output_paths or {})  # type: ignore[union-attr]
            previous_attempts = job.delivery_attempts  # type: ignore[union-attr]

        paths = [Path(outputs[key]) for key in DELIVERED_OUTPUTS if outputs.get(key)]
        destination = self.settings.destination
        attempt = previous_attempts + 1

        try:
            missing = [str(path) for path in paths if not path.is_file()]
            if missing:
                raise DeliveryError(f"output files not found: {', '.join(missing)}")
            if destination.kind == "folder":
                records = self._copy_to_folder(paths, study_uid, series_uid)
            else:
                records = self._send(paths)
        except Exception as error:  # noqa: BLE001 - every delivery error is retried
            reason = f"{error.__class__.__name__}: {error}"
            return self._finish_delivery_failed(job_id, attempt, reason)

        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            job.state = JobState.SUCCEEDED  # type: ignore[union-attr]
            job.delivery = records  # type: ignore[union-attr]
            job.delivery_attempts = attempt  # type: ignore[union-attr]
            job.next_delivery_at = None  # type: ignore[union-attr]
            job.delivered_at = utc_now()  # type: ignore[union-attr]
            job.error = None  # type: ignore[union-attr]
            for record in records:
                add_audit_event(
                    session,
                    AuditKind.SENT,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=record.get("sop_instance_uid"),
                    job_id=job_id,
                    message=f"{record['path']} delivered to {record['destination']}"
                    f" (status {record['status']})",
                )
            if not records:
                add_audit_event(
                    session,
                    AuditKind.SENT,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    job_id=job_id,
                    message="the analysis wrote no SEG or SR; nothing to deliver",
                )
        logger.info(
            "Job %d: delivered %d files of series %s to %s",
            job_id,
            len(records),
            series_uid,
            _describe_destination(self.settings),
        )
        return JobState.SUCCEEDED

    def _copy_to_folder(
        self, paths: list[Path], study_uid: str, series_uid: str
    ) -> list[dict[str, Any]]:
        target_dir = Path(self.settings.destination.path) / study_uid  # type: ignore[arg-type]
        target_dir.mkdir(parents=True, exist_ok=True)

        records: list[dict[str, Any]] = []
        for path in paths:
            # Several series of one study share the folder, so names carry the series UID.
            target = target_dir / f"{series_uid}_{path.name}"
            write_atomically(target, path.read_bytes())
            records.append(
                {
                    "path": str(path),
                    "destination": str(target),
                    "sop_instance_uid": _read_sop_instance_uid(path),
                    "status": "copied",
                }
            )
        return records

    def _send(self, paths: list[Path]) -> list[dict[str, Any]]:
        destination = self.settings.destination
        results = self.sender(
            paths,
            ae_title=destination.ae_title,
            host=destination.host,
            port=destination.port,
            calling_ae_title=destination.calling_ae_title,
            timeout_s=destination.send_timeout_s,
        )

        if len(results) != len(paths):
            raise DeliveryError(f"the sender returned {len(results)} results for {len(paths)} files")

        records = []
        for path, result in zip(paths, results, strict=True):
            status = getattr(result, "status", None)
            records.append(
                {
                    "path": str(path),
                    "destination": _describe_destination(self.settings),
                    "sop_instance_uid": str(result.sop_instance_uid),
                    "status": "no response" if status is None else f"0x{int(status):04X}",
                    "stored": status is not None and int(status) in STORED_STATUSES,
                    "message": str(getattr(result, "message", "") or ""),
                }
            )

        failed = [record for record in records if not record["stored"]]
        if failed:
            details = ", ".join(
                f"{record['sop_instance_uid']} status {record['status']} {record['message']}".rstrip()
                for record in failed
            )
            raise DeliveryError(f"the destination did not store: {details}")
        return records

    def _finish_delivery_failed(self, job_id: int, attempt: int, reason: str) -> str:
        destination = self.settings.destination
        allowed_attempts = destination.send_retries + 1

        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            series = job.series  # type: ignore[union-attr]
            job.state = JobState.DELIVERY_FAILED  # type: ignore[union-attr]
            job.delivery_attempts = attempt  # type: ignore[union-attr]
            job.error = reason  # type: ignore[union-attr]

            if attempt < allowed_attempts:
                delay_s = destination.retry_delay_s(attempt)
                job.next_delivery_at = utc_now() + dt.timedelta(seconds=delay_s)  # type: ignore[union-attr]
                message = (
                    f"delivery attempt {attempt} of {allowed_attempts} to "
                    f"{_describe_destination(self.settings)} failed: {reason}; "
                    f"retry in {delay_s:g} s"
                )
            else:
                job.next_delivery_at = None  # type: ignore[union-attr]
                message = (
                    f"delivery to {_describe_destination(self.settings)} failed after "
                    f"{attempt} attempts, no retries left: {reason}"
                )
            add_audit_event(
                session,
                AuditKind.SEND_FAILED,
                study_uid=series.study.study_instance_uid,
                series_uid=series.series_instance_uid,
                job_id=job_id,
                message=message,
            )
        logger.warning("Job %d: %s", job_id, message)
        return JobState.DELIVERY_FAILED


def _describe_destination(settings: Settings) -> str:
    destination = settings.destination
    if destination.kind == "folder":
        return f"folder {destination.path}"
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _read_sop_instance_uid(path: Path) -> str | None:
    try:
        return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except (InvalidDicomError, AttributeError, OSError):
        return None


def _summarise_result(result: dict[str, Any]) -> str:
    def number(key: str, unit: str) -> str:
        value = result.get(key)
        return f"{value:.1f} {unit}" if isinstance(value, (int, float)) else "n/a"

    seconds = sum((result.get("stage_seconds") or {}).values())
    return (
        f"analysis finished in {seconds:.1f} s: liver {number('liver_volume_ml', 'mL')}, "
        f"tumour {number('tumor_volume_ml', 'mL')}, "
        f"burden {number('tumor_burden_percent', '%')}, "
        f"{result.get('tumor_count', 'n/a')} tumours"
    )
