"""Conversion of a CT series to a RAS NIfTI volume and of label volumes back to source frames.

Coordinate conventions: DICOM patient coordinates are LPS, NIfTI world coordinates are RAS, so
a DICOM position ``(x, y, z)`` is ``(-x, -y, z)`` in RAS. On the native grid of a series, voxel
index ``i`` runs along the columns of a slice (the row direction cosine), ``j`` along its rows
(the column direction cosine) and ``k`` over ``CTSeries.datasets`` in sorted order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import dicom2nifti.convert_dicom
import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale

from dicom_io.errors import ConversionError
from dicom_io.series import CTSeries

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Maximum distance in mm between the volume corners placed by dicom2nifti's affine and by the
# affine built here. Beyond it, the conversion falls back to the affine built here.
AFFINE_AGREEMENT_TOLERANCE_MM = 0.05

#: Percentile of the slice steps used as the step of the regular grid for irregular series.
GRID_STEP_PERCENTILE = 10

#: HU given to padding pixels (PixelPaddingValue): air.
PADDING_HU = -1024.0

# A source pixel centre may lie this far (in voxels) from the nearest voxel centre before
# labels_to_source_frames reports that the label grid does not match the series.
GRID_MISMATCH_TOLERANCE_VOXELS = 0.1


def native_affine_ras(series: CTSeries) -> np.ndarray:
    """Build the RAS affine of the native ``(column, row, slice)`` grid of a series.

    The slice step is the vector from the first to the last slice origin divided by the number
    of gaps, which reproduces a uniformly stacked series exactly, including gantry tilt.

    Parameters
    ----------
    series: CTSeries
        A validated series.

    Returns
    -------
    numpy.ndarray
        A 4x4 affine mapping ``(i, j, k, 1)`` to RAS millimetres.
    """
    first = series.datasets[0]
    last = series.datasets[-1]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_cosine = orientation[:3]
    column_cosine = orientation[3:]
    row_spacing, column_spacing = (float(value) for value in first.PixelSpacing)

    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    n_slices = len(series.datasets)
    if n_slices > 1:
        step = (np.asarray(last.ImagePositionPatient, dtype=float) - origin) / (n_slices - 1)
    else:
        step = series.slice_normal * float(first.get("SliceThickness", 1.0) or 1.0)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * column_spacing
    affine_lps[:3, 1] = column_cosine * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = origin
    return LPS_TO_RAS @ affine_lps


def slice_hu(dataset: Dataset) -> np.ndarray:
    """Decode one slice and return its HU as a float32 ``(rows, columns)`` array.

    The modality LUT (RescaleSlope, RescaleIntercept) is applied to the stored values, which
    pydicom reads as signed or unsigned from PixelRepresentation and masks to BitsStored.
    Pixels equal to PixelPaddingValue, or between it and PixelPaddingRangeLimit, lie outside
    the reconstructed field and become :data:`PADDING_HU` (air) instead of their rescaled value.
    """
    stored = dataset.pixel_array
    hu = np.asarray(apply_rescale(stored, dataset), dtype=np.float32)

    padding = dataset.get("PixelPaddingValue")
    if padding is not None:
        limit = dataset.get("PixelPaddingRangeLimit")
        padding_value = int(padding)
        if limit is None:
            padded = stored == padding_value
        else:
            low, high = sorted((padding_value, int(limit)))
            padded = (stored >= low) & (stored <= high)
        hu[padded] = PADDING_HU
    return hu


def _native_volume_hu(series: CTSeries) -> np.ndarray:
    """Decode every slice and apply the modality LUT, giving a ``(columns, rows, slices)`` array."""
    volume = np.empty((series.columns, series.rows, len(series.datasets)), dtype=np.float32)
    for k, dataset in enumerate(series.datasets):
        volume[:, :, k] = slice_hu(dataset).T
    return volume


def regular_grid_positions(series: CTSeries) -> np.ndarray:
    """Return the slice positions along the normal of the regular grid for ``series``.

    The grid runs from the first to the last source slice. Its step is close to the finest
    regular step of the series (the 10th percentile of the slice steps, which ignores a few
    jittered steps), so source slices of a series with missing slices or with a fine and a
    coarse part land exactly on grid positions.
    """
    first, last = float(series.positions_mm[0]), float(series.positions_mm[-1])
    fine_step = float(np.percentile(np.diff(series.positions_mm), GRID_STEP_PERCENTILE))
    steps = max(int(round((last - first) / fine_step)), 1)
    return np.linspace(first, last, steps + 1)


def _resampled_volume_hu(series: CTSeries, grid_positions: np.ndarray) -> np.ndarray:
    """Interpolate the source slices linearly along the normal at ``grid_positions``."""
    source = series.positions_mm
    volume = np.empty((series.columns, series.rows, len(grid_positions)), dtype=np.float32)
    # Grid positions ascend, so only the two source slices around the current one are kept.
    cache: dict[int, np.ndarray] = {}

    def hu_of(index: int) -> np.ndarray:
        if index not in cache:
            for stale in [key for key in cache if key < index - 1]:
                del cache[stale]
            cache[index] = slice_hu(series.datasets[index]).T
        return cache[index]

    for k, position in enumerate(grid_positions):
        upper = int(np.clip(np.searchsorted(source, position), 1, len(source) - 1))
        lower = upper - 1
        span = source[upper] - source[lower]
        weight = float(np.clip((position - source[lower]) / span, 0.0, 1.0))
        if weight < 1e-6:
            volume[:, :, k] = hu_of(lower)
        elif weight > 1.0 - 1e-6:
            volume[:, :, k] = hu_of(upper)
        else:
            volume[:, :, k] = (1.0 - weight) * hu_of(lower) + weight * hu_of(upper)
    return volume


def _regular_affine_ras(series: CTSeries, grid_positions: np.ndarray) -> np.ndarray:
    """RAS affine of the regular grid: the native in-plane axes and a uniform slice step.

    The slice step follows the line from the first to the last slice origin, so a sheared
    (gantry-tilted) stack keeps its shear.
    """
    affine = native_affine_ras(series)
    first = np.asarray(series.datasets[0].ImagePositionPatient, dtype=float)
    last = np.asarray(series.datasets[-1].ImagePositionPatient, dtype=float)
    step_lps = (last - first) / max(len(grid_positions) - 1, 1)
    affine[:3, 2] = LPS_TO_RAS[:3, :3] @ step_lps
    return affine


def _corner_distance_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape: tuple[int, ...]) -> float:
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    ).T
    return float(np.abs(affine_a @ corners - affine_b @ corners).max())


def _convert_with_dicom2nifti(series: CTSeries, native_affine: np.ndarray) -> nib.Nifti1Image | None:
    """Return dicom2nifti's volume as RAS+ float32, or None when it is unusable for this series."""
    shape = (series.columns, series.rows, len(series.datasets))
    try:
        # reorient_nifti=False because dicom2nifti 2.6 writes the reoriented image to
        # output_file and fails when that is None; reorientation happens below with nibabel.
        result = dicom2nifti.convert_dicom.dicom_array_to_nifti(
            list(series.datasets), None, reorient_nifti=False
        )
    except Exception as error:  # dicom2nifti raises plain exceptions as well as its own
        logger.info(
            "dicom2nifti did not convert series %s (%s: %s); building the volume directly",
            series.series_instance_uid or "<no SeriesInstanceUID>",
            type(error).__name__,
            error,
        )
        return None

    image = result["NII"]
    if image.shape != shape:
        logger.warning(
            "dicom2nifti returned shape %s for series %s but the validated series has %s; "
            "building the volume directly",
            image.shape,
            series.series_instance_uid,
            shape,
        )
        return None

    canonical = nib.as_closest_canonical(image)
    expected = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), native_affine))
    distance = _corner_distance_mm(canonical.affine, expected.affine, shape)
    if canonical.shape != expected.shape or distance > AFFINE_AGREEMENT_TOLERANCE_MM:
        logger.warning(
            "dicom2nifti affine for series %s differs from the DICOM geometry by %.3f mm; "
            "building the volume directly",
            series.series_instance_uid,
            distance,
        )
        return None

    data = np.asarray(canonical.dataobj, dtype=np.float32)
    return nib.Nifti1Image(data, expected.affine)


