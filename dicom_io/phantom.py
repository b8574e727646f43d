"""A synthetic abdominal CT volume for demonstrations and tests.

The phantom is a RAS volume of Hounsfield units in the portal venous phase of a contrast-enhanced
CT, which is how most clinical abdominal CTs are acquired. It reaches from the lung bases to
below the kidneys. An elliptic body has a subcutaneous fat layer, an abdominal wall of muscle
and back muscles. Inside lie intra-abdominal fat and the liver with portal and hepatic veins and
three hypodense lesions. Around the liver lie the gallbladder, spleen, stomach with an air
pocket, pancreas, kidneys with a brighter cortex, aorta, inferior vena cava, psoas muscles and
bowel loops with fluid and air. Vertebrae have a cortical shell and marrow, ribs circle the upper
abdomen, and the heart and lung bases lie above the domed diaphragm. A patient table lies below the back. The liver sits under the right hemidiaphragm,
which is at high x because +x points to the patient's right in RAS. Edges are slightly blurred and correlated
Gaussian noise is added, as in a reconstructed CT.

Known volumes on the default grid (192 x 192 x 96 voxels of 2.0 x 2.0 x 2.5 mm), counted from
the tissue map of :func:`abdomen_phantom_tissues` (see :data:`DEFAULT_PHANTOM_VOLUMES_ML`).
Liver parenchyma includes the intrahepatic vessels, as in clinical liver segmentations:

==================================  ==========
Structure                           Volume
==================================  ==========
Whole liver (parenchyma + lesions)  1240.27 mL
Liver parenchyma                    1225.75 mL
Lesions, 3 of 18, 20 and 24 mm      14.52 mL
Lesion volume / whole liver         1.17 %
==================================  ==========

The anatomy is defined in millimetres around the grid centre, so other grids give the same
structures, cut off where the field of view is smaller. The anatomy does not depend on the seed,
which only draws the noise. The phantom exercises the data flow of the node and gives the liver
network a recognisable liver; it is not a validation case.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = (192, 192, 96)
DEFAULT_SPACING_MM = (2.0, 2.0, 2.5)

#: Standard deviation of the Gaussian noise added to every voxel, in HU.
NOISE_SD_HU = 12.0

#: Gaussian blur of the noiseless volume and of the noise, in mm, like a CT reconstruction kernel.
EDGE_BLUR_SD_MM = 1.0
NOISE_CORRELATION_SD_MM = 0.8

MM3_PER_ML = 1000.0


class Tissue(enum.IntEnum):
    """Labels of the phantom's tissue map."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LIVER = 3
    LESION = 4
    BONE = 5
    KIDNEY_CORTEX = 6
    TABLE = 7
    LIVER_VESSEL = 8
    VESSEL = 9
    MARROW = 10
    KIDNEY_MEDULLA = 11
    SPLEEN = 12
    BOWEL_WALL = 13
    FLUID = 14
    LUNG = 15
    PANCREAS = 16
    HEART = 17


#: Mean attenuation of each tissue before noise, in HU, in the portal venous phase.
TISSUE_HU: dict[Tissue, float] = {
    Tissue.AIR: -1000.0,
    Tissue.FAT: -100.0,
    Tissue.MUSCLE: 55.0,
    Tissue.LIVER: 105.0,
    Tissue.LESION: 70.0,
    Tissue.BONE: 700.0,
    Tissue.KIDNEY_CORTEX: 170.0,
    Tissue.TABLE: 200.0,
    Tissue.LIVER_VESSEL: 160.0,
    Tissue.VESSEL: 160.0,
    Tissue.MARROW: 200.0,
    Tissue.KIDNEY_MEDULLA: 120.0,
    Tissue.SPLEEN: 115.0,
    Tissue.BOWEL_WALL: 80.0,
    Tissue.FLUID: 10.0,
    Tissue.LUNG: -850.0,
    Tissue.PANCREAS: 95.0,
    Tissue.HEART: 130.0,
}

