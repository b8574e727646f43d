"""Confirmed delivery: C-STORE and STOW-RS send-back, failures, retries and ``livernode resend``.

What is under test here is delivery, not the networks: the worker runs the stand-in
analysis of ``tests/test_worker.py`` (:class:`FakeAnalysis`, placeholder SEG and SR files),
because the real analysis takes minutes per series. The series arrives through the real SCP,
results leave through the real senders to a real Orthanc (Debian's ``orthanc`` and
``orthanc-dicomweb``) or to pynetdicom SCPs on 127.0.0.1. The STOW-RS response parser is also
fed crafted responses from a small HTTP server, because a real Orthanc never responds with a
Failed SOP Sequence for valid files.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import Engine

from dicom_io.dicomweb import stow_files
from node.audit import list_audit_events
from node.cli import main
from node.config import Settings
from node.db import init_db
from node.jobs import DatabaseJobQueue
from node.models import AuditKind, JobState, utc_now
from node.scheduler import sweep_delivery_retries
from node.scp import StorageSCP
from node.worker import Worker
from tests.orthanc_server import ORTHANC_AE_TITLE, USERNAME, OrthancUnavailable, orthanc_server
from tests.pg import free_port
from tests.test_scp import make_settings
from tests.test_worker import FakeAnalysis, load_job, receive_and_complete

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

#: Delivery attempts in these tests: the first one and two retries.
SEND_RETRIES = 2
TINY_BACKOFF_S = 0.05


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Engine, DatabaseJobQueue]]:
    """A node SCP with SQLite, tiny retry back-offs and short confirmation timeouts."""
    settings = make_settings(tmp_path)
    destination = settings.destination
    destination.send_retries = SEND_RETRIES
    destination.retry_backoff_s = TINY_BACKOFF_S
    destination.send_timeout_s = 5
    destination.confirm_timeout_s = 15
    destination.confirm_interval_s = 0.3
    engine = init_db(settings.database_url)
    queue = DatabaseJobQueue(engine)
    scp = StorageSCP(settings, engine)
    scp.start()
    yield settings, engine, queue
    scp.stop()
    engine.dispose()


def require_orthanc():
    """Return the :func:`orthanc_server` factory, or skip when Orthanc is not installed."""
    try:
        from tests.orthanc_server import find_orthanc

        find_orthanc()
    except OrthancUnavailable as error:
        pytest.skip(str(error))
    return orthanc_server


def deliver_until_settled(worker: Worker, engine: Engine, queue: DatabaseJobQueue, job_id: int) -> str:
    """Run the job, then each due delivery retry, until no retry is left; return the state."""
    assert worker.run_once() == job_id
    for _ in range(SEND_RETRIES + 2):
        job = load_job(engine, job_id)
        if job.state != JobState.DELIVERY_FAILED or job.next_delivery_at is None:
            return job.state
        time.sleep(TINY_BACKOFF_S * 2 ** SEND_RETRIES)
        assert sweep_delivery_retries(engine, queue, now=utc_now()) == [job_id]
        assert worker.run_once() == job_id
    return load_job(engine, job_id).state


def write_config(settings: Settings, path: Path, destination_lines: list[str]) -> Path:
    """Write a TOML file with the node's folders and database and the given destination."""
    lines = [
        f'data_dir = "{settings.data_dir}"',
        f'database_url = "{settings.database_url}"',
        "[destination]",
        *destination_lines,
        "send_timeout_s = 5",
        "confirm_timeout_s = 15",
        "confirm_interval_s = 0.3",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def dicom_destination(settings: Settings, port: int) -> list[str]:
    settings.destination.kind = "dicom"
    settings.destination.ae_title = ORTHANC_AE_TITLE
    settings.destination.host = "127.0.0.1"
    settings.destination.port = port
    return ['kind = "dicom"', f'ae_title = "{ORTHANC_AE_TITLE}"', 'host = "127.0.0.1"', f"port = {port}"]


def output_sop_uids(engine: Engine, job_id: int) -> set[str]:
    job = load_job(engine, job_id)
    return {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in job.output_paths.values() if path and path.endswith(".dcm")}


def orthanc_sop_uids(orthanc, study_uid: str) -> set[str]:
    """SOP Instance UIDs Orthanc lists in the study, through QIDO-RS."""
    found = set()
    for match in orthanc_qido(orthanc, f"/studies/{study_uid}/instances"):
        found.update(match["00080018"]["Value"])
    return found


def orthanc_qido(orthanc, path: str) -> list[dict]:
    import requests

    response = requests.get(orthanc.dicomweb_url + path, auth=orthanc.auth, timeout=30)
    if response.status_code == 204 or not response.content:
        return []
    response.raise_for_status()
    return response.json()


def test_down_destination_fails_then_resend_delivers(node, tmp_path: Path) -> None:
    settings, engine, queue = node
    orthanc_factory = require_orthanc()
    port = free_port()  # nothing listens there until Orthanc starts below
    destination_lines = dicom_destination(settings, port)
    worker = Worker(settings, engine, queue, analyse=FakeAnalysis())
    datasets, job_id = receive_and_complete(settings, engine, queue)
    study_uid = str(datasets[0].StudyInstanceUID)

    state = deliver_until_settled(worker, engine, queue, job_id)

    job = load_job(engine, job_id)
    assert state == JobState.DELIVERY_FAILED
    assert job.delivery_attempts == SEND_RETRIES + 1
    assert job.next_delivery_at is None
    assert "could not connect" in job.error
    failures = list_audit_events(engine, kind=AuditKind.SEND_FAILED, job_id=job_id)
    assert len(failures) == SEND_RETRIES + 1
    assert "no retries left" in failures[-1].message
    assert "could not connect" in failures[-1].message
    assert all(Path(path).is_file() for path in job.output_paths.values() if path)

    config = write_config(settings, tmp_path / "resend.toml", destination_lines)
    with orthanc_factory(node_port=settings.scp.port, extra={"DicomPort": port}) as orthanc:
        exit_code = main(["--config", str(config), "resend", study_uid])
        in_orthanc = orthanc_sop_uids(orthanc, study_uid)

    job = load_job(engine, job_id)
    assert exit_code == 0
    assert job.state == JobState.SUCCEEDED
    assert job.delivered_at is not None
    assert output_sop_uids(engine, job_id) <= in_orthanc
    confirmed = list_audit_events(engine, kind=AuditKind.DELIVERY_CONFIRMED, job_id=job_id)
    assert len(confirmed) == 1
    assert list_audit_events(engine, kind=AuditKind.RESEND_REQUESTED, job_id=job_id)


class SrOnlySCP:
    """Storage SCP that accepts Comprehensive 3D SR but not Segmentation Storage."""

    def __init__(self, port: int) -> None:
        self.received: list[str] = []
        ae = AE(ae_title=ORTHANC_AE_TITLE)
        ae.add_supported_context(Comprehensive3DSRStorage)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000


def test_destination_refusing_seg_fails_then_resend_delivers(node, tmp_path: Path) -> None:
    settings, engine, queue = node
    orthanc_factory = require_orthanc()
    port = free_port()
    destination_lines = dicom_destination(settings, port)
    worker = Worker(settings, engine, queue, analyse=FakeAnalysis())
    datasets, job_id = receive_and_complete(settings, engine, queue)
    study_uid = str(datasets[0].StudyInstanceUID)

    refusing = SrOnlySCP(port)
    try:
        state = deliver_until_settled(worker, engine, queue, job_id)
    finally:
        refusing.server.shutdown()

    job = load_job(engine, job_id)
    print(f"refused delivery reason: {job.error}")
    assert state == JobState.DELIVERY_FAILED
    assert job.delivery_attempts == SEND_RETRIES + 1
    assert "Segmentation Storage" in job.error
    failures = list_audit_events(engine, kind=AuditKind.SEND_FAILED, job_id=job_id)
    assert "no retries left" in failures[-1].message
    assert "Segmentation Storage" in failures[-1].message
    assert not list_audit_events(engine, kind=AuditKind.DELIVERY_CONFIRMED, job_id=job_id)

    config = write_config(settings, tmp_path / "resend.toml", destination_lines)
    with orthanc_factory(node_port=settings.scp.port, extra={"DicomPort": port}) as orthanc:
        exit_code = main(["--config", str(config), "resend", study_uid])
        in_orthanc = orthanc_sop_uids(orthanc, study_uid)

    assert exit_code == 0
    assert load_job(engine, job_id).state == JobState.SUCCEEDED
    assert output_sop_uids(engine, job_id) <= in_orthanc


def test_stow_rs_delivery_confirmed_by_qido(node, tmp_path: Path) -> None:
    settings, engine, queue = node
    orthanc_factory = require_orthanc()
    with orthanc_factory() as orthanc:
        password_file = tmp_path / "orthanc-password"
        password_file.write_text(orthanc.password + "\n", encoding="utf-8")
        destination = settings.destination
        destination.kind = "dicomweb"
        destination.url = orthanc.dicomweb_url
        destination.username = USERNAME
        destination.password_file = password_file
        settings.validate()
        worker = Worker(settings, engine, queue, analyse=FakeAnalysis())
        datasets, job_id = receive_and_complete(settings, engine, queue)

        state = deliver_until_settled(worker, engine, queue, job_id)
        in_orthanc = orthanc_sop_uids(orthanc, str(datasets[0].StudyInstanceUID))

    job = load_job(engine, job_id)
    assert state == JobState.SUCCEEDED
    assert job.delivery_attempts == 1
    assert output_sop_uids(engine, job_id) <= in_orthanc
    assert {record["status"] for record in job.delivery} == {"0x0000"}
    confirmed = list_audit_events(engine, kind=AuditKind.DELIVERY_CONFIRMED, job_id=job_id)
    assert len(confirmed) == 1
    assert "DICOMweb" in confirmed[0].message


def test_stow_rs_wrong_password_fails(node, tmp_path: Path) -> None:
    settings, engine, queue = node
    orthanc_factory = require_orthanc()
    with orthanc_factory() as orthanc:
        destination = settings.destination
        destination.kind = "dicomweb"
        destination.url = orthanc.dicomweb_url
        destination.username = USERNAME
        destination.password = "not-the-password"
        worker = Worker(settings, engine, queue, analyse=FakeAnalysis())
        _, job_id = receive_and_complete(settings, engine, queue)

        state = deliver_until_settled(worker, engine, queue, job_id)

    job = load_job(engine, job_id)
    assert state == JobState.DELIVERY_FAILED
    assert "HTTP 401" in job.error
    assert "no retries left" in list_audit_events(engine, kind=AuditKind.SEND_FAILED, job_id=job_id)[-1].message


class CraftedStowServer:
    """HTTP server on 127.0.0.1 responding to every POST with one fixed STOW-RS response."""

    def __init__(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _placeholder_outputs(tmp_path: Path) -> list[Path]:
    from tests.test_scp import make_ct_series

    source = make_ct_series(1)[0]
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    source.save_as(source_dir / "ct.dcm", enforce_file_format=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    outputs = FakeAnalysis()(source_dir, out_dir, Settings(data_dir=tmp_path))["outputs"]
    return [outputs["seg"], outputs["sr"]]


def _referenced(path: Path) -> dict:
    dataset = dcmread(path, stop_before_pixels=True)
    return {
        "00081150": {"vr": "UI", "Value": [str(dataset.SOPClassUID)]},
        "00081155": {"vr": "UI", "Value": [str(dataset.SOPInstanceUID)]},
    }


def test_stow_failed_sop_sequence_is_failure_despite_http_200(tmp_path: Path) -> None:
    seg, sr = _placeholder_outputs(tmp_path)
    failed_seg = {**_referenced(seg), "00081197": {"vr": "US", "Value": [0x0122]}}
    body = {
        "00081198": {"vr": "SQ", "Value": [failed_seg]},
        "00081199": {"vr": "SQ", "Value": [_referenced(sr)]},
    }
    server = CraftedStowServer(200, body)
    try:
        results = stow_files([seg, sr], url=server.url)
    finally:
        server.close()

    assert [result.stored for result in results] == [False, True]
    assert results[0].status == 0x0122
    assert "Failed SOP Sequence" in results[0].message


def test_stow_instance_missing_from_response_is_failure(tmp_path: Path) -> None:
    seg, sr = _placeholder_outputs(tmp_path)
    body = {"00081199": {"vr": "SQ", "Value": [_referenced(seg)]}}
    server = CraftedStowServer(200, body)
    try:
        results = stow_files([seg, sr], url=server.url)
    finally:
        server.close()

    assert [result.stored for result in results] == [True, False]
    assert "neither the Referenced nor the Failed SOP Sequence" in results[1].message


def test_stow_conflict_response_is_parsed(tmp_path: Path) -> None:
    seg, sr = _placeholder_outputs(tmp_path)
    failed = [{**_referenced(path), "00081197": {"vr": "US", "Value": [0xA700]}} for path in (seg, sr)]
    server = CraftedStowServer(409, {"00081198": {"vr": "SQ", "Value": failed}})
    try:
        results = stow_files([seg, sr], url=server.url)
    finally:
        server.close()

    assert [result.stored for result in results] == [False, False]
    assert {result.status for result in results} == {0xA700}
