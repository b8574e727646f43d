"""Resampling of volumes between voxel grids that span the same physical extent."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


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


def resize_volume(volume: np.ndarray, shape: Sequence[int], mode: str = "trilinear") -> np.ndarray:
    """Resample a 3D array onto a grid of ``shape`` voxels covering the same extent.

    Voxel edges of both grids coincide (``align_corners=False``), so a resize followed by the
    reverse resize maps every voxel back onto its original position.

    Parameters
    ----------
    volume: numpy.ndarray
        3D array.
    shape: Sequence[int]
        Target number of voxels per axis.
    mode: str
        ``"trilinear"`` or ``"nearest"``.

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape``.
    """
    target = tuple(int(n) for n in shape)
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if tuple(tensor.shape[2:]) == target:
        return tensor[0, 0].numpy()

    with torch.inference_mode():
        if mode == "nearest":
            resized = F.interpolate(tensor, size=target, mode="nearest-exact")
        else:
            resized = F.interpolate(tensor, size=target, mode=mode, align_corners=False)
    return resized[0, 0].numpy()
