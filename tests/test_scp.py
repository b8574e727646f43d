"""C-STORE SCP tests: real associations on 127.0.0.1 with a pynetdicom SCU."""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine, func, select

try:
    from tests.pg import free_port
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from pg import free_port

from node.audit import list_audit_events
from node.config import Settings
from node.db import init_db, session_scope
from node.models import AuditKind, Instance, Series, Study
from node.scp import (
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_SUCCESS,
    StorageSCP,
    supported_transfer_syntaxes,
)

PATIENT_NAME = "Synthetic^Testpatient"
ROWS = COLUMNS = 16
SLICE_SPACING_MM = 2.5
SCU_AE_TITLE = "TESTSCU"


def make_ct_series(
    count: int = 4,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """Build ``count`` tiny axial CT instances (16x16 int16) of one series."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = generate_uid()
    datasets = []

    for index in range(count):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PatientName = PATIENT_NAME
        ds.PatientID = "SYN-0001"
        ds.AccessionNumber = "ACC123"
        ds.StudyDate = "20240102"
        ds.Modality = "CT"
        ds.SeriesDescription = "synthetic abdomen"
        ds.SeriesNumber = 3
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-10.0, -10.0, index * SLICE_SPACING_MM]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = SLICE_SPACING_MM
        ds.Rows = ROWS
        ds.Columns = COLUMNS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        pixels = (np.arange(ROWS * COLUMNS, dtype=np.int16).reshape(ROWS, COLUMNS) - 100) * (index + 1)
        ds.PixelData = pixels.astype(np.int16).tobytes()

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        datasets.append(ds)
    return datasets


def make_settings(tmp_path: Path, **scp_options: object) -> Settings:
    """Return settings with every folder and the SQLite database under ``tmp_path``."""
    settings = Settings(data_dir=tmp_path / "data")
    settings.scp.port = free_port()
    settings.scp.acse_timeout_s = 5
    settings.scp.dimse_timeout_s = 5
    settings.scp.network_timeout_s = 5
    for key, value in scp_options.items():
        setattr(settings.scp, key, value)
    settings.validate()
    return settings


def send_datasets(
    settings: Settings,
    datasets: list[Dataset | Path],
    ae_title: str = SCU_AE_TITLE,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[int]:
    """Send data sets or DICOM files over one association and return the C-STORE statuses."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage, transfer_syntax)
    assoc = ae.associate("127.0.0.1", settings.scp.port, ae_title=settings.scp.ae_title)
    assert assoc.is_established, "association with the node SCP was not established"

    statuses = []
    try:
        for ds in datasets:
            response = assoc.send_c_store(ds)
            statuses.append(int(response.Status))
    finally:
        assoc.release()
    return statuses


def wait_for_audit(engine: Engine, kind: str, deadline_s: float = 10.0) -> list:
    """Poll for audit events of ``kind`` written by a server thread; return what was found."""
    stop_at = time.monotonic() + deadline_s
    while True:
        events = list_audit_events(engine, kind=kind)
        if events or time.monotonic() > stop_at:
            return events
        time.sleep(0.05)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Engine, StorageSCP]]:
    settings = make_settings(tmp_path)
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    yield settings, engine, scp
    scp.stop()
    engine.dispose()


def test_store_series_spooled_and_recorded(node, caplog) -> None:
    settings, engine, scp = node
    datasets = make_ct_series(4)
    study_uid = datasets[0].StudyInstanceUID
    series_uid = datasets[0].SeriesInstanceUID

    with caplog.at_level(logging.DEBUG):
        statuses = send_datasets(settings, datasets)

    assert statuses == [STATUS_SUCCESS] * 4

    series_dir = Path(settings.spool_dir) / study_uid / series_uid
    assert sorted(p.name for p in series_dir.iterdir()) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in datasets
    )

    with session_scope(engine) as session:
        instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        series = session.scalar(select(Series))
        study = session.scalar(select(Study))
        assert series is not None and study is not None
        assert series.series_instance_uid == series_uid
        assert series.instance_count == 4
        assert series.state == "receiving"
        assert series.calling_ae_title == SCU_AE_TITLE
        assert study.study_instance_uid == study_uid
        assert study.patient_id == "SYN-0001"
        assert study.accession_number == "ACC123"
        assert not hasattr(study, "patient_name")

    for ds in datasets:
        path = series_dir / f"{ds.SOPInstanceUID}.dcm"
        data = path.read_bytes()
        record = instances[ds.SOPInstanceUID]
        assert record.spool_path == str(path)
        assert record.sha256 == hashlib.sha256(data).hexdigest()
        assert record.size_bytes == len(data)
        assert record.transfer_syntax_uid == ExplicitVRLittleEndian
        assert record.sop_class_uid == CTImageStorage

        stored = dcmread(path)
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
        assert stored.PixelData == ds.PixelData
        assert stored.ImagePositionPatient == ds.ImagePositionPatient
        assert stored.PatientName == PATIENT_NAME

    received = list_audit_events(engine, kind=AuditKind.RECEIVED)
    assert len(received) == 4
    assert {event.sop_instance_uid for event in received} == set(instances)

    assert "Association accepted from calling AE TESTSCU" in caplog.text
    assert "Synthetic" not in caplog.text, "a patient name was written to the log"


