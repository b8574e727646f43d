"""Conversion of a CT series to a RAS NIfTI volume and of label volumes back to source frames.

Coordinate conventions: DICOM patient coordinates are LPS, NIfTI world coordinates are RAS, so
a DICOM position ``(x, y, z)`` is ``(-x, -y, z)`` in RAS. On the native grid of a series, voxel
index ``i`` runs along the columns of a slice (the row direction cosine), ``j`` along its rows
(the column direction cosine) and ``k`` over ``CTSeries.datasets`` in sorted order.

The volume is decoded here, instance by instance, into one preallocated array (see
:mod:`dicom_io.hu_volume`). dicom2nifti, an independent implementation, is kept in
:mod:`dicom_io.reference_conversion` to check this conversion in the tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import nibabel as nib
import numpy as np

from dicom_io.errors import ConversionError
from dicom_io.hu_volume import PADDING_HU, read_hu_volume, slice_hu_float32
from dicom_io.series import CTSeries

logger = logging.getLogger(__name__)

__all__ = [
    "PADDING_HU",
    "labels_to_source_frames",
    "native_affine_ras",
    "regular_grid_positions",
    "series_to_nifti",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Percentile of the slice steps used as the step of the regular grid for irregular series.
GRID_STEP_PERCENTILE = 10

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


def _locations_of(series: CTSeries) -> list:
    """Pixel Data locations in the order of ``series.datasets``; None for each when unknown."""
    if len(series.pixel_data_locations) == len(series.datasets):
        return list(series.pixel_data_locations)
    return [None] * len(series.datasets)


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
    """Interpolate the source slices linearly along the normal at ``grid_positions``.

    Returns a float32 ``(grid slices, Rows, Columns)`` array.
    """
    source = series.positions_mm
    locations = _locations_of(series)
    volume = np.empty((len(grid_positions), series.rows, series.columns), dtype=np.float32)
    # Grid positions ascend, so only the two source slices around the current one are kept.
    cache: dict[int, np.ndarray] = {}

    def hu_of(index: int) -> np.ndarray:
        if index not in cache:
            for stale in [key for key in cache if key < index - 1]:
                del cache[stale]
            cache[index] = slice_hu_float32(series.files[index], series.datasets[index], locations[index])
        return cache[index]

    for k, position in enumerate(grid_positions):
        upper = int(np.clip(np.searchsorted(source, position), 1, len(source) - 1))
        lower = upper - 1
        span = source[upper] - source[lower]
        weight = float(np.clip((position - source[lower]) / span, 0.0, 1.0))
        if weight < 1e-6:
            volume[k] = hu_of(lower)
        elif weight > 1.0 - 1e-6:
            volume[k] = hu_of(upper)
        else:
            volume[k] = (1.0 - weight) * hu_of(lower) + weight * hu_of(upper)
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


def _decode_and_place(
    series: CTSeries, decode: Callable[[], np.ndarray], affine: np.ndarray
) -> nib.Nifti1Image:
    """Decode a ``(slices, Rows, Columns)`` volume and wrap it as a RAS+ image without copying it.

    The transpose to ``(columns, rows, slices)`` and the flips of
    :func:`nibabel.as_closest_canonical` are numpy views of the decoded array.
    """
    try:
        volume = decode()
    except (ValueError, OSError, RuntimeError, NotImplementedError, AttributeError, KeyError) as error:
        transfer_syntax = series.datasets[0].file_meta.get("TransferSyntaxUID", "<none>")
        raise ConversionError(
            f"Could not decode the pixel data of series {series.series_instance_uid or '<no UID>'} "
            f"({type(error).__name__}: {error}). Check that a decoder for transfer syntax "
            f"{transfer_syntax} is installed (pylibjpeg plugins)."
        ) from error

    image = nib.as_closest_canonical(nib.Nifti1Image(volume.transpose(2, 1, 0), affine))
    result = nib.Nifti1Image(np.asarray(image.dataobj), image.affine)
    result.header.set_data_dtype(volume.dtype)
    return result


def series_to_nifti(series: CTSeries) -> nib.Nifti1Image:
    """Convert a validated CT series to a RAS+ NIfTI image of Hounsfield units.

    Each instance is decoded from its file straight into one preallocated volume (see
    :func:`dicom_io.hu_volume.read_hu_volume`), placed with :func:`native_affine_ras`. A series
    whose slice steps are not uniform (a missing slice, mixed spacing; see
    :attr:`CTSeries.is_uniform`) is resampled instead onto the regular grid of
    :func:`regular_grid_positions` by linear interpolation along the slice normal, and
    :func:`labels_to_source_frames` maps labels on that grid back to each source slice by its
    own position. Either way the modality LUT (RescaleSlope and RescaleIntercept) is applied
    once and padding pixels (PixelPaddingValue) become air.

    Parameters
    ----------
    series: CTSeries
        A series returned by :func:`dicom_io.series.load_series`.

    Returns
    -------
    nibabel.Nifti1Image
        RAS+ image (``nib.as_closest_canonical``) with ``xyzt`` units of mm. Its data array is
        int16 when every instance has an integral RescaleSlope and RescaleIntercept and the HU
        fit int16 (the usual CT case), float32 otherwise (non-integral rescale, Modality LUT
        Sequence, HU outside int16, or a resampled series). The header's data type gives which.
        The array is a non-contiguous view (transpose and flips) of the one decoded array, which
        nothing else references.

    Raises
    ------
    ConversionError
        When the pixel data of a slice cannot be read or decoded.
    """
    if series.is_uniform:
        method = "direct"
        locations = _locations_of(series)
        image = _decode_and_place(
            series, lambda: read_hu_volume(series.files, series.datasets, locations), native_affine_ras(series)
        )
    else:
        method = "resampled"
        grid_positions = regular_grid_positions(series)
        image = _decode_and_place(
            series,
            lambda: _resampled_volume_hu(series, grid_positions),
            _regular_affine_ras(series, grid_positions),
        )

    image.header.set_xyzt_units("mm")
    logger.info(
        "Converted series %s to NIfTI (%s): shape %s, %s, orientation %s",
        series.series_instance_uid or "<no SeriesInstanceUID>",
        method,
        image.shape,
        image.get_data_dtype(),
        "".join(nib.aff2axcodes(image.affine)),
    )
    return image


def labels_to_source_frames(labels: np.ndarray, image: nib.Nifti1Image, series: CTSeries) -> np.ndarray:
    """Sample a label volume at every source pixel of the series.

    Each source pixel centre is mapped to RAS with its own instance's ImagePositionPatient,
    then to the nearest voxel of ``image``. When ``image`` came from
    :func:`series_to_nifti`, the two grids differ only by axis permutation and flips, so the
    labels are reproduced exactly. When the rows, columns and slices of the series each run
    along one voxel axis of ``image``, the frames are cut from the volume by slicing and one
    transposing copy. Other grids, such as oblique ones, are sampled pixel by pixel.

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
    if labels.size and labels.dtype not in (np.uint8, np.bool_) and (labels.min() < 0 or labels.max() > 255):
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
    in_plane_steps = world_to_voxel[:3, :3] @ in_plane_ras
    origins_ras = np.array([dataset.ImagePositionPatient for dataset in series.datasets], dtype=float)
    origins_ras *= np.array([-1.0, -1.0, 1.0])
    origin_voxels = origins_ras @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]

    axes = _aligned_voxel_axes(in_plane_steps, origin_voxels)
    if axes is None:
        frames, max_offset, outside = _sample_pixel_by_pixel(labels, in_plane_steps, origin_voxels, rows, columns)
    else:
        frames, max_offset, outside = _sample_axis_aligned(labels, in_plane_steps, origin_voxels, rows, columns, axes)

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


