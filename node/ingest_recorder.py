"""Database rows of received instances, committed in batches by one writer thread.

The SCP acknowledges an instance once its spool file is fsynced (see
:meth:`node.spool.Spool.store_received`) and hands an :class:`InstanceRecord` to the
:class:`IngestRecorder`. The recorder's thread commits waiting records together: their
``instances`` rows, one ``received`` audit event each, and the study and series rows with
the instance count and last receive time that the quiet-time sweep reads. One commit per
batch instead of one per instance is what keeps the database off the C-STORE path.

No acknowledged instance is lost when the process stops before its batch commits: its
spool file exists, and :func:`reconcile_spool` records every spool file without a row at
node start. A batch that fails because the database is unreachable stays queued and is
retried. Meanwhile the SCP returns "out of resources" for new instances, because the
duplicate lookup that precedes every store fails.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from node.db import session_scope
from node.models import AuditEvent, AuditKind, Instance, Series, SeriesState, Study
from node.spool import Spool, sha256_hex

logger = logging.getLogger(__name__)

#: Most records committed in one transaction.
MAX_BATCH_RECORDS = 500

#: Seconds the writer waits for more records after the first of a batch arrives. A flush
#: request, such as an A-RELEASE, ends the wait at once. The quiet time that completes a
#: series is seconds long, so this delay barely moves the completion.
BATCH_LINGER_S = 0.2

#: Seconds between retries of a batch that failed, doubling up to the maximum.
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 10.0

#: Seconds :meth:`IngestRecorder.stop` waits for waiting records to commit.
STOP_FLUSH_TIMEOUT_S = 30.0

#: Records per transaction when :func:`reconcile_spool` records spool files at start.
RECONCILE_BATCH_RECORDS = 500

#: Maximum lengths of the optional text columns (see :mod:`node.models`).
PATIENT_ID_LENGTH = 64
ACCESSION_NUMBER_LENGTH = 16
STUDY_DATE_LENGTH = 8
SERIES_DESCRIPTION_LENGTH = 64
MODALITY_LENGTH = 16


def descriptive_attributes(dataset: Dataset) -> dict[str, str | None]:
    """Return the modality, patient, accession, date and series description of ``dataset``.

    Values are stripped and cut to their column widths, so a malformed long value cannot fail
    the database insert. A missing modality is an empty string, other missing values None.
    """

    def text(keyword: str, max_length: int) -> str | None:
        value = dataset.get(keyword)
        return None if value is None else (str(value).strip()[:max_length] or None)

    return {
        "modality": text("Modality", MODALITY_LENGTH) or "",
        "patient_id": text("PatientID", PATIENT_ID_LENGTH),
        "accession_number": text("AccessionNumber", ACCESSION_NUMBER_LENGTH),
        "study_date": text("StudyDate", STUDY_DATE_LENGTH),
        "series_description": text("SeriesDescription", SERIES_DESCRIPTION_LENGTH),
    }


@dataclass(frozen=True)
class InstanceRecord:
    """Database content of one spooled instance: its row, series and audit message."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    series_description: str | None
    transfer_syntax_uid: str
    spool_path: str
    sha256: str
    size_bytes: int
    calling_ae_title: str | None
    received_at: dt.datetime
    #: Message of the ``received`` audit event.
    audit_message: str