def test_store_keeps_received_transfer_syntax(node) -> None:
    settings, engine, scp = node
    datasets = make_ct_series(1)

    statuses = send_datasets(settings, datasets, transfer_syntax=ImplicitVRLittleEndian)

    assert statuses == [STATUS_SUCCESS]
    with session_scope(engine) as session:
        instance = session.scalar(select(Instance))
        assert instance is not None
        assert instance.transfer_syntax_uid == ImplicitVRLittleEndian
        stored = dcmread(instance.spool_path)
    assert stored.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert stored.PixelData == datasets[0].PixelData


def test_store_missing_uids_rejected(node, tmp_path, monkeypatch) -> None:
    settings, engine, scp = node
    good, no_series, good_after = make_ct_series(3)
    no_series.SeriesInstanceUID = ""
    wrong_modality = make_ct_series(1)[0]
    wrong_modality.Modality = "MR"

    # The C-STORE request needs a valid Affected SOP Instance UID, so the instance whose
    # data set lacks SOPInstanceUID is sent as a file. pynetdicom then sends the encoded
    # data set unchanged and takes the request's UID from the file meta information.
    no_sop_uid = copy.deepcopy(good_after)
    no_sop_uid.SOPInstanceUID = ""
    no_sop_uid.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_sop_uid.preamble = b"\x00" * 128
    no_sop_uid_path = tmp_path / "no-sop-uid.dcm"
    no_sop_uid.save_as(no_sop_uid_path, enforce_file_format=False)
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)

    statuses = send_datasets(
        settings, [good, no_series, no_sop_uid_path, wrong_modality, good_after]
    )

    assert statuses == [
        STATUS_SUCCESS,
        STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
        STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
        STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
        STATUS_SUCCESS,
    ]

    rejected = list_audit_events(engine, kind=AuditKind.REJECTED)
    assert len(rejected) == 3
    assert "SeriesInstanceUID" in rejected[0].message
    assert rejected[0].sop_instance_uid == no_series.SOPInstanceUID
    assert "SOPInstanceUID" in rejected[1].message
    assert "Modality" in rejected[2].message
    assert all(event.calling_ae_title == SCU_AE_TITLE for event in rejected)

    with session_scope(engine) as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == {good.SOPInstanceUID, good_after.SOPInstanceUID}


def test_echo_answered(node) -> None:
    settings, engine, scp = node
    ae = AE(ae_title=SCU_AE_TITLE)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.scp.port, ae_title=settings.scp.ae_title)
    assert assoc.is_established

    status = assoc.send_c_echo()
    assoc.release()

    assert int(status.Status) == STATUS_SUCCESS


def test_calling_ae_not_allowed_rejected(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, allowed_calling_ae_titles=["PACS"])
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CTImageStorage)
        rejected = ae.associate("127.0.0.1", settings.scp.port, ae_title=settings.scp.ae_title)
        rejected_flag = rejected.is_rejected

        allowed_statuses = send_datasets(settings, make_ct_series(1), ae_title="PACS")
        events = wait_for_audit(engine, AuditKind.ASSOCIATION_REJECTED)
    finally:
        scp.stop()
        engine.dispose()

    assert rejected_flag
    assert allowed_statuses == [STATUS_SUCCESS]
    assert len(events) == 1
    assert events[0].calling_ae_title == "INTRUDER"
    assert "not in scp.allowed_calling_ae_titles" in events[0].message


def test_duplicate_resend_idempotent(node) -> None:
    settings, engine, scp = node
    datasets = make_ct_series(2)

    first = send_datasets(settings, datasets)
    second = send_datasets(settings, datasets)

    assert first == [STATUS_SUCCESS, STATUS_SUCCESS]
    assert second == [STATUS_SUCCESS, STATUS_SUCCESS]
    with session_scope(engine) as session:
        assert session.scalar(select(func.count(Instance.id))) == 2
        assert session.scalar(select(Series.instance_count)) == 2
    assert len(list_audit_events(engine, kind=AuditKind.DUPLICATE)) == 2
    series_dir = Path(settings.spool_dir) / datasets[0].StudyInstanceUID / datasets[0].SeriesInstanceUID
    assert len(list(series_dir.iterdir())) == 2


def test_conflicting_resend_keeps_both(node) -> None:
    settings, engine, scp = node
    (original,) = make_ct_series(1)
    changed = copy.deepcopy(original)
    changed.PixelData = (np.ones((ROWS, COLUMNS), dtype=np.int16) * 7).tobytes()

    statuses = send_datasets(settings, [original, changed])

    assert statuses == [STATUS_SUCCESS, STATUS_SUCCESS]
    with session_scope(engine) as session:
        instances = list(session.scalars(select(Instance)))
    assert len(instances) == 1
    assert dcmread(instances[0].spool_path).PixelData == original.PixelData

    conflicts = list_audit_events(engine, kind=AuditKind.CONFLICT)
    assert len(conflicts) == 1
    version_path = (
        Path(settings.spool_dir)
        / "conflicts"
        / original.StudyInstanceUID
        / original.SeriesInstanceUID
        / f"{original.SOPInstanceUID}.v2.dcm"
    )
    assert str(version_path) in conflicts[0].message
    assert dcmread(version_path).PixelData == changed.PixelData


def test_supported_transfer_syntaxes_native_first() -> None:
    syntaxes = supported_transfer_syntaxes()

    assert syntaxes[0] == ExplicitVRLittleEndian
    assert ImplicitVRLittleEndian in syntaxes
    assert len(syntaxes) == len(set(syntaxes))
