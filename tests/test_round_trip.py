"""DICOM round trip: a CT series in over C-STORE, SEG and SR back out, database rows checked.

``livernode serve`` runs as a separate process with the real networks; a pynetdicom storage
SCP in the test plays the PACS. The database is a throwaway PostgreSQL cluster when its
binaries are installed (CI installs them), otherwise the embedded SQLite default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    CTImageStorage,
    SegmentationStorage,
    Verification,
)
from sqlalchemy import func, select

from dicom_io.sr_writer import read_sr_measurements
from node.db import init_db, session_scope
from node.models import AuditEvent, Instance, Job, JobState, Series, SeriesState, Study
from tests.conftest import REFERENCE_LIVER_LABEL, TOTALSEG, canonical_array, dice
from tests.pg import PostgresUnavailable, free_port, postgres_cluster

pytestmark = pytest.mark.slow

PACS_AE_TITLE = "TESTPACS"
NODE_AE_TITLE = "LIVERNODE"

#: Seconds to wait for SEG and SR after the last instance was sent (the analysis takes minutes).
RESULT_TIMEOUT_S = 1200

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


class ReceivingPacs:
    """A storage SCP on 127.0.0.1 that keeps every received SEG and SR as a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.received: list[Path] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=PACS_AE_TITLE)
        for sop_class in (SegmentationStorage, Comprehensive3DSRStorage, Verification):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        path = self.folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(path)
        return 0x0000

    def sop_classes(self) -> set[str]:
        with self._lock:
            paths = list(self.received)
        return {pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID for path in paths}

    def shutdown(self) -> None:
        self._server.shutdown()


def wait_for_echo(port: int, deadline_s: float = 120.0) -> None:
    """Wait until the node answers C-ECHO on ``port``."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    stop_at = time.monotonic() + deadline_s
    while time.monotonic() < stop_at:
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE_TITLE)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0x0000:
                return
        time.sleep(1.0)
    raise AssertionError(f"the node did not answer C-ECHO on 127.0.0.1:{port} within {deadline_s} s")


def send_series(folder: Path, port: int) -> list[int]:
    """Send every file of ``folder`` to the node over one association; return the statuses."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE_TITLE)
    assert assoc.is_established, "association with the node was not established"
    statuses = []
    try:
        for path in sorted(folder.iterdir()):
            statuses.append(int(assoc.send_c_store(pydicom.dcmread(path)).Status))
    finally:
        assoc.release()
    return statuses