def record_instances(session: Session, records: Sequence[InstanceRecord]) -> None:
    """Add the rows of ``records`` to ``session``: instances, audit events, studies, series.

    A new study or series row is created on its first instance. A series that is no longer
    ``receiving`` goes back to ``receiving`` with a ``late_instance`` audit event, once per
    call, so it is analysed again after the quiet time.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        Session whose commit stores the rows; nothing is committed here.
    records : sequence of InstanceRecord
        Instances whose SOP Instance UIDs have no row yet.

    Raises
    ------
    sqlalchemy.exc.SQLAlchemyError
        When a statement fails, for example an ``IntegrityError`` for a SOP Instance UID
        that already has a row.
    """
    series_by_uid: dict[str, tuple[Study, Series]] = {}
    for record in records:
        if record.series_uid not in series_by_uid:
            series_by_uid[record.series_uid] = _upsert_study_and_series(session, record)
        study, series = series_by_uid[record.series_uid]
        series.instance_count = (series.instance_count or 0) + 1
        if series.last_received_at is None or record.received_at > series.last_received_at:
            series.last_received_at = record.received_at
        if record.calling_ae_title:
            series.calling_ae_title = record.calling_ae_title
        if study.last_received_at is None or record.received_at > study.last_received_at:
            study.last_received_at = record.received_at
    session.flush()

    session.execute(
        insert(Instance),
        [
            {
                "series_id": series_by_uid[record.series_uid][1].id,
                "sop_instance_uid": record.sop_uid,
                "sop_class_uid": record.sop_class_uid,
                "transfer_syntax_uid": record.transfer_syntax_uid,
                "spool_path": record.spool_path,
                "sha256": record.sha256,
                "size_bytes": record.size_bytes,
                "calling_ae_title": record.calling_ae_title,
                "received_at": record.received_at,
            }
            for record in records
        ],
    )
    session.execute(
        insert(AuditEvent),
        [
            {
                "created_at": record.received_at,
                "kind": AuditKind.RECEIVED,
                "study_instance_uid": record.study_uid,
                "series_instance_uid": record.series_uid,
                "sop_instance_uid": record.sop_uid,
                "calling_ae_title": record.calling_ae_title,
                "message": record.audit_message,
            }
            for record in records
        ],
    )


def _upsert_study_and_series(session: Session, record: InstanceRecord) -> tuple[Study, Series]:
    study = session.scalar(select(Study).where(Study.study_instance_uid == record.study_uid))
    if study is None:
        study = Study(
            study_instance_uid=record.study_uid,
            patient_id=record.patient_id,
            accession_number=record.accession_number,
            study_date=record.study_date,
            first_received_at=record.received_at,
            last_received_at=record.received_at,
        )
        session.add(study)

    series = session.scalar(select(Series).where(Series.series_instance_uid == record.series_uid))
    if series is None:
        series = Series(
            study=study,
            series_instance_uid=record.series_uid,
            modality=record.modality,
            series_description=record.series_description,
            instance_count=0,
            state=SeriesState.RECEIVING,
            calling_ae_title=record.calling_ae_title,
            first_received_at=record.received_at,
            last_received_at=record.received_at,
        )
        session.add(series)
    elif series.state != SeriesState.RECEIVING:
        previous_state = series.state
        session.add(
            AuditEvent(
                kind=AuditKind.LATE_INSTANCE,
                study_instance_uid=record.study_uid,
                series_instance_uid=record.series_uid,
                sop_instance_uid=record.sop_uid,
                calling_ae_title=record.calling_ae_title,
                message=f"instance arrived while the series was {previous_state}; "
                "the series is receiving again and will be analysed again",
            )
        )
        logger.warning(
            "Series %s received SOP instance %s while %s; receiving again",
            record.series_uid,
            record.sop_uid,
            previous_state,
        )
        series.state = SeriesState.RECEIVING
        series.completed_at = None
    return study, series


