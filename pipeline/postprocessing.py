"""Post-processing of network probabilities into liver and tumour masks."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: 3 x 3 x 3 structuring element without corners (18-connectivity), as in the original pipeline.
OPENING_STRUCTURE = ndimage.generate_binary_structure(3, 2)

#: Face connectivity used to find the largest liver component.
LIVER_COMPONENT_STRUCTURE = ndimage.generate_binary_structure(3, 1)

#: Full 26-connectivity used to count tumours.
TUMOR_COMPONENT_STRUCTURE = ndimage.generate_binary_structure(3, 3)


def largest_liver_region(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Keep the largest liver region of the liver network's probabilities.

    The thresholded mask is eroded once, its largest face-connected component is kept, and that
    component is dilated once: small bridges to neighbouring organs break before the component
    is chosen, and the liver's outline is restored afterwards.

    Parameters
    ----------
    probabilities: numpy.ndarray
        Liver probabilities on the network's grid.
    threshold: float
        Probability above which a voxel is liver.

    Returns
    -------
    numpy.ndarray
        Boolean mask; all False when no voxel passes the threshold.
    """
    binary = probabilities > threshold
    eroded = ndimage.binary_erosion(binary, structure=OPENING_STRUCTURE)
    labels, count = ndimage.label(eroded, structure=LIVER_COMPONENT_STRUCTURE)
    if count == 0:
        logger.warning("The liver network found no liver above probability %.2f", threshold)
        return np.zeros_like(binary)

    sizes = ndimage.sum_labels(eroded, labels, index=np.arange(1, count + 1))
    largest = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_dilation(largest, structure=OPENING_STRUCTURE)


def dilate_liver(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Dilate a liver mask with the 18-connected element ``iterations`` times.

    Parameters
    ----------
    mask: numpy.ndarray
        Boolean liver mask.
    iterations: int
        Number of dilations (0 returns the mask unchanged).

    Returns
    -------
    numpy.ndarray
        Boolean mask.
    """
    if iterations <= 0:
        return mask.astype(bool)
    structure = ndimage.iterate_structure(OPENING_STRUCTURE, iterations)
    return ndimage.binary_dilation(mask, structure=structure)


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components of fewer than ``min_voxels`` voxels.

    Parameters
    ----------
    mask: numpy.ndarray
        Boolean mask.
    min_voxels: int
        Smallest component kept, in voxels.

    Returns
    -------
    numpy.ndarray
        Boolean mask.
    """
    if min_voxels <= 1 or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=TUMOR_COMPONENT_STRUCTURE)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    keep = np.concatenate([[False], sizes >= min_voxels])
    return keep[labels]
