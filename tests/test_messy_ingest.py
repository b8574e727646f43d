"""Receiving messy PACS traffic: compressed syntaxes, resends, bursts, bad instances,
odd AE titles, aborted associations, node restarts and whole-study sends.

Real associations run on 127.0.0.1 between pynetdicom SCUs and the node's
:class:`~node.scp.StorageSCP`. Where a test needs the worker, it runs the stand-in
:class:`tests.test_worker.FakeAnalysis`, because the real networks take minutes per series on
CPU; series selection and resume do not depend on what the analysis computes.
"""

from __future__ import annotations

import copy
import datetime as dt
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)
from sqlalchemy import Engine, func, select

import node.scp as scp_module
from dicom_io.convert import series_to_nifti
from dicom_io.sender import send_files
from dicom_io.series import load_series
from dicom_io.sr_versions import predecessor_uids
from node.audit import list_audit_events
from node.config import Settings
from node.db import init_db, session_scope
from node.jobs import DatabaseJobQueue
from node.models import AuditKind, Instance, Job, JobState, Series, SeriesState, Study, utc_now
from node.scheduler import sweep_complete_series
from node.scp import (
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_SUCCESS,
    StorageSCP,
    supported_transfer_syntaxes,
)
from node.spool import Spool
from node.worker import Worker
from tests.pg import free_port
from tests.synthetic_series import SeriesSpec, write_synthetic_series
from tests.test_scp import make_ct_series, make_settings, send_datasets, wait_for_audit
from tests.test_worker import FakeAnalysis, node  # noqa: F401 - shared pytest fixture

SCU_AE_TITLE = "MESSYSCU"


def send_files_as_stored(settings: Settings, paths: list[Path], ae_title: str = SCU_AE_TITLE) -> list[int]:
    """Send files in their own transfer syntax, one context per SOP class and syntax pair."""
    ae = AE(ae_title=ae_title)
    pairs = set()
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        pairs.add((str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)))
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, syntax)

    assoc = ae.associate("127.0.0.1", settings.scp.port, ae_title=settings.scp.ae_title)
    assert assoc.is_established, "association with the node SCP was not established"
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def complete_and_run(settings, engine, queue, analysis, *, selection=None) -> list[int]:
    """Run the completion sweep after the quiet time, then the worker on every new job."""
    later = utc_now() + dt.timedelta(seconds=settings.series.quiet_time_s + 1)
    job_ids = sweep_complete_series(
        engine, queue, settings.series.quiet_time_s, now=later,
        spool=Spool(settings.spool_dir) if selection else None, selection=selection,
    )
    worker = Worker(settings, engine, queue, analyse=analysis, sender=send_files)
    while worker.run_once() is not None:
        pass
    return job_ids


def job_count(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count(Job.id))))


# Compressed transfer syntaxes


def test_scp_offers_only_decodable_syntaxes(tmp_path, monkeypatch):
    for syntax in supported_transfer_syntaxes():
        if pydicom.uid.UID(syntax).is_compressed:
            assert pydicom.pixels.get_decoder(syntax).is_available, f"{syntax} offered without a decoder"

    # A node whose JPEG 2000 plugin is missing: pretend no decoder exists for it.
    real_get_decoder = scp_module.get_decoder

    def without_jpeg2000(uid):
        if uid == JPEG2000Lossless:
            raise NotImplementedError("no decoder")
        return real_get_decoder(uid)

    monkeypatch.setattr(scp_module, "get_decoder", without_jpeg2000)
    settings = make_settings(tmp_path)
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    try:
        ae = AE(ae_title=SCU_AE_TITLE)
        ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.scp.port, ae_title=settings.scp.ae_title)
        accepted = [str(context.transfer_syntax[0]) for context in assoc.accepted_contexts]
        assoc.release()
    finally:
        scp.stop()
        engine.dispose()

    assert JPEG2000Lossless not in supported_transfer_syntaxes()
    assert accepted == [ExplicitVRLittleEndian]


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_received_with_same_hu(node, tmp_path, transfer_syntax):
    settings, engine, queue = node
    spec = SeriesSpec(slice_count=8, first_position_mm=-10.0, transfer_syntax=transfer_syntax)
    synthetic = write_synthetic_series(tmp_path / "sent", spec)

    statuses = send_files_as_stored(settings, synthetic.slice_files)

    assert statuses == [STATUS_SUCCESS] * 8
    spooled = Spool(settings.spool_dir).series_dir(synthetic.study_uid, synthetic.series_uid)
    series = load_series(spooled)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in series.datasets} == {transfer_syntax}
    volume = np.asarray(series_to_nifti(series).dataobj)
    expected = np.stack([hu.T[::-1, ::-1] for hu in synthetic.hu], axis=2)
    assert np.array_equal(volume, expected)


