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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

#: Subfolder of a series output folder holding the outputs of earlier, replaced jobs.
REPLACED_DIR_NAME = "replaced"

#: Output keys of the analysis result that are delivered, in sending order.
DELIVERED_OUTPUTS = ("seg", "sr")

#: C-STORE statuses that count as stored: Success and the Warning statuses of PS3.4 B.2.3
#: (coercion of data elements, elements discarded, data set does not match SOP class).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

ProgressCallback = Callable[[str], None]

#: Seconds each confirmation query may take before it counts as failed.
CONFIRM_QUERY_TIMEOUT_S = 30.0


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

    def deliver(self, job_id: int) -> str:
        """Deliver the stored SEG and SR of an analysed job again, and confirm them.

        Used by ``livernode resend``: the outputs on disk are sent whatever the job's
        state and retry count, and the job ends ``succeeded`` (delivered and confirmed) or
        ``delivery_failed``.

        Parameters
        ----------
        job_id : int
            A job whose analysis finished (``result`` set).

        Returns
        -------
        str
            The job's final state.

        Raises
        ------
        ValueError
            When no job has that id or it has no analysis result to deliver.
        """
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            if job is None:
                raise ValueError(f"No job with id {job_id}")
            if job.result is None:
                raise ValueError(
                    f"Job {job_id} has no analysis result (state {job.state}); nothing to resend"
                )
            previous_state = job.state
            job.state = JobState.RUNNING
            job.next_delivery_at = None
            add_audit_event(
                session,
                AuditKind.RESEND_REQUESTED,
                study_uid=job.series.study.study_instance_uid,
                series_uid=job.series.series_instance_uid,
                job_id=job_id,
                message=f"resend of the stored SEG and SR to {_describe_destination(self.settings)}"
                f" requested (previous state {previous_state}, {job.delivery_attempts} attempts)",
            )
        return self._deliver(job_id)

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
        if self.analyse is _default_analysis:
            self._preload_models()
        while not self._stop.is_set():
            try:
                job_id = self.run_once()
            except Exception:  # noqa: BLE001 - keep the worker alive, the error is logged
                logger.exception("Worker %s: unexpected error while running a job", self.name)
                job_id = None
            if job_id is None:
                self.queue.wait(self.settings.worker.poll_interval_s)

    def _preload_models(self) -> None:
        """Load the networks before the first job, so its latency does not include loading them."""
        from node.analysis import load_models, use_bfloat16
        from pipeline.inference import bfloat16_module

        started = time.perf_counter()
        try:
            models = load_models(self.settings)
            if use_bfloat16(self.settings.analysis.precision):
                for model in models:
                    bfloat16_module(model.module)
        except Exception as error:  # noqa: BLE001 - the first job loads them again and reports
            logger.warning("Worker %s: loading the networks at start failed: %s", self.name, error)
            return
        logger.info("Worker %s: networks loaded in %.1f s", self.name, time.perf_counter() - started)

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
            previous = self._archive_previous_result(job_id, out_dir)
            result = self.analyse(input_dir, out_dir, self.settings, progress)
            result = json.loads(json.dumps(result, default=str))
            replaced = _reference_predecessor(result, previous)
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
            if result.get("not_analysable"):
                add_audit_event(
                    session,
                    AuditKind.NOT_ANALYSABLE,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    job_id=job_id,
                    message=f"{result['not_analysable']}; an SR with this reason and no volumes is delivered",
                )
            if replaced is not None:
                add_audit_event(
                    session,
                    AuditKind.RESULT_REPLACED,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    job_id=job_id,
                    message=replaced,
                )
        logger.info("Job %d: %s", job_id, _summarise_result(result))
        return True

    def _add_overlays(self, job_id: int) -> None:
        """Write the overlay pictures of a job; any error is logged and the delivery goes on."""
        try:
            self._write_overlays(job_id)
        except Exception:  # noqa: BLE001 - the pictures are a preview, never a reason to fail
            logger.exception("Job %d: recording the overlay pictures failed", job_id)

    def _write_overlays(self, job_id: int) -> None:
        """Write the overlay PNG files of an analysed job once, and list them in its result.

        Runs after SEG and SR were sent, so the pictures do not delay the delivery. A failure
        only adds a warning to the result, because the pictures are a preview and the SEG and
        SR do not depend on them.
        """
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            result = json.loads(json.dumps(job.result or {}))  # type: ignore[union-attr]
            series_uid = job.series.series_instance_uid  # type: ignore[union-attr]
            study_uid = job.series.study.study_instance_uid  # type: ignore[union-attr]
            out_dir = Path(job.output_dir) if job.output_dir else None  # type: ignore[union-attr]
        outputs = result.get("outputs")
        mask_path = outputs.get("mask") if isinstance(outputs, dict) else None
        if out_dir is None or "overlays" in (outputs or {}):
            return
        if not mask_path or not Path(mask_path).is_file():
            logger.debug("Job %d: no mask.nii.gz, so no overlay pictures", job_id)
            return

        from node.overlay import write_series_overlays

        input_dir = self.spool.series_dir(study_uid, series_uid)
        try:
            outputs["overlays"] = write_series_overlays(input_dir, Path(mask_path), out_dir, result)
        except Exception as error:  # noqa: BLE001 - a preview failure must not fail the job
            reason = f"{error.__class__.__name__}: {error}"
            logger.warning("Job %d: overlay pictures of series %s failed: %s", job_id, series_uid, reason)
            result.setdefault("warnings", []).append(f"overlay pictures not written: {reason}")
        write_atomically(out_dir / RESULT_FILE_NAME, (json.dumps(result, indent=2) + "\n").encode())
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            job.result = result  # type: ignore[union-attr]
            job.output_paths = result.get("outputs")  # type: ignore[union-attr]

    def _archive_previous_result(self, job_id: int, out_dir: Path) -> _PreviousResult | None:
        """Move the outputs of the series' last analysed job out of ``out_dir``.

        A series analysed again (more instances arrived after its result) writes into the
        same folder. The earlier SEG, SR and mask move to ``replaced/job-<id>/`` so that no
        sent result is lost, and that job's output paths follow them.

        Returns
        -------
        _PreviousResult or None
            The earlier job and its moved SR, or None when the series has no earlier result.
        """
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            earlier = [
                other
                for other in job.series.jobs  # type: ignore[union-attr]
                if other.id != job_id and other.output_paths and other.output_dir == str(out_dir)
            ]
            if not earlier:
                return None
            previous_job = max(earlier, key=lambda other: other.id)
            archive = out_dir / REPLACED_DIR_NAME / f"job-{previous_job.id}"
            archive.mkdir(parents=True, exist_ok=True)

            moved: dict[str, Any] = {}
            for key, value in dict(previous_job.output_paths or {}).items():
                source = Path(value) if isinstance(value, str) else None
                if source is not None and source.is_file() and source.parent == out_dir:
                    target = archive / source.name
                    source.replace(target)
                    moved[key] = str(target)
                else:
                    moved[key] = value
            result_file = out_dir / RESULT_FILE_NAME
            if result_file.is_file():
                result_file.replace(archive / RESULT_FILE_NAME)
            previous_job.output_paths = moved
            previous_job.output_dir = str(archive)
            sr_path = moved.get("sr")
            logger.info(
                "Job %d: outputs of earlier job %d of the series moved to %s",
                job_id, previous_job.id, archive,
            )
            return _PreviousResult(previous_job.id, Path(sr_path) if sr_path else None)

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
                if destination.confirm_delivery and records:
                    self._confirm(job_id, study_uid, paths, records)
        except Exception as error:  # noqa: BLE001 - every delivery error is retried
            reason = f"{error.__class__.__name__}: {error}"
            self._add_overlays(job_id)
            return self._finish_delivery_failed(job_id, attempt, reason)

        self._add_overlays(job_id)

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
        if destination.kind == "dicomweb":
            from dicom_io.dicomweb import stow_files

            results = stow_files(
                paths,
                url=destination.url,
                username=destination.username,
                password=destination.read_password(),
                timeout_s=destination.send_timeout_s,
            )
        else:
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
                    "stored": bool(result.stored)
                    if isinstance(getattr(result, "stored", None), bool)
                    else status is not None and int(status) in STORED_STATUSES,
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

    def _confirm(
        self, job_id: int, study_uid: str, paths: list[Path], records: list[dict[str, Any]]
    ) -> None:
        """Query the destination until it lists every sent instance, or raise DeliveryError."""
        destination = self.settings.destination
        expected = {str(record["sop_instance_uid"]) for record in records}
        series_uids = sorted({_read_series_instance_uid(path) for path in paths} - {None})
        deadline = time.monotonic() + destination.confirm_timeout_s
        found: set[str] = set()
        last_error = ""
        queries = 0

        while True:
            queries += 1
            try:
                found = self._query_destination(study_uid, series_uids)
                last_error = ""
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                last_error = f"{error.__class__.__name__}: {error}"
                logger.warning(
                    "Job %d: confirmation query %d for study %s failed: %s",
                    job_id,
                    queries,
                    study_uid,
                    last_error,
                )
            if expected <= found:
                break
            if time.monotonic() >= deadline:
                missing = ", ".join(sorted(expected - found))
                detail = f"; last query error: {last_error}" if last_error else ""
                raise DeliveryError(
                    f"the destination accepted the files but does not list SOP instance(s) "
                    f"{missing} of study {study_uid} after {destination.confirm_timeout_s:g} s "
                    f"({queries} queries){detail}"
                )
            time.sleep(destination.confirm_interval_s)

        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            add_audit_event(
                session,
                AuditKind.DELIVERY_CONFIRMED,
                study_uid=study_uid,
                series_uid=job.series.series_instance_uid,  # type: ignore[union-attr]
                job_id=job_id,
                message=f"{_describe_destination(self.settings)} lists the {len(expected)} sent "
                f"instance(s) ({', '.join(sorted(expected))}) after {queries} "
                f"{'query' if queries == 1 else 'queries'}",
            )
        logger.info(
            "Job %d: delivery of %d instance(s) of study %s confirmed by query",
            job_id,
            len(expected),
            study_uid,
        )

    def _query_destination(self, study_uid: str, series_uids: list[str]) -> set[str]:
        destination = self.settings.destination
        timeout_s = min(destination.send_timeout_s, CONFIRM_QUERY_TIMEOUT_S)
        if destination.kind == "dicomweb":
            from dicom_io.dicomweb import find_instances as find_dicomweb

            return find_dicomweb(
                study_uid,
                url=destination.url,
                username=destination.username,
                password=destination.read_password(),
                timeout_s=timeout_s,
            )

        from dicom_io.query import find_instances as find_dimse

        return find_dimse(
            study_uid,
            series_uids,
            ae_title=destination.ae_title,
            host=destination.host,
            port=destination.port,
            calling_ae_title=destination.calling_ae_title,
            timeout_s=timeout_s,
        )

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


