"""Overlay pictures on synthetic phantoms with known extents: proportions, orientation, files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from node.overlay import (
    LIVER_RGB,
    OVERLAY_NAMES,
    TUMOUR_RGB,
    OverlayError,
    render_overlays,
    write_overlays,
)

#: Air outside the box, soft tissue inside.
AIR_HU = -1000.0
LIVER_HU = 60.0


def box_phantom(
    spacing: tuple[float, float, float], box_mm: tuple[float, float, float], field_mm: tuple[float, float, float]
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Return a CT and a mask with a liver box of ``box_mm`` centred in a ``field_mm`` volume."""
    shape = tuple(int(round(f / s)) for f, s in zip(field_mm, spacing))
    size = [int(round(b / s)) for b, s in zip(box_mm, spacing)]
    start = [(n - k) // 2 for n, k in zip(shape, size)]
    box = tuple(slice(a, a + k) for a, k in zip(start, size))

    labels = np.zeros(shape, dtype=np.uint8)
    labels[box] = 1
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    hu[box] = LIVER_HU
    affine = np.diag([*spacing, 1.0])
    return nib.Nifti1Image(hu, affine), nib.Nifti1Image(labels, affine)


def colour_extent_mm(picture, colour) -> tuple[float, float]:
    """Width and height in mm of the pixels of ``colour`` in the CT part of a picture."""
    pixels = np.asarray(picture.image)[: picture.image_size[1], : picture.image_size[0]]
    rows, columns = np.nonzero(np.all(pixels == colour, axis=-1))
    assert rows.size, f"no {colour} pixels in {picture.name}"
    width = (columns.max() - columns.min() + 1) * picture.mm_per_pixel
    height = (rows.max() - rows.min() + 1) * picture.mm_per_pixel
    return width, height


def by_name(pictures) -> dict:
    return {picture.name: picture for picture in pictures}


def test_anisotropic_pixels_keep_proportions() -> None:
    # 100 x 50 mm in-plane on 0.5 x 1.0 mm pixels: 200 x 50 voxels, 2:1 in millimetres.
    ct, labels = box_phantom((0.5, 1.0, 2.5), (100.0, 50.0, 40.0), (160.0, 120.0, 80.0))
    pictures = by_name(render_overlays(ct, labels))

    width, height = colour_extent_mm(pictures["overlay_liver_axial"], LIVER_RGB)
    assert width / height == pytest.approx(2.0, rel=0.04)
    assert width == pytest.approx(100.0, abs=2.0)
    assert height == pytest.approx(50.0, abs=2.0)


def test_thick_slices_not_squashed() -> None:
    # 5 mm slices: the 40 mm box height in z must not shrink to 8 pixels next to 0.5 mm ones.
    ct, labels = box_phantom((0.5, 1.0, 5.0), (100.0, 50.0, 40.0), (160.0, 120.0, 100.0))
    pictures = by_name(render_overlays(ct, labels))

    width, height = colour_extent_mm(pictures["overlay_liver_coronal"], LIVER_RGB)
    assert width == pytest.approx(100.0, abs=2.0)
    assert height == pytest.approx(40.0, abs=5.0)  # one 5 mm slice of tolerance
    width, height = colour_extent_mm(pictures["overlay_liver_sagittal"], LIVER_RGB)
    assert width == pytest.approx(50.0, abs=2.0)
    assert height == pytest.approx(40.0, abs=5.0)


def test_radiological_orientation() -> None:
    # A tumour on the patient's right (+x in RAS) and anterior (+y) shows at the image's
    # left and top in the axial view.
    ct, labels = box_phantom((1.0, 1.0, 2.0), (100.0, 80.0, 40.0), (120.0, 100.0, 60.0))
    mask = np.asarray(labels.dataobj).copy()
    mask[95:105, 75:85, 14:17] = 2
    labels = nib.Nifti1Image(mask, labels.affine)

    pictures = by_name(render_overlays(ct, labels))
    axial = pictures["overlay_tumour_axial"]
    pixels = np.asarray(axial.image)[: axial.image_size[1], : axial.image_size[0]]
    rows, columns = np.nonzero(np.all(pixels == TUMOUR_RGB, axis=-1))
    assert columns.mean() < axial.image_size[0] / 2
    assert rows.mean() < axial.image_size[1] / 2


def test_views_through_liver_and_largest_tumour(tmp_path) -> None:
    ct, labels = box_phantom((1.0, 1.0, 2.0), (80.0, 60.0, 40.0), (100.0, 80.0, 60.0))
    mask = np.asarray(labels.dataobj).copy()
    mask[20:24, 20:24, 12:14] = 2  # small tumour
    mask[50:60, 40:50, 15:20] = 2  # largest tumour, slices 15-19
    labels = nib.Nifti1Image(mask, labels.affine)
    result = {"liver_volume_ml": 180.25, "tumor_volume_ml": 1.06, "tumor_burden_percent": 0.58, "tumor_count": 2}

    written = write_overlays(ct, labels, tmp_path, result)
    assert sorted(written) == sorted(OVERLAY_NAMES)
    for path in written.values():
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"

    pictures = by_name(render_overlays(ct, labels, result))
    assert 15 <= pictures["overlay_tumour_axial"].slice_index <= 19
    # The 40 mm box covers slices 5-24, so its centre lies at 14.5.
    assert pictures["overlay_liver_axial"].slice_index in (14, 15)


def test_liver_only_writes_three_pictures(tmp_path) -> None:
    ct, labels = box_phantom((1.0, 1.0, 2.0), (80.0, 60.0, 40.0), (100.0, 80.0, 60.0))
    written = write_overlays(ct, labels, tmp_path)
    assert sorted(written) == ["overlay_liver_axial", "overlay_liver_coronal", "overlay_liver_sagittal"]


def test_grid_mismatch_raises() -> None:
    ct, _ = box_phantom((1.0, 1.0, 2.0), (80.0, 60.0, 40.0), (100.0, 80.0, 60.0))
    _, other = box_phantom((1.0, 1.0, 2.0), (80.0, 60.0, 40.0), (100.0, 80.0, 80.0))
    with pytest.raises(OverlayError, match="differ in shape or affine"):
        render_overlays(ct, other)
