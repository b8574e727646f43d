"""Resampling of volumes between voxel grids that span the same physical extent."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: Voxels of float32 work array allowed per chunk when an axis is interpolated (64 MiB).
CHUNK_VOXELS = 16 * 2**20


def grid_shape_for_spacing(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Return the shape of a grid with ``target_spacing`` over the extent of ``shape`` x ``spacing``.

    Parameters
    ----------
    shape: Sequence[int]
        Number of voxels per axis of the source grid.
    spacing: Sequence[float]
        Voxel spacing of the source grid in mm.
    target_spacing: Sequence[float]
        Requested voxel spacing in mm.

    Returns
    -------
    tuple[int, int, int]
        Number of voxels per axis, at least 1.
    """
    return tuple(
        max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing)
    )


def linear_weights(
    source_length: int, target_length: int, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the two source neighbours and the weight of the upper one for target ``indices``.

    Voxel edges of both grids coincide: target voxel ``j`` samples the source at
    ``(j + 0.5) * source_length / target_length - 0.5``, clamped to the first voxel, as
    ``torch.nn.functional.interpolate`` does with ``align_corners=False``.

    Parameters
    ----------
    source_length, target_length: int
        Lengths of the axis on both grids.
    indices: numpy.ndarray
        Target voxel indices.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]
        Lower and upper source indices and the float32 weight of the upper one.
    """
    scale = source_length / target_length
    position = np.maximum((indices + 0.5) * scale - 0.5, 0.0)
    lower = np.minimum(np.floor(position).astype(np.intp), source_length - 1)
    upper = np.minimum(lower + 1, source_length - 1)
    return lower, upper, (position - lower).astype(np.float32)


def _interpolate_axis(volume: np.ndarray, axis: int, target_length: int, indices: np.ndarray) -> np.ndarray:
    """Linearly interpolate ``volume`` along ``axis`` at target ``indices``, as float32.

    The work is split into chunks along another axis so that integer or non-contiguous input
    is converted to float32 a chunk at a time.
    """
    lower, upper, weight = linear_weights(volume.shape[axis], target_length, indices)
    out_shape = list(volume.shape)
    out_shape[axis] = len(indices)
    out = np.empty(out_shape, dtype=np.float32)

    chunk_axis = 0 if axis != 0 else 1
    per_plane = max(1, int(np.prod(out_shape)) // max(1, out_shape[chunk_axis]))
    step = max(1, CHUNK_VOXELS // per_plane)
    shape = [1, 1, 1]
    shape[axis] = len(indices)
    weight = weight.reshape(shape)
    for start in range(0, volume.shape[chunk_axis], step):
        part = [slice(None)] * 3
        part[chunk_axis] = slice(start, start + step)
        source = volume[tuple(part)]
        low = np.take(source, lower, axis=axis).astype(np.float32, copy=False)
        high = np.take(source, upper, axis=axis).astype(np.float32, copy=False)
        high -= low
        high *= weight
        high += low
        out[tuple(part)] = high
    return out


def resize_volume(
    volume: np.ndarray,
    shape: Sequence[int],
    mode: str = "trilinear",
    *,
    region: Sequence[slice] | None = None,
) -> np.ndarray:
    """Resample a 3D array onto a grid of ``shape`` voxels covering the same extent.

    Voxel edges of both grids coincide (``align_corners=False``), so a resize followed by the
    reverse resize maps every voxel back onto its original position. Trilinear resampling is
    done one axis at a time, shrinking axes first and in chunks, so the float32 work arrays stay
    near the size of the output. The input may be any numeric dtype and a view.

    Parameters
    ----------
    volume: numpy.ndarray
        3D array.
    shape: Sequence[int]
        Target number of voxels per axis.
    mode: str
        ``"trilinear"`` or ``"nearest"``.
    region: Sequence[slice] | None
        Part of the target grid to compute (slices with steps of 1); None for all of it.
        Only trilinear resampling takes a region.

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape``, or of the region's size.

    Raises
    ------
    ValueError
        If ``region`` is given with ``mode="nearest"``.
    """
    target = tuple(int(n) for n in shape)
    if mode == "nearest":
        if region is not None:
            raise ValueError("resize_volume takes a region only with mode='trilinear'")
        tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        if tuple(tensor.shape[2:]) == target:
            return tensor[0, 0].numpy()
        with torch.inference_mode():
            resized = F.interpolate(tensor, size=target, mode="nearest-exact")
        return resized[0, 0].numpy()

    target_indices = [
        np.arange(n) if region is None else np.arange(n)[region[axis]] for axis, n in enumerate(target)
    ]

    # Work on the axes in memory order (largest stride first), so that whole planes or rows are
    # read at a time whatever the view's transposes and flips.
    memory_order = [int(axis) for axis in np.argsort([-abs(stride) for stride in volume.strides], kind="stable")]
    result: np.ndarray = volume.transpose(memory_order)
    target_in_order = [target[axis] for axis in memory_order]
    indices_in_order = [target_indices[axis] for axis in memory_order]

    # Axes that shrink the most go first, so the intermediate arrays stay small.
    steps = sorted(range(3), key=lambda axis: len(indices_in_order[axis]) / result.shape[axis])
    for axis in steps:
        if result.shape[axis] == target_in_order[axis] and len(indices_in_order[axis]) == target_in_order[axis]:
            continue
        result = _interpolate_axis(result, axis, target_in_order[axis], indices_in_order[axis])
    return np.ascontiguousarray(result.transpose(np.argsort(memory_order)), dtype=np.float32)
