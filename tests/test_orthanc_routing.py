"""End to end with a real Orthanc: auto-routing to the node and SEG/SR back, by C-STORE and STOW-RS.

A real Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) runs with the project's
``orthanc/`` configuration and routing script on loopback ports. The test stores the real CT
series in Orthanc over C-STORE; Orthanc routes it to ``livernode serve`` by itself, the node
analyses it with the real networks and sends SEG and SR back with C-STORE, confirmed by
C-FIND. To keep to one analysis, the STOW-RS path is then run by ``livernode resend`` with a
DICOMweb destination, after the SEG and SR were deleted from Orthanc, confirmed by QIDO-RS.
The database is a throwaway PostgreSQL cluster when its binaries are installed.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dicom_io.sr_writer import read_sr_measurements
from node.db import init_db, session_scope
from node.models import AuditEvent, AuditKind, Instance, Job, JobState
from tests.node_process import start_serve, stop_serve
from tests.orthanc_server import ORTHANC_AE_TITLE, USERNAME, OrthancServer, OrthancUnavailable, orthanc_server
from tests.pg import PostgresUnavailable, free_port, postgres_cluster

pytestmark = pytest.mark.slow

NODE_AE_TITLE = "LIVERNODE"
MODALITY_AE_TITLE = "CTSCANNER"

#: Seconds from storing the CT in Orthanc to SEG and SR in Orthanc (the analysis takes minutes).
RESULT_TIMEOUT_S = 1200

#: Seconds to wait for Orthanc's routing script to run again on the study once results arrived.
RESTABLE_TIMEOUT_S = 60

ROUTED_LINE = "sent to modality livernode"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def store_in_orthanc(folder: Path, orthanc: OrthancServer) -> list[int]:
    """Send every file of ``folder`` to Orthanc over one association; return the statuses."""
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=ORTHANC_AE_TITLE)
    assert assoc.is_established, "association with Orthanc was not established"
    statuses = []
    try:
        for path in sorted(folder.iterdir()):
            statuses.append(int(assoc.send_c_store(pydicom.dcmread(path)).Status))
    finally:
        assoc.release()
    return statuses


def result_series(orthanc: OrthancServer, study_uid: str) -> dict[str, dict]:
    """Return the SEG and SR series Orthanc lists in the study through QIDO-RS, by modality."""
    response = requests.get(
        f"{orthanc.dicomweb_url}/studies/{study_uid}/series", auth=orthanc.auth, timeout=30
    )
    if response.status_code == 204 or not response.content:
        return {}
    response.raise_for_status()
    found = {}
    for match in response.json():
        modality = match.get("00080060", {}).get("Value", [""])[0]
        if modality in ("SEG", "SR"):
            found[modality] = match
    return found


def orthanc_instances(orthanc: OrthancServer, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    """Download the instances of one modality of the study from Orthanc's REST API."""
    series_ids = orthanc.post(
        "/tools/find",
        {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}},
    )
    datasets = []
    for series_id in series_ids:
        for instance in orthanc.get(f"/series/{series_id}/instances"):
            response = requests.get(f"{orthanc.url}/instances/{instance['ID']}/file", auth=orthanc.auth, timeout=60)
            response.raise_for_status()
            datasets.append(pydicom.dcmread(io.BytesIO(response.content)))
    return datasets


def wait_for(condition, timeout_s: float, what: str, diagnostics) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s:\n{diagnostics()}")
        time.sleep(2.0)


