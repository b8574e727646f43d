"""A synthetic abdominal CT volume for demonstrations and tests.

The phantom is a RAS volume of Hounsfield units. Air surrounds an elliptic body of
subcutaneous fat around soft tissue. A smooth liver with three round hypodense lesions lies in
the right upper abdomen, which is at low x because +x is patient left in RAS. A vertebral
column lies posterior, with two kidneys beside it and a patient table below the back.
Gaussian noise is added on top.

Known volumes on the default grid (192 x 192 x 80 voxels of 2.0 x 2.0 x 2.5 mm), counted from
the tissue map of :func:`abdomen_phantom_tissues` (see :data:`DEFAULT_PHANTOM_VOLUMES_ML`):

==================================  ==========
Structure                           Volume
==================================  ==========
Whole liver (parenchyma + lesions)  1362.96 mL
Liver parenchyma                    1348.44 mL
Lesions, 3 of 18, 20 and 24 mm      14.52 mL
Lesion volume / whole liver         1.07 %
==================================  ==========

The anatomy is defined in millimetres around the grid centre, so other grids give the same
structures, cut off where the field of view is smaller. The phantom exercises the data flow
of the node; it is not a validation case, and the networks may segment it poorly.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = (192, 192, 80)
DEFAULT_SPACING_MM = (2.0, 2.0, 2.5)

#: Standard deviation of the Gaussian noise added to every voxel, in HU.
NOISE_SD_HU = 10.0

MM3_PER_ML = 1000.0


class Tissue(enum.IntEnum):
    """Labels of the phantom's tissue map."""

    AIR = 0
    FAT = 1
    SOFT_TISSUE = 2
    LIVER = 3
    LESION = 4
    BONE = 5
    KIDNEY = 6
    TABLE = 7


#: Mean attenuation of each tissue before noise, in HU.
TISSUE_HU: dict[Tissue, float] = {
    Tissue.AIR: -1000.0,
    Tissue.FAT: -100.0,
    Tissue.SOFT_TISSUE: 40.0,
    Tissue.LIVER: 60.0,
    Tissue.LESION: 20.0,
    Tissue.BONE: 700.0,
    Tissue.KIDNEY: 30.0,
    Tissue.TABLE: 200.0,
}


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid in RAS millimetres relative to the grid centre."""

    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Return a boolean mask of the points inside the ellipsoid."""
        (cx, cy, cz), (a, b, c) = self.centre_mm, self.semi_axes_mm
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0


# Body cross-section (x, y) in mm. The body runs through the whole z range.
BODY_CENTRE_MM = (0.0, 10.0)
BODY_SEMI_AXES_MM = (165.0, 115.0)
SUBCUTANEOUS_FAT_MM = 20.0

# Patient table: a slab below the back (posterior is -y in RAS), across the whole z range.
TABLE_Y_RANGE_MM = (-138.0, -126.0)
TABLE_HALF_WIDTH_MM = 180.0

# Vertebral column: a cylinder along z, posterior in the body.
SPINE_CENTRE_MM = (0.0, -65.0)
SPINE_RADIUS_MM = 20.0

KIDNEYS = (
    Ellipsoid(centre_mm=(-80.0, -62.0, -45.0), semi_axes_mm=(28.0, 22.0, 50.0)),  # right
    Ellipsoid(centre_mm=(80.0, -62.0, -35.0), semi_axes_mm=(28.0, 22.0, 50.0)),  # left
)

# Liver: an ellipsoid in the patient's right upper abdomen whose anterior-posterior and
# cranio-caudal extent shrink towards the midline, like the left lobe, with a smooth wave on
# its surface. Lesions are spheres of 18-24 mm diameter well inside it.
LIVER_SHAPE = Ellipsoid(centre_mm=(-62.0, 22.0, 5.0), semi_axes_mm=(72.0, 64.0, 82.0))
LIVER_LEFT_LOBE_TAPER = 0.4
LIVER_SURFACE_WAVE = 0.06
LESIONS = (
    Ellipsoid(centre_mm=(-85.0, 30.0, 35.0), semi_axes_mm=(10.0, 10.0, 10.0)),
    Ellipsoid(centre_mm=(-50.0, 5.0, -15.0), semi_axes_mm=(9.0, 9.0, 9.0)),
    Ellipsoid(centre_mm=(-75.0, 50.0, -5.0), semi_axes_mm=(12.0, 12.0, 12.0)),
)

#: Volumes in mL on the default grid, counted from the tissue map.
DEFAULT_PHANTOM_VOLUMES_ML = {
    "liver_whole": 1362.96,
    "liver_parenchyma": 1348.44,
    "lesions": 14.52,
}
DEFAULT_PHANTOM_LESION_COUNT = len(LESIONS)


def phantom_affine(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
) -> np.ndarray:
    """Return the RAS voxel-to-world affine whose world origin is the grid centre."""
    affine = np.diag([*map(float, spacing_mm), 1.0])
    affine[:3, 3] = [-(size - 1) / 2.0 * spacing for size, spacing in zip(shape, spacing_mm)]
    return affine