#: Tissues that make up the liver: parenchyma (with its vessels) and lesions.
LIVER_PARENCHYMA_TISSUES = (Tissue.LIVER, Tissue.LIVER_VESSEL)
LIVER_TISSUES = (*LIVER_PARENCHYMA_TISSUES, Tissue.LESION)


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid in RAS millimetres relative to the grid centre."""

    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Return a boolean mask of the points inside the ellipsoid."""
        return self.radius(x, y, z) <= 1.0

    def radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Return the normalised radius, 1 on the surface, of each point."""
        (cx, cy, cz), (a, b, c) = self.centre_mm, self.semi_axes_mm
        return np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the lowest and highest corner in mm of the bounding box."""
        centre, semi_axes = np.asarray(self.centre_mm), np.asarray(self.semi_axes_mm)
        return centre - semi_axes, centre + semi_axes


@dataclass(frozen=True)
class Tube:
    """A straight tube with round ends between two points in RAS millimetres."""

    start_mm: tuple[float, float, float]
    end_mm: tuple[float, float, float]
    radius_mm: float

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Return a boolean mask of the points within ``radius_mm`` of the segment."""
        start = np.asarray(self.start_mm, dtype=np.float32)
        direction = np.asarray(self.end_mm, dtype=np.float32) - start
        length_sq = float(direction @ direction)
        dx, dy, dz = x - start[0], y - start[1], z - start[2]
        along = np.clip((dx * direction[0] + dy * direction[1] + dz * direction[2]) / length_sq, 0.0, 1.0)
        distance_sq = (
            (dx - along * direction[0]) ** 2 + (dy - along * direction[1]) ** 2 + (dz - along * direction[2]) ** 2
        )
        return distance_sq <= self.radius_mm**2

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the lowest and highest corner in mm of the bounding box."""
        ends = np.asarray([self.start_mm, self.end_mm])
        return ends.min(axis=0) - self.radius_mm, ends.max(axis=0) + self.radius_mm


Coordinates = tuple[np.ndarray, np.ndarray, np.ndarray]


def _bounding_box(shape: Ellipsoid | Tube, coordinates: Coordinates) -> tuple[tuple[slice, ...], Coordinates]:
    """Return the voxel slices around ``shape`` and the coordinates inside them.

    Shapes are evaluated inside their box only, which keeps the phantom fast to build.
    """
    low, high = shape.bounds()
    box = []
    for axis, (axis_coordinates, lowest, highest) in enumerate(zip(coordinates, low, high)):
        values = axis_coordinates.ravel()
        box.append(slice(int(np.searchsorted(values, lowest)), int(np.searchsorted(values, highest, side="right"))))
    x, y, z = coordinates
    return tuple(box), (x[box[0]], y[:, box[1]], z[:, :, box[2]])


# Body cross-section (x, y) in mm, through the whole z range. Layers are measured inwards.
BODY_CENTRE_MM = (0.0, 10.0)
BODY_SEMI_AXES_MM = (160.0, 115.0)
SUBCUTANEOUS_FAT_MM = 20.0
ABDOMINAL_WALL_MM = 12.0
# Ribs lie in the outer part of the abdominal wall, between these depths below the skin.
RIB_DEPTH_MM = (22.0, 31.0)

# Patient table: a slab below the back (posterior is -y in RAS), across the whole z range.
TABLE_Y_RANGE_MM = (-122.0, -110.0)
TABLE_HALF_WIDTH_MM = 180.0

# Diaphragm: two domes, the right one higher, whose height falls off quadratically towards the
# body wall, more steeply posterior to the dome centre. Lungs and heart lie above it.
DIAPHRAGM_DOMES_MM = ((70.0, -5.0, 85.0), (-70.0, -5.0, 72.0))  # (x, y, top z): right, left
DIAPHRAGM_DROP_MM = 95.0
DIAPHRAGM_RADII_MM = (115.0, 150.0, 95.0)  # x, anterior y, posterior y
DIAPHRAGM_THICKNESS_MM = 5.0
HEART = Ellipsoid(centre_mm=(-20.0, 35.0, 125.0), semi_axes_mm=(65.0, 55.0, 55.0))

