"""Decoding of a CT series into one preallocated volume of Hounsfield units.

The modality LUT of each instance is applied exactly as ``pydicom.pixels.apply_modality_lut``
does: ``stored * RescaleSlope + RescaleIntercept`` when both attributes are present, the
Modality LUT Sequence when it is present, the stored values otherwise. Pixels marked by
PixelPaddingValue become :data:`PADDING_HU`.

The volume is int16 when every instance has an integral RescaleSlope and RescaleIntercept and no
Modality LUT Sequence, which stores the exact HU of usual CT data in half the memory of float32.
When a slice turns out to contain HU outside the int16 range, the volume is converted to float32
once and decoding continues. Non-integral rescale parameters give float32, rounded from the
float64 result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from dicom_io.pixel_reader import PixelDataLocation, can_read_directly, read_stored_frame, stored_dtype_of

logger = logging.getLogger(__name__)

#: HU given to padding pixels (PixelPaddingValue): air.
PADDING_HU = -1024

INT16_INFO = np.iinfo(np.int16)


def rescale_of(dataset: Dataset) -> tuple[float, float] | None:
    """Return ``(RescaleSlope, RescaleIntercept)``, ``(1, 0)`` when either is absent.

    Returns None when the instance has a Modality LUT Sequence, which then replaces the rescale.
    """
    if "ModalityLUTSequence" in dataset:
        return None
    slope = dataset.get("RescaleSlope")
    intercept = dataset.get("RescaleIntercept")
    if slope is None or intercept is None or slope == "" or intercept == "":
        return 1.0, 0.0
    return float(slope), float(intercept)


def has_integral_rescale(dataset: Dataset) -> bool:
    """Return whether the modality LUT of ``dataset`` is an integral rescale of integers to integers."""
    rescale = rescale_of(dataset)
    return rescale is not None and rescale[0].is_integer() and rescale[1].is_integer()


def padding_mask(stored: np.ndarray, dataset: Dataset) -> np.ndarray | None:
    """Return where ``stored`` equals PixelPaddingValue (or lies in its range), None without one.

    With PixelPaddingRangeLimit, every value between it and PixelPaddingValue is padding.
    """
    padding = dataset.get("PixelPaddingValue")
    if padding is None:
        return None

    padding_value = int(padding)
    limit = dataset.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == padding_value
    low, high = sorted((padding_value, int(limit)))
    return (stored >= low) & (stored <= high)


def slice_hu_float32(path: Path, dataset: Dataset, location: PixelDataLocation | None) -> np.ndarray:
    """Decode one instance and return its HU as a float32 ``(Rows, Columns)`` array.

    Raises
    ------
    ValueError, OSError, RuntimeError, NotImplementedError
        When the pixel data cannot be read or decoded (see
        :func:`dicom_io.pixel_reader.read_stored_frame`).
    """
    stored = read_stored_frame(path, dataset, location)
    hu = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float32)
    mask = padding_mask(stored, dataset)
    if mask is not None:
        hu[mask] = PADDING_HU
    return hu


def _stored_range(dataset: Dataset) -> tuple[int, int]:
    """Smallest and largest stored value that BitsStored and PixelRepresentation allow."""
    bits_stored = int(dataset.get("BitsStored", 16) or 16)
    if int(dataset.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def _fits_int16(low: float, high: float) -> bool:
    return INT16_INFO.min <= low and high <= INT16_INFO.max


def _fill_int16_in_place(
    target: np.ndarray, path: Path, dataset: Dataset, location: PixelDataLocation | None, intercept: int
) -> bool:
    """Read the stored values straight into ``target`` and add ``intercept`` in int16.

    Only for a slope of 1 and stored values that are int16, or uint16 with BitsStored <= 15 (so
    the bytes read as int16 give the same numbers). Returns False, leaving the work to the
    caller, when the values cannot be read directly or the HU range may leave int16.
    """
    if not can_read_directly(dataset, location):
        return False
    low, high = _stored_range(dataset)
    if not _fits_int16(low, high) or not _fits_int16(low + intercept, high + intercept):
        return False

    stored = read_stored_frame(path, dataset, location, out=target.view(stored_dtype_of(dataset)))
    mask = padding_mask(stored, dataset)
    if intercept:
        target += np.int16(intercept)
    if mask is not None:
        target[mask] = PADDING_HU
    return True


def _integral_hu(stored: np.ndarray, slope: int, intercept: int) -> np.ndarray:
    """``stored * slope + intercept`` in int64, exact for every integral rescale of 16-bit data."""
    hu = stored.astype(np.int64)
    if slope != 1:
        hu *= slope
    if intercept:
        hu += intercept
    return hu


def read_hu_volume(paths: list[Path], datasets: list[Dataset], locations: list[PixelDataLocation | None]) -> np.ndarray:
    """Decode every instance into one ``(slices, Rows, Columns)`` volume of HU.

    The instances are decoded one at a time into the preallocated volume, so at most one
    instance's pixel data is held besides it.

    Parameters
    ----------
    paths: list[pathlib.Path]
        The file of each instance, in slice order.
    datasets: list[pydicom.dataset.Dataset]
        The header of each instance (Rows and Columns equal for all), in the same order.
    locations: list[PixelDataLocation | None]
        The Pixel Data location of each instance from :func:`dicom_io.pixel_reader.read_header`,
        or None where unknown (pydicom then reads the file).

    Returns
    -------
    numpy.ndarray
        C-contiguous int16 or float32 array; see the module documentation for which.

    Raises
    ------
    ValueError, OSError, RuntimeError, NotImplementedError
        When an instance's pixel data cannot be read or decoded.
    """
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    integral = all(has_integral_rescale(dataset) for dataset in datasets)
    volume = np.empty((len(datasets), rows, columns), dtype=np.int16 if integral else np.float32)

    for k, (path, dataset, location) in enumerate(zip(paths, datasets, locations)):
        if volume.dtype == np.int16:
            slope, intercept = (int(value) for value in rescale_of(dataset))
            if slope == 1 and _fill_int16_in_place(volume[k], path, dataset, location, intercept):
                continue

            stored = read_stored_frame(path, dataset, location)
            hu = _integral_hu(stored, slope, intercept)
            mask = padding_mask(stored, dataset)
            if mask is not None:
                hu[mask] = PADDING_HU
            if _fits_int16(int(hu.min()), int(hu.max())):
                volume[k] = hu
                continue

            logger.info(
                "Instance %s (SOPInstanceUID %s) has HU from %d to %d, outside int16; "
                "decoding the series as float32",
                path,
                dataset.get("SOPInstanceUID", ""),
                int(hu.min()),
                int(hu.max()),
            )
            volume = volume.astype(np.float32)
            volume[k] = hu
            continue

        volume[k] = slice_hu_float32(path, dataset, location)
    return volume
