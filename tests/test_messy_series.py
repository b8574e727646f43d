"""Series reading and conversion of the irregular series real scanners and PACS send.

Every series comes from :mod:`tests.synthetic_series`, whose phantom organ has a known
physical volume. These tests are about geometry and pixel values, so a threshold
segmentation (:func:`tests.synthetic_series.threshold_volume_ml`) replaces the networks:
the measured organ volume then depends only on reading, conversion and label mapping.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicom_io.convert import labels_to_source_frames, series_to_nifti
from dicom_io.errors import SeriesValidationError
from dicom_io.series import load_series
from tests.synthetic_series import (
    AIR_HU,
    ORGAN_THRESHOLD_HU,
    VOLUME_TOLERANCE,
    SeriesSpec,
    threshold_volume_ml,
    write_synthetic_series,
)


def convert(folder: Path):
    series = load_series(folder)
    return series, series_to_nifti(series)


def assert_organ_volume(image, spec: SeriesSpec) -> None:
    measured = threshold_volume_ml(image)
    expected = spec.phantom.organ_volume_ml
    assert measured == pytest.approx(expected, rel=VOLUME_TOLERANCE), (
        f"organ volume {measured:.2f} mL, expected {expected:.2f} mL"
    )


def assert_masks_on_source_slices(series, image, synthetic) -> None:
    """Threshold labels mapped back to each source slice equal the slice's own threshold."""
    labels = (np.asarray(image.dataobj) > ORGAN_THRESHOLD_HU).astype(np.uint8)
    frames = labels_to_source_frames(labels, image, series)
    truth = {path.name: hu > ORGAN_THRESHOLD_HU for path, hu in zip(synthetic.slice_files, synthetic.hu)}

    for frame, path in zip(frames, series.files):
        assert np.array_equal(frame.astype(bool), truth[path.name]), f"mask of {path.name} differs"


# The generator itself


def test_generator_default_volume(tmp_path):
    synthetic = write_synthetic_series(tmp_path)
    series, image = convert(tmp_path)

    assert len(series.datasets) == synthetic.spec.slice_count
    assert series.warnings == []
    assert_organ_volume(image, synthetic.spec)
    assert_masks_on_source_slices(series, image, synthetic)


# Slice geometry


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"removed_slices": (17,)}, id="missing-slice"),
        pytest.param({"removed_slices": (5, 30)}, id="two-missing-slices"),
        pytest.param({"position_jitter_mm": 0.4, "seed": 3}, id="position-jitter"),
        pytest.param(
            {"slice_count": 51, "slice_steps_mm": [4.0] * 5 + [2.0] * 40 + [4.0] * 5, "first_position_mm": -60.0},
            id="mixed-spacing",
        ),
        pytest.param({"slice_thickness_mm": 5.0}, id="thickness-above-spacing"),
        pytest.param({"shuffle_file_names": True, "seed": 11}, id="any-file-order"),
    ],
)
def test_irregular_geometry_keeps_volume(tmp_path, options):
    spec = SeriesSpec(**options)
    synthetic = write_synthetic_series(tmp_path, spec)

    series, image = convert(tmp_path)

    assert_organ_volume(image, spec)
    assert_masks_on_source_slices(series, image, synthetic)
    assert np.allclose(series.positions_mm, np.sort(synthetic.positions_mm), atol=1e-3)


def test_missing_slice_resampled_with_warning(tmp_path):
    spec = SeriesSpec(removed_slices=(17,))
    write_synthetic_series(tmp_path, spec)

    series, image = convert(tmp_path)

    assert image.shape[2] == spec.slice_count, "the regular grid does not restore the missing slice"
    assert np.allclose(np.abs(np.diag(image.affine))[:3], [1.5, 1.5, 2.5])
    assert any("resampled onto a regular grid" in warning for warning in series.warnings)
    assert any("-8.75 and -3.75 mm" in warning for warning in series.warnings), series.warnings


def test_large_gap_rejected_naming_positions(tmp_path):
    write_synthetic_series(tmp_path, SeriesSpec(removed_slices=(15, 16, 17)))

    with pytest.raises(SeriesValidationError) as raised:
        load_series(tmp_path)

    message = str(raised.value)
    assert "gap of 10.00 mm" in message
    assert "-13.75 mm and -3.75 mm" in message


@pytest.mark.parametrize(
    ("row_cosine", "column_cosine"),
    [
        pytest.param((1.0, 0.0, 0.0), (0.0, np.cos(0.3), -np.sin(0.3)), id="tilted-17deg"),
        pytest.param(
            (np.cos(0.2), np.sin(0.2), 0.0), (-np.sin(0.2) * np.cos(0.25), np.cos(0.2) * np.cos(0.25), -np.sin(0.25)),
            id="double-oblique",
        ),
    ],
)
def test_oblique_series_keeps_volume(tmp_path, row_cosine, column_cosine):
    spec = SeriesSpec(row_cosine=row_cosine, column_cosine=column_cosine, removed_slices=(12,))
    synthetic = write_synthetic_series(tmp_path, spec)

    series, image = convert(tmp_path)

    assert_organ_volume(image, spec)
    assert_masks_on_source_slices(series, image, synthetic)


def test_localizer_inside_series_dropped(tmp_path):
    spec = SeriesSpec(localizer_count=2)
    synthetic = write_synthetic_series(tmp_path, spec)

    series, image = convert(tmp_path)

    assert len(series.datasets) == len(synthetic.slice_files)
    assert sum("LOCALIZER" in warning for warning in series.warnings) == 2
    assert_organ_volume(image, spec)