# Spine: vertebral bodies with a cortical shell, the spinal canal and the posterior elements.
VERTEBRA_CENTRE_MM = (0.0, -48.0)
VERTEBRA_RADIUS_MM = 21.0
CORTEX_MM = 3.0
DISC_PITCH_MM = 32.0
DISC_HEIGHT_MM = 7.0
SPINAL_CANAL = ((0.0, -78.0), 9.0)  # centre (x, y), radius
LAMINA_RADII_MM = (14.0, 20.0)  # inner and outer radius of the posterior arch around the canal
SPINOUS_PROCESS_Y_MM = (-110.0, -88.0)
SPINOUS_PROCESS_HALF_WIDTH_MM = 4.0
BACK_MUSCLES = (
    Ellipsoid(centre_mm=(-40.0, -82.0, 0.0), semi_axes_mm=(30.0, 22.0, 1.0e6)),
    Ellipsoid(centre_mm=(40.0, -82.0, 0.0), semi_axes_mm=(30.0, 22.0, 1.0e6)),
)
# Psoas muscles beside the vertebrae, growing from nothing at PSOAS_TOP_Z_MM downwards.
PSOAS_CENTRES_MM = ((-38.0, -45.0), (38.0, -45.0))
PSOAS_TOP_Z_MM = 10.0
PSOAS_GROWTH = 0.2  # mm of radius per mm below the top
PSOAS_MAX_RADIUS_MM = 24.0

# Ribs: seven pairs of arcs that start beside the spine at RIB_TOPS_MM and fall by RIB_FALL_MM
# towards the front. They stop short of the anterior midline, where the costal cartilage is.
RIB_TOPS_MM = (150.0, 125.0, 100.0, 75.0, 50.0, 25.0, 0.0)
RIB_FALL_MM = 60.0
RIB_HALF_HEIGHT_MM = 5.0
RIB_ANGLE_RANGE = (0.15, 0.72)  # fraction of pi from the posterior midline

AORTA = Tube(start_mm=(-18.0, -15.0, -200.0), end_mm=(-18.0, -15.0, 200.0), radius_mm=12.0)
INFERIOR_VENA_CAVA = Ellipsoid(centre_mm=(25.0, -10.0, 0.0), semi_axes_mm=(14.0, 11.0, 1.0e6))

KIDNEYS = (
    Ellipsoid(centre_mm=(72.0, -45.0, -40.0), semi_axes_mm=(26.0, 22.0, 52.0)),  # right
    Ellipsoid(centre_mm=(-72.0, -45.0, -25.0), semi_axes_mm=(26.0, 22.0, 52.0)),  # left
)
KIDNEY_CORTEX_MM = 6.0
SPLEEN = Ellipsoid(centre_mm=(-102.0, -30.0, 40.0), semi_axes_mm=(28.0, 52.0, 55.0))
STOMACH = Ellipsoid(centre_mm=(-55.0, 40.0, 35.0), semi_axes_mm=(42.0, 38.0, 50.0))
STOMACH_AIR_ABOVE_Y_MM = 55.0  # the patient lies supine, so gas rises to the anterior side
WALL_MM = 4.0
PANCREAS = Tube(start_mm=(15.0, 15.0, -5.0), end_mm=(-85.0, -10.0, 15.0), radius_mm=12.0)
GALLBLADDER = Ellipsoid(centre_mm=(50.0, 55.0, -30.0), semi_axes_mm=(15.0, 15.0, 30.0))