class IngestRecorder:
    """Writer thread that commits :class:`InstanceRecord` objects in batches.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Node database.

    Examples
    --------
    ::

        recorder = IngestRecorder(engine)
        recorder.start()
        recorder.submit(record)      # returns at once
        recorder.flush(timeout_s=10)  # True once every submitted record is committed
        recorder.stop()
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._condition = threading.Condition()
        self._waiting: deque[tuple[int, InstanceRecord]] = deque()
        # Records submitted but not yet committed, by SOP Instance UID, for the SCP's
        # duplicate check before the row exists.
        self._pending: dict[str, InstanceRecord] = {}
        self._submitted_sequence = 0
        self._committed_sequence = 0
        self._flush_requested = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ingest-recorder", daemon=True)
        self._thread.start()
        logger.info("Ingest recorder started (batches of up to %d instances)", MAX_BATCH_RECORDS)

    def stop(self, timeout_s: float = STOP_FLUSH_TIMEOUT_S) -> bool:
        """Commit what is waiting, within ``timeout_s`` seconds, and stop the thread.

        Returns
        -------
        bool
            True when every submitted record was committed. Records left over stay as
            spool files and are recorded by :func:`reconcile_spool` at the next start.
        """
        if self._thread is None:
            return True
        committed = self.flush(timeout_s)
        with self._condition:
            self._stopping = True
            left_over = len(self._pending)
            self._condition.notify_all()
        self._thread.join(timeout=RETRY_MAX_S)
        self._thread = None
        if left_over:
            logger.error(
                "Ingest recorder stopped with %d instance(s) not recorded; their spool files "
                "are recorded at the next node start",
                left_over,
            )
        else:
            logger.info("Ingest recorder stopped")
        return committed and not left_over

    def submit(self, record: InstanceRecord) -> None:
        """Queue ``record`` for the next batch and return at once."""
        with self._condition:
            self._submitted_sequence += 1
            self._waiting.append((self._submitted_sequence, record))
            self._pending[record.sop_uid] = record
            self._condition.notify_all()

    def pending_record(self, sop_uid: str) -> InstanceRecord | None:
        """Return the submitted, not yet committed record of ``sop_uid``, if there is one."""
        with self._condition:
            return self._pending.get(sop_uid)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every record submitted before this call is committed.

        Returns
        -------
        bool
            False when ``timeout_s`` passed first, for example during a database outage.
        """
        with self._condition:
            target = self._submitted_sequence
            if self._committed_sequence >= target:
                return True
            self._flush_requested = True
            self._condition.notify_all()
            return self._condition.wait_for(
                lambda: self._committed_sequence >= target, timeout=timeout_s
            )

    # Writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        retry_delay_s = RETRY_INITIAL_S
        batch: list[tuple[int, InstanceRecord]] = []
        while True:
            if not batch:
                batch = self._take_batch()
                if not batch:
                    return

            try:
                self._commit(batch)
            except SQLAlchemyError as error:
                uids = ", ".join(record.sop_uid for _, record in batch[:3])
                logger.error(
                    "Recording %d received instance(s) (%s%s) failed; retrying in %g s: %s",
                    len(batch),
                    uids,
                    ", ..." if len(batch) > 3 else "",
                    retry_delay_s,
                    error,
                )
                with self._condition:
                    if self._condition.wait_for(lambda: self._stopping, timeout=retry_delay_s):
                        return
                retry_delay_s = min(retry_delay_s * 2, RETRY_MAX_S)
                continue

            retry_delay_s = RETRY_INITIAL_S
            with self._condition:
                for _, record in batch:
                    if self._pending.get(record.sop_uid) is record:
                        del self._pending[record.sop_uid]
                self._committed_sequence = batch[-1][0]
                self._condition.notify_all()
            batch = []

    def _take_batch(self) -> list[tuple[int, InstanceRecord]]:
        """Wait for records and return up to MAX_BATCH_RECORDS; empty when stopping."""
        with self._condition:
            self._condition.wait_for(lambda: self._waiting or self._stopping)
            if not self._waiting:
                return []
            if not self._flush_requested and not self._stopping:
                self._condition.wait_for(
                    lambda: self._flush_requested
                    or self._stopping
                    or len(self._waiting) >= MAX_BATCH_RECORDS,
                    timeout=BATCH_LINGER_S,
                )
            batch = []
            while self._waiting and len(batch) < MAX_BATCH_RECORDS:
                batch.append(self._waiting.popleft())
            if not self._waiting:
                self._flush_requested = False
            return batch

    def _commit(self, batch: list[tuple[int, InstanceRecord]]) -> None:
        records = [record for _, record in batch]
        try:
            with session_scope(self.engine) as session:
                record_instances(session, records)
            logger.debug("Recorded %d received instance(s)", len(records))
        except IntegrityError:
            # Another writer stored one of these SOP Instance UIDs first; record the others.
            logger.warning(
                "Batch of %d instance(s) hit an existing row; recording them one by one",
                len(records),
            )
            for record in records:
                self._commit_single(record)

    def _commit_single(self, record: InstanceRecord) -> None:
        try:
            with session_scope(self.engine) as session:
                record_instances(session, [record])
        except IntegrityError as error:
            logger.error(
                "SOP instance %s of series %s already has a database row from another "
                "writer; kept the spool file %s without a second row: %s",
                record.sop_uid,
                record.series_uid,
                record.spool_path,
                str(error).splitlines()[0],
            )