def test_off_orientation_slice_dropped(tmp_path):
    spec = SeriesSpec(overrides={7: {"ImageOrientationPatient": ["1", "0", "0", "0", "0", "-1"]}})
    synthetic = write_synthetic_series(tmp_path, spec)

    series, image = convert(tmp_path)

    assert len(series.datasets) == len(synthetic.slice_files) - 1
    assert synthetic.slice_files[7] not in series.files
    dropped = [warning for warning in series.warnings if "differs from the main stack" in warning]
    assert len(dropped) == 1
    assert synthetic.slice_files[7].name in dropped[0]


def test_many_off_orientation_slices_rejected(tmp_path):
    coronal = {"ImageOrientationPatient": ["1", "0", "0", "0", "0", "-1"]}
    write_synthetic_series(tmp_path, SeriesSpec(overrides={index: coronal for index in range(10)}))

    with pytest.raises(SeriesValidationError, match="leave the main stack"):
        load_series(tmp_path)


def test_duplicates_and_stray_objects_ignored(tmp_path, caplog):
    spec = SeriesSpec(duplicate_slices=(3, 20), stray_objects=True)
    synthetic = write_synthetic_series(tmp_path, spec)

    with caplog.at_level(logging.INFO):
        series, image = convert(tmp_path)

    assert len(series.datasets) == len(synthetic.slice_files)
    assert sum("repeats SOPInstanceUID" in warning for warning in series.warnings) == 2
    assert "not a CT image" in caplog.text
    assert_organ_volume(image, spec)


# Pixel value encodings


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"pixel_representation": 1, "bits_stored": 16}, id="signed-16"),
        pytest.param({"pixel_representation": 1, "bits_stored": 12, "rescale_intercept": 0}, id="signed-12"),
        pytest.param({"pixel_representation": 0, "bits_stored": 12, "rescale_intercept": -1024}, id="unsigned-12"),
        pytest.param({"pixel_representation": 0, "bits_stored": 16, "rescale_intercept": -32768}, id="unsigned-16"),
        pytest.param(
            {"pixel_representation": 0, "bits_stored": 16, "rescale_slope": 0.5, "rescale_intercept": -1100},
            id="slope-0.5",
        ),
        pytest.param({"pixel_representation": 1, "bits_stored": 16, "rescale_slope": 2.0}, id="slope-2"),
        pytest.param(
            {"pixel_representation": 0, "bits_stored": 12, "rescale_intercept": -1024, "pixel_padding_value": 4095},
            id="unsigned-padding",
        ),
        pytest.param(
            {"pixel_representation": 1, "bits_stored": 16, "rescale_intercept": -1024, "pixel_padding_value": -2000},
            id="signed-padding",
        ),
    ],
)
def test_pixel_encodings_give_exact_hu(tmp_path, options):
    spec = SeriesSpec(shuffle_file_names=False, **options)
    synthetic = write_synthetic_series(tmp_path, spec)

    series, image = convert(tmp_path)

    # A uniform axial series in LPS layout: RAS reorientation flips the first two axes.
    volume = np.asarray(image.dataobj)
    expected = np.stack([hu.T[::-1, ::-1] for hu in synthetic.hu], axis=2)
    assert volume.min() >= AIR_HU - 24, "a padding or sign error produced HU far below air"
    assert np.allclose(volume, expected, atol=spec.rescale_slope / 2 + 1e-3)
    if spec.pixel_padding_value is not None:
        assert (volume == -1024.0).any(), "padding pixels were not mapped to air"


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_decodes_to_same_hu(tmp_path, transfer_syntax):
    spec = SeriesSpec(slice_count=12, first_position_mm=-15.0, shuffle_file_names=False)
    reference = convert(write_synthetic_series(tmp_path / "native", spec).folder)[1]
    compressed_spec = SeriesSpec(
        slice_count=12, first_position_mm=-15.0, shuffle_file_names=False, transfer_syntax=transfer_syntax
    )
    write_synthetic_series(tmp_path / "compressed", compressed_spec)

    series, image = convert(tmp_path / "compressed")

    assert str(series.datasets[0].file_meta.TransferSyntaxUID) == transfer_syntax
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(reference.dataobj))


# Character sets


@pytest.mark.parametrize(
    ("character_set", "patient_name", "description"),
    [
        pytest.param("ISO_IR 100", "Müller^Jürgen", "Abdomen Leber näher", id="latin1"),
        pytest.param("ISO_IR 192", "Øresund^Zoë", "腹部 CT 肝臓 ☢", id="utf8"),
        pytest.param(["", "ISO 2022 IR 87"], "山田^太郎", "腹部造影", id="iso2022-japanese"),
        pytest.param("ISO_IR 126", "Παπαδόπουλος^Νίκος", "Κοιλία ήπαρ", id="greek"),
    ],
)
def test_character_sets_read_and_converted(tmp_path, caplog, character_set, patient_name, description):
    spec = SeriesSpec(
        slice_count=6, first_position_mm=-6.0, specific_character_set=character_set,
        patient_name=patient_name, series_description=description, study_description=description,
    )
    write_synthetic_series(tmp_path, spec)

    with caplog.at_level(logging.DEBUG):
        series, image = convert(tmp_path)

    reread = pydicom.dcmread(series.files[0])
    assert str(reread.PatientName) == patient_name
    assert reread.SeriesDescription == description
    assert image.shape[2] == 6
    family_name = patient_name.split("^")[0]
    assert family_name not in caplog.text, "a patient name was written to the log"