@dataclass(frozen=True)
class _PreviousResult:
    """The earlier analysed job of a series and its SR after archiving."""

    job_id: int
    sr_path: Path | None


def _reference_predecessor(result: dict[str, Any], previous: _PreviousResult | None) -> str | None:
    """Make the new SR reference the earlier SR; return the audit message, or None."""
    if previous is None:
        return None
    new_sr = (result.get("outputs") or {}).get("sr")
    if not new_sr or previous.sr_path is None or not previous.sr_path.is_file():
        return f"replaces the result of job {previous.job_id}, which had no SR to reference"

    from dicom_io.sr_versions import DocumentReference, add_predecessor

    predecessor = DocumentReference.from_file(previous.sr_path)
    add_predecessor(Path(new_sr), predecessor)
    return (
        f"replaces the result of job {previous.job_id}: the new SR references SR "
        f"{predecessor.sop_instance_uid} in its PredecessorDocumentsSequence"
    )


def _describe_destination(settings: Settings) -> str:
    destination = settings.destination
    if destination.kind == "folder":
        return f"folder {destination.path}"
    if destination.kind == "dicomweb":
        return f"DICOMweb {destination.url}"
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _read_series_instance_uid(path: Path) -> str | None:
    try:
        dataset = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        return str(dataset.SeriesInstanceUID)
    except (InvalidDicomError, AttributeError, OSError):
        return None


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