def routing_lines(orthanc: OrthancServer) -> list[str]:
    return [line for line in orthanc.log_text().splitlines() if "LiverNodeRouting:" in line]


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, example_dicom_series: Path, weights_cache: Path) -> Iterator[dict]:
    """Orthanc routes the real CT to the node; yields once SEG and SR are back in Orthanc."""
    work = tmp_path_factory.mktemp("orthanc-routing")
    with ExitStack() as stack:
        try:
            database_url = stack.enter_context(postgres_cluster())
            database = "PostgreSQL"
        except PostgresUnavailable as error:
            database_url = f"sqlite:///{work / 'livernode.db'}"
            database = f"SQLite ({error})"
        print(f"orthanc routing database: {database}")

        node_port = free_port()
        try:
            orthanc = stack.enter_context(orthanc_server(node_ae_title=NODE_AE_TITLE, node_port=node_port))
        except OrthancUnavailable as error:
            pytest.skip(str(error))

        password_file = work / "orthanc-password"
        password_file.write_text(orthanc.password + "\n", encoding="utf-8")
        common = [
            f'data_dir = "{work / "data"}"',
            f'weights_cache_dir = "{weights_cache}"',
            f'database_url = "{database_url}"',
            "[scp]",
            f'ae_title = "{NODE_AE_TITLE}"',
            f"port = {node_port}",
            f'allowed_peers = [{{ ae_title = "{ORTHANC_AE_TITLE}", host = "127.0.0.1" }}]',
            "[series]",
            "quiet_time_s = 3",
            "sweep_interval_s = 1",
            "[destination]",
            "send_retries = 2",
            "retry_backoff_s = 2",
            "confirm_timeout_s = 60",
            "confirm_interval_s = 1",
        ]
        dicom_config = work / "livernode.toml"
        dicom_config.write_text(
            "\n".join(
                common
                + ['kind = "dicom"', f'ae_title = "{ORTHANC_AE_TITLE}"', 'host = "127.0.0.1"', f"port = {orthanc.dicom_port}", ""]
            ),
            encoding="utf-8",
        )
        dicomweb_config = work / "livernode-dicomweb.toml"
        dicomweb_config.write_text(
            "\n".join(
                common
                + [
                    'kind = "dicomweb"',
                    f'url = "{orthanc.dicomweb_url}"',
                    f'username = "{USERNAME}"',
                    f'password_file = "{password_file}"',
                    "",
                ]
            ),
            encoding="utf-8",
        )

        log_path = work / "serve.log"
        process = start_serve(dicom_config, log_path)
        stack.callback(stop_serve, process)

        def diagnostics() -> str:
            return (
                f"node log:\n{log_path.read_text()[-3000:]}\nOrthanc routing:\n"
                + "\n".join(routing_lines(orthanc)[-20:])
            )

        # Orthanc's own C-ECHO to the node proves the node accepts Orthanc as a peer.
        def node_answers_orthanc() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"livernode serve exited early:\n{diagnostics()}")
            try:
                orthanc.post("/modalities/livernode/echo", {})
                return True
            except requests.HTTPError:
                return False

        wait_for(node_answers_orthanc, 120, "C-ECHO from Orthanc to the node", diagnostics)

        source = pydicom.dcmread(next(example_dicom_series.iterdir()), stop_before_pixels=True)
        study_uid = str(source.StudyInstanceUID)
        started = time.monotonic()
        statuses = store_in_orthanc(example_dicom_series, orthanc)

        def results_back() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"livernode serve exited early:\n{diagnostics()}")
            return set(result_series(orthanc, study_uid)) == {"SEG", "SR"}

        wait_for(results_back, RESULT_TIMEOUT_S, "SEG and SR in Orthanc", diagnostics)
        print(f"CT stored in Orthanc to SEG and SR back in Orthanc: {time.monotonic() - started:.0f} s")

        engine = stack.enter_context(_engine(database_url))

        def job_succeeded() -> bool:
            with session_scope(engine) as session:
                return session.scalar(select(Job.state)) == JobState.SUCCEEDED

        wait_for(job_succeeded, 60, "job state succeeded", diagnostics)

        # The results make the study change, so Orthanc runs the routing script again.
        result_uids = {modality: match["0020000E"]["Value"][0] for modality, match in result_series(orthanc, study_uid).items()}

        def results_seen_by_routing() -> bool:
            text = "\n".join(routing_lines(orthanc))
            return all(f"series {uid} not routed" in text for uid in result_uids.values())

        wait_for(results_seen_by_routing, RESTABLE_TIMEOUT_S, "routing script run on the results", diagnostics)

        yield {
            "orthanc": orthanc,
            "engine": engine,
            "statuses": statuses,
            "source": source,
            "study_uid": study_uid,
            "series_folder": example_dicom_series,
            "dicomweb_config": dicomweb_config,
            "log": log_path,
            "process": process,
        }
        stop_serve(process)
        assert process.returncode == 0, log_path.read_text()[-4000:]


