"""Durability of batched ingest: spool files without a database row, temporary files left
by a crash, the recorder's retries and the file header the SCP writes.

Real associations run on 127.0.0.1 between pynetdicom SCUs and the node's
:class:`~node.scp.StorageSCP`. A crash between the fsync of an instance's file and the commit
of its row is reproduced by writing the spool file with :meth:`node.spool.Spool.store_received`
and no row, which is exactly what such a crash leaves. A kill inside that window of a few
milliseconds cannot be timed reliably.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy import select

from node.audit import list_audit_events
from node.db import init_db, session_scope
from node.file_meta import encode_file_header
from node.ingest_recorder import IngestRecorder, InstanceRecord
from node.models import AuditKind, Instance, Series, SeriesState, Study, utc_now
from node.scp import STATUS_SUCCESS, StorageSCP
from node.spool import Spool
from tests.pg import PostgresUnavailable, postgres_server
from tests.test_scp import make_ct_series, make_settings, send_datasets


def encode_instance(dataset: Dataset) -> tuple[bytes, bytes]:
    """Return the file header and the Explicit VR Little Endian data set of ``dataset``."""
    header = encode_file_header(str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), ExplicitVRLittleEndian)
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    dataset_without_meta = Dataset(dataset)
    write_dataset(buffer, dataset_without_meta)
    return header, buffer.getvalue()


def spool_without_row(spool: Spool, dataset: Dataset) -> Path:
    """Write ``dataset`` to the spool as the SCP does, leaving out the database row."""
    header, body = encode_instance(dataset)
    digest = hashlib.sha256(header + body).hexdigest()
    return spool.store_received(
        str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID),
        (header, body), digest,
    )


def instance_uids(engine, series_uid: str) -> list[str]:
    with session_scope(engine) as session:
        return sorted(
            session.scalars(
                select(Instance.sop_instance_uid)
                .join(Series, Instance.series_id == Series.id)
                .where(Series.series_instance_uid == series_uid)
            )
        )


def test_file_header_matches_pynetdicom():
    sop_uid = generate_uid()
    for transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        expected_meta = create_file_meta(
            sop_class_uid=CTImageStorage, sop_instance_uid=sop_uid, transfer_syntax=transfer_syntax
        )
        expected = b"\x00" * 128 + b"DICM" + encode_file_meta(expected_meta)

        header = encode_file_header(CTImageStorage, sop_uid, transfer_syntax)

        assert header == expected, transfer_syntax
        meta = pydicom.dcmread(io.BytesIO(header)).file_meta
        assert meta.MediaStorageSOPInstanceUID == sop_uid
        assert meta.TransferSyntaxUID == transfer_syntax


def test_spool_file_without_row_recorded_at_start(tmp_path):
    settings = make_settings(tmp_path)
    engine = init_db(settings.database_url)
    spool = Spool(settings.spool_dir)
    datasets = make_ct_series(4)
    other_series = make_ct_series(2)
    series_uid = str(datasets[0].SeriesInstanceUID)

    scp = StorageSCP(settings, engine)
    scp.start()
    try:
        assert send_datasets(settings, datasets[:3]) == [STATUS_SUCCESS] * 3
    finally:
        scp.stop()
    # What a crash after the fsync and before the commit leaves: files without rows, for
    # a series with rows and for a series without any.
    unrecorded = spool_without_row(spool, datasets[3])
    for dataset in other_series:
        spool_without_row(spool, dataset)
    assert len(instance_uids(engine, series_uid)) == 3

    restarted = StorageSCP(settings, engine)
    restarted.start()
    restarted.stop()

    assert instance_uids(engine, series_uid) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    other_uid = str(other_series[0].SeriesInstanceUID)
    assert instance_uids(engine, other_uid) == sorted(str(ds.SOPInstanceUID) for ds in other_series)
    with session_scope(engine) as session:
        series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        other = session.scalar(select(Series).where(Series.series_instance_uid == other_uid))
        recorded = session.scalar(
            select(Instance).where(Instance.sop_instance_uid == str(datasets[3].SOPInstanceUID))
        )
        study_uids = set(session.scalars(select(Study.study_instance_uid)))
    assert series.instance_count == 4
    assert series.state == SeriesState.RECEIVING
    assert other.instance_count == 2
    assert other.modality == "CT"
    assert str(other_series[0].StudyInstanceUID) in study_uids
    assert recorded.spool_path == str(unrecorded)
    assert recorded.sha256 == hashlib.sha256(unrecorded.read_bytes()).hexdigest()
    assert recorded.transfer_syntax_uid == ExplicitVRLittleEndian
    received = list_audit_events(engine, kind=AuditKind.RECEIVED)
    assert len(received) == 6
    at_start = [event for event in received if "recorded at node start" in event.message]
    assert len(at_start) == 3
    engine.dispose()


def test_crash_temporary_files_completed_or_deleted(tmp_path):
    settings = make_settings(tmp_path)
    engine = init_db(settings.database_url)
    spool = Spool(settings.spool_dir)
    complete, partial = make_ct_series(2)
    folder = spool.series_dir(str(complete.StudyInstanceUID), str(complete.SeriesInstanceUID))
    folder.mkdir(parents=True)

    # A file fsynced under its temporary name, whose rename a crash lost: content and name agree.
    header, body = encode_instance(complete)
    digest = hashlib.sha256(header + body).hexdigest()
    (folder / f".{complete.SOPInstanceUID}.{digest}.part").write_bytes(header + body)
    # A file cut off while being written, so never acknowledged: content and name disagree.
    header, body = encode_instance(partial)
    digest = hashlib.sha256(header + body).hexdigest()
    cut = folder / f".{partial.SOPInstanceUID}.{digest}.part"
    cut.write_bytes((header + body)[: len(header) + 100])

    scp = StorageSCP(settings, engine)
    scp.start()
    scp.stop()

    assert sorted(path.name for path in folder.iterdir()) == [f"{complete.SOPInstanceUID}.dcm"]
    assert instance_uids(engine, str(complete.SeriesInstanceUID)) == [str(complete.SOPInstanceUID)]
    assert pydicom.dcmread(folder / f"{complete.SOPInstanceUID}.dcm").PixelData == complete.PixelData
    engine.dispose()


def test_resend_within_association_is_duplicate(tmp_path):
    """A resend before the first copy's row is committed is still found as a duplicate."""
    settings = make_settings(tmp_path)
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    (dataset,) = make_ct_series(1)
    try:
        statuses = send_datasets(settings, [dataset, dataset])
    finally:
        scp.stop()

    assert statuses == [STATUS_SUCCESS, STATUS_SUCCESS]
    assert instance_uids(engine, str(dataset.SeriesInstanceUID)) == [str(dataset.SOPInstanceUID)]
    assert len(list_audit_events(engine, kind=AuditKind.DUPLICATE)) == 1
    assert len(list_audit_events(engine, kind=AuditKind.RECEIVED)) == 1
    engine.dispose()


