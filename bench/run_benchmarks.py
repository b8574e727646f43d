"""Performance benchmarks of the node on realistic CT series; regenerates ``docs/benchmarks.md``.

Inputs are derived from the real abdominal CT ``../shared/data/totalseg-example/example_ct.nii.gz``:
resampled to 512 x 512 pixels of 0.8 mm (air around the body) with N = 100, 300, 600 and 1000
slices over its 336 mm, written as CT series with :func:`dicom_io.volume_writer.write_ct_series`
and kept in a cache folder.

Measured, all on the same inputs in one run:

- end-to-end latency through a real ``livernode serve`` process: from the moment the sender received
  the response to the last C-STORE until the destination (a pynetdicom storage SCP with C-FIND)
  returned the SEG and the SR in response to the node's C-FIND; seconds per stage; peak RSS of
  every process; studies per hour with one worker when several studies queue up;
- ingest: the node's SCP against DCMTK ``storescp``, both fed by DCMTK ``storescu``;
- conversion: ``load_series`` + ``series_to_nifti`` against ``dcm2niix``;
- SEG encoding: ``labels_to_source_frames`` + ``write_seg`` against dcmqi ``itkimage2segimage``;
- windowing overhead: sliding-window inference against one forward pass over the same region;
- the original pyliverlesionseg Keras networks on the same network inputs (``original_keras.py``
  in a separate TensorFlow environment), with Dice between the resulting masks.

Usage: python -m bench.run_benchmarks [--sizes 100,300,600,1000] [--runs 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.main_job import TOTALSEG, resample_to_large  # noqa: E402

logger = logging.getLogger("bench.run_benchmarks")

DEFAULT_SIZES = (100, 300, 600, 1000)
#: Sizes measured with several runs; the others get one run each.
REPEATED_SIZES = (100, 300)
REFERENCE_SIZE = 300
NODE_AE_TITLE = "LIVERNODE"
PACS_AE_TITLE = "BENCHPACS"
SENDER_AE_TITLE = "MODALITY"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
#: Quiet time after which the node considers a series complete, in s (part of the latency).
QUIET_TIME_S = 1.0
RESULT_TIMEOUT_S = 1800.0
#: Method notes, printed under Notes in every report.
METHOD_NOTES = [
    "The node answers each C-STORE only after the instance is written and fsync'ed; storescp does "
    "not fsync. The bare pynetdicom SCP (`bench/bare_scp.py`) only writes the received "
    "bytes, with and without fsync, so it shows the floor of a Python receiver on this disk.",
    "The node runs the networks in bfloat16 where the CPU has AVX512-BF16 or AMX (`analysis.precision = "
    "\"auto\"`); the comparison with the original Keras networks runs ours in float32.",
    "The node omits empty SEG frames by default (`analysis.keep_empty_frames = false`), as "
    "itkimage2segimage does; both modes are timed.",
    "Each end-to-end node is started and has loaded its networks before the series is sent.",
    "Conversion is timed in a fresh Python process from before its imports (numpy, pydicom and "
    "nibabel take about 0.5 s) until the volume is in memory; dcm2niix also writes it as an "
    "uncompressed NIfTI file. Inside the running node the same step is the `conversion` column of "
    "the end-to-end table.",
    "Why ingest misses 0.8x: the node fsyncs every instance before it answers, and on this disk a "
    "pynetdicom receiver that does nothing but write and fsync (the bare SCP) already stays far "
    "below storescp; the node's own checks, spool and database cost the gap between it and that "
    "floor.",
    "Why conversion misses 1.5x on short series: the imports of a fresh Python process (pydicom "
    "loads its pixel decoders) take longer than dcm2niix's whole run; the decoding itself is "
    "reading headers with pydicom and copying pixel data into one int16 array.",
    "Why the sliding window misses 20 %: the liver network keeps the original pipeline's "
    "189 x 162 x 162 tile, larger than the region, because its instance normalisation makes the "
    "output depend on the tile (a fitted 162 x 135 x 162 tile lowered liver Dice on the example CT "
    "from 0.963 to 0.953); the lesion tiles stay within 1.2 times the trained tile per axis for the "
    "same reason, while one pass over the region would need a tile of about three times its volume.",
    "Why the original pipeline's Dice and tumour targets are not checked: its own body crop cut the "
    "liver on this series (section above), so the targets, which apply where the original does not "
    "truncate the liver, have no case here; no shared CT has tumour labels.",
]

#: Parts of the benchmark, in the order they run (``--only`` takes these names).
PARTS = ("e2e", "ingest", "conversion", "seg", "networks", "memory", "original", "queue", "budget")

#: Label of the liver in TotalSegmentator's ``example_seg.nii.gz``.
TOTALSEG_LIVER_LABEL = 5
#: Runs of our conversion and of dcm2niix per size; the table shows the medians.
CONVERSION_RUNS = 3
#: Runs of each SEG encoder; the table shows the medians.
SEG_RUNS = 3
STAGES = ("conversion", "preprocessing", "liver_inference", "tumor_inference", "postprocessing",
          "measurements", "seg_encode", "sr_encode")
#: DCMTK disables Nagle's algorithm only when asked: without it storescu and storescp stall
#: about 45 ms per instance on loopback (4.9 s instead of 0.13 s for 100 instances here).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_KERAS_PYTHON = Path("/tmp/kerasenv/bin/python")
DEFAULT_DCMQI_BIN = Path("/tmp/dcmqienv/bin")


# Inputs -----------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def series_folder(cache: Path, slices: int, copy: int = 0) -> Path:
    """Return the cached 512 x 512 x ``slices`` series number ``copy``, writing it when missing.

    Copies hold the same pixels with their own study, series and instance UIDs, so that the
    node treats each as a new study.
    """
    from dicom_io.volume_writer import write_ct_series

    folder = cache / f"series-512x512x{slices}" if copy == 0 else cache / f"series-512x512x{slices}-copy{copy}"
    if folder.exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    source = nib.load(str(TOTALSEG / "example_ct.nii.gz"))
    started = time.perf_counter()
    write_ct_series(resample_to_large(source, slices), partial, patient_id=f"BENCH{slices}-{copy}",
                    accession_number=f"B{slices}C{copy}")
    partial.rename(folder)
    logger.info("Wrote %s in %.1f s", folder, time.perf_counter() - started)
    return folder


def _high_water_mark_mb(pid: int) -> float | None:
    """Return VmHWM of a running process in MiB, or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_measured(command: list[str], **kwargs: Any) -> dict[str, Any]:
    """Run ``command``; return its wall seconds, exit status and peak RSS in MiB.

    The peak is the command's VmHWM, read every 20 ms until it exits (the high-water mark only
    grows, so the last reading is the peak up to 20 ms before the end). wait4's ru_maxrss is
    not used: it also counts the moment between fork and exec, when the child still maps this
    benchmark process's memory, and so reported this process's size for small commands.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, **kwargs)
    peak = 0.0
    while process.poll() is None:
        reading = _high_water_mark_mb(process.pid)
        if reading is not None:
            peak = max(peak, reading)
        time.sleep(0.02)
    return {"seconds": time.perf_counter() - started, "returncode": process.returncode, "peak_rss_mb": peak}


def storescu(folder: Path, port: int, called_ae: str) -> dict[str, Any]:
    """Send every file of ``folder`` over one association with DCMTK ``storescu``."""
    result = run_measured(
        ["storescu", "-aet", SENDER_AE_TITLE, "-aec", called_ae, "+sd", "127.0.0.1", str(port), str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV,
    )
    if result["returncode"] != 0:
        raise RuntimeError(f"storescu to port {port} failed with status {result['returncode']}")
    result["instances"] = sum(1 for _ in folder.iterdir())
    return result


# Destination PACS ---------------------------------------------------------------------------------


class BenchPacs:
    """Storage SCP with Study Root C-FIND on 127.0.0.1 that records when it confirmed results."""

    def __init__(self, folder: Path) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            Comprehensive3DSRStorage,
            SegmentationStorage,
            StudyRootQueryRetrieveInformationModelFind,
            Verification,
        )

        self.folder = folder
        self.port = free_port()
        self._lock = threading.Lock()
        #: study UID -> {SOP class UID: (SOP instance UID, series UID)}
        self.stored: dict[str, dict[str, tuple[str, str]]] = {}
        #: study UID -> time.time() of the first C-FIND response that lists both SEG and SR
        self.confirmed_at: dict[str, float] = {}
        ae = AE(ae_title=PACS_AE_TITLE)
        for sop_class in (SegmentationStorage, Comprehensive3DSRStorage, Verification,
                          StudyRootQueryRetrieveInformationModelFind):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)])

    def _store(self, event: Any) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        dataset.save_as(self.folder / f"{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.stored.setdefault(dataset.StudyInstanceUID, {})[dataset.SOPClassUID] = (
                dataset.SOPInstanceUID, dataset.SeriesInstanceUID)
        return 0x0000

    def _find(self, event: Any) -> Any:
        from pydicom.dataset import Dataset

        query = event.identifier
        study = str(query.get("StudyInstanceUID", ""))
        with self._lock:
            stored = dict(self.stored.get(study, {}))
        for sop_class, (sop_uid, series_uid) in stored.items():
            if query.get("SeriesInstanceUID") not in ("", None, series_uid):
                continue
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID = study
            match.SeriesInstanceUID = series_uid
            match.SOPInstanceUID = sop_uid
            match.SOPClassUID = sop_class
            yield 0xFF00, match
        if {SEG_SOP_CLASS, SR_SOP_CLASS} <= set(stored):
            with self._lock:
                self.confirmed_at.setdefault(study, time.time())
        yield 0x0000, None

    def shutdown(self) -> None:
        self._server.shutdown()


# The node -----------------------------------------------------------------------------------------


class NodeProcess:
    """A ``livernode serve`` subprocess with its own data folder and SQLite database."""

    def __init__(self, work: Path, pacs_port: int, weights_cache: Path, nodelay: bool = False,
                 memory_budget_mb: int | None = None) -> None:
        self.work = work
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        self.database_url = f"sqlite:///{work / 'livernode.db'}"
        analysis = f"[analysis]\nmemory_budget_mb = {memory_budget_mb}\n" if memory_budget_mb else ""
        config = work / "livernode.toml"
        config.write_text(
            f'data_dir = "{work / "data"}"\nweights_cache_dir = "{weights_cache}"\n'
            f'database_url = "{self.database_url}"\n'
            f'[scp]\nae_title = "{NODE_AE_TITLE}"\nport = {self.port}\n'
            f"[series]\nquiet_time_s = {QUIET_TIME_S}\nsweep_interval_s = 0.5\n"
            f'[destination]\nkind = "dicom"\nae_title = "{PACS_AE_TITLE}"\nhost = "127.0.0.1"\n'
            f"port = {pacs_port}\nconfirm_interval_s = 0.5\n"
            "[web]\nenabled = false\n" + analysis,
            encoding="utf-8",
        )
        bootstrap = "import bench.nodelay; bench.nodelay.install(); " if nodelay else ""
        self.log_path = work / "serve.log"
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-c", bootstrap + "from node.cli import main; raise SystemExit(main())",
             "--config", str(config), "serve"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._wait_for_echo()
        self._wait_for_models()

    def _wait_for_models(self, deadline_s: float = 120.0) -> None:
        """Wait until the worker has loaded the networks, which it does once at start."""
        stop_at = time.monotonic() + deadline_s
        while time.monotonic() < stop_at:
            log = self.log_path.read_text(encoding="utf-8", errors="replace")
            if "networks loaded" in log or "loading the networks at start failed" in log:
                return
            time.sleep(0.2)
        logger.warning("livernode serve did not report its networks loaded within %.0f s", deadline_s)

    def _wait_for_echo(self, deadline_s: float = 120.0) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        stop_at = time.monotonic() + deadline_s
        while time.monotonic() < stop_at:
            if self.process.poll() is not None:
                raise RuntimeError(f"livernode serve exited early:\n{self.log_path.read_text()[-3000:]}")
            assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE_TITLE)
            if assoc.is_established:
                assoc.release()
                return
            time.sleep(0.5)
        raise RuntimeError(f"livernode serve did not respond to C-ECHO within {deadline_s} s")

    def peak_rss_mb(self) -> float:
        """Return the process's peak resident memory so far (VmHWM), in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
        return float("nan")

    def jobs(self) -> dict[str, dict[str, Any]]:
        """Return the job rows by study UID: state, stage seconds, timestamps (epoch s), result."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url)
        rows = {}
        with engine.connect() as connection:
            for row in connection.execute(text(
                "SELECT studies.study_instance_uid, jobs.state, jobs.stage_seconds, jobs.created_at, "
                "jobs.started_at, jobs.finished_at, jobs.delivered_at, jobs.result, jobs.error FROM jobs "
                "JOIN series ON jobs.series_id = series.id JOIN studies ON series.study_id = studies.id"
            )):
                def epoch(value: Any) -> float | None:
                    if value is None:
                        return None
                    parsed = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
                    return parsed.replace(tzinfo=dt.timezone.utc).timestamp()

                decode = lambda value: json.loads(value) if isinstance(value, str) else value  # noqa: E731
                rows[row[0]] = {"state": row[1], "stage_seconds": decode(row[2]) or {},
                                "created": epoch(row[3]), "started": epoch(row[4]),
                                "finished": epoch(row[5]), "delivered": epoch(row[6]),
                                "result": decode(row[7]) or {}, "error": row[8]}
        engine.dispose()
        return rows

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def study_uid_of(folder: Path) -> str:
    import pydicom

    first = next(iter(sorted(folder.iterdir())))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def wait_confirmed(pacs: BenchPacs, node: NodeProcess, studies: list[str]) -> None:
    stop_at = time.monotonic() + RESULT_TIMEOUT_S
    while not all(study in pacs.confirmed_at for study in studies):
        if node.process.poll() is not None:
            raise RuntimeError(f"livernode serve exited:\n{node.log_path.read_text()[-3000:]}")
        failed = [s for s, job in node.jobs().items() if s in studies and job["state"] in ("failed",)]
        if failed:
            raise RuntimeError(f"job failed for {failed}: {node.jobs()[failed[0]]['error']}")
        if time.monotonic() > stop_at:
            raise RuntimeError(f"no confirmed SEG and SR within {RESULT_TIMEOUT_S} s")
        time.sleep(0.2)
    # The node records the delivery right after its confirming query.
    for _ in range(50):
        if all(node.jobs().get(s, {}).get("delivered") for s in studies):
            break
        time.sleep(0.2)


def end_to_end(cache: Path, work: Path, weights: Path, slices: int, runs: int) -> dict[str, Any]:
    """Send ``runs`` copies of the series one after another through one node; time each."""
    received = work / f"pacs-{slices}"
    received.mkdir(parents=True, exist_ok=True)
    pacs = BenchPacs(received)
    node = NodeProcess(work / f"node-{slices}", pacs.port, weights)
    records = []
    try:
        for run in range(runs):
            folder = series_folder(cache, slices, copy=run)
            study = study_uid_of(folder)
            send = storescu(folder, node.port, NODE_AE_TITLE)
            last_received = time.time()
            wait_confirmed(pacs, node, [study])
            job = node.jobs()[study]
            stages = {name: float(job["stage_seconds"].get(name, 0.0)) for name in STAGES}
            stages["send_and_confirm"] = pacs.confirmed_at[study] - job["finished"]
            record = {
                "slices": slices, "run": run, "receive_s": send["seconds"],
                "instances": send["instances"], "sender_peak_rss_mb": send["peak_rss_mb"],
                "end_to_end_s": pacs.confirmed_at[study] - last_received,
                "queue_wait_s": job["started"] - last_received,
                "analysis_s": job["finished"] - job["started"],
                "stages": stages, "analysis_peak_rss_mb": job["result"].get("peak_rss_mb"),
                "liver_ml": job["result"].get("liver_volume_ml"),
                "tumor_ml": job["result"].get("tumor_volume_ml"),
                "output_dir": job["result"].get("outputs", {}).get("mask"),
            }
            records.append(record)
            logger.info("E2E %d slices run %d: %.1f s (receive %.1f s)", slices, run,
                        record["end_to_end_s"], record["receive_s"])
        node_peak = node.peak_rss_mb()
    finally:
        node.stop()
        pacs.shutdown()
    return {"runs": records, "node_peak_rss_mb": node_peak,
            "bench_process_peak_rss_mb": _self_peak_rss_mb()}


def throughput(cache: Path, work: Path, weights: Path, slices: int, studies: int) -> dict[str, Any]:
    """Queue ``studies`` series at once and measure studies per hour with the one worker."""
    received = work / f"pacs-queue-{slices}"
    received.mkdir(parents=True, exist_ok=True)
    pacs = BenchPacs(received)
    node = NodeProcess(work / f"node-queue-{slices}", pacs.port, weights)
    try:
        folders = [series_folder(cache, slices, copy=10 + index) for index in range(studies)]
        uids = [study_uid_of(folder) for folder in folders]
        started = time.time()
        for folder in folders:
            storescu(folder, node.port, NODE_AE_TITLE)
        wait_confirmed(pacs, node, uids)
        confirmed = sorted(pacs.confirmed_at[uid] for uid in uids)
        node_peak = node.peak_rss_mb()
    finally:
        node.stop()
        pacs.shutdown()
    elapsed = confirmed[-1] - started
    steady = (confirmed[-1] - confirmed[0]) / (studies - 1) if studies > 1 else elapsed
    return {"slices": slices, "studies": studies, "elapsed_s": elapsed,
            "studies_per_hour": studies * 3600.0 / elapsed, "steady_s_per_study": steady,
            "steady_studies_per_hour": 3600.0 / steady, "node_peak_rss_mb": node_peak}


def _self_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# Side-by-side comparisons -----------------------------------------------------------------------


def _bare_scp(folder: Path, slices: int, target: Path, fsync: bool) -> dict[str, Any]:
    """Send the series to :mod:`bench.bare_scp` and return the sender's timing."""
    port = free_port()
    command = [sys.executable, "-m", "bench.bare_scp", str(port), str(target)] + (["--fsync"] if fsync else [])
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        sent = storescu(folder, port, "BARESCP")
        sent["receiver_peak_rss_mb"] = float("nan")
        return sent
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(target, ignore_errors=True)