def test_sender_falls_back_to_uncompressed(tmp_path):
    spec = SeriesSpec(slice_count=3, first_position_mm=0.0, transfer_syntax=JPEG2000Lossless)
    synthetic = write_synthetic_series(tmp_path / "sent", spec)
    received: list[Dataset] = []

    def keep(event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0x0000

    # A destination that stores CT only in Implicit VR Little Endian.
    destination = AE(ae_title="PLAINSCP")
    destination.add_supported_context(CTImageStorage, ImplicitVRLittleEndian)
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])
    try:
        results = send_files(synthetic.slice_files, ae_title="PLAINSCP", host="127.0.0.1", port=port, timeout_s=5)
    finally:
        server.shutdown()

    assert [result.stored for result in results] == [True] * 3
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received} == {ImplicitVRLittleEndian}
    for dataset in received:
        original = pydicom.dcmread(next(p for p in synthetic.slice_files if pydicom.dcmread(p).SOPInstanceUID == dataset.SOPInstanceUID))
        assert np.array_equal(dataset.pixel_array, original.pixel_array)


# Resends


def test_resend_and_conflict_make_no_second_job(node):
    settings, engine, queue = node
    datasets = make_ct_series(4)
    analysis = FakeAnalysis()
    assert send_datasets(settings, datasets) == [STATUS_SUCCESS] * 4
    first_jobs = complete_and_run(settings, engine, queue, analysis)

    conflicting = copy.deepcopy(datasets[1])
    conflicting.PixelData = np.full((16, 16), 5, dtype=np.int16).tobytes()
    assert send_datasets(settings, datasets) == [STATUS_SUCCESS] * 4
    assert send_datasets(settings, [conflicting]) == [STATUS_SUCCESS]
    second_jobs = complete_and_run(settings, engine, queue, analysis)

    assert len(first_jobs) == 1
    assert second_jobs == []
    assert job_count(engine) == 1
    assert len(analysis.calls) == 1
    assert len(list_audit_events(engine, kind=AuditKind.DUPLICATE)) == 4
    conflicts = list_audit_events(engine, kind=AuditKind.CONFLICT)
    assert len(conflicts) == 1
    assert conflicts[0].sop_instance_uid == datasets[1].SOPInstanceUID
    with session_scope(engine) as session:
        assert session.scalar(select(Series.state)) == SeriesState.DONE


def test_burst_replaces_result_with_new_sr_version(node):
    settings, engine, queue = node
    datasets = make_ct_series(6)
    analysis = FakeAnalysis()

    send_datasets(settings, datasets[:3])
    (first_job,) = complete_and_run(settings, engine, queue, analysis)
    send_datasets(settings, datasets[3:])
    (second_job,) = complete_and_run(settings, engine, queue, analysis)

    assert len(analysis.input_files[1]) == 6, "the second analysis did not see the whole series"
    with session_scope(engine) as session:
        first = session.get(Job, first_job)
        second = session.get(Job, second_job)
        first_sr, second_sr = Path(first.output_paths["sr"]), Path(second.output_paths["sr"])
        assert first.state == second.state == JobState.SUCCEEDED
        assert "replaced" in first.output_dir
    assert first_sr.is_file()
    assert second_sr.is_file()
    assert first_sr != second_sr
    first_uid = str(pydicom.dcmread(first_sr).SOPInstanceUID)
    assert predecessor_uids(second_sr) == [first_uid]
    assert predecessor_uids(first_sr) == []
    replaced = list_audit_events(engine, kind=AuditKind.RESULT_REPLACED)
    assert len(replaced) == 1
    assert replaced[0].job_id == second_job
    assert first_uid in replaced[0].message