@pytest.fixture(scope="module")
def round_trip(
    tmp_path_factory: pytest.TempPathFactory, example_dicom_series: Path, weights_cache: Path
) -> Iterator[dict]:
    """Run the node, send the series, wait for SEG and SR; yield what the checks need."""
    work = tmp_path_factory.mktemp("round-trip")
    with ExitStack() as stack:
        try:
            database_url = stack.enter_context(postgres_cluster())
            database = "PostgreSQL"
        except PostgresUnavailable as error:
            database_url = f"sqlite:///{work / 'livernode.db'}"
            database = f"SQLite ({error})"
        print(f"round trip database: {database}")

        received = work / "pacs"
        received.mkdir()
        pacs = ReceivingPacs(received)
        stack.callback(pacs.shutdown)

        node_port = free_port()
        config = work / "livernode.toml"
        config.write_text(
            "\n".join(
                [
                    f'data_dir = "{work / "data"}"',
                    f'weights_cache_dir = "{weights_cache}"',
                    f'database_url = "{database_url}"',
                    "[scp]",
                    f'ae_title = "{NODE_AE_TITLE}"',
                    f"port = {node_port}",
                    "[series]",
                    "quiet_time_s = 3",
                    "sweep_interval_s = 1",
                    "[destination]",
                    'kind = "dicom"',
                    f'ae_title = "{PACS_AE_TITLE}"',
                    'host = "127.0.0.1"',
                    f"port = {pacs.port}",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        log_path = work / "serve.log"
        log = stack.enter_context(open(log_path, "w", encoding="utf-8"))
        process = subprocess.Popen(
            [sys.executable, "-c", "from node.cli import main; raise SystemExit(main())",
             "--config", str(config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        def stop_node() -> None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()

        stack.callback(stop_node)
        wait_for_echo(node_port)
        statuses = send_series(example_dicom_series, node_port)

        stop_at = time.monotonic() + RESULT_TIMEOUT_S
        while pacs.sop_classes() != {SEG_SOP_CLASS, COMPREHENSIVE_3D_SR_SOP_CLASS}:
            if process.poll() is not None:
                raise AssertionError(f"livernode serve exited early:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > stop_at:
                raise AssertionError(f"no SEG and SR within {RESULT_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2.0)

        # The job row is written after the send completes; give the worker a moment.
        engine = init_db(database_url)
        for _ in range(30):
            with session_scope(engine) as session:
                state = session.scalar(select(Job.state))
            if state == JobState.SUCCEEDED:
                break
            time.sleep(1.0)

        yield {
            "engine": engine,
            "statuses": statuses,
            "received": list(pacs.received),
            "series_folder": example_dicom_series,
            "log": log_path,
        }
        stop_node()
        assert process.returncode == 0, log_path.read_text()[-4000:]
        engine.dispose()


def test_round_trip_statuses(round_trip: dict) -> None:
    assert round_trip["statuses"]
    assert set(round_trip["statuses"]) == {0x0000}


def test_round_trip_seg_and_sr_in_source_study(round_trip: dict) -> None:
    source = pydicom.dcmread(next(round_trip["series_folder"].iterdir()), stop_before_pixels=True)
    received = [pydicom.dcmread(path, stop_before_pixels=True) for path in round_trip["received"]]
    assert sorted(ds.SOPClassUID for ds in received) == sorted([SEG_SOP_CLASS, COMPREHENSIVE_3D_SR_SOP_CLASS])
    for dataset in received:
        assert dataset.StudyInstanceUID == source.StudyInstanceUID
        assert dataset.PatientID == source.PatientID
    seg = next(ds for ds in received if ds.SOPClassUID == SEG_SOP_CLASS)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


def test_round_trip_database_rows(round_trip: dict) -> None:
    instance_count = len(list(round_trip["series_folder"].iterdir()))
    with session_scope(round_trip["engine"]) as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        series = session.scalars(select(Series)).one()
        assert session.scalar(select(func.count()).select_from(Instance)) == instance_count
        job = session.scalars(select(Job)).one()
        kinds = {event.kind for event in session.scalars(select(AuditEvent))}
        job_state, job_result, stage_seconds = job.state, job.result, job.stage_seconds
        series_state = series.state

    assert job_state == JobState.SUCCEEDED
    assert series_state == SeriesState.DONE
    assert {"received", "series_complete", "job_started", "job_finished", "sent"} <= kinds
    assert job_result["liver_volume_ml"] > 0
    assert stage_seconds
    print(f"round trip stage seconds: {stage_seconds}; peak RSS {job_result['peak_rss_mb']} MiB")


def test_round_trip_volumes_and_dice(round_trip: dict) -> None:
    with session_scope(round_trip["engine"]) as session:
        job = session.scalars(select(Job)).one()
        result, output_dir = job.result, Path(job.output_dir)

    sr_path = next(
        path for path in round_trip["received"]
        if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == COMPREHENSIVE_3D_SR_SOP_CLASS
    )
    measured = read_sr_measurements(sr_path)
    on_disk = json.loads((output_dir / "result.json").read_text())
    for key in ("liver_volume_ml", "tumor_volume_ml", "tumor_burden_percent"):
        assert measured[key] == pytest.approx(result[key], abs=1e-6), key
        assert on_disk[key] == result[key], key

    reference = canonical_array(TOTALSEG / "example_seg.nii.gz") == REFERENCE_LIVER_LABEL
    labels = canonical_array(output_dir / "mask.nii.gz")
    score = dice(labels >= 1, reference)
    print(f"round trip liver Dice: {score:.4f}")
    assert score >= 0.94
