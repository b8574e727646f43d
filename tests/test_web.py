"""Web page tests through Starlette's test client: login, 401 and redirects, CSRF, retry.

The application, the SQLite database and the templates are the real ones. Only the HTTP
transport is the in-process test client instead of uvicorn, which the browser test covers.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from node.audit import list_audit_events
from node.db import session_scope
from node.models import AuditKind, Job, JobState, Series, SeriesState
from node.web.app import SESSION_COOKIE, create_app, group_repeated_events
from node.web.auth import (
    SECRET_FILE_NAME,
    PasswordHashError,
    check_login,
    hash_password,
    load_or_create_secret,
    verify_password,
)
from tests.web_fixtures import (
    ANALYSIS_ERROR,
    DONE_RESULT,
    DONE_STUDY_UID,
    FAILED_STUDY_UID,
    WEB_PASSWORD,
    WEB_USER,
    ReportDatabase,
    make_report_database,
)

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def database(tmp_path) -> Iterator[ReportDatabase]:
    data = make_report_database(tmp_path, users={WEB_USER: hash_password(WEB_PASSWORD)})
    yield data
    data.engine.dispose()


@pytest.fixture
def client(database: ReportDatabase) -> Iterator[TestClient]:
    with TestClient(create_app(database.settings, database.engine), follow_redirects=False) as test_client:
        yield test_client


def csrf_token(client: TestClient, path: str = "/login") -> str:
    match = CSRF_FIELD.search(client.get(path).text)
    assert match, f"no csrf_token field on {path}"
    return match.group(1)


def log_in(client: TestClient, password: str = WEB_PASSWORD) -> object:
    return client.post(
        "/login",
        data={"username": WEB_USER, "password": password, "csrf_token": csrf_token(client), "next": "/studies"},
    )


@pytest.mark.parametrize("path", ["/api/studies", "/api/health", f"/api/studies/{DONE_STUDY_UID}"])
def test_api_without_login_401(client, path) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response.json() == {"detail": "login required"}


@pytest.mark.parametrize(
    "path",
    [
        "/studies",
        f"/studies/{DONE_STUDY_UID}",
        "/health",
        f"/studies/{DONE_STUDY_UID}/jobs/1/overlays/overlay_liver_axial.png",
    ],
)
def test_pages_without_login_redirect(client, path) -> None:
    response = client.get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


def test_retry_without_login_redirects(client, database) -> None:
    response = client.post(f"/studies/{FAILED_STUDY_UID}/retry", data={"csrf_token": "x"})
    assert response.status_code == 303
    with session_scope(database.engine) as session:
        assert session.get(Job, database.failed_job_id).state == JobState.FAILED


def test_login_wrong_password_401(client) -> None:
    response = log_in(client, password="wrong password")
    assert response.status_code == 401
    assert "Invalid user name or password" in response.text
    assert client.get("/api/studies").status_code == 401


def test_login_without_csrf_token_403(client) -> None:
    client.get("/login")
    response = client.post("/login", data={"username": WEB_USER, "password": WEB_PASSWORD})
    assert response.status_code == 403
    assert client.get("/api/studies").status_code == 401


def test_login_then_study_list(client) -> None:
    response = log_in(client)
    assert response.status_code == 303
    assert response.headers["location"] == "/studies"

    page = client.get("/studies")
    assert page.status_code == 200
    assert DONE_STUDY_UID in page.text
    assert FAILED_STUDY_UID in page.text
    assert f"{DONE_RESULT['liver_volume_ml']:.2f}" in page.text
    assert "ACC-DONE" in page.text
    assert "2024-02-29" in page.text


def test_login_redirects_only_to_local_paths(client) -> None:
    response = client.post(
        "/login",
        data={
            "username": WEB_USER,
            "password": WEB_PASSWORD,
            "csrf_token": csrf_token(client),
            "next": "//example.org/studies",
        },
    )
    assert response.headers["location"] == "/studies"


def test_tampered_session_cookie_rejected(client) -> None:
    log_in(client)
    cookie = client.cookies[SESSION_COOKIE]
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, cookie[:-4] + ("AAAA" if not cookie.endswith("AAAA") else "BBBB"))
    assert client.get("/api/studies").status_code == 401


def test_logout_ends_session(client) -> None:
    log_in(client)
    token = csrf_token(client, "/studies")
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    assert client.get("/api/studies").status_code == 401


def test_study_list_filters(client) -> None:
    log_in(client)
    failed_only = client.get("/api/studies", params={"state": "failed"}).json()
    assert [row["study_instance_uid"] for row in failed_only["rows"]] == [FAILED_STUDY_UID]

    by_ae = client.get("/api/studies", params={"calling_ae": "PACS_A"}).json()
    assert [row["study_instance_uid"] for row in by_ae["rows"]] == [DONE_STUDY_UID]

    by_date = client.get("/studies", params={"since": "2024-03-02", "until": "2024-03-31"})
    assert FAILED_STUDY_UID in by_date.text
    assert DONE_STUDY_UID not in by_date.text

    invalid = client.get("/studies", params={"since": "03/02/2024"})
    assert invalid.status_code == 400
    assert "is not a date" in invalid.text


def test_study_list_paging(client, database) -> None:
    database.settings.web.page_size = 1
    log_in(client)
    first = client.get("/studies")
    second = client.get("/studies", params={"page": 2})
    assert FAILED_STUDY_UID in first.text
    assert DONE_STUDY_UID not in first.text
    assert DONE_STUDY_UID in second.text
    assert FAILED_STUDY_UID not in second.text
    assert "page 2 of 2" in second.text


def test_study_page_audit_trail_in_time_order(client) -> None:
    log_in(client)
    page = client.get(f"/studies/{DONE_STUDY_UID}")
    assert page.status_code == 200
    received = page.text.index("120 instances received")
    complete = page.text.index("quiet time elapsed")
    finished = page.text.index("analysis finished")
    assert received < complete < finished
    assert "Retry failed jobs" not in page.text


def test_study_page_unknown_study_404(client) -> None:
    log_in(client)
    assert client.get("/studies/1.2.3.4").status_code == 404
    assert client.get("/api/studies/1.2.3.4").status_code == 404


def test_retry_without_csrf_token_403(client, database) -> None:
    log_in(client)
    response = client.post(f"/studies/{FAILED_STUDY_UID}/retry", data={})
    assert response.status_code == 403
    with session_scope(database.engine) as session:
        assert session.get(Job, database.failed_job_id).state == JobState.FAILED


def test_retry_button_queues_failed_job(client, database) -> None:
    log_in(client)
    page = client.get(f"/studies/{FAILED_STUDY_UID}")
    assert ANALYSIS_ERROR in page.text
    assert "Retry failed jobs" in page.text
    token = CSRF_FIELD.search(page.text.split('action="/studies/')[1]).group(1)

    response = client.post(f"/studies/{FAILED_STUDY_UID}/retry", data={"csrf_token": token})
    assert response.status_code == 303

    with session_scope(database.engine) as session:
        job = session.get(Job, database.failed_job_id)
        series_state = session.scalar(select(Series.state).where(Series.id == job.series_id))
        assert job.state == JobState.QUEUED
    assert series_state == SeriesState.QUEUED
    events = list_audit_events(database.engine, kind=AuditKind.JOB_REQUEUED)
    assert len(events) == 1
    assert f"web user {WEB_USER}" in events[0].message
    assert "Queued again: job" in client.get(f"/studies/{FAILED_STUDY_UID}").text


def test_health_page_shows_last_error(client) -> None:
    log_in(client)
    page = client.get("/health")
    assert page.status_code == 200
    assert "not listening" in page.text  # no SCP runs in this test
    assert ANALYSIS_ERROR in page.text
    health = client.get("/api/health")
    assert health.status_code == 503
    assert health.json()["database"]["reachable"] is True
    assert health.json()["queue"]["queued"] == 0


def test_password_hash_round_trip() -> None:
    encoded = hash_password("s3cret")
    assert encoded.startswith("scrypt$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret!", encoded)
    assert hash_password("s3cret") != encoded  # a new salt each time


def test_password_hash_malformed() -> None:
    with pytest.raises(PasswordHashError):
        verify_password("x", "pbkdf2$1$2")
    assert not check_login({"admin": "not a hash"}, "admin", "x")
    assert not check_login({}, "nobody", "x")


def test_session_secret_file_mode_0600(tmp_path) -> None:
    key = load_or_create_secret(tmp_path)
    path = tmp_path / SECRET_FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(tmp_path) == key
    assert load_or_create_secret(tmp_path, configured="from-config") == "from-config"


def test_repeated_events_grouped() -> None:
    def event(kind: str, second: int) -> dict:
        return {
            "kind": kind,
            "series_instance_uid": "1.2.3",
            "job_id": None,
            "calling_ae_title": "PACS",
            "created_at": f"2024-03-01T09:30:{second:02d}",
            "message": f"stored instance {second}",
        }

    events = [event("received", 1), event("received", 2), event("received", 3), event("series_complete", 9)]
    grouped = group_repeated_events(events)
    assert [row["kind"] for row in grouped] == ["received", "series_complete"]
    assert grouped[0]["count"] == 3
    assert grouped[0]["message"] == "stored instance 1"
    assert grouped[0]["last_created_at"] == "2024-03-01T09:30:03"
    assert grouped[1]["count"] == 1