# Invalid instances


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_rejected_association_continues(node, keyword):
    settings, engine, queue = node
    good, bad, after = make_ct_series(3)
    delattr(bad, keyword)

    statuses = send_datasets(settings, [good, bad, after])

    assert statuses == [STATUS_SUCCESS, STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, STATUS_SUCCESS]
    (rejected,) = list_audit_events(engine, kind=AuditKind.REJECTED)
    assert keyword in rejected.message
    assert rejected.sop_instance_uid == bad.SOPInstanceUID
    with session_scope(engine) as session:
        assert session.scalar(select(func.count(Instance.id))) == 2


def test_wrong_geometry_multiplicity_rejected(node):
    settings, engine, queue = node
    (bad,) = make_ct_series(1)
    bad.ImagePositionPatient = [0.0, 0.0]

    assert send_datasets(settings, [bad]) == [STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS]
    (rejected,) = list_audit_events(engine, kind=AuditKind.REJECTED)
    assert "ImagePositionPatient has 2 values" in rejected.message


# AE titles and aborted associations


def test_calling_ae_padding_and_case_accepted(tmp_path):
    settings = make_settings(tmp_path, allowed_calling_ae_titles=["PACS"])
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    try:
        padded = send_datasets(settings, make_ct_series(1), ae_title=" PACS ")
        lower = send_datasets(settings, make_ct_series(1), ae_title="pacs")
        ae = AE(ae_title="PACS2")
        ae.add_requested_context(CTImageStorage)
        other = ae.associate("127.0.0.1", settings.scp.port, ae_title=settings.scp.ae_title)
        other_rejected = other.is_rejected
        with session_scope(engine) as session:
            titles = set(session.scalars(select(Instance.calling_ae_title)))
    finally:
        scp.stop()
        engine.dispose()

    assert padded == [STATUS_SUCCESS]
    assert lower == [STATUS_SUCCESS]
    assert other_rejected
    assert titles == {"PACS", "pacs"}


def test_aborted_association_audited(node):
    settings, engine, queue = node
    datasets = make_ct_series(5)
    ae = AE(ae_title=SCU_AE_TITLE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.scp.port, ae_title=settings.scp.ae_title)
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets[:2]]
    assoc.abort()

    events = wait_for_audit(engine, AuditKind.ASSOCIATION_ABORTED)

    assert statuses == [STATUS_SUCCESS] * 2
    assert len(events) == 1
    assert "2 stored and 0 rejected" in events[0].message
    assert datasets[0].SeriesInstanceUID in events[0].message
    assert events[0].calling_ae_title == SCU_AE_TITLE
    with session_scope(engine) as session:
        assert session.scalar(select(func.count(Instance.id))) == 2


def test_timeouts_configurable(tmp_path):
    settings = make_settings(tmp_path, acse_timeout_s=3, dimse_timeout_s=4, network_timeout_s=7)
    scp = StorageSCP(settings, init_db(settings.database_url))

    assert (scp.ae.acse_timeout, scp.ae.dimse_timeout, scp.ae.network_timeout) == (3, 4, 7)


# Restart


