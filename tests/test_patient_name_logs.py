"""No patient name in any log line or web page: receive, analyse, deliver and browse one series.

The series arrives through the real SCP, the real scheduler sweep queues it, and the real
worker converts it, writes the overlay pictures and delivers. The networks are replaced by
:func:`box_analysis` (a box mask), because they take a minute per series on CPU; the log
lines of the real analysis are checked by the browser test on the real round trip.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from starlette.testclient import TestClient

from dicom_io.convert import series_to_nifti
from dicom_io.series import load_series
from node.config import Settings
from node.db import init_db, session_scope
from node.jobs import DatabaseJobQueue
from node.models import Job, JobState
from node.scheduler import sweep_complete_series
from node.scp import StorageSCP
from node.web.app import create_app
from node.web.auth import hash_password
from node.worker import Worker
from tests.test_scp import make_ct_series, make_settings, send_datasets
from tests.web_fixtures import WEB_PASSWORD, WEB_USER

#: A patient name that no other text in the node contains.
DISTINCTIVE_PATIENT_NAME = "Quillfeather^Ottoline^Marguerite"
NAME_PARTS = ("Quillfeather", "Ottoline", "Marguerite")


def box_analysis(input_path: Path, out_dir: Path, settings: Settings, progress: Any = None) -> dict[str, Any]:
    """Stand-in for ``node.analysis.segment``: converts the series and labels a central box."""
    image = series_to_nifti(load_series(input_path))
    labels = np.zeros(image.shape[:3], dtype=np.uint8)
    labels[4:12, 4:12, 1:3] = 1
    labels[7:9, 7:9, 1:2] = 2
    mask_path = out_dir / "mask.nii.gz"
    nib.save(nib.Nifti1Image(labels, image.affine), str(mask_path))
    return {
        "liver_volume_ml": 0.1,
        "tumor_volume_ml": 0.01,
        "tumor_burden_percent": 8.0,
        "tumor_count": 1,
        "warnings": [],
        "stage_seconds": {"conversion": 0.1},
        "total_seconds": 0.1,
        "outputs": {"mask": str(mask_path), "seg": None, "sr": None},
    }


def test_patient_name_absent_from_logs_and_pages(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path)
    settings.web.users = {WEB_USER: hash_password(WEB_PASSWORD)}
    engine = init_db(settings.database_url)
    scp = StorageSCP(settings, engine)
    scp.start()
    try:
        datasets = make_ct_series(count=4)
        for dataset in datasets:
            dataset.PatientName = DISTINCTIVE_PATIENT_NAME
        assert set(send_datasets(settings, datasets)) == {0x0000}
    finally:
        scp.stop()

    queue = DatabaseJobQueue(engine)
    later = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(hours=1)
    assert sweep_complete_series(engine, queue, settings.series.quiet_time_s, now=later)
    worker = Worker(settings, engine, queue, analyse=box_analysis)
    job_id = worker.run_once()
    assert job_id is not None

    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        state, overlays = job.state, dict(job.output_paths["overlays"])
    assert state == JobState.SUCCEEDED
    assert len(overlays) == 6

    study_uid = datasets[0].StudyInstanceUID
    pages = []
    with TestClient(create_app(settings, engine)) as client:
        login = client.get("/login")
        token = login.text.split('name="csrf_token" value="')[1].split('"')[0]
        client.post("/login", data={"username": WEB_USER, "password": WEB_PASSWORD, "csrf_token": token})
        for path in ("/studies", f"/studies/{study_uid}", "/health", "/api/studies", f"/api/studies/{study_uid}"):
            response = client.get(path)
            assert response.status_code in (200, 503), path
            pages.append(response.text)
        picture = client.get(f"/studies/{study_uid}/jobs/{job_id}/overlays/overlay_liver_axial.png")
        assert picture.status_code == 200
        assert picture.headers["content-type"] == "image/png"
    engine.dispose()

    log_text = caplog.text
    assert study_uid in log_text  # the logs did capture the flow
    assert "Job" in log_text
    for part in NAME_PARTS:
        assert part not in log_text, f"patient name part {part!r} found in the logs"
        for page in pages:
            assert part not in page, f"patient name part {part!r} found in a web page"