def _decode_and_place(
    series: CTSeries, decode: Callable[[], np.ndarray], affine: np.ndarray
) -> nib.Nifti1Image:
    try:
        volume = decode()
    except Exception as error:  # pixel data handlers raise many exception types
        raise ConversionError(
            f"Could not decode the pixel data of series {series.series_instance_uid or '<no UID>'} "
            f"({type(error).__name__}: {error}). Check that a decoder for transfer syntax "
            f"{series.datasets[0].file_meta.TransferSyntaxUID} is installed (pylibjpeg plugins)."
        ) from error
    image = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    return nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)


def series_to_nifti(series: CTSeries) -> nib.Nifti1Image:
    """Convert a validated CT series to a RAS+ NIfTI image of Hounsfield units.

    A series whose slice steps are not uniform (a missing slice, mixed spacing; see
    :attr:`CTSeries.is_uniform`) is resampled here onto the regular grid of
    :func:`regular_grid_positions` by linear interpolation along the slice normal; :func:`labels_to_source_frames` maps labels on that
    grid back to each source slice by its own position. For a uniform series dicom2nifti
    builds the volume first, and its result is used only when its shape and affine agree
    with the geometry of ``series``. Otherwise, and for series with PixelPaddingValue, the
    volume is decoded here and placed with :func:`native_affine_ras`. Either way the modality
    LUT (RescaleSlope and RescaleIntercept) is applied once and padding pixels become air.

    Parameters
    ----------
    series: CTSeries
        A series returned by :func:`dicom_io.series.load_series`.

    Returns
    -------
    nibabel.Nifti1Image
        RAS+ image (``nib.as_closest_canonical``) with float32 HU data and ``xyzt`` units of mm.

    Raises
    ------
    ConversionError
        When the pixel data of a slice cannot be decoded.
    """
    native_affine = native_affine_ras(series)
    image = None
    method = "dicom2nifti"
    if not series.is_uniform:
        method = "resampled"
        grid_positions = regular_grid_positions(series)
        image = _decode_and_place(
            series, lambda: _resampled_volume_hu(series, grid_positions), _regular_affine_ras(series, grid_positions)
        )
    elif any("PixelPaddingValue" in dataset for dataset in series.datasets):
        # dicom2nifti 2.6 rescales padding pixels like tissue; decode here to map them to air.
        method = "direct"
    else:
        image = _convert_with_dicom2nifti(series, native_affine)

    if image is None:
        method = "direct"
        image = _decode_and_place(series, lambda: _native_volume_hu(series), native_affine)

    image.header.set_xyzt_units("mm")
    image.header.set_data_dtype(np.float32)
    logger.info(
        "Converted series %s to NIfTI with %s: shape %s, orientation %s",
        series.series_instance_uid or "<no SeriesInstanceUID>",
        method,
        image.shape,
        "".join(nib.aff2axcodes(image.affine)),
    )
    return image


