"""``livernode segment`` on real CT: accuracy against reference labels, outputs and geometry.

Every analysis here runs the real networks with the real weights; each runs once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_io.sr_writer import read_sr_measurements
from node.cli import main
from pipeline.inference import bfloat16_supported
from tests.conftest import (
    REFERENCE_LIVER_LABEL,
    TOTALSEG,
    canonical_array,
    dice,
    require_shared,
)

pytestmark = pytest.mark.slow

#: Liver Dice the node must reach against the reference labels of the real CT.
MIN_LIVER_DICE = 0.94

RESULT_KEYS = {
    "liver_volume_ml",
    "tumor_volume_ml",
    "tumor_burden_percent",
    "tumor_count",
    "liver_voxels",
    "tumor_voxels",
    "models",
    "stage_seconds",
    "peak_rss_mb",
    "warnings",
}


@pytest.fixture(scope="session")
def slab_runs(tmp_path_factory: pytest.TempPathFactory, slab_with_uids: Path, node_settings) -> dict:
    """``livernode segment`` on the real slab, once as distributed (blank UIDs) and once with UIDs."""
    source = require_shared(TOTALSEG / "ct-dicom")
    runs = {}
    for name, folder in (("blank", source), ("uids", slab_with_uids)):
        out_dir = tmp_path_factory.mktemp(f"slab-{name}")
        exit_code = main(["--config", str(node_settings.config_path), "segment", str(folder), "--out", str(out_dir)])
        runs[name] = {"exit_code": exit_code, "out_dir": out_dir}
    return runs


def test_nifti_liver_dice(example_nifti_run: dict) -> None:
    reference = canonical_array(TOTALSEG / "example_seg.nii.gz") == REFERENCE_LIVER_LABEL
    labels = canonical_array(example_nifti_run["out_dir"] / "mask.nii.gz")
    score = dice(labels >= 1, reference)
    print(f"liver Dice on example_ct.nii.gz: {score:.4f}")
    assert score >= MIN_LIVER_DICE


def test_nifti_mask_on_input_grid(example_nifti_run: dict) -> None:
    source = nib.load(str(example_nifti_run["source"]))
    mask = nib.load(str(example_nifti_run["out_dir"] / "mask.nii.gz"))
    assert mask.shape == source.shape
    assert np.allclose(mask.affine, source.affine)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_nifti_result_json(example_nifti_run: dict) -> None:
    result = json.loads((example_nifti_run["out_dir"] / "result.json").read_text())
    assert RESULT_KEYS <= set(result)
    assert result == example_nifti_run["result"]
    assert result["outputs"]["seg"] is None
    assert set(result["models"]) == {"liver", "lesion"}
    for model in result["models"].values():
        assert len(model["sha256"]) == 64
    assert result["precision"] == ("bfloat16" if bfloat16_supported() else "float32")

    labels = np.asarray(nib.load(str(example_nifti_run["out_dir"] / "mask.nii.gz")).dataobj)
    voxel_ml = 27.0 / 1000.0
    assert result["liver_voxels"] == int((labels == 1).sum())
    assert result["tumor_voxels"] == int((labels == 2).sum())
    assert result["liver_volume_ml"] == pytest.approx(result["liver_voxels"] * voxel_ml, abs=0.01)
    total = result["liver_voxels"] + result["tumor_voxels"]
    assert result["tumor_burden_percent"] == pytest.approx(100.0 * result["tumor_voxels"] / total, abs=0.01)
    print(f"stage seconds (example_ct.nii.gz): {result['stage_seconds']}, peak RSS {result['peak_rss_mb']} MiB")


def test_dicom_series_liver_dice(dicom_cli_run: dict) -> None:
    assert dicom_cli_run["exit_code"] == 0
    reference = canonical_array(TOTALSEG / "example_seg.nii.gz") == REFERENCE_LIVER_LABEL
    labels = canonical_array(dicom_cli_run["out_dir"] / "mask.nii.gz")
    assert labels.shape == reference.shape
    score = dice(labels >= 1, reference)
    print(f"liver Dice on the DICOM series of example_ct: {score:.4f}")
    assert score >= MIN_LIVER_DICE


def test_dicom_series_sr_matches_result(dicom_cli_run: dict) -> None:
    out_dir = dicom_cli_run["out_dir"]
    result = json.loads((out_dir / "result.json").read_text())
    assert (out_dir / "seg.dcm").is_file()
    assert (out_dir / "sr.dcm").is_file()

    measured = read_sr_measurements(out_dir / "sr.dcm")
    for key in ("liver_volume_ml", "tumor_volume_ml", "tumor_burden_percent"):
        assert measured[key] == pytest.approx(result[key], abs=1e-6), key


def source_pixel_labels(instance: pydicom.Dataset, mask: nib.Nifti1Image) -> np.ndarray:
    """Sample the mask at the patient position of every pixel of ``instance``."""
    position = np.array([float(v) for v in instance.ImagePositionPatient])
    orientation = np.array([float(v) for v in instance.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in instance.PixelSpacing)
    rows, columns = np.mgrid[0 : int(instance.Rows), 0 : int(instance.Columns)]
    lps = (
        position[None, None, :]
        + columns[..., None] * column_spacing * orientation[None, None, :3]
        + rows[..., None] * row_spacing * orientation[None, None, 3:]
    )
    ras = np.concatenate([-lps[..., :2], lps[..., 2:], np.ones(lps.shape[:2] + (1,))], axis=-1)
    voxels = np.rint(ras @ np.linalg.inv(mask.affine).T)[..., :3].astype(int)
    labels = np.asarray(mask.dataobj)
    return labels[voxels[..., 0], voxels[..., 1], voxels[..., 2]]


def test_dicom_series_seg_frames_on_source(dicom_cli_run: dict, example_dicom_series: Path) -> None:
    out_dir = dicom_cli_run["out_dir"]
    seg = hd.seg.segread(str(out_dir / "seg.dcm"))
    source = {
        ds.SOPInstanceUID: ds
        for ds in (pydicom.dcmread(path, stop_before_pixels=True) for path in example_dicom_series.iterdir())
    }
    mask = nib.load(str(out_dir / "mask.nii.gz"))
    assert seg.StudyInstanceUID == next(iter(source.values())).StudyInstanceUID
    # Empty frames are omitted (analysis.keep_empty_frames = false): one frame per instance and
    # segment that the mask has on that instance.
    expected_frames = {
        (uid, number) for uid, instance in source.items() for number in (1, 2)
        if (source_pixel_labels(instance, mask) == number).any()
    }
    assert int(seg.NumberOfFrames) == len(expected_frames)

    found_frames = set()
    pixels = seg.pixel_array
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        derivation = frame.DerivationImageSequence[0].SourceImageSequence[0]
        instance = source[derivation.ReferencedSOPInstanceUID]
        frame_position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(frame_position, [float(v) for v in instance.ImagePositionPatient], atol=1e-3)

        segment_number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        expected = source_pixel_labels(instance, mask) == segment_number
        assert np.array_equal(pixels[index].astype(bool), expected), (
            f"SEG frame {index + 1} (segment {segment_number}) differs from the mask on "
            f"instance {instance.SOPInstanceUID}"
        )
        found_frames.add((derivation.ReferencedSOPInstanceUID, segment_number))
    assert found_frames == expected_frames


def test_slab_blank_uids_skips_seg(slab_runs: dict) -> None:
    run = slab_runs["blank"]
    assert run["exit_code"] == 0
    out_dir = run["out_dir"]
    assert (out_dir / "mask.nii.gz").is_file()
    result = json.loads((out_dir / "result.json").read_text())
    assert not (out_dir / "seg.dcm").exists()
    assert not (out_dir / "sr.dcm").exists()
    skipped = [warning for warning in result["warnings"] if "SEG and SR not written" in warning]
    assert len(skipped) == 1
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert attribute in skipped[0]


def test_slab_with_uids_outputs(slab_runs: dict, slab_with_uids: Path) -> None:
    run = slab_runs["uids"]
    assert run["exit_code"] == 0
    out_dir = run["out_dir"]
    result = json.loads((out_dir / "result.json").read_text())
    assert any(warning.startswith("partial coverage") for warning in result["warnings"])
    assert result["coverage_mm"] == pytest.approx(40.0, abs=0.5)

    seg = hd.seg.segread(str(out_dir / "seg.dcm"))
    source_uids = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in slab_with_uids.iterdir()}
    referenced = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == source_uids

    measured = read_sr_measurements(out_dir / "sr.dcm")
    assert measured["liver_volume_ml"] == pytest.approx(result["liver_volume_ml"], abs=1e-6)

    reference = canonical_array(TOTALSEG / "example_seg_dicom.nii.gz") == REFERENCE_LIVER_LABEL
    labels = canonical_array(out_dir / "mask.nii.gz")
    assert labels.shape == reference.shape
    print(f"liver Dice on the 40 mm slab: {dice(labels >= 1, reference):.4f}; stage seconds {result['stage_seconds']}")
