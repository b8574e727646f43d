"""The web page in a real headless Chromium, on the node of the shared real round trip.

The browser logs in and opens the study list and the study page of the analysed real series.
It checks that the volumes shown equal ``result.json`` and that the overlay pictures load, and
saves screenshots under the test's temp folder and in :data:`SCREENSHOT_DIR`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db import session_scope
from node.models import Job, Study
from tests.conftest import EXAMPLE_PATIENT_NAME
from tests.node_process import WEB_PASSWORD, WEB_USER

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")

#: Chromium switches for a container without a display, GPU or network access.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Stable copy of the screenshots, for a person to look at after the run.
SCREENSHOT_DIR = Path("/tmp/livernode-screenshots")

VOLUME_KEYS = ("liver_volume_ml", "tumor_volume_ml", "tumor_burden_percent")

#: Milliseconds the browser waits for a page or an element.
BROWSER_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright; skips when either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, SCREENSHOT_DIR / name)
    return path


def test_browser_study_list_and_study_page(browser, round_trip, tmp_path) -> None:
    with session_scope(round_trip["engine"]) as session:
        job = session.scalars(select(Job)).one()
        study_uid = session.scalars(select(Study.study_instance_uid)).one()
        output_dir = Path(job.output_dir)
    result = json.loads((output_dir / "result.json").read_text())
    expected = {key: f"{result[key]:.2f}" for key in VOLUME_KEYS}

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(BROWSER_TIMEOUT_MS)

    # Unauthenticated: the study list redirects to the login page.
    page.goto(f"{round_trip['web_url']}/studies")
    assert "/login" in page.url
    page.fill("input[name=username]", WEB_USER)
    page.fill("input[name=password]", WEB_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/studies")

    row = page.locator(f'tr[data-study-uid="{study_uid}"]')
    assert row.count() == 1
    for key in VOLUME_KEYS:
        assert row.locator(f'td[data-key="{key}"]').inner_text().strip() == expected[key], key
    assert row.locator("td.state-done").inner_text().strip() == "done"
    save_screenshot(page, tmp_path, "studies.png")
    list_html = page.content()

    row.locator("a").first.click()
    page.wait_for_url(f"**/studies/{study_uid}")
    volumes = page.locator(f"#volumes-{job.id}")
    for key in VOLUME_KEYS:
        assert volumes.locator(f'td[data-key="{key}"]').inner_text().strip() == expected[key], key

    pictures = page.locator(".overlays img")
    assert pictures.count() == len(result["outputs"]["overlays"])
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.overlays img'))"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    audit_text = page.locator("#audit").inner_text()
    for kind in ("received", "series_complete", "job_started", "job_finished"):
        assert kind in audit_text, kind
    save_screenshot(page, tmp_path, "study.png")
    study_html = page.content()
    page.close()

    # The node's log, uvicorn access lines included, and the pages never show the patient name.
    log_text = round_trip["log"].read_text()
    assert "GET /studies" in log_text
    for part in EXAMPLE_PATIENT_NAME.split("^"):
        assert part not in log_text, f"patient name part {part!r} in the node's log"
        assert part not in list_html, f"patient name part {part!r} on the study list"
        assert part not in study_html, f"patient name part {part!r} on the study page"