class _engine:
    """Context manager around :func:`init_db` that disposes of the engine."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self):
        self.engine = init_db(self.url)
        return self.engine

    def __exit__(self, *exc_info: object) -> None:
        self.engine.dispose()


def test_ct_stored_in_orthanc(routed: dict) -> None:
    assert routed["statuses"] and set(routed["statuses"]) == {0x0000}


def test_seg_and_sr_in_orthanc_reference_the_ct(routed: dict) -> None:
    orthanc, study_uid, source = routed["orthanc"], routed["study_uid"], routed["source"]
    (seg,) = orthanc_instances(orthanc, study_uid, "SEG")
    (sr,) = orthanc_instances(orthanc, study_uid, "SR")

    assert seg.SOPClassUID == SEG_SOP_CLASS
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR_SOP_CLASS
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    evidence = {
        item.SeriesInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for item in study.ReferencedSeriesSequence
    }
    assert source.SeriesInstanceUID in evidence

    with session_scope(routed["engine"]) as session:
        job = session.scalars(select(Job)).one()
        result = job.result
    measured = read_sr_measurements(sr)
    for key in ("liver_volume_ml", "tumor_volume_ml", "tumor_burden_percent"):
        assert measured[key] == pytest.approx(result[key], abs=1e-6), key
    print(
        f"volumes in Orthanc's SR: liver {measured['liver_volume_ml']:.1f} mL, tumour "
        f"{measured['tumor_volume_ml']:.1f} mL, burden {measured['tumor_burden_percent']:.2f} %"
    )


def test_each_ct_instance_routed_once(routed: dict) -> None:
    orthanc = routed["orthanc"]
    instance_count = len(list(routed["series_folder"].iterdir()))
    lines = routing_lines(orthanc)

    assert sum(ROUTED_LINE in line for line in lines) == 1, "\n".join(lines)
    with session_scope(routed["engine"]) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == instance_count
        duplicates = session.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.kind == AuditKind.DUPLICATE)
        )
        calling = set(session.scalars(select(Instance.calling_ae_title).distinct()))
    assert duplicates == 0
    assert calling == {ORTHANC_AE_TITLE}

    (ct_series,) = orthanc.post(
        "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": routed["study_uid"], "Modality": "CT"}}
    )
    assert "LiverNodeRouted" in orthanc.get(f"/series/{ct_series}/metadata")


def test_job_and_audit_rows(routed: dict) -> None:
    with session_scope(routed["engine"]) as session:
        job = session.scalars(select(Job)).one()
        kinds = {event.kind for event in session.scalars(select(AuditEvent))}
        confirmed = session.scalars(
            select(AuditEvent.message).where(AuditEvent.kind == AuditKind.DELIVERY_CONFIRMED)
        ).all()
        state, delivered_at, result = job.state, job.delivered_at, job.result

    assert state == JobState.SUCCEEDED
    assert delivered_at is not None
    assert result["liver_volume_ml"] > 0
    assert {"received", "series_complete", "job_started", "job_finished", "sent", "delivery_confirmed"} <= kinds
    assert len(confirmed) == 1
    assert f"{ORTHANC_AE_TITLE}@127.0.0.1" in confirmed[0]


def test_stow_rs_send_back_with_resend(routed: dict) -> None:
    orthanc, study_uid = routed["orthanc"], routed["study_uid"]
    before = {modality: match["0020000E"]["Value"][0] for modality, match in result_series(orthanc, study_uid).items()}
    for modality in ("SEG", "SR"):
        for series_id in orthanc.post(
            "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}}
        ):
            orthanc.delete(f"/series/{series_id}")
    assert result_series(orthanc, study_uid) == {}

    completed = subprocess.run(
        [sys.executable, "-c", "from node.cli import main; raise SystemExit(main())",
         "--config", str(routed["dicomweb_config"]), "resend", study_uid],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    after = {modality: match["0020000E"]["Value"][0] for modality, match in result_series(orthanc, study_uid).items()}
    assert after == before
    with session_scope(routed["engine"]) as session:
        job = session.scalars(select(Job)).one()
        confirmed = session.scalars(
            select(AuditEvent.message).where(AuditEvent.kind == AuditKind.DELIVERY_CONFIRMED).order_by(AuditEvent.id)
        ).all()
        delivery = job.delivery
    assert job.state == JobState.SUCCEEDED
    assert "DICOMweb" in confirmed[-1]
    assert {record["status"] for record in delivery} == {"0x0000"}
    print(f"STOW-RS resend: {completed.stdout.strip()}")