def test_restart_resumes_series_and_jobs(tmp_path):
    """A node stopped mid-receive and mid-analysis resumes both after a restart.

    A SIGKILL of ``livernode serve`` cannot be combined with a stand-in analysis, and the real
    one takes minutes, so the kill is reproduced in-process. The first node's objects are
    dropped without any shutdown step. That leaves a job ``running`` and a series
    ``receiving`` in the database, as a killed process leaves them.
    """
    settings = make_settings(tmp_path)
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    processed, receiving = make_ct_series(3), make_ct_series(4)
    send_datasets(settings, processed)
    later = utc_now() + dt.timedelta(seconds=settings.series.quiet_time_s + 1)
    (running_job,) = sweep_complete_series(engine, DatabaseJobQueue(engine), settings.series.quiet_time_s, now=later)
    assert DatabaseJobQueue(engine).claim_next("worker-killed") == running_job
    send_datasets(settings, receiving[:2])
    scp.stop()  # the port is freed; nothing else of the first node is shut down
    engine.dispose()

    engine = init_db(settings.database_url)
    queue = DatabaseJobQueue(engine)
    scp = StorageSCP(settings, engine)
    scp.start()
    try:
        requeued = queue.requeue_running()
        send_datasets(settings, receiving[2:])
        analysis = FakeAnalysis()
        worker = Worker(settings, engine, queue, analyse=analysis, sender=send_files)
        assert worker.run_once() == running_job
        new_jobs = complete_and_run(settings, engine, queue, analysis)
    finally:
        scp.stop()

    assert requeued == [running_job]
    assert len(new_jobs) == 1
    assert [len(files) for files in analysis.input_files] == [3, 4]
    with session_scope(engine) as session:
        states = dict(session.execute(select(Job.id, Job.state)).all())
        attempts = session.get(Job, running_job).attempts
    assert states == {running_job: JobState.SUCCEEDED, new_jobs[0]: JobState.SUCCEEDED}
    assert attempts == 2
    assert len(list_audit_events(engine, kind=AuditKind.JOB_REQUEUED)) == 1
    engine.dispose()


# Whole-study sends and series selection


def _companion(path: Path, sop_class: str, modality: str, study_uid: str) -> Path:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "SYN-PHANTOM-1"
    if sop_class == SecondaryCaptureImageStorage:
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(64)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.save_as(path, enforce_file_format=True)
    return path


def _restudy(synthetic, study_uid: str) -> list[Path]:
    """Move a synthetic series into study ``study_uid``."""
    for path in synthetic.slice_files:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study_uid
        dataset.save_as(path)
    return synthetic.slice_files