# Largest off-axis voxel step per source pixel, and largest in-plane drift of the slice origins,
# in voxels, for which labels_to_source_frames treats the grids as axis-aligned. Over 512
# pixels such an error moves a sampling point by at most about 5e-4 voxels.
AXIS_ALIGNMENT_TOLERANCE_VOXELS = 1e-6


def _aligned_voxel_axes(in_plane_steps: np.ndarray, origin_voxels: np.ndarray) -> tuple[int, int, int] | None:
    """Find the voxel axes along which the columns, rows and slices of a series run.

    Parameters
    ----------
    in_plane_steps: numpy.ndarray
        ``(3, 2)`` voxel step of one source pixel along a row (column index) and along a column
        (row index).
    origin_voxels: numpy.ndarray
        ``(instances, 3)`` voxel coordinates of each instance's first pixel.

    Returns
    -------
    tuple[int, int, int] | None
        The voxel axes of the column index, the row index and the instance index, or None when
        a pixel step leaves its voxel axis or the slice origins shift within the plane.
    """
    column_axis = int(np.argmax(np.abs(in_plane_steps[:, 0])))
    row_axis = int(np.argmax(np.abs(in_plane_steps[:, 1])))
    if column_axis == row_axis:
        return None
    slice_axis = 3 - column_axis - row_axis

    off_axis_steps = np.concatenate(
        (np.delete(in_plane_steps[:, 0], column_axis), np.delete(in_plane_steps[:, 1], row_axis))
    )
    if np.abs(off_axis_steps).max() > AXIS_ALIGNMENT_TOLERANCE_VOXELS:
        return None

    in_plane_drift = np.ptp(origin_voxels[:, [column_axis, row_axis]], axis=0).max()
    if in_plane_drift > AXIS_ALIGNMENT_TOLERANCE_VOXELS:
        return None
    return column_axis, row_axis, slice_axis


