"""Plain-text rendering of :func:`node.reports.study_detail` for ``livernode study``."""

from __future__ import annotations

from typing import Any

from node.reports import format_table, shorten_middle

#: Columns of the audit trail table: title, key, and whether the column holds a UID.
EVENT_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("time (UTC)", "created_at", False),
    ("event", "kind", False),
    ("series UID", "series_instance_uid", True),
    ("job", "job_id", False),
    ("calling AE", "calling_ae_title", False),
    ("message", "message", False),
)

#: Columns of the job table.
JOB_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("job", "job_id", False),
    ("state", "state", False),
    ("attempts", "attempts", False),
    ("deliveries", "delivery_attempts", False),
    ("started (UTC)", "started_at", False),
    ("finished (UTC)", "finished_at", False),
    ("liver mL", "liver_volume_ml", False),
    ("tumour mL", "tumor_volume_ml", False),
    ("burden %", "tumor_burden_percent", False),
    ("total s", "total_seconds", False),
)


def format_study_detail(detail: dict[str, Any], width: int | None = None) -> str:
    """Format a study from :func:`node.reports.study_detail` as text sections.

    Parameters
    ----------
    detail : dict
        The study, its series with their jobs, and its audit events.
    width : int, optional
        Terminal width; UIDs in tables are shortened in the middle to fit. None never shortens.

    Returns
    -------
    str
        Study header, one section per series (jobs, stage seconds, errors, output files), then
        the audit trail in time order.
    """
    study = detail["study"]
    lines = [
        f"Study {study['study_instance_uid']}",
        f"  study date {study['study_date'] or '-'}, accession {study['accession_number'] or '-'}, "
        f"patient ID {study['patient_id'] or '-'}",
        f"  first received {study['first_received_at']}, last received {study['last_received_at']}",
    ]

    for series in detail["series"]:
        lines += ["", *_format_series(series, width)]

    lines += ["", "Audit trail:"]
    if detail["events"]:
        # Messages are the last column, so only their own line is long.
        table = format_table(detail["events"], EVENT_COLUMNS, width=width)
        lines += ["  " + line for line in table.splitlines()]
    else:
        lines.append("  (no events)")
    return "\n".join(lines)


def _format_series(series: dict[str, Any], width: int | None) -> list[str]:
    uid = series["series_instance_uid"]
    if width is not None:
        uid = shorten_middle(uid, max(width - 10, 20))
    lines = [
        f"Series {uid}",
        f"  {series['instances']} instances from {series['calling_ae_title'] or '-'}, state "
        f"{series['state']}, received {series['received_at']}, complete {series['completed_at'] or '-'}",
    ]
    jobs = series["jobs"]
    if not jobs:
        lines.append("  no job yet")
        return lines

    table = format_table(jobs, JOB_COLUMNS, width=width)
    lines += ["  " + line for line in table.splitlines()]

    for job in jobs:
        if job["stage_seconds"]:
            stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in job["stage_seconds"].items())
            lines.append(f"  job {job['job_id']} stage seconds: {stages}")
        if job["error"]:
            lines.append(f"  job {job['job_id']} error: {job['error']}")
        for warning in job["warnings"]:
            lines.append(f"  job {job['job_id']} warning: {warning}")
        for output in job["outputs"]:
            mark = "" if output["exists"] else "  (missing)"
            lines.append(f"  job {job['job_id']} output {output['name']}: {output['path']}{mark}")
    return lines