def test_study_selection_skips_with_audited_reasons(node, tmp_path):
    from dicom_io.selection import SelectionRules

    settings, engine, queue = node
    study_uid = generate_uid()
    coronal = (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)
    series = {
        "axial": SeriesSpec(slice_count=12, first_position_mm=-15.0),
        "localizer": SeriesSpec(slice_count=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        "coronal": SeriesSpec(slice_count=10, row_cosine=coronal[0], column_cosine=coronal[1]),
        "reformat": SeriesSpec(slice_count=10, image_type=("DERIVED", "SECONDARY", "REFORMATTED")),
        "short": SeriesSpec(slice_count=3, first_position_mm=0.0),
    }
    files: list[Path] = []
    uids = {}
    for name, spec in series.items():
        synthetic = write_synthetic_series(tmp_path / name, spec)
        files += _restudy(synthetic, study_uid)
        uids[name] = synthetic.series_uid
    files.append(_companion(tmp_path / "sc.dcm", SecondaryCaptureImageStorage, "OT", study_uid))
    files.append(_companion(tmp_path / "dose.dcm", XRayRadiationDoseSRStorage, "SR", study_uid))

    statuses = send_files_as_stored(settings, files)
    analysis = FakeAnalysis()
    jobs = complete_and_run(settings, engine, queue, analysis, selection=SelectionRules(min_slices=5))

    assert statuses == [STATUS_SUCCESS] * len(files)
    assert len(jobs) == 1
    assert analysis.calls[0][0].name == uids["axial"]
    skipped = {event.series_instance_uid: event.message for event in list_audit_events(engine, kind=AuditKind.SERIES_SKIPPED)}
    assert len(skipped) == 6
    assert "ImageType values found: ORIGINAL\\PRIMARY\\LOCALIZER" in skipped[uids["localizer"]]
    assert "not an axial series: the slice normal is 90.0 degrees" in skipped[uids["coronal"]]
    assert "DERIVED\\SECONDARY\\REFORMATTED" in skipped[uids["reformat"]]
    assert "3 qualifying CT image(s), at least 5 required" in skipped[uids["short"]]
    messages = " ".join(skipped.values())
    assert "secondary capture" in messages
    assert "radiation dose report" in messages
    with session_scope(engine) as session:
        states = dict(session.execute(select(Series.series_instance_uid, Series.state)).all())
    assert sum(state == SeriesState.SKIPPED for state in states.values()) == 6
    assert states[uids["axial"]] == SeriesState.DONE


def test_enhanced_ct_skipped_with_message(node):
    from dicom_io.selection import SelectionRules

    settings, engine, queue = node
    enhanced = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eCT_Supplemental.dcm"
    if not enhanced.exists():
        pytest.skip(f"reference data {enhanced} is absent; place the shared data folder beside the repository")

    statuses = send_files_as_stored(settings, [enhanced])
    jobs = complete_and_run(settings, engine, queue, FakeAnalysis(), selection=SelectionRules())

    assert statuses == [STATUS_SUCCESS]
    assert jobs == []
    (event,) = list_audit_events(engine, kind=AuditKind.SERIES_SKIPPED)
    assert "Enhanced CT (multi-frame)" in event.message
    assert "send the series as single-frame CT Image Storage" in event.message


def test_selection_settings_from_toml(tmp_path):
    from node.config import ConfigError, load_settings

    config = tmp_path / "node.toml"
    config.write_text(
        '[selection]\nmin_slices = 20\nimage_type_values = ["AXIAL", "REFORMATTED"]\n'
        "orientation_tolerance_deg = 15\n",
        encoding="utf-8",
    )
    settings = load_settings(config, environ={})
    config.write_text("[selection]\norientation_tolerance_deg = 120\n", encoding="utf-8")

    assert settings.selection.min_slices == 20
    assert settings.selection.image_type_values == ["AXIAL", "REFORMATTED"]
    assert settings.selection.orientation_tolerance_deg == 15
    with pytest.raises(ConfigError, match="orientation_tolerance_deg"):
        load_settings(config, environ={})


# Character sets


@pytest.mark.parametrize(
    ("character_set", "patient_name", "description"),
    [
        pytest.param("ISO_IR 100", "Müller^Jürgen", "Leber näher", id="latin1"),
        pytest.param("ISO_IR 192", "Øresund^Zoë", "腹部 CT 肝臓", id="utf8"),
        pytest.param(["", "ISO 2022 IR 87"], "山田^太郎", "腹部造影", id="iso2022-japanese"),
        pytest.param("ISO_IR 126", "Παπαδόπουλος^Νίκος", "Κοιλία ήπαρ", id="greek"),
    ],
)
def test_character_sets_stored_not_logged(node, tmp_path, caplog, character_set, patient_name, description):
    settings, engine, queue = node
    spec = SeriesSpec(
        slice_count=3, first_position_mm=0.0, specific_character_set=character_set,
        patient_name=patient_name, series_description=description,
    )
    synthetic = write_synthetic_series(tmp_path / "sent", spec)

    with caplog.at_level("DEBUG"):
        statuses = send_files_as_stored(settings, synthetic.slice_files)
        time.sleep(0.1)

    assert statuses == [STATUS_SUCCESS] * 3
    with session_scope(engine) as session:
        assert session.scalar(select(Series.series_description)) == description
        assert session.scalar(select(Study.patient_id)) == "SYN-PHANTOM-1"
        spool_path = session.scalar(select(Instance.spool_path))
    assert str(pydicom.dcmread(spool_path).PatientName) == patient_name
    assert patient_name.split("^")[0] not in caplog.text, "a patient name was written to the log"