def _sample_axis_aligned(
    labels: np.ndarray,
    in_plane_steps: np.ndarray,
    origin_voxels: np.ndarray,
    rows: int,
    columns: int,
    axes: tuple[int, int, int],
) -> tuple[np.ndarray, float, int]:
    """Cut the source frames from an axis-aligned label volume.

    Each of the instance, row and column indices maps to the nearest index along one voxel
    axis, so the frames are the volume indexed by three 1D index arrays. Index arrays with a
    constant step become slices, so the usual case costs one transposing copy.

    Returns
    -------
    tuple[numpy.ndarray, float, int]
        The uint8 frames, the largest distance in voxels from a source pixel to its nearest
        voxel centre, and the number of source pixels outside the volume.
    """
    column_axis, row_axis, slice_axis = axes
    coordinates = (
        origin_voxels[:, slice_axis],
        origin_voxels[0, row_axis] + in_plane_steps[row_axis, 1] * np.arange(rows),
        origin_voxels[0, column_axis] + in_plane_steps[column_axis, 0] * np.arange(columns),
    )
    sizes = (labels.shape[slice_axis], labels.shape[row_axis], labels.shape[column_axis])

    selected = labels.transpose(slice_axis, row_axis, column_axis)
    destination: list[slice | np.ndarray] = []
    max_offset = 0.0
    inside_count = 1
    for axis, (values, size) in enumerate(zip(coordinates, sizes)):
        nearest = np.rint(values)
        max_offset = max(max_offset, float(np.abs(values - nearest).max(initial=0.0)))
        index = nearest.astype(np.int64)
        inside = (index >= 0) & (index < size)
        inside_count *= int(inside.sum())
        destination.append(_index_or_slice(np.flatnonzero(inside)))

        source = _index_or_slice(index[inside])
        if isinstance(source, slice):
            selected = selected[(slice(None),) * axis + (source,)]
        else:
            selected = np.take(selected, source, axis=axis)

    if inside_count == len(origin_voxels) * rows * columns:
        frames = np.empty((len(origin_voxels), rows, columns), dtype=np.uint8)
    else:
        frames = np.zeros((len(origin_voxels), rows, columns), dtype=np.uint8)
    if inside_count:
        if all(isinstance(item, slice) for item in destination):
            frames[tuple(destination)] = selected
        else:
            frames[np.ix_(*(np.arange(length)[item] for length, item in zip(frames.shape, destination)))] = selected
    return frames, max_offset, frames.size - inside_count


def _index_or_slice(indices: np.ndarray) -> slice | np.ndarray:
    """Return a slice that selects the same elements as the 1D ``indices`` when their step is constant."""
    if indices.size == 0:
        return slice(0, 0)
    if indices.size == 1:
        return slice(int(indices[0]), int(indices[0]) + 1)
    step = int(indices[1] - indices[0])
    if step == 0 or np.any(np.diff(indices) != step):
        return indices
    start = int(indices[0])
    stop = start + step * indices.size
    return slice(start, stop if stop >= 0 else None, step)


def _sample_pixel_by_pixel(
    labels: np.ndarray,
    in_plane_steps: np.ndarray,
    origin_voxels: np.ndarray,
    rows: int,
    columns: int,
) -> tuple[np.ndarray, float, int]:
    """Sample the label volume at the nearest voxel of every source pixel, one instance at a time.

    Returns the same triple as :func:`_sample_axis_aligned`, for any orientation of the grids.
    """
    jj, ii = np.meshgrid(np.arange(rows, dtype=float), np.arange(columns, dtype=float), indexing="ij")
    in_plane_voxels = np.tensordot(in_plane_steps, np.stack((ii, jj)), axes=1)
    upper_bounds = np.asarray(labels.shape)[:, None, None]

    frames = np.zeros((len(origin_voxels), rows, columns), dtype=np.uint8)
    max_offset = 0.0
    outside = 0
    for k, origin_voxel in enumerate(origin_voxels):
        voxels = in_plane_voxels + origin_voxel[:, None, None]

        nearest = np.rint(voxels)
        max_offset = max(max_offset, float(np.abs(voxels - nearest).max()))
        index = nearest.astype(np.int64)
        inside = np.all((index >= 0) & (index < upper_bounds), axis=0)
        outside += int((~inside).sum())
        frames[k][inside] = labels[index[0][inside], index[1][inside], index[2][inside]]
    return frames, max_offset, outside