def ingest(cache: Path, work: Path, weights: Path, slices: int, runs: int) -> dict[str, Any]:
    """Instances per second of storescp, a bare pynetdicom SCP (with and without fsync) and the node."""
    folder = series_folder(cache, slices)
    results: dict[str, list[dict[str, Any]]] = {"storescp": [], "bare": [], "bare_fsync": [], "node": []}
    for run in range(runs):
        target = work / f"storescp-{slices}-{run}"
        target.mkdir(parents=True, exist_ok=True)
        port = free_port()
        scp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(target), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
        time.sleep(0.5)
        sent = storescu(folder, port, "STORESCP")
        sent["receiver_peak_rss_mb"] = _high_water_mark_mb(scp.pid) or float("nan")
        scp.send_signal(signal.SIGTERM)
        scp.wait()
        results["storescp"].append(sent)
        shutil.rmtree(target, ignore_errors=True)

        results["bare"].append(_bare_scp(folder, slices, work / f"bare-{slices}-{run}", fsync=False))
        results["bare_fsync"].append(_bare_scp(folder, slices, work / f"bare-fsync-{slices}-{run}", fsync=True))

        # Destination port 9 is never called: no analysis runs within the quiet time.
        node = NodeProcess(work / f"ingest-node-{slices}-{run}", 9, weights)
        try:
            sent = storescu(folder, node.port, NODE_AE_TITLE)
            sent["receiver_peak_rss_mb"] = node.peak_rss_mb()
        finally:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()
            node._log.close()
        results["node"].append(sent)
        shutil.rmtree(node.work, ignore_errors=True)
    summary = {}
    for name, items in results.items():
        seconds = statistics.median(item["seconds"] for item in items)
        summary[name] = {"seconds": seconds, "instances_per_s": slices / seconds,
                         "receiver_peak_rss_mb": max(item["receiver_peak_rss_mb"] for item in items)}
    return {"slices": slices, "runs": runs, **summary}