# Liver: the space under the right hemidiaphragm, inside the body wall. Its left border reaches
# further left anteriorly, which forms the left lobe. Its inferior surface slopes up from the
# right lobe's tip towards the left lobe, and a posterior border keeps it off the spine.
LIVER_LEFT_BORDER_MM = (20.0, -0.6)  # x at y = 0 and dx/dy
LIVER_POSTERIOR_BORDER_MM = (-75.0, -30.0, 60.0, 15.0)  # y lateral, y medial; x from, x to
LIVER_INFERIOR_SURFACE_MM = (-92.0, 140.0, -0.55, 0.1)  # z at x0, x0, dz/dx, dz/dy
# Extraperitoneal and perirenal fat between the liver and the abdominal wall and kidneys.
LIVER_FAT_GAP_MM = 4.0
# The cut surfaces above meet in sharp edges, so a Gaussian blur of the region rounds them.
LIVER_ROUNDING_SD_MM = 5.0
PORTAL_VEINS = (
    Tube((5.0, 5.0, -15.0), (30.0, 15.0, 8.0), 7.0),  # main portal vein
    Tube((30.0, 15.0, 8.0), (85.0, 10.0, 15.0), 5.0),  # right branch
    Tube((85.0, 10.0, 15.0), (120.0, -5.0, -5.0), 3.5),
    Tube((85.0, 10.0, 15.0), (105.0, 25.0, 50.0), 3.5),
    Tube((30.0, 15.0, 8.0), (-5.0, 45.0, 25.0), 4.0),  # left branch
)
HEPATIC_VEINS = (
    Tube((25.0, -12.0, 72.0), (115.0, 5.0, 35.0), 5.0),  # right
    Tube((25.0, -12.0, 72.0), (55.0, 45.0, 20.0), 4.0),  # middle
    Tube((25.0, -12.0, 72.0), (-10.0, 35.0, 50.0), 3.5),  # left
)
LESIONS = (
    Ellipsoid(centre_mm=(95.0, 40.0, 40.0), semi_axes_mm=(10.0, 10.0, 10.0)),
    Ellipsoid(centre_mm=(60.0, -35.0, 35.0), semi_axes_mm=(9.0, 9.0, 9.0)),
    Ellipsoid(centre_mm=(95.0, 20.0, -15.0), semi_axes_mm=(12.0, 12.0, 12.0)),
)

# Bowel: loops of BOWEL_LOOP_COUNT round segments drawn with a fixed seed in the lower abdomen,
# filled with fluid, gas or both (a gas-fluid level), and kept BOWEL_GAP_MM away from organs.
BOWEL_SEED = 20240611
BOWEL_LOOP_COUNT = 90
BOWEL_RADIUS_MM = (11.0, 18.0)
BOWEL_TOP_Z_MM = 15.0
BOWEL_GAP_MM = 3.0
COLON = (
    Tube((110.0, 0.0, -200.0), (110.0, 10.0, -30.0), 22.0),  # ascending
    Tube((110.0, 10.0, -30.0), (-100.0, 45.0, -20.0), 20.0),  # transverse
    Tube((-110.0, 0.0, -200.0), (-100.0, 10.0, 5.0), 20.0),  # descending
)