def labels_to_source_frames(labels: np.ndarray, image: nib.Nifti1Image, series: CTSeries) -> np.ndarray:
    """Sample a label volume at every source pixel of the series.

    Each source pixel centre is mapped to RAS with its own instance's ImagePositionPatient,
    then to the nearest voxel of ``image``. When ``image`` came from
    :func:`series_to_nifti`, the two grids differ only by axis permutation and flips, so the
    labels are reproduced exactly.

    Parameters
    ----------
    labels: numpy.ndarray
        Integer label volume with the shape of ``image`` (0 background, 1 liver, 2 tumour).
    image: nibabel.Nifti1Image
        The image whose affine defines the voxel grid of ``labels``.
    series: CTSeries
        The source series.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape ``(len(series.datasets), Rows, Columns)``; frame ``k`` belongs to
        ``series.datasets[k]``. Pixels outside the label volume are 0.

    Raises
    ------
    ConversionError
        When ``labels`` does not have the shape of ``image`` or contains values outside 0..255.
    """
    labels = np.asarray(labels)
    if labels.shape != tuple(image.shape[:3]):
        raise ConversionError(
            f"Label volume shape {labels.shape} does not match the image shape {image.shape[:3]}."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ConversionError(
            f"Label values must lie in 0..255 to fit uint8 frames; found {labels.min()}..{labels.max()}."
        )

    rows, columns = series.rows, series.columns
    world_to_voxel = np.linalg.inv(image.affine)
    first = series.datasets[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(value) for value in first.PixelSpacing)

    # Pixel (row j, column i) of a slice lies at its origin + i * column_spacing * row_cosine
    # + j * row_spacing * column_cosine (LPS). load_series checked that orientation and pixel
    # spacing are shared, so the in-plane part of the voxel index is the same for every slice
    # and only the slice origin's contribution changes.
    in_plane_ras = np.diag([-1.0, -1.0, 1.0]) @ np.column_stack(
        (orientation[:3] * column_spacing, orientation[3:] * row_spacing)
    )
    jj, ii = np.meshgrid(np.arange(rows, dtype=float), np.arange(columns, dtype=float), indexing="ij")
    in_plane_voxels = np.tensordot(world_to_voxel[:3, :3] @ in_plane_ras, np.stack((ii, jj)), axes=1)
    upper_bounds = np.asarray(labels.shape)[:, None, None]

    frames = np.zeros((len(series.datasets), rows, columns), dtype=np.uint8)
    max_offset = 0.0
    outside = 0
    for k, dataset in enumerate(series.datasets):
        origin_ras = np.asarray(dataset.ImagePositionPatient, dtype=float) * np.array([-1.0, -1.0, 1.0])
        origin_voxel = world_to_voxel[:3, :3] @ origin_ras + world_to_voxel[:3, 3]
        voxels = in_plane_voxels + origin_voxel[:, None, None]

        nearest = np.rint(voxels)
        max_offset = max(max_offset, float(np.abs(voxels - nearest).max()))
        index = nearest.astype(np.int64)
        inside = np.all((index >= 0) & (index < upper_bounds), axis=0)
        outside += int((~inside).sum())
        frames[k][inside] = labels[index[0][inside], index[1][inside], index[2][inside]]

    if max_offset > GRID_MISMATCH_TOLERANCE_VOXELS:
        logger.warning(
            "Label grid does not match series %s: source pixels lie up to %.2f voxels from the "
            "nearest label voxel, so frames use nearest-neighbour sampling",
            series.series_instance_uid,
            max_offset,
        )
    if outside:
        logger.warning(
            "%d source pixels of series %s lie outside the label volume and were set to 0",
            outside,
            series.series_instance_uid,
        )
    return frames