def conversion(cache: Path, work: Path, slices: int) -> dict[str, Any]:
    """Seconds of our DICOM-to-volume step and of dcm2niix on the same series, fresh processes."""
    folder = series_folder(cache, slices)
    script = (
        "import time, json, resource; t = time.perf_counter()\n"
        "from dicom_io.series import load_series; from dicom_io.convert import series_to_nifti\n"
        f"image = series_to_nifti(load_series(__import__('pathlib').Path({str(folder)!r})))\n"
        "print(json.dumps({'seconds': time.perf_counter() - t}))\n"
    )
    out = work / f"dcm2niix-{slices}"
    ours_inner, ours_process, ours_rss, theirs_s, theirs_rss = [], [], [], [], []
    for _ in range(CONVERSION_RUNS):
        with open(work / "conversion.out", "w+", encoding="utf-8") as captured:
            ours = run_measured([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=captured)
            captured.seek(0)
            ours_inner.append(json.loads(captured.read().strip().splitlines()[-1])["seconds"])
        ours_process.append(ours["seconds"])
        ours_rss.append(ours["peak_rss_mb"])

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        theirs = run_measured(["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), "-f", "volume", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs_s.append(theirs["seconds"])
        theirs_rss.append(theirs["peak_rss_mb"])
        shutil.rmtree(out, ignore_errors=True)
    return {"slices": slices, "runs": CONVERSION_RUNS, "ours_s": statistics.median(ours_inner),
            "ours_process_s": statistics.median(ours_process), "ours_peak_rss_mb": max(ours_rss),
            "dcm2niix_s": statistics.median(theirs_s), "dcm2niix_peak_rss_mb": max(theirs_rss)}


DCMQI_METADATA = {
    "ContentCreatorName": "Benchmark", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
    "SeriesDescription": "Liver and liver tumor segmentation", "SeriesNumber": "9901",
    "InstanceNumber": "1", "ContentLabel": "LIVER_SEG", "BodyPartExamined": "ABDOMEN",
    "segmentAttributes": [[
        {"labelID": 1, "SegmentDescription": "Liver", "SegmentAlgorithmType": "AUTOMATIC",
         "SegmentAlgorithmName": "Liver Node",
         "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "91723000", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"},
         "SegmentedPropertyTypeCodeSequence": {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Liver"}},
        {"labelID": 2, "SegmentDescription": "Liver tumor", "SegmentAlgorithmType": "AUTOMATIC",
         "SegmentAlgorithmName": "Liver Node",
         "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "49755003", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Morphologically Altered Structure"},
         "SegmentedPropertyTypeCodeSequence": {"CodeValue": "108369006", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Neoplasm"}},
    ]],
}


def seg_encoding(cache: Path, work: Path, slices: int, mask_path: Path, dcmqi_bin: Path) -> dict[str, Any]:
    """Seconds to encode the same label mask as SEG: ours (highdicom) against itkimage2segimage.

    Ours runs twice, keeping empty frames (the node's default) and omitting them, as dcmqi does.
    """
    folder = series_folder(cache, slices)
    result: dict[str, Any] = {"slices": slices}
    for keep in (True, False):
        output = work / f"ours-seg-{'keep' if keep else 'omit'}.dcm"
        script = (
            "import time, json, pathlib, nibabel as nib, numpy as np\n"
            "from dicom_io.series import load_series; from dicom_io.convert import series_to_nifti, labels_to_source_frames\n"
            "from dicom_io.seg_writer import write_seg\n"
            f"series = load_series(pathlib.Path({str(folder)!r})); image = series_to_nifti(series)\n"
            f"labels = np.asarray(nib.load({str(mask_path)!r}).dataobj, dtype=np.uint8)\n"
            "t = time.perf_counter(); frames = labels_to_source_frames(labels, image, series)\n"
            f"write_seg(series, frames, pathlib.Path({str(output)!r}), algorithm_name='Liver Node', "
            f"algorithm_version='bench', keep_empty_frames={keep})\n"
            "print(json.dumps({'seconds': time.perf_counter() - t}))\n"
        )
        key = "ours" if keep else "ours_omit"
        seconds = []
        for _ in range(SEG_RUNS):
            inner = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
            seconds.append(json.loads(inner.stdout.strip().splitlines()[-1])["seconds"])
        result[f"{key}_s"] = statistics.median(seconds)
        result[f"{key}_size_mb"] = output.stat().st_size / 2**20
    tool = dcmqi_bin / "itkimage2segimage"
    if not tool.exists():
        result["itkimage2segimage"] = f"not run: {tool} is missing (pip install dcmqi)"
        return result
    metadata = work / "dcmqi-meta.json"
    metadata.write_text(json.dumps(DCMQI_METADATA))
    output = work / "dcmqi-seg.dcm"
    runs = []
    for _ in range(SEG_RUNS):
        theirs = run_measured([str(tool), "--inputImageList", str(mask_path), "--inputDICOMDirectory", str(folder),
                               "--outputDICOM", str(output), "--inputMetadata", str(metadata)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if theirs["returncode"] != 0 or not output.exists():
            result["itkimage2segimage"] = f"failed with status {theirs['returncode']}"
            return result
        runs.append(theirs)
    result.update({"itkimage2segimage_s": statistics.median(run["seconds"] for run in runs),
                   "itkimage2segimage_peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
                   "itkimage2segimage_size_mb": output.stat().st_size / 2**20})
    return result


# Networks: windowing overhead and the original Keras networks ------------------------------------


class _RecordingModule:
    """Wraps a network; records each input tile and its output (for the Keras comparison)."""

    def __init__(self, module: Any, replay: list[np.ndarray] | None = None) -> None:
        self.module = module
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.seconds: list[float] = []
        self.replay = replay
        self.valid_output_lengths = module.valid_output_lengths

    def __call__(self, tile: Any) -> Any:
        import torch

        self.inputs.append(tile[0, 0].numpy().copy())
        started = time.perf_counter()
        if self.replay is not None:
            output = torch.from_numpy(self.replay[len(self.inputs) - 1])[None, None]
        else:
            output = self.module(tile)
        self.seconds.append(time.perf_counter() - started)
        self.outputs.append(output[0, 0].numpy().copy())
        return output


def networks(cache: Path, work: Path, weights: Path, slices: int, keras_python: Path | None) -> dict[str, Any]:
    """Windowing overhead of both networks and, when TensorFlow is at hand, the Keras originals."""
    import dataclasses

    import torch

    from dicom_io.convert import series_to_nifti
    from dicom_io.series import load_series
    from node.analysis import load_models
    from node.config import Settings
    from pipeline.analysis import analyse
    from pipeline.inference import sliding_window_predict
    from pipeline.settings import AnalysisSettings

    torch.set_num_threads(2)
    settings = Settings(data_dir=str(work / "networks-data"), weights_cache_dir=str(weights))  # type: ignore[call-arg]
    liver_model, lesion_model = load_models(settings)
    image = series_to_nifti(load_series(series_folder(cache, slices)))

    # Record the tiles each network receives in one real analysis.
    liver_recorder = _RecordingModule(liver_model.module)
    lesion_recorder = _RecordingModule(lesion_model.module)
    started = time.perf_counter()
    ours = analyse(image, dataclasses.replace(liver_model, module=liver_recorder),
                   dataclasses.replace(lesion_model, module=lesion_recorder), AnalysisSettings(torch_threads=2))
    ours_seconds = time.perf_counter() - started
    result: dict[str, Any] = {"slices": slices, "ours_stage_seconds": ours.stage_seconds, "ours_analysis_s": ours_seconds}

    result["windowing"] = windowing_overhead(image, liver_model, lesion_model, settings)

    if keras_python is None or not keras_python.exists():
        result["keras"] = f"not run: no TensorFlow environment at {keras_python}"
        return result
    tiles_path = work / f"tiles-{slices}.npz"
    arrays = {}
    for name, model, recorder in (("liver", liver_model, liver_recorder), ("lesion", lesion_model, lesion_recorder)):
        for index, tile in enumerate(recorder.inputs):
            arrays[f"{name}_{index:03d}_input"] = tile
            output_size = recorder.outputs[index].shape
            arrays[f"{name}_{index:03d}_output_size"] = np.array(output_size)
    np.savez(tiles_path, **arrays)
    keras_out = work / f"keras-{slices}.npz"
    completed = run_measured([str(keras_python), str(REPO_ROOT / "bench" / "original_keras.py"), str(tiles_path), str(keras_out)],
                             cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(work / "keras.log", "w"))
    if completed["returncode"] != 0 or not keras_out.exists():
        result["keras"] = f"failed with status {completed['returncode']}; see {work / 'keras.log'}"
        return result
    saved = np.load(keras_out)
    timings = json.loads(str(saved["timings"]))
    keras_outputs = {name: [saved[f"{name}_{index:03d}_keras"] for index in range(len(recorder.inputs))]
                     for name, recorder in (("liver", liver_recorder), ("lesion", lesion_recorder))}
    differences = {name: max(float(np.abs(a - b).max()) for a, b in zip(keras_outputs[name], recorder.outputs))
                   for name, recorder in (("liver", liver_recorder), ("lesion", lesion_recorder))}

    # The whole analysis again with the Keras outputs in place of ours: same preprocessing,
    # tiling and post-processing, so the masks differ only by the networks.
    replay_liver = _RecordingModule(liver_model.module, replay=keras_outputs["liver"])
    replay_lesion = _RecordingModule(lesion_model.module, replay=keras_outputs["lesion"])
    with_keras = analyse(image, dataclasses.replace(liver_model, module=replay_liver),
                         dataclasses.replace(lesion_model, module=replay_lesion), AnalysisSettings(torch_threads=2))
    tiles_match = len(replay_lesion.inputs) == len(keras_outputs["lesion"]) and all(
        np.array_equal(a, b) for a, b in zip(replay_lesion.inputs, lesion_recorder.inputs))
    result["keras"] = {
        "seconds": {name: sum(values) for name, values in timings.items()},
        "torch_seconds": {name: sum(recorder.seconds) for name, recorder in
                          (("liver", liver_recorder), ("lesion", lesion_recorder))},
        "max_abs_diff": differences,
        "liver_dice": _dice(ours.labels >= 1, with_keras.labels >= 1),
        "tumor_dice": _dice(ours.labels == 2, with_keras.labels == 2),
        "lesion_tiles_identical": tiles_match,
        "ours_ml": [ours.measurements.liver_volume_ml, ours.measurements.tumor_volume_ml],
        "keras_ml": [with_keras.measurements.liver_volume_ml, with_keras.measurements.tumor_volume_ml],
        "liver_touches_edge": bool((ours.labels[:, :, 0] > 0).any() or (ours.labels[:, :, -1] > 0).any()),
    }
    return result


def reference_liver(slices: int, path: Path) -> Path:
    """Write TotalSegmentator's liver label (5) resampled like the ``slices``-slice series."""
    segmentation = nib.load(str(TOTALSEG / "example_seg.nii.gz"))
    liver = (np.asarray(segmentation.dataobj) == TOTALSEG_LIVER_LABEL).astype(np.float32) * 1000.0
    large = resample_to_large(nib.Nifti1Image(liver, segmentation.affine), slices)
    mask = (np.asarray(large.dataobj) > 500).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, large.affine), str(path))
    return path


def original_pipeline(cache: Path, work: Path, slices: int, keras_python: Path, ours_dir: Path | None) -> dict[str, Any]:
    """Run the original pyliverlesionseg pipeline on the series and compare its masks with ours."""
    from bench.original_pipeline import compare_masks, run_original

    if not keras_python.exists():
        return {"slices": slices, "skipped": f"no TensorFlow environment at {keras_python}"}
    out = work / f"original-{slices}"
    started = time.perf_counter()
    result = run_original(series_folder(cache, slices), out, python=keras_python)
    entry: dict[str, Any] = {"slices": slices, "wall_s": time.perf_counter() - started,
                             "seconds": result.get("seconds"), "peak_rss_mb": result.get("peak_rss_mib"),
                             "body_crop": result.get("body_crop_lps_voxels"), "liver": result.get("liver"),
                             "tumour": result.get("tumour")}
    if ours_dir is not None:
        truth = reference_liver(slices, work / f"reference-liver-{slices}.nii.gz")
        entry["comparison"] = compare_masks(out, ours_dir, truth)
    return entry


FORWARD_SCRIPT = """
import json, sys, time
import numpy as np, torch
from pathlib import Path
from pipeline.inference import bfloat16_module
from pipeline.memory import current_rss_mb
from weights.load import load_model
torch.set_num_threads(2)
name, precision, weights = sys.argv[1], sys.argv[2], Path(sys.argv[3])
size = tuple(int(v) for v in sys.argv[4].split("x"))
module = load_model(name, weights).module
dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
if precision == "bfloat16":
    module = bfloat16_module(module)
tile = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, size=(1, 1) + size).astype(np.float32)).to(dtype)
def high_water_mark_mb():
    # VmHWM starts at exec; ru_maxrss would also count the fork from the benchmark process.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
baseline = current_rss_mb()
with torch.inference_mode():
    started = time.perf_counter()
    module(tile)
    seconds = time.perf_counter() - started
peak = high_water_mark_mb() - baseline
print(json.dumps({"above_mib": round(peak), "per_voxel": round(peak * 2**20 / float(np.prod(size)), 1),
                  "seconds": round(seconds, 2)}))
"""

#: The networks' default tiles (input voxels) measured by :func:`forward_memory`.
FORWARD_TILES = {"liver": (189, 162, 162), "lesion": (180, 172, 86)}


def forward_memory(weights: Path) -> list[dict[str, Any]]:
    """Peak memory and seconds of one forward pass per network and precision, each in a fresh process."""
    entries = []
    for name, size in FORWARD_TILES.items():
        for precision in ("float32", "bfloat16"):
            completed = subprocess.run(
                [sys.executable, "-c", FORWARD_SCRIPT, name, precision, str(weights), "x".join(map(str, size))],
                cwd=REPO_ROOT, capture_output=True, text=True, check=True,
            )
            measured = json.loads(completed.stdout.strip().splitlines()[-1])
            entries.append({"name": f"{name}, {precision}", "size": " x ".join(map(str, size)), **measured})
    return entries


def windowing_overhead(image: Any, liver_model: Any, lesion_model: Any, settings: Any) -> dict[str, Any]:
    """Time each network's sliding window in one analysis against one pass over the same region.

    The analysis runs at the node's precision. Every ``sliding_window_predict`` call it makes is
    recorded and timed. The same call is then repeated with a single tile just large enough to
    cover the whole volume of that call, which is one plain forward pass over the same region.
    """
    import dataclasses

    import pipeline.analysis as analysis_module
    from node.analysis import use_bfloat16
    from pipeline.analysis import analyse
    from pipeline.inference import estimated_peak_mb, sliding_window_predict
    from pipeline.memory import current_rss_mb
    from pipeline.settings import AnalysisSettings

    calls: list[dict[str, Any]] = []

    def recording(volume: np.ndarray, model: Any, **options: Any) -> np.ndarray:
        started = time.perf_counter()
        probabilities = sliding_window_predict(volume, model, **options)
        calls.append({"volume": volume.copy(), "model": model, "options": options,
                      "seconds": time.perf_counter() - started})
        return probabilities

    bfloat16 = use_bfloat16(settings.analysis.precision)
    analysis_module.sliding_window_predict = recording
    try:
        analyse(image, liver_model, lesion_model, AnalysisSettings(torch_threads=2, bfloat16=bfloat16))
    finally:
        analysis_module.sliding_window_predict = sliding_window_predict

    overhead: dict[str, Any] = {}
    for call in calls:
        model, volume = call["model"], call["volume"]
        inputs, outputs = [], []
        for axis, length in enumerate(volume.shape):
            pairs = model.module.valid_output_lengths(axis, int(length) + 400)
            pair = next(pair for pair in pairs if pair[1] >= length)
            inputs.append(pair[0])
            outputs.append(pair[1])
        tiles = int(np.prod([-(-n // o) for n, o in zip(volume.shape, model.output_size)]))
        plain = dataclasses.replace(model, input_size=tuple(inputs), output_size=tuple(outputs))
        entry: dict[str, Any] = {"precision": "bfloat16" if bfloat16 else "float32", "region": list(volume.shape),
                                 "tiles": tiles, "tile_input": list(model.input_size),
                                 "windowed_s": call["seconds"], "plain_input": inputs,
                                 "plain_estimate_mb": estimated_peak_mb(plain)}
        if estimated_peak_mb(plain) + current_rss_mb() < 16000:
            started = time.perf_counter()
            sliding_window_predict(volume, plain, **call["options"])
            entry["plain_s"] = time.perf_counter() - started
            entry["overhead_percent"] = 100.0 * (entry["windowed_s"] / entry["plain_s"] - 1.0)
        overhead[model.name] = entry
    return overhead


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * int((a & b).sum()) / total


# Report -----------------------------------------------------------------------------------------


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def fit_slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of log(seconds) against log(slices): 1.0 is linear."""
    x = np.log([p[0] for p in points])
    y = np.log([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def render(results: dict[str, Any]) -> str:
    """Render the results as the Markdown of ``docs/benchmarks.md``."""
    lines = ["# Benchmarks", "",
             "Generated by `python -m bench.run_benchmarks` (see the module docstring for what each "
             "figure means); do not edit by hand.", "",
             f"- Date: {results['date']}", f"- Machine: {results['machine']}",
             *_render_provenance(results),
             f"- Inputs: the real CT `example_ct.nii.gz` resampled to 512 x 512 pixels of 0.8 mm and N slices "
             f"over its 336 mm, written as uncompressed CT series; the node's quiet time was {QUIET_TIME_S} s "
             "(included in the latency).", ""]

    e2e = results.get("end_to_end", {})
    if e2e:
        lines += ["## End-to-end latency", "",
                  "End-to-end runs from the sender's last C-STORE response until the destination answered the "
                  "node's C-FIND listing SEG and SR. Median over the runs; seconds. `receive` is how long "
                  "storescu took to send the series, before the end-to-end time starts; `liver` and "
                  "`tumour` are the seconds of each network stage. Node peak RSS is the high-water mark of "
                  "the `livernode serve` process over the whole run (receiving, analysis, sending, overlay "
                  "pictures); analysis peak RSS is sampled during the analysis alone.", "",
                  "| slices | runs | receive | conversion | preprocessing | liver | tumour | post-processing | "
                  "SEG encode | SR encode | send + confirm | analysis | end-to-end | node peak RSS MiB | "
                  "analysis peak RSS MiB | storescu peak RSS MiB |",
                  "|---:" * 16 + "|"]
        for slices, entry in sorted(e2e.items(), key=lambda item: int(item[0])):
            runs = entry["runs"]
            med = lambda values: statistics.median(values)  # noqa: E731
            stage = lambda name: med([r["stages"][name] for r in runs])  # noqa: E731
            post = med([r["stages"]["postprocessing"] + r["stages"]["measurements"] for r in runs])
            lines.append(
                f"| {slices} | {len(runs)} | {med([r['receive_s'] for r in runs]):.1f} | {stage('conversion'):.1f} | "
                f"{stage('preprocessing'):.1f} | {stage('liver_inference'):.1f} | {stage('tumor_inference'):.1f} | "
                f"{post:.1f} | {stage('seg_encode'):.1f} | {stage('sr_encode'):.2f} | {stage('send_and_confirm'):.1f} | "
                f"{med([r['analysis_s'] for r in runs]):.1f} | **{med([r['end_to_end_s'] for r in runs]):.1f}** | "
                f"{entry['node_peak_rss_mb']:.0f} | {max(r['analysis_peak_rss_mb'] or 0 for r in runs):.0f} | "
                f"{max(r['sender_peak_rss_mb'] for r in runs):.0f} |")
        points = [(int(s), statistics.median(r["end_to_end_s"] for r in e["runs"])) for s, e in e2e.items()]
        if len(points) >= 2:
            slope, _ = fit_slope(points)
            lines += ["", f"Fitted growth of the end-to-end time with slice count: seconds ~ slices^{slope:.2f} "
                      "(log-log least squares; 1.00 is linear)."]
        lines += ["", "The end-to-end time includes the quiet time, the analysis (its stages above; the gap to "
                  "their sum is loading the models' handles, writing the mask and overview pictures and "
                  "the database), the send and the confirming C-FIND. `send + confirm` runs from the end of "
                  "the analysis to the confirming C-FIND.", ""]

    queue = results.get("throughput")
    if queue:
        lines += ["## Throughput with one worker", "",
                  f"{queue['studies']} studies of {queue['slices']} slices sent back to back: all confirmed "
                  f"{queue['elapsed_s']:.0f} s after the first instance was sent, "
                  f"**{queue['studies_per_hour']:.0f} studies per hour**; between the first and the last "
                  f"confirmation {queue['steady_s_per_study']:.1f} s per study "
                  f"({queue['steady_studies_per_hour']:.0f} per hour). Node peak RSS "
                  f"{queue['node_peak_rss_mb']:.0f} MiB.", ""]

    lines += ["## Side by side", "",
              "Ours against a reference on the same inputs in the same run. For ingest the ratio is our "
              "rate over storescp's (higher is better); for times it is our time over theirs (lower is "
              "better); for the sliding window it is the extra time over one forward pass of the smallest "
              "valid tile that covers the same region. `target` is the performance target and `met` states "
              "whether this run reached it. The notes below explain each missed target.", "",
              "| comparison | ours | theirs | ratio | target | met |",
              "|---|---:|---:|---:|---|---|"]
    for entry in results.get("ingest", []):
        ratio = entry["node"]["instances_per_s"] / entry["storescp"]["instances_per_s"]
        floor = entry["bare_fsync"]["instances_per_s"] / entry["storescp"]["instances_per_s"]
        lines.append(f"| ingest, {entry['slices']} instances (storescu sender, median of {entry['runs']}) | "
                     f"{entry['node']['instances_per_s']:.0f} inst/s (bare pynetdicom: "
                     f"{entry['bare']['instances_per_s']:.0f}, with fsync: {entry['bare_fsync']['instances_per_s']:.0f}) | "
                     f"storescp {entry['storescp']['instances_per_s']:.0f} inst/s | "
                     f"{ratio:.2f}x of storescp's rate (bare pynetdicom with fsync: {floor:.2f}x) | >= 0.8x | {_met(ratio >= 0.8)} |")
    for entry in results.get("conversion", []):
        runs = entry.get("runs", 1)
        lines.append(f"| conversion, {entry['slices']} slices (fresh process, imports included, median of {runs}) | "
                     f"{entry['ours_s']:.2f} s, {entry['ours_peak_rss_mb']:.0f} MiB | dcm2niix {entry['dcm2niix_s']:.2f} s, "
                     f"{entry['dcm2niix_peak_rss_mb']:.0f} MiB | {entry['ours_s'] / entry['dcm2niix_s']:.1f}x the time | <= 1.5x | "
                     f"{_met(entry['ours_s'] / entry['dcm2niix_s'] <= 1.5)} |")
    seg = results.get("seg")
    if seg:
        if "itkimage2segimage_s" in seg:
            theirs = seg["itkimage2segimage_s"]
            lines.append(f"| SEG encoding, {seg['slices']} frames (median of {SEG_RUNS}), empty frames kept | {seg['ours_s']:.1f} s "
                         f"({seg['ours_size_mb']:.1f} MiB) | itkimage2segimage {theirs:.1f} s "
                         f"({seg['itkimage2segimage_size_mb']:.1f} MiB) | {seg['ours_s'] / theirs:.2f}x the time | <= 1.0x | "
                         f"{_met(seg['ours_s'] / theirs <= 1.0)} |")
            if "ours_omit_s" in seg:
                lines.append(f"| SEG encoding, {seg['slices']} frames (median of {SEG_RUNS}), empty frames omitted "
                             f"(node default) | {seg['ours_omit_s']:.1f} s "
                             f"({seg['ours_omit_size_mb']:.1f} MiB) | itkimage2segimage {theirs:.1f} s | "
                             f"{seg['ours_omit_s'] / theirs:.2f}x the time | <= 1.0x | "
                             f"{_met(seg['ours_omit_s'] / theirs <= 1.0)} |")
        else:
            lines.append(f"| SEG encoding, {seg['slices']} frames | {seg['ours_s']:.1f} s | {seg['itkimage2segimage']} | - | <= 1.0x | - |")
    nets = results.get("networks")
    if nets:
        for name, entry in nets["windowing"].items():
            plain = (f"one pass of {entry['plain_input']}: {entry['plain_s']:.1f} s" if "plain_s" in entry
                     else f"one pass not run: about {entry['plain_estimate_mb']:.0f} MiB")
            ratio = f"{entry['overhead_percent']:+.0f} %" if "overhead_percent" in entry else "-"
            met = _met(entry["overhead_percent"] <= 20.0) if "overhead_percent" in entry else "-"
            lines.append(f"| {name} network ({entry.get('precision', 'float32')}): sliding window, {entry['tiles']} tile{'s' if entry['tiles'] != 1 else ''} of "
                         f"{entry['tile_input']} over {entry.get('region')} | {entry['windowed_s']:.1f} s | {plain} | "
                         f"{ratio} | <= 20 % | {met} |")
        keras = nets.get("keras")
        if isinstance(keras, dict):
            for name in ("liver", "lesion"):
                lines.append(f"| {name} network, same tiles: PyTorch port vs original Keras (tf-keras {name}) | "
                             f"{keras['torch_seconds'][name]:.1f} s | {keras['seconds'][name]:.1f} s | "
                             f"{keras['torch_seconds'][name] / keras['seconds'][name]:.2f}x the time | - | - |")
    lines.append("")
    if nets and isinstance(nets.get("keras"), dict):
        keras = nets["keras"]
        lines += ["## Against the original networks", "",
                  f"On the {nets['slices']}-slice series, the original pyliverlesionseg 0.3 Keras networks "
                  "(tf-keras, TensorFlow's float32 normalisation as in the original) ran on exactly the tiles our "
                  "float32 pipeline fed its own networks; our pre- and post-processing then turned their "
                  "probabilities into masks. This compares the networks alone; the original pipeline end "
                  "to end follows in the next section.", "",
                  f"- network seconds: ours {sum(keras['torch_seconds'].values()):.1f} s, original "
                  f"{sum(keras['seconds'].values()):.1f} s (ours takes {sum(keras['torch_seconds'].values()) / sum(keras['seconds'].values()):.2f}x the original's time)",
                  f"- largest probability difference per tile: liver {keras['max_abs_diff']['liver']:.2g}, "
                  f"lesion {keras['max_abs_diff']['lesion']:.2g}",
                  f"- liver Dice, ours vs original networks: {keras['liver_dice']:.4f} (the liver touches the "
                  f"first or last slice: {keras['liver_touches_edge']})",
                  ("- tumour Dice: " + (f"{keras['tumor_dice']}" if keras["lesion_tiles_identical"] else
                   "not comparable, because the two liver masks differ, so the lesion tiles the original saw "
                   "were not the tiles replayed into our pipeline")),
                  f"- volumes mL (liver, tumour): ours {keras['ours_ml'][0]:.2f} and {keras['ours_ml'][1]:.2f}, "
                  f"original networks {keras['keras_ml'][0]:.2f} and {keras['keras_ml'][1]:.2f}", ""]
    elif nets:
        lines += [f"Original networks: {nets.get('keras')}", ""]

    lines += _render_original(results)

    memory = results.get("memory")
    if memory:
        lines += ["## Memory of one forward pass", "", "| network | tile (input voxels) | peak above the loaded process MiB | "
                  "bytes per input voxel | seconds |", "|---|---|---:|---:|---:|"]
        for entry in memory:
            lines.append(f"| {entry['name']} | {entry['size']} | {entry['above_mib']} | {entry['per_voxel']} | {entry['seconds']} |")
        lines.append("")
    budget = results.get("budget")
    if budget:
        lines += ["## Memory budget", ""]
        for entry in budget:
            lines.append(f"- `memory_budget_mb = {entry['budget_mb']}`, {entry['slices']} slices: {entry['outcome']}")
        lines.append("")
    notes = METHOD_NOTES + list(results.get("notes") or [])
    lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_benchmarks",
                                     description=__doc__.splitlines()[0].replace("``", "`"))
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="slice counts (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3,
                        help=f"end-to-end runs for {REPEATED_SIZES} slices, others get 1 (default: %(default)s)")
    parser.add_argument("--queue", type=int, default=3,
                        help="studies queued for the throughput run, 0 skips it (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/livernode-bench"),
                        help="folder of the series, work files and results.json (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=Path("/tmp/livernode-test-weights"),
                        help="weights cache folder (default: %(default)s)")
    parser.add_argument("--keras-python", type=Path, default=DEFAULT_KERAS_PYTHON, help="Python of the TensorFlow environment for the original networks and pipeline (default: %(default)s)")
    parser.add_argument("--dcmqi-bin", type=Path, default=DEFAULT_DCMQI_BIN, help="folder holding dcmqi's itkimage2segimage (default: %(default)s)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated parts to run, of: %(default)s; the others are taken from "
                             "CACHE/results.json; 'render' only rewrites the report from that file")
    parser.add_argument("--out", type=Path, default=DOCS_PATH, help="Markdown report (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if not TOTALSEG.exists():
        print(f"the real CT {TOTALSEG} is absent; nothing to measure", file=sys.stderr)
        return 1
    sizes = [int(v) for v in args.sizes.split(",") if v]
    parts = set(args.only.split(","))
    unknown = parts - set(PARTS) - {"render"}
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))} in --only: use {', '.join(PARTS)} or render")
    if parts == {"render"}:
        results_file = args.cache / "results.json"
        if not results_file.is_file():
            parser.error(f"{results_file} does not exist: run the benchmark (without --only render) first")
        args.out.write_text(render(json.loads(results_file.read_text())))
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    results_path = args.cache / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["notes"] = []
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "pipeline", "node", "dicom_io", "bench"],
                           cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    this_run = {"date": dt.date.today().isoformat(),
                "command": "python -m bench.run_benchmarks " + " ".join(sys.argv[1:]),
                "source_state": f"commit {head}" + (" with uncommitted changes" if dirty else "")}

    def save(part: str | None = None) -> None:
        results.update(this_run)
        results["machine"] = machine_description()
        if part is not None:
            results.setdefault("measured_by", {})[part] = this_run
        results_path.write_text(json.dumps(results, indent=2, default=str))
        args.out.write_text(render(results))

    for slices in sizes:
        series_folder(args.cache, slices)
    if "e2e" in parts:
        results.setdefault("end_to_end", {})
        for slices in sizes:
            runs = args.runs if slices in REPEATED_SIZES else 1
            results["end_to_end"][str(slices)] = end_to_end(args.cache, work, args.weights, slices, runs)
            save("e2e")
    def guarded(key: str, function: Any, part: str | None = None) -> None:
        try:
            results[key] = function()
        except Exception as error:  # noqa: BLE001 - one failed part must not lose the others
            logger.exception("Benchmark part %s failed", key)
            results.setdefault("notes", []).append(f"{key} failed: {type(error).__name__}: {error}")
        save(part or key)

    if "ingest" in parts:
        guarded("ingest", lambda: [ingest(args.cache, work, args.weights, slices, 3) for slices in sizes])
    if "conversion" in parts:
        guarded("conversion", lambda: [conversion(args.cache, work, slices) for slices in sizes])
    if "seg" in parts:
        mask = _find_mask(results, REFERENCE_SIZE)
        if mask is not None:
            guarded("seg", lambda: seg_encoding(args.cache, work, REFERENCE_SIZE, mask, args.dcmqi_bin))
    if "networks" in parts:
        guarded("networks", lambda: networks(args.cache, work, args.weights, REFERENCE_SIZE, args.keras_python))
    if "memory" in parts:
        guarded("memory", lambda: forward_memory(args.weights))
    if "original" in parts:
        mask = _find_mask(results, REFERENCE_SIZE)
        ours_dir = mask.parent if mask is not None else None
        guarded("original", lambda: original_pipeline(args.cache, work, REFERENCE_SIZE, args.keras_python, ours_dir))
    if "queue" in parts and args.queue > 0:
        guarded("throughput", lambda: throughput(args.cache, work, args.weights, REFERENCE_SIZE, args.queue), "queue")
    if "budget" in parts:
        guarded("budget", lambda: memory_budget(args.cache, work, args.weights, max(sizes), [3000, 1500]))
    save()
    print(args.out.read_text())
    return 0


def memory_budget(cache: Path, work: Path, weights: Path, slices: int, budgets: list[int]) -> list[dict[str, Any]]:
    """Run ``livernode segment`` on the series under each memory budget; record what happened."""
    outcomes = []
    folder = series_folder(cache, slices)
    for budget in budgets:
        out = work / f"budget-{budget}"
        config = work / "budget.toml"
        config.write_text(f'data_dir = "{work / "budget-data"}"\nweights_cache_dir = "{weights}"\n')
        command = [sys.executable, "-c", "from node.cli import main; raise SystemExit(main())", "--config", str(config),
                   "--log-level", "WARNING", "segment", str(folder), "--out", str(out)]
        stderr_path = work / f"budget-{budget}.stderr"
        with open(stderr_path, "w", encoding="utf-8") as stderr:
            measured = run_measured(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                    env={**os.environ, "LIVERNODE_MEMORY_BUDGET_MB": str(budget)})
        errors = stderr_path.read_text(encoding="utf-8", errors="replace")
        result_file = out / "result.json"
        if measured["returncode"] == 0 and result_file.exists():
            content = json.loads(result_file.read_text())
            outcome = (f"completed in {content['total_seconds']:.0f} s, analysis peak RSS "
                       f"{content['peak_rss_mb']:.0f} MiB, process peak RSS {measured['peak_rss_mb']:.0f} MiB")
        else:
            message = [line for line in errors.splitlines() if "memory_budget_mb" in line]
            outcome = (f"refused (exit status {measured['returncode']}, process peak RSS "
                       f"{measured['peak_rss_mb']:.0f} MiB): " + (message[-1].strip() if message else errors.strip()[-300:]))
        outcomes.append({"budget_mb": budget, "slices": slices, "outcome": outcome})
        logger.info("Budget %d MiB, %d slices: %s", budget, slices, outcome)
    return outcomes


def _met(reached: bool) -> str:
    return "yes" if reached else "no"


def _render_provenance(results: dict[str, Any]) -> list[str]:
    """Return the report lines naming the command, commit and date behind each part."""
    measured_by = results.get("measured_by") or {}
    runs: dict[tuple[str, str, str], list[str]] = {}
    for part, run in measured_by.items():
        runs.setdefault((run["command"], run["source_state"], run["date"]), []).append(part)
    if len(runs) <= 1:
        return [f"- Command: `{results['command']}`", f"- Source state: {results.get('source_state', 'n/a')}"]
    return [f"- `{command}` at {source} on {date} measured: {', '.join(sorted(parts))}"
            for (command, source, date), parts in sorted(runs.items(), key=lambda item: item[0][2])]


def _render_original(results: dict[str, Any]) -> list[str]:
    """Return the report section on the original pipeline run end to end."""
    entry = results.get("original")
    if not entry:
        return []
    title = "## Against the original pipeline end to end"
    if "skipped" in entry:
        return [title, "", f"Not run: {entry['skipped']}.", ""]

    slices = entry["slices"]
    ours_entry = results.get("end_to_end", {}).get(str(slices), {})
    ours_runs = ours_entry.get("runs", [])
    ours_s = statistics.median(r["end_to_end_s"] for r in ours_runs) if ours_runs else float("nan")
    ours_rss = ours_entry.get("node_peak_rss_mb", float("nan"))
    seconds = entry.get("seconds") or {}
    original_s = seconds.get("process_total", entry["wall_s"])
    steps = ", ".join(f"{name} {value:.1f}" for name, value in seconds.items()
                      if name not in ("pipeline_total", "process_total"))
    lines = [title, "",
             "pyliverlesionseg 0.3 ran through its own entry point (`predict_liver_lesion_seg --seg_liver "
             "--seg_lesion --save_nifti`) with its bundled models: pymirc DICOM reading, body crop, resampling, "
             "tiling, thresholds, post-processing and RTSTRUCT output. It ran once on the same "
             f"{slices}-slice series, because it takes minutes, in a separate TensorFlow environment. "
             "`bench/original_pipeline.py` lists the compatibility shims it needs.", "",
             "| | original | ours | ratio |", "|---|---:|---:|---:|",
             "| seconds (original: whole process with imports and model set-up; ours: end-to-end median, "
             f"networks already loaded) | {original_s:.0f} | {ours_s:.1f} | ours takes {ours_s / original_s:.2f}x the time |",
             f"| peak RSS MiB (ours: the node process) | {entry['peak_rss_mb']:.0f} | {ours_rss:.0f} | "
             f"ours needs {ours_rss / entry['peak_rss_mb']:.2f}x the memory |", "",
             f"Original seconds per step: {steps}.", ""]

    comparison = entry.get("comparison")
    if not comparison:
        return lines
    crop = comparison.get("inside_original_crop", {})
    truth = comparison.get("dice_against_truth", {})
    liver = comparison["liver"]

    def extent(name: str) -> str:
        return f"{liver[name]['volume_ml']} ({liver[name]['first_slice']}-{liver[name]['last_slice']})"

    lines += [
        f"- liver Dice, original vs ours: {comparison['liver_dice']:.3f} (inside the original's body crop, "
        f"slices {crop.get('slices')}: {crop.get('liver_dice', float('nan')):.3f}); tumour Dice: "
        f"{comparison['tumour_dice']}",
        "- liver Dice against TotalSegmentator's liver label resampled to the series: original "
        f"{truth.get('original', {}).get('liver', float('nan')):.3f}, ours {truth.get('ours', {}).get('liver', float('nan')):.3f}",
        f"- liver volume mL and slices: original {extent('original')}, ours {extent('ours')}, reference "
        f"{extent('truth')}; tumour mL: original {comparison['tumour']['original']['volume_ml']}, ours "
        f"{comparison['tumour']['ours']['volume_ml']}",
        "",
    ]

    # The Dice targets apply only where the original's crop keeps the whole reference liver.
    crop_slices = crop.get("slices")
    reference = liver["truth"]
    if crop_slices and reference["first_slice"] is not None and (
        reference["first_slice"] < crop_slices[0] or reference["last_slice"] > crop_slices[1]
    ):
        lines += [
            f"The original's own body crop (`crop_ct_image`) kept slices {crop_slices[0]}-{crop_slices[1]} of "
            f"this series, while the reference liver spans slices {reference['first_slice']}-"
            f"{reference['last_slice']}, so the crop cut the liver. Its masks are therefore not the same "
            "masks as ours, and the Dice targets between the two, which apply where the original does not "
            "truncate the liver, cannot be checked on this series. The networks alone agree (previous section).",
            "",
        ]
    return lines


def _find_mask(results: dict[str, Any], slices: int) -> Path | None:
    runs = results.get("end_to_end", {}).get(str(slices), {}).get("runs", [])
    for run in runs:
        if run.get("output_dir") and Path(run["output_dir"]).exists():
            return Path(run["output_dir"])
    logger.warning("no mask of a %d-slice end-to-end run found: SEG comparison skipped", slices)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