def _world_coordinates(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return broadcastable x, y and z coordinates in mm of the voxel centres."""
    axes = [
        (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * spacing
        for size, spacing in zip(shape, spacing_mm)
    ]
    return (
        axes[0][:, None, None],
        axes[1][None, :, None],
        axes[2][None, None, :],
    )


def _inside_body_ellipse(x: np.ndarray, y: np.ndarray, margin_mm: float) -> np.ndarray:
    (cx, cy), (a, b) = BODY_CENTRE_MM, BODY_SEMI_AXES_MM
    return ((x - cx) / (a - margin_mm)) ** 2 + ((y - cy) / (b - margin_mm)) ** 2 <= 1.0


def _liver_mask(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    (cx, cy, cz), (a, b, c) = LIVER_SHAPE.centre_mm, LIVER_SHAPE.semi_axes_mm
    u = (x - cx) / a

    # Towards the midline (u > 0) the liver gets thinner and shorter, like the left lobe.
    taper = 1.0 - LIVER_LEFT_LOBE_TAPER * np.clip(u, 0.0, 1.0)
    v = (y - cy) / (b * taper)
    w = (z - cz) / (c * taper)
    radius = np.sqrt(u**2 + v**2 + w**2)
    wave = 1.0 + LIVER_SURFACE_WAVE * np.sin(2.5 * u + 1.0) * np.cos(2.0 * w)
    return radius <= wave


def abdomen_phantom_tissues(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
) -> np.ndarray:
    """Build the tissue map of the phantom.

    Parameters
    ----------
    shape: tuple[int, int, int]
        Grid size in voxels along x (to patient left), y (to anterior) and z (to superior).
    spacing_mm: tuple[float, float, float]
        Voxel size in mm along x, y and z.

    Returns
    -------
    numpy.ndarray
        uint8 array of ``shape`` with :class:`Tissue` values, in RAS array order.
    """
    x, y, z = _world_coordinates(shape, spacing_mm)
    full = np.ones(shape, dtype=bool)
    tissues = np.full(shape, Tissue.AIR, dtype=np.uint8)

    table = (
        (y >= TABLE_Y_RANGE_MM[0]) & (y <= TABLE_Y_RANGE_MM[1]) & (np.abs(x) <= TABLE_HALF_WIDTH_MM)
    )
    tissues[table & full] = Tissue.TABLE

    body = _inside_body_ellipse(x, y, 0.0) & full
    interior = _inside_body_ellipse(x, y, SUBCUTANEOUS_FAT_MM) & full
    tissues[body] = Tissue.FAT
    tissues[interior] = Tissue.SOFT_TISSUE

    spine = ((x - SPINE_CENTRE_MM[0]) ** 2 + (y - SPINE_CENTRE_MM[1]) ** 2 <= SPINE_RADIUS_MM**2) & full
    tissues[spine & interior] = Tissue.BONE

    for kidney in KIDNEYS:
        tissues[kidney.contains(x, y, z) & interior] = Tissue.KIDNEY

    # The liver and its lesions are painted last, so they win where structures touch.
    tissues[_liver_mask(x, y, z) & interior] = Tissue.LIVER
    for lesion in LESIONS:
        tissues[lesion.contains(x, y, z) & (tissues == Tissue.LIVER)] = Tissue.LESION
    return tissues


def phantom_volumes_ml(tissues: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict[str, float]:
    """Count the liver and lesion volumes of a tissue map.

    Returns
    -------
    dict[str, float]
        ``liver_whole`` (parenchyma and lesions), ``liver_parenchyma`` and ``lesions``, in mL.
    """
    voxel_ml = float(np.prod(spacing_mm)) / MM3_PER_ML
    parenchyma = int(np.count_nonzero(tissues == Tissue.LIVER)) * voxel_ml
    lesions = int(np.count_nonzero(tissues == Tissue.LESION)) * voxel_ml
    return {
        "liver_whole": parenchyma + lesions,
        "liver_parenchyma": parenchyma,
        "lesions": lesions,
    }


def make_abdomen_phantom(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    seed: int = 0,
) -> nib.Nifti1Image:
    """Build the synthetic abdominal CT volume in HU.

    Parameters
    ----------
    shape: tuple[int, int, int]
        Grid size in voxels along x, y and z; default 192 x 192 x 80.
    spacing_mm: tuple[float, float, float]
        Voxel size in mm; default 2.0 x 2.0 x 2.5.
    seed: int
        Seed of the noise; the same seed gives the same volume.

    Returns
    -------
    nibabel.Nifti1Image
        float32 HU in RAS orientation, with the world origin at the grid centre.

    Raises
    ------
    ValueError
        When a grid size or a spacing is not positive.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"Phantom shape {shape} is invalid: give three sizes of 1 voxel or more")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"Phantom spacing {spacing_mm} is invalid: give three spacings above 0 mm")

    tissues = abdomen_phantom_tissues(shape, spacing_mm)
    lookup = np.array([TISSUE_HU[Tissue(label)] for label in range(len(Tissue))], dtype=np.float32)
    hu = lookup[tissues]

    generator = np.random.default_rng(seed)
    hu += generator.normal(0.0, NOISE_SD_HU, size=shape).astype(np.float32)

    image = nib.Nifti1Image(hu, phantom_affine(shape, spacing_mm))
    image.header.set_xyzt_units("mm")
    volumes = phantom_volumes_ml(tissues, spacing_mm)
    logger.info(
        "Built abdomen phantom %s at %s mm: liver %.0f mL with %.1f mL of lesions",
        shape,
        spacing_mm,
        volumes["liver_whole"],
        volumes["lesions"],
    )
    return image
