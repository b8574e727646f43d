"""``livernode studies``, ``study``, ``retry`` and ``web hash-password`` on a real SQLite database."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.audit import list_audit_events
from node.cli import main
from node.db import session_scope
from node.models import AuditKind, Job, JobState
from node.reports import format_series_table, list_series_rows, shorten_middle
from node.web.auth import verify_password
from tests.web_fixtures import (
    ANALYSIS_ERROR,
    DONE_RESULT,
    DONE_SERIES_UID,
    DONE_STUDY_UID,
    FAILED_STUDY_UID,
    ReportDatabase,
    make_report_database,
)


@pytest.fixture
def database(tmp_path: Path) -> Iterator[ReportDatabase]:
    data = make_report_database(tmp_path)
    yield data
    data.engine.dispose()


@pytest.fixture
def config(database: ReportDatabase, tmp_path: Path) -> Path:
    path = tmp_path / "livernode.toml"
    path.write_text(f'data_dir = "{database.settings.data_dir}"\n', encoding="utf-8")
    return path


def run_json(capsys, config: Path, *arguments: str) -> object:
    assert main(["--config", str(config), *arguments, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_studies_json_columns(capsys, config) -> None:
    rows = run_json(capsys, config, "studies")
    assert [row["study_instance_uid"] for row in rows] == [FAILED_STUDY_UID, DONE_STUDY_UID]
    done = rows[1]
    assert done["study_date"] == "2024-02-29"
    assert done["accession_number"] == "ACC-DONE"
    assert done["series_instance_uid"] == DONE_SERIES_UID
    assert done["state"] == "done"
    assert done["liver_volume_ml"] == DONE_RESULT["liver_volume_ml"]
    assert done["tumor_volume_ml"] == DONE_RESULT["tumor_volume_ml"]
    assert done["tumor_burden_percent"] == DONE_RESULT["tumor_burden_percent"]
    assert done["seconds"] == 61.2
    assert rows[0]["error"] == ANALYSIS_ERROR


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--state", "failed"], [FAILED_STUDY_UID]),
        (["--state", "done"], [DONE_STUDY_UID]),
        (["--calling-ae", "PACS_A"], [DONE_STUDY_UID]),
        (["--since", "2024-03-02"], [FAILED_STUDY_UID]),
        (["--until", "2024-03-01"], [DONE_STUDY_UID]),
        (["--since", "2024-03-01", "--until", "2024-03-05"], [FAILED_STUDY_UID, DONE_STUDY_UID]),
        (["--since", "2024-04-01"], []),
    ],
)
def test_studies_filters(capsys, config, arguments, expected) -> None:
    rows = run_json(capsys, config, "studies", *arguments)
    assert [row["study_instance_uid"] for row in rows] == expected


def test_studies_invalid_date_usage_error(capsys, config) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "studies", "--since", "1.3.2024"])
    assert exit_info.value.code == 2
    assert "use YYYY-MM-DD" in capsys.readouterr().err


def test_studies_table_aligned(capsys, config, monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["--config", str(config), "studies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("received (UTC)")
    assert DONE_STUDY_UID in lines[2]  # full UIDs when the output is no terminal
    # Right-aligned numbers: the liver column ends at the same offset in every row.
    title_end = lines[0].index("liver mL") + len("liver mL")
    assert lines[2][title_end - len("1523.47") : title_end] == "1523.47"
    assert lines[1][title_end - 1] == "-"


def test_studies_table_shortens_uids_in_middle(database) -> None:
    rows = list_series_rows(database.engine)
    wide = format_series_table(rows)
    narrow = format_series_table(rows, width=150)
    assert max(len(line) for line in wide.splitlines()) > 150
    assert max(len(line) for line in narrow.splitlines()) <= 150
    assert DONE_STUDY_UID[:8] in narrow
    assert DONE_STUDY_UID[-8:] in narrow
    assert "\u2026" in narrow
    assert "ACC-DONE" in narrow


def test_shorten_middle() -> None:
    assert shorten_middle("1.2.3.4.5", 20) == "1.2.3.4.5"
    assert shorten_middle("1.2.840.10008.5.1.4", 9) == "1.2.\u2026.1.4"
    assert len(shorten_middle("1.2.840.10008.5.1.4", 9)) == 9


def test_study_json_events_jobs_outputs(capsys, config) -> None:
    detail = run_json(capsys, config, "study", DONE_STUDY_UID)
    assert detail["study"]["accession_number"] == "ACC-DONE"
    kinds = [event["kind"] for event in detail["events"]]
    assert kinds == [AuditKind.RECEIVED, AuditKind.SERIES_COMPLETE, AuditKind.JOB_FINISHED]
    job = detail["series"][0]["jobs"][0]
    assert job["stage_seconds"] == {"conversion": 3.2, "liver": 40.1, "lesion": 18.0}
    outputs = {output["name"]: output["exists"] for output in job["outputs"]}
    assert outputs == {"result": True, "mask": False}


def test_study_text_shows_error(capsys, config) -> None:
    assert main(["--config", str(config), "study", FAILED_STUDY_UID]) == 0
    text = capsys.readouterr().out
    assert f"Study {FAILED_STUDY_UID}" in text
    assert f"error: {ANALYSIS_ERROR}" in text
    assert "Audit trail:" in text
    assert "failed" in text


def test_study_unknown_uid_fails(capsys, config) -> None:
    assert main(["--config", str(config), "study", "1.2.3.4"]) == 1
    assert "not found" in capsys.readouterr().err


def test_retry_queues_failed_job(capsys, config, database) -> None:
    answer = run_json(capsys, config, "retry", FAILED_STUDY_UID)
    assert answer["queued_job_ids"] == [database.failed_job_id]

    with session_scope(database.engine) as session:
        assert session.get(Job, database.failed_job_id).state == JobState.QUEUED
    events = list_audit_events(database.engine, kind=AuditKind.JOB_REQUEUED)
    assert [event.job_id for event in events] == [database.failed_job_id]
    assert "command line" in events[0].message
    assert ANALYSIS_ERROR in events[0].message

    # A second retry finds nothing failed any more.
    assert run_json(capsys, config, "retry", FAILED_STUDY_UID)["queued_job_ids"] == []


def test_retry_leaves_succeeded_job(capsys, config, database) -> None:
    assert run_json(capsys, config, "retry", DONE_STUDY_UID)["queued_job_ids"] == []
    with session_scope(database.engine) as session:
        assert session.get(Job, database.done_job_id).state == JobState.SUCCEEDED


def test_web_hash_password_from_stdin(capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("pass word 1\n"))
    assert main(["web", "hash-password"]) == 0
    encoded = capsys.readouterr().out.strip()
    assert verify_password("pass word 1", encoded)