# Reconciliation at node start -----------------------------------------------------------


def reconcile_spool(engine: Engine, spool: Spool, now: dt.datetime) -> int:
    """Record every spool file that has no ``instances`` row, at node start.

    A node that stops between fsyncing an instance's file and committing its row leaves
    such a file. The instance was acknowledged, so it is recorded now with a ``received``
    audit event that names this cause, and its series gets the usual quiet time from ``now``.
    Temporary files left by the crash are completed or deleted first, with
    :meth:`node.spool.Spool.recover_received_files`.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Node database.
    spool : Spool
        The spool to scan.
    now : datetime
        UTC time without time zone recorded as the receive time of these instances.

    Returns
    -------
    int
        Number of instances recorded.

    Raises
    ------
    sqlalchemy.exc.SQLAlchemyError
        When the database cannot be read or written.
    """
    spool.recover_received_files()

    records: list[InstanceRecord] = []
    recorded_by_series: dict[str, set[str]] = {}
    for study_uid, series_uid, path in spool.instance_files():
        if series_uid not in recorded_by_series:
            recorded_by_series[series_uid] = _recorded_sop_uids(engine, series_uid)
        if path.stem in recorded_by_series[series_uid]:
            continue
        record = _record_from_file(study_uid, series_uid, path, now)
        if record is not None:
            records.append(record)

    elsewhere = _sop_uids_recorded_elsewhere(engine, records) if records else set()
    for record in records:
        if record.sop_uid in elsewhere:
            logger.error(
                "Spool file %s has no row in series %s, but its SOP Instance UID is recorded "
                "in another series; it stays unrecorded",
                record.spool_path,
                record.series_uid,
            )
    records = [record for record in records if record.sop_uid not in elsewhere]

    for start in range(0, len(records), RECONCILE_BATCH_RECORDS):
        with session_scope(engine) as session:
            record_instances(session, records[start : start + RECONCILE_BATCH_RECORDS])
    if records:
        logger.warning(
            "Recorded %d spool file(s) without a database row at node start (series %s)",
            len(records),
            ", ".join(sorted({record.series_uid for record in records})),
        )
    return len(records)


def _recorded_sop_uids(engine: Engine, series_uid: str) -> set[str]:
    with session_scope(engine) as session:
        return set(
            session.scalars(
                select(Instance.sop_instance_uid)
                .join(Series, Instance.series_id == Series.id)
                .where(Series.series_instance_uid == series_uid)
            )
        )


def _sop_uids_recorded_elsewhere(engine: Engine, records: Iterable[InstanceRecord]) -> set[str]:
    """Return SOP Instance UIDs of ``records`` that have a row in another series."""
    uids = [record.sop_uid for record in records]
    found: set[str] = set()
    with session_scope(engine) as session:
        for start in range(0, len(uids), RECONCILE_BATCH_RECORDS):
            chunk = uids[start : start + RECONCILE_BATCH_RECORDS]
            found.update(
                session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk)))
            )
    return found


def _record_from_file(
    study_uid: str, series_uid: str, path: Path, now: dt.datetime
) -> InstanceRecord | None:
    """Build the record of one spool file from its header; None when it cannot be read."""
    try:
        data = path.read_bytes()
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError) as error:
        logger.error(
            "Spool file %s has no database row and cannot be read, so it stays unrecorded: %s",
            path,
            error,
        )
        return None

    sop_class_uid = str(dataset.get("SOPClassUID", "") or dataset.file_meta.get("MediaStorageSOPClassUID", ""))
    transfer_syntax_uid = str(dataset.file_meta.get("TransferSyntaxUID", ""))
    return InstanceRecord(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=path.stem,
        sop_class_uid=sop_class_uid,
        **descriptive_attributes(dataset),
        transfer_syntax_uid=transfer_syntax_uid,
        spool_path=str(path),
        sha256=sha256_hex(data),
        size_bytes=len(data),
        calling_ae_title=None,
        received_at=now,
        audit_message=(
            f"stored at {path} ({len(data)} bytes, {transfer_syntax_uid}); recorded at node "
            "start because the node stopped before committing its database row"
        ),
    )
