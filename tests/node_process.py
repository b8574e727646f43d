"""A whole node as a separate ``livernode serve`` process, and a Storage SCP playing the PACS.

:func:`run_round_trip` is the expensive real analysis shared by the round-trip and browser
tests through the session fixture ``round_trip`` in ``conftest.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    CTImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.db import init_db, session_scope
from node.models import Job, JobState
from node.web.auth import hash_password
from tests.pg import PostgresUnavailable, free_port, postgres_cluster

PACS_AE_TITLE = "TESTPACS"
NODE_AE_TITLE = "LIVERNODE"

#: Seconds to wait for SEG and SR after the last instance was sent (the analysis takes minutes).
RESULT_TIMEOUT_S = 1200

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"

#: Login of the node's web page in the round trip.
WEB_USER = "radiologist"
WEB_PASSWORD = "round-trip password"


class ReceivingPacs:
    """A storage SCP on 127.0.0.1 that keeps every received SEG and SR as a file.

    It also responds to Study Root C-FIND at IMAGE level from the received files, so the node can
    confirm its delivery.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.received: list[Path] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=PACS_AE_TITLE)
        for sop_class in (
            SegmentationStorage,
            Comprehensive3DSRStorage,
            Verification,
            StudyRootQueryRetrieveInformationModelFind,
        ):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)],
        )

    def _store(self, event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        path = self.folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(path)
        return 0x0000

    def _find(self, event: evt.Event):
        query = event.identifier
        with self._lock:
            paths = list(self.received)
        for path in paths:
            stored = pydicom.dcmread(path, stop_before_pixels=True)
            if query.get("QueryRetrieveLevel") != "IMAGE":
                continue
            if query.get("StudyInstanceUID") not in ("", None, stored.StudyInstanceUID):
                continue
            if query.get("SeriesInstanceUID") not in ("", None, stored.SeriesInstanceUID):
                continue
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID = stored.StudyInstanceUID
            match.SeriesInstanceUID = stored.SeriesInstanceUID
            match.SOPInstanceUID = stored.SOPInstanceUID
            match.SOPClassUID = stored.SOPClassUID
            yield 0xFF00, match
        yield 0x0000, None

    def sop_classes(self) -> set[str]:
        with self._lock:
            paths = list(self.received)
        return {pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID for path in paths}

    def shutdown(self) -> None:
        self._server.shutdown()


def start_serve(config: Path, log_path: Path) -> subprocess.Popen:
    """Start ``livernode --config CONFIG serve`` with its output appended to ``log_path``."""
    with open(log_path, "a", encoding="utf-8") as log:
        return subprocess.Popen(
            [sys.executable, "-c", "from node.cli import main; raise SystemExit(main())",
             "--config", str(config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stop_serve(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Stop a ``livernode serve`` process with SIGTERM, or kill it after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_for_echo(port: int, deadline_s: float = 120.0) -> None:
    """Wait until the node responds to C-ECHO on ``port``."""
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
    raise AssertionError(f"the node did not respond to C-ECHO on 127.0.0.1:{port} within {deadline_s} s")


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


@contextmanager
def run_round_trip(work: Path, series_folder: Path, weights_cache: Path) -> Iterator[dict]:
    """Run ``livernode serve``, send the series, wait for SEG and SR; yield what checks need.

    The node also serves its web page on a free port, with the user :data:`WEB_USER`.
    """
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
        web_port = free_port()
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
                    "[web]",
                    "enabled = true",
                    f"port = {web_port}",
                    f'users = {{ {WEB_USER} = "{hash_password(WEB_PASSWORD)}" }}',
                    "",
                ]
            ),
            encoding="utf-8",
        )
        log_path = work / "serve.log"
        process = start_serve(config, log_path)
        stack.callback(stop_serve, process)
        wait_for_echo(node_port)
        statuses = send_series(series_folder, node_port)

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
            "series_folder": series_folder,
            "log": log_path,
            "web_url": f"http://127.0.0.1:{web_port}",
        }
        stop_serve(process)
        assert process.returncode == 0, log_path.read_text()[-4000:]
        engine.dispose()