#: Volumes in mL on the default grid, counted from the tissue map.
DEFAULT_PHANTOM_VOLUMES_ML = {
    "liver_whole": 1240.27,
    "liver_parenchyma": 1225.75,
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


def _inside_body_ellipse(x: np.ndarray, y: np.ndarray, depth_mm: float) -> np.ndarray:
    """Return the points of the body cross-section deeper than ``depth_mm`` below the skin."""
    (cx, cy), (a, b) = BODY_CENTRE_MM, BODY_SEMI_AXES_MM
    return ((x - cx) / (a - depth_mm)) ** 2 + ((y - cy) / (b - depth_mm)) ** 2 <= 1.0


def _diaphragm_height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return the z in mm of the diaphragm's upper surface above each (x, y)."""
    radius_x, radius_anterior, radius_posterior = DIAPHRAGM_RADII_MM
    height = None
    for dome_x, dome_y, top_z in DIAPHRAGM_DOMES_MM:
        radius_y = np.where(y >= dome_y, radius_anterior, radius_posterior)
        fall = ((x - dome_x) / radius_x) ** 2 + ((y - dome_y) / radius_y) ** 2
        dome = top_z - DIAPHRAGM_DROP_MM * fall
        height = dome if height is None else np.maximum(height, dome)
    return height.astype(np.float32)


def _liver_region(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    below_diaphragm: np.ndarray,
    spacing_mm: tuple[float, float, float],
) -> np.ndarray:
    """Return the space the liver may fill; organs painted before it are kept."""
    left_x, left_slope = LIVER_LEFT_BORDER_MM
    lateral_y, medial_y, ramp_from_x, ramp_to_x = LIVER_POSTERIOR_BORDER_MM
    inferior_z, inferior_x, slope_x, slope_y = LIVER_INFERIOR_SURFACE_MM

    left_border = x >= left_x + left_slope * y
    ramp = np.clip((x - ramp_from_x) / (ramp_to_x - ramp_from_x), 0.0, 1.0)
    posterior_border = y >= lateral_y + (medial_y - lateral_y) * ramp
    inferior_surface = z >= inferior_z + slope_x * (x - inferior_x) + slope_y * y
    inside_wall = _inside_body_ellipse(x, y, SUBCUTANEOUS_FAT_MM + ABDOMINAL_WALL_MM + LIVER_FAT_GAP_MM)
    region = left_border & posterior_border & inferior_surface & inside_wall
    if region.any():
        rounded = ndimage.gaussian_filter(
            region.astype(np.float32), _blur_sigma_voxels(LIVER_ROUNDING_SD_MM, spacing_mm), mode="nearest"
        )
        region = rounded >= 0.5
    region &= below_diaphragm
    for kidney in KIDNEYS:
        grown = Ellipsoid(kidney.centre_mm, tuple(s + LIVER_FAT_GAP_MM for s in kidney.semi_axes_mm))
        region &= ~grown.contains(x, y, z)
    return region


def _paint(tissues: np.ndarray, mask: np.ndarray, tissue: Tissue, over: tuple[Tissue, ...] | None = None) -> None:
    """Set ``tissue`` where ``mask`` holds, only over the ``over`` tissues when given."""
    mask = np.broadcast_to(mask, tissues.shape)
    if over is not None:
        mask = mask & np.isin(tissues, over)
    tissues[mask] = tissue


def _paint_spine(tissues: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, body: np.ndarray) -> None:
    (vx, vy), radius = VERTEBRA_CENTRE_MM, VERTEBRA_RADIUS_MM
    axial_sq = (x - vx) ** 2 + (y - vy) ** 2
    disc = np.abs(((z + DISC_PITCH_MM / 2.0) % DISC_PITCH_MM) - DISC_PITCH_MM / 2.0) <= DISC_HEIGHT_MM / 2.0
    endplate = np.abs(((z + DISC_PITCH_MM / 2.0) % DISC_PITCH_MM) - DISC_PITCH_MM / 2.0) <= (
        DISC_HEIGHT_MM / 2.0 + CORTEX_MM
    )
    _paint(tissues, (axial_sq <= radius**2) & body, Tissue.BONE)
    _paint(tissues, (axial_sq <= (radius - CORTEX_MM) ** 2) & ~endplate, Tissue.MARROW)
    _paint(tissues, (axial_sq <= radius**2) & disc, Tissue.MUSCLE)

    (canal_x, canal_y), canal_radius = SPINAL_CANAL
    canal_sq = (x - canal_x) ** 2 + (y - canal_y) ** 2
    inner, outer = LAMINA_RADII_MM
    arch = (canal_sq <= outer**2) & (canal_sq > inner**2) & (y < canal_y + 4.0)
    spinous = (
        (np.abs(x - canal_x) <= SPINOUS_PROCESS_HALF_WIDTH_MM)
        & (y >= SPINOUS_PROCESS_Y_MM[0])
        & (y <= SPINOUS_PROCESS_Y_MM[1])
    )
    pedicles = (np.abs(np.abs(x - vx) - 12.0) <= 4.0) & (y <= vy - radius + 2.0) & (y >= canal_y)
    _paint(tissues, (arch | spinous | pedicles) & body & ~disc, Tissue.BONE)
    _paint(tissues, (canal_sq <= canal_radius**2) & body, Tissue.FLUID)


def _paint_ribs(tissues: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    (cx, cy), (a, b) = BODY_CENTRE_MM, BODY_SEMI_AXES_MM
    shallow, deep = RIB_DEPTH_MM
    band = _inside_body_ellipse(x, y, shallow) & ~_inside_body_ellipse(x, y, deep)

    # Angle from the posterior midline, 0 at the back and pi at the front.
    angle = np.arccos(np.clip(-(y - cy) / b / np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + 1e-9), -1, 1))
    fraction = angle / np.pi
    in_arc = (fraction >= RIB_ANGLE_RANGE[0]) & (fraction <= RIB_ANGLE_RANGE[1])
    fall = RIB_FALL_MM * fraction
    for top in RIB_TOPS_MM:
        rib = band & in_arc & (np.abs(z - (top - fall)) <= RIB_HALF_HEIGHT_MM)
        _paint(tissues, rib, Tissue.BONE)


def _paint_kidneys(tissues: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    for kidney in KIDNEYS:
        radius = kidney.radius(x, y, z)
        inner = 1.0 - KIDNEY_CORTEX_MM / min(kidney.semi_axes_mm)
        _paint(tissues, radius <= 1.0, Tissue.KIDNEY_CORTEX)
        _paint(tissues, radius <= inner, Tissue.KIDNEY_MEDULLA)

        # The renal sinus opens medially: fat and a renal vein at the hilum.
        (kx, ky, kz), (ka, _, _) = kidney.centre_mm, kidney.semi_axes_mm
        medial = np.sign(-kx)
        hilum = Ellipsoid((kx + medial * ka * 0.6, ky + 4.0, kz), (ka * 0.5, 8.0, 14.0))
        _paint(tissues, hilum.contains(x, y, z), Tissue.FAT)
        vein = Tube((kx + medial * ka * 0.3, ky + 6.0, kz), (medial * 10.0 + kx * 0.05, -12.0, kz + 5.0), 5.0)
        _paint(tissues, vein.contains(x, y, z), Tissue.VESSEL, over=(Tissue.FAT,))


def _paint_hollow_organ(
    tissues: np.ndarray,
    inside: np.ndarray,
    wall: np.ndarray,
    gas: np.ndarray,
    over: tuple[Tissue, ...] | None = None,
) -> None:
    """Paint a wall, fluid content and gas, where ``wall`` is the organ less its lumen."""
    _paint(tissues, inside, Tissue.BOWEL_WALL, over=over)
    lumen = inside & ~wall
    if over is not None:
        lumen = lumen & (tissues == Tissue.BOWEL_WALL)
    _paint(tissues, lumen, Tissue.FLUID)
    _paint(tissues, lumen & gas, Tissue.AIR)


def _paint_bowel(tissues: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, spacing_mm) -> None:
    organs = np.isin(tissues, (Tissue.FAT,), invert=True)
    gap = [max(1, int(round(BOWEL_GAP_MM / s))) for s in spacing_mm]
    structure = np.ones([2 * g + 1 for g in gap], dtype=bool)
    free = (tissues == Tissue.FAT) & ~ndimage.binary_dilation(organs, structure=structure)
    cavity = _inside_body_ellipse(x, y, SUBCUTANEOUS_FAT_MM + ABDOMINAL_WALL_MM)
    free &= np.broadcast_to(cavity, tissues.shape)

    for colon in COLON:
        box, (bx, by, bz) = _bounding_box(colon, (x, y, z))
        inside = colon.contains(bx, by, bz) & free[box]
        narrow = Tube(colon.start_mm, colon.end_mm, colon.radius_mm - WALL_MM).contains(bx, by, bz)
        gas = by >= (colon.start_mm[1] + colon.end_mm[1]) / 2.0 - 4.0
        _paint_hollow_organ(tissues[box], inside, inside & ~narrow, gas)
        free[box] &= ~inside

    generator = np.random.default_rng(BOWEL_SEED)
    (cx, cy), (a, b) = BODY_CENTRE_MM, BODY_SEMI_AXES_MM
    for _ in range(BOWEL_LOOP_COUNT):
        centre = (
            generator.uniform(-(a - 45.0), a - 45.0),
            generator.uniform(cy - 30.0, cy + b - 45.0),
            generator.uniform(z.min() - 10.0, BOWEL_TOP_Z_MM),
        )
        end = tuple(c + d for c, d in zip(centre, generator.normal(0.0, 25.0, size=3)))
        radius = generator.uniform(*BOWEL_RADIUS_MM)
        loop = Tube(centre, end, radius)
        box, (bx, by, bz) = _bounding_box(loop, (x, y, z))
        inside = loop.contains(bx, by, bz) & free[box]
        if not inside.any():
            continue
        lumen = Tube(centre, end, radius - WALL_MM).contains(bx, by, bz)
        content = generator.uniform()
        if content < 0.5:
            gas = np.zeros((1, 1, 1), dtype=bool)
        elif content < 0.75:
            gas = np.ones((1, 1, 1), dtype=bool)
        else:
            gas = by >= (centre[1] + end[1]) / 2.0
        _paint_hollow_organ(tissues[box], inside, inside & ~lumen, gas)
        free[box] &= ~inside


def abdomen_phantom_tissues(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
) -> np.ndarray:
    """Build the tissue map of the phantom.

    Parameters
    ----------
    shape: tuple[int, int, int]
        Grid size in voxels along x (to patient right), y (to anterior) and z (to superior).
    spacing_mm: tuple[float, float, float]
        Voxel size in mm along x, y and z.

    Returns
    -------
    numpy.ndarray
        uint8 array of ``shape`` with :class:`Tissue` values, in RAS array order.
    """
    x, y, z = _world_coordinates(shape, spacing_mm)
    tissues = np.full(shape, Tissue.AIR, dtype=np.uint8)

    # Body wall: table, skin and subcutaneous fat, muscle, then fat inside the cavity.
    table = (y >= TABLE_Y_RANGE_MM[0]) & (y <= TABLE_Y_RANGE_MM[1]) & (np.abs(x) <= TABLE_HALF_WIDTH_MM)
    _paint(tissues, table, Tissue.TABLE)
    body = _inside_body_ellipse(x, y, 0.0)
    wall = _inside_body_ellipse(x, y, SUBCUTANEOUS_FAT_MM)
    cavity = _inside_body_ellipse(x, y, SUBCUTANEOUS_FAT_MM + ABDOMINAL_WALL_MM)
    _paint(tissues, body, Tissue.FAT)
    _paint(tissues, wall, Tissue.MUSCLE)
    _paint(tissues, cavity, Tissue.FAT)
    for muscle in BACK_MUSCLES:
        _paint(tissues, muscle.contains(x, y, z) & wall, Tissue.MUSCLE)

    # Chest above the diaphragm: lungs, then the heart and the diaphragm muscle.
    diaphragm = _diaphragm_height(x, y)
    above = (z > diaphragm) & cavity
    _paint(tissues, above, Tissue.LUNG)
    _paint(tissues, HEART.contains(x, y, z) & above, Tissue.HEART)
    _paint(tissues, (z > diaphragm - DIAPHRAGM_THICKNESS_MM) & (z <= diaphragm) & cavity, Tissue.MUSCLE)
    below = (z <= diaphragm - DIAPHRAGM_THICKNESS_MM) & cavity

    # Retroperitoneum and upper abdominal organs other than the liver.
    for psoas_x, psoas_y in PSOAS_CENTRES_MM:
        radius = np.clip((PSOAS_TOP_Z_MM - z) * PSOAS_GROWTH, 0.0, PSOAS_MAX_RADIUS_MM)
        _paint(tissues, ((x - psoas_x) ** 2 + (y - psoas_y) ** 2 <= radius**2) & below, Tissue.MUSCLE)
    _paint_kidneys(tissues, x, y, z)
    _paint(tissues, SPLEEN.contains(x, y, z) & below, Tissue.SPLEEN)
    stomach = STOMACH.contains(x, y, z) & below
    stomach_lumen = Ellipsoid(STOMACH.centre_mm, tuple(s - WALL_MM for s in STOMACH.semi_axes_mm))
    _paint_hollow_organ(
        tissues, stomach, stomach & ~stomach_lumen.contains(x, y, z), y >= STOMACH_AIR_ABOVE_Y_MM
    )
    _paint(tissues, PANCREAS.contains(x, y, z) & below, Tissue.PANCREAS, over=(Tissue.FAT,))
    _paint(tissues, GALLBLADDER.contains(x, y, z) & below, Tissue.FLUID)
    _paint(tissues, AORTA.contains(x, y, z) & body, Tissue.VESSEL)
    _paint(tissues, INFERIOR_VENA_CAVA.contains(x, y, z) & body & (z <= 100.0), Tissue.VESSEL)
    _paint(tissues, PORTAL_VEINS[0].contains(x, y, z) & below, Tissue.VESSEL)
    _paint_spine(tissues, x, y, z, body)
    _paint_ribs(tissues, x, y, z)

    # The liver fills the fat left in its region, so the organs above stay whole. Its vessels
    # and lesions are painted inside it only.
    _paint(tissues, _liver_region(x, y, z, below, spacing_mm), Tissue.LIVER, over=(Tissue.FAT,))
    for vein in (*PORTAL_VEINS, *HEPATIC_VEINS):
        box, (bx, by, bz) = _bounding_box(vein, (x, y, z))
        _paint(tissues[box], vein.contains(bx, by, bz), Tissue.LIVER_VESSEL, over=(Tissue.LIVER,))
    for lesion in LESIONS:
        box, (bx, by, bz) = _bounding_box(lesion, (x, y, z))
        _paint(tissues[box], lesion.contains(bx, by, bz), Tissue.LESION, over=(Tissue.LIVER,))

    _paint_bowel(tissues, x, y, z, spacing_mm)
    return tissues


def phantom_volumes_ml(tissues: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict[str, float]:
    """Count the liver and lesion volumes of a tissue map.

    Returns
    -------
    dict[str, float]
        ``liver_whole`` (parenchyma and lesions), ``liver_parenchyma`` (with the intrahepatic
        vessels) and ``lesions``, in mL.
    """
    voxel_ml = float(np.prod(spacing_mm)) / MM3_PER_ML
    parenchyma = int(np.count_nonzero(np.isin(tissues, LIVER_PARENCHYMA_TISSUES))) * voxel_ml
    lesions = int(np.count_nonzero(tissues == Tissue.LESION)) * voxel_ml
    return {
        "liver_whole": parenchyma + lesions,
        "liver_parenchyma": parenchyma,
        "lesions": lesions,
    }


def _blur_sigma_voxels(sd_mm: float, spacing_mm: tuple[float, float, float]) -> list[float]:
    return [sd_mm / float(s) for s in spacing_mm]


def make_abdomen_phantom(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    seed: int = 0,
) -> nib.Nifti1Image:
    """Build the synthetic abdominal CT volume in HU.

    Parameters
    ----------
    shape: tuple[int, int, int]
        Grid size in voxels along x, y and z; default 192 x 192 x 96.
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
    hu = ndimage.gaussian_filter(lookup[tissues], _blur_sigma_voxels(EDGE_BLUR_SD_MM, spacing_mm), mode="nearest")

    # Correlated noise: blurred white noise, rescaled so that its standard deviation is NOISE_SD_HU.
    generator = np.random.default_rng(seed)
    noise = generator.standard_normal(size=shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, _blur_sigma_voxels(NOISE_CORRELATION_SD_MM, spacing_mm), mode="wrap")
    noise *= np.float32(NOISE_SD_HU / max(float(noise.std()), 1e-6))
    hu += noise

    image = nib.Nifti1Image(hu.astype(np.float32), phantom_affine(shape, spacing_mm))
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
