"""The direct DICOM-to-volume reader: equal to dicom2nifti, exact HU in int16 or float32, lean.

The reference HU in these tests come from pydicom reading each whole file
(``pixel_array`` and ``apply_modality_lut``) or from dicom2nifti, never from the reader under
test. Timings are measured by ``bench/conversion_profile.py``, not asserted here.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless

from dicom_io.convert import PADDING_HU, native_affine_ras, series_to_nifti
from dicom_io.pixel_reader import PIXEL_DATA_TAG
from dicom_io.reference_conversion import convert_with_dicom2nifti
from dicom_io.series import CTSeries, load_series
from tests.conftest import TOTALSEG, require_shared
from tests.ct_writer import write_ct_series

AFFINE_TOLERANCE_MM = 1e-3


def corner_distance_mm(first: nib.Nifti1Image, second: nib.Nifti1Image) -> float:
    """Largest distance between the world positions of the 8 corner voxels of two images."""
    shape = first.shape
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    ).T
    return float(np.abs(first.affine @ corners - second.affine @ corners).max())


def pydicom_reference(series: CTSeries) -> np.ndarray:
    """HU of the series computed by pydicom from whole files, on the RAS grid of our image."""
    slices = []
    for path in series.files:
        dataset = pydicom.dcmread(path)
        stored = dataset.pixel_array
        hu = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)
        if "PixelPaddingValue" in dataset:
            hu[stored == int(dataset.PixelPaddingValue)] = PADDING_HU
        slices.append(hu)
    native = np.stack(slices).transpose(2, 1, 0)
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(native, native_affine_ras(series))).dataobj)


def rewrite_pixels(folder: Path, change) -> None:
    """Apply ``change(dataset, stored)`` to every file of ``folder`` and save it in place.

    ``change`` sets the new attributes and returns the new stored values.
    """
    for path in sorted(folder.iterdir()):
        dataset = pydicom.dcmread(path)
        stored = change(dataset, dataset.pixel_array)
        dataset.PixelData = stored.tobytes()
        dataset.save_as(path, enforce_file_format=True)


@pytest.fixture
def small_series(tmp_path: Path) -> Path:
    """Ten 24 x 20 slices of random HU in -1000..2000, written as an uncompressed series."""
    data = np.random.default_rng(11).integers(-1000, 2000, size=(24, 20, 10)).astype(np.float32)
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    folder = tmp_path / "ct"
    write_ct_series(nib.Nifti1Image(data, affine), folder, shuffle_file_names=True)
    return folder


# Agreement with dicom2nifti


def test_real_ct_series_equals_dicom2nifti(example_dicom_series):
    series = load_series(example_dicom_series)

    ours = series_to_nifti(series)
    reference = convert_with_dicom2nifti(series)

    assert ours.shape == reference.shape
    assert corner_distance_mm(ours, reference) <= AFFINE_TOLERANCE_MM
    assert np.array_equal(ours.get_fdata(dtype=np.float32), reference.get_fdata(dtype=np.float32))


def test_real_jpeg2000_slab_equals_dicom2nifti():
    folder = require_shared(TOTALSEG / "ct-dicom")
    series = load_series(folder)
    assert str(series.datasets[0].file_meta.TransferSyntaxUID) == JPEG2000Lossless

    ours = series_to_nifti(series)
    reference = convert_with_dicom2nifti(series)

    assert ours.shape == reference.shape
    assert corner_distance_mm(ours, reference) <= AFFINE_TOLERANCE_MM
    assert np.array_equal(ours.get_fdata(dtype=np.float32), reference.get_fdata(dtype=np.float32))


# Exact HU and the volume dtype


def test_usual_ct_gives_int16(small_series):
    series = load_series(small_series)

    image = series_to_nifti(series)

    assert image.get_data_dtype() == np.int16
    assert np.asarray(image.dataobj).dtype == np.int16
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert np.array_equal(np.asarray(image.dataobj), pydicom_reference(series))


def test_non_integral_rescale_gives_float32(small_series):
    def change(dataset, stored):
        dataset.RescaleSlope = "0.5"
        dataset.RescaleIntercept = "-1024.25"
        return stored

    rewrite_pixels(small_series, change)
    series = load_series(small_series)

    image = series_to_nifti(series)

    assert image.get_data_dtype() == np.float32
    expected = pydicom_reference(series).astype(np.float32)
    assert np.array_equal(np.asarray(image.dataobj), expected)


def test_hu_beyond_int16_switch_to_float32(small_series):
    # 16 bits stored, unsigned: 60000 - 1024 does not fit int16, but only in the sixth file.
    def change(dataset, stored):
        dataset.BitsStored = 16
        dataset.HighBit = 15
        values = stored.astype(np.uint16)
        if int(dataset.InstanceNumber) == 6:
            values[0, 0] = 60000
        return values

    rewrite_pixels(small_series, change)
    series = load_series(small_series)

    image = series_to_nifti(series)

    assert image.get_data_dtype() == np.float32
    data = np.asarray(image.dataobj)
    assert data.max() == 60000 - 1024
    assert np.array_equal(data, pydicom_reference(series))


def test_signed_stored_values_with_padding(small_series):
    # The usual GE layout: signed 16-bit values, intercept -1024 and padding value -2000.
    def change(dataset, stored):
        dataset.PixelRepresentation = 1
        dataset.BitsStored = 16
        dataset.HighBit = 15
        dataset.add_new("PixelPaddingValue", "SS", -2000)
        values = stored.astype(np.int16)
        values[:, :3] = -2000
        return values

    rewrite_pixels(small_series, change)
    series = load_series(small_series)

    image = series_to_nifti(series)

    data = np.asarray(image.dataobj)
    assert image.get_data_dtype() == np.int16
    assert np.count_nonzero(data == PADDING_HU) == 3 * series.rows * len(series.datasets)
    assert np.array_equal(data, pydicom_reference(series))


def test_unused_high_bits_are_ignored(small_series):
    # BitsStored 12: a reader must ignore bits 12..15, which this sender filled with garbage.
    def change(dataset, stored):
        return stored.astype(np.uint16) | np.uint16(0xA000)

    rewrite_pixels(small_series, change)
    series = load_series(small_series)

    image = series_to_nifti(series)

    assert image.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(image.dataobj), pydicom_reference(series))


# Memory


def test_series_datasets_hold_no_pixel_data(small_series):
    series = load_series(small_series)

    image = series_to_nifti(series)

    assert all(PIXEL_DATA_TAG not in dataset for dataset in series.datasets)
    assert all(location is not None for location in series.pixel_data_locations)
    assert image.shape == (24, 20, 10)


def test_truncated_file_raises_conversion_error(small_series):
    from dicom_io.errors import ConversionError

    series = load_series(small_series)
    path = series.files[4]
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(ConversionError, match="truncated"):
        series_to_nifti(series)