def make_record(tmp_path: Path) -> InstanceRecord:
    study_uid, series_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    return InstanceRecord(
        study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class_uid=CTImageStorage,
        modality="CT", patient_id="SYN-0001", accession_number=None, study_date=None,
        series_description=None, transfer_syntax_uid=ExplicitVRLittleEndian,
        spool_path=str(tmp_path / f"{sop_uid}.dcm"), sha256="0" * 64, size_bytes=1,
        calling_ae_title="TESTSCU", received_at=utc_now(), audit_message="stored for the test",
    )


def test_recorder_retries_after_database_outage(tmp_path):
    try:
        with postgres_server() as postgres:
            engine = init_db(postgres.url)
            recorder = IngestRecorder(engine)
            recorder.start()
            record = make_record(tmp_path)
            try:
                postgres.stop()
                recorder.submit(record)
                committed_during_outage = recorder.flush(timeout_s=1.5)
                pending_during_outage = recorder.pending_record(record.sop_uid)
                postgres.start()
                committed_after = recorder.flush(timeout_s=60)
            finally:
                recorder.stop()
            with session_scope(engine) as session:
                rows = list(session.scalars(select(Instance.sop_instance_uid)))
            engine.dispose()
    except PostgresUnavailable as error:
        pytest.skip(f"PostgreSQL is not available for the recorder outage test: {error}")

    assert not committed_during_outage
    assert pending_during_outage == record
    assert committed_after
    assert rows == [record.sop_uid]
