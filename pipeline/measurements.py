"""Volumes and counts measured on a label volume."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from pipeline.labels import LIVER_LABEL, TUMOR_LABEL
from pipeline.postprocessing import TUMOR_COMPONENT_STRUCTURE

MM3_PER_ML = 1000.0

#: Voxels counted per call of numpy.bincount (8 bytes each in its working copy).
COUNT_CHUNK_VOXELS = 8 * 2**20


@dataclass(frozen=True)
class Measurements:
    """Volumetry of one analysis.

    Attributes
    ----------
    liver_volume_ml: float
        Volume of liver parenchyma (label 1, tumours excluded) in mL.
    tumor_volume_ml: float
        Volume of all tumours (label 2) in mL.
    tumor_burden_percent: float
        tumour / (liver + tumour) x 100; 0 when no liver was found.
    tumor_count: int
        Number of 26-connected tumour components.
    liver_voxels: int
        Voxels labelled 1.
    tumor_voxels: int
        Voxels labelled 2.
    voxel_volume_mm3: float
        Volume of one voxel of the label grid in mm^3.
    """

    liver_volume_ml: float
    tumor_volume_ml: float
    tumor_burden_percent: float
    tumor_count: int
    liver_voxels: int
    tumor_voxels: int
    voxel_volume_mm3: float

    def as_dict(self) -> dict[str, float | int]:
        """Return the measurements as a JSON-ready mapping."""
        return asdict(self)


def measure(labels: np.ndarray, affine: np.ndarray) -> Measurements:
    """Measure liver and tumour volumes of a label volume.

    Parameters
    ----------
    labels: numpy.ndarray
        uint8 labels: 0 background, 1 liver, 2 tumour.
    affine: numpy.ndarray
        4 x 4 voxel-to-world affine in mm; its determinant gives the voxel volume.

    Returns
    -------
    Measurements
        Volumes rounded to 0.01 mL and burden to 0.01 %.
    """
    voxel_volume = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
    # bincount works on intp copies of its input: counting in chunks bounds that copy.
    flat = np.asarray(labels, dtype=np.uint8).reshape(-1)
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, flat.size, COUNT_CHUNK_VOXELS):
        counts += np.bincount(flat[start : start + COUNT_CHUNK_VOXELS], minlength=256)
    liver_voxels = int(counts[LIVER_LABEL])
    tumor_voxels = int(counts[TUMOR_LABEL])
    tumor_count = 0
    if tumor_voxels:
        # Components are counted inside the tumours' bounding box, which contains all of them.
        box = ndimage.find_objects((labels == TUMOR_LABEL).astype(np.uint8))[0]
        _, tumor_count = ndimage.label(labels[box] == TUMOR_LABEL, structure=TUMOR_COMPONENT_STRUCTURE)

    liver_ml = liver_voxels * voxel_volume / MM3_PER_ML
    tumor_ml = tumor_voxels * voxel_volume / MM3_PER_ML
    total = liver_voxels + tumor_voxels
    burden = 100.0 * tumor_voxels / total if total else 0.0

    return Measurements(
        liver_volume_ml=round(liver_ml, 2),
        tumor_volume_ml=round(tumor_ml, 2),
        tumor_burden_percent=round(burden, 2),
        tumor_count=int(tumor_count),
        liver_voxels=liver_voxels,
        tumor_voxels=tumor_voxels,
        voxel_volume_mm3=voxel_volume,
    )
