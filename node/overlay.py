"""PNG previews of a result: liver and tumour contours over the CT.

For each result the node draws axial, coronal and sagittal slices through the centre of the
liver and, when tumours were found, through the centre of the largest tumour. The CT is shown
in a soft-tissue window (width 400 HU, level 40 HU), liver and tumour outlines are drawn in
colour, and a caption below the image gives the volumes.

Views follow radiological display convention: axial slices are seen from the feet (patient
right on the image left, anterior at the top), coronal slices from the front (patient right on
the left, superior at the top), sagittal slices from the patient's left (anterior on the left,
superior at the top). Pixels are square in millimetres, so an anisotropic CT keeps its
physical proportions: the longer side of every picture is :data:`PICTURE_SIZE_PX` pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from node.spool import write_atomically

logger = logging.getLogger(__name__)

#: Soft-tissue window in HU.
WINDOW_WIDTH_HU = 400.0
WINDOW_LEVEL_HU = 40.0

#: Pixels of the longer side of each picture, without the caption.
PICTURE_SIZE_PX = 512

#: Outline colours (RGB) of the liver and the tumours.
LIVER_RGB = (46, 204, 64)
TUMOUR_RGB = (255, 65, 54)

#: Colour of the caption and orientation letters.
TEXT_RGB = (255, 255, 255)

#: Label values of ``mask.nii.gz``.
LIVER_LABEL = 1
TUMOUR_LABEL = 2

#: Font size, line height and margin of the caption below the picture, in pixels.
FONT_SIZE_PX = 14
LINE_HEIGHT_PX = 18
CAPTION_MARGIN_PX = 6

#: Outline thickness in pixels of the picture.
OUTLINE_WIDTH_PX = 2

VIEWS = ("axial", "coronal", "sagittal")
FOCI = ("liver", "tumour")

#: Letters at the left, right, top and bottom edge of each view (RAS array axes).
ORIENTATION_LETTERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}

#: File names of every picture the node may write, by picture name.
OVERLAY_NAMES = tuple(f"overlay_{focus}_{view}" for focus in FOCI for view in VIEWS)


class OverlayError(ValueError):
    """Raised when the CT and the label mask do not share one voxel grid."""


@dataclass
class OverlayPicture:
    """One rendered view.

    Attributes
    ----------
    name : str
        ``overlay_<focus>_<view>``, also the file name without ``.png``.
    focus : str
        ``"liver"`` or ``"tumour"``: the structure whose centre the slice passes through.
    view : str
        ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    slice_index : int
        Index of the slice along the view's normal, in the RAS array.
    mm_per_pixel : float
        Edge length of one picture pixel in millimetres (pixels are square).
    image_size : tuple of int
        Width and height of the CT part of the picture in pixels; it sits at the top left of
        :attr:`image`, above the caption.
    image : PIL.Image.Image
        The RGB picture with the caption.
    """

    name: str
    focus: str
    view: str
    slice_index: int
    mm_per_pixel: float
    image_size: tuple[int, int]
    image: Image.Image


def render_overlays(
    ct: nib.Nifti1Image, labels: nib.Nifti1Image, result: Mapping[str, Any] | None = None
) -> list[OverlayPicture]:
    """Render the overlay pictures of one result.

    Parameters
    ----------
    ct : nibabel.Nifti1Image
        CT volume in HU.
    labels : nibabel.Nifti1Image
        Label mask on the same grid (0 background, 1 liver, 2 tumour), as ``mask.nii.gz``.
    result : Mapping, optional
        ``result.json`` content; its volumes go into the caption.

    Returns
    -------
    list of OverlayPicture
        Three views through the liver centre, then three through the largest tumour when the
        mask has tumour voxels. Without liver voxels the views pass through the volume centre.

    Raises
    ------
    OverlayError
        When the two volumes differ in shape or affine.
    """
    ct = nib.as_closest_canonical(ct)
    labels = nib.as_closest_canonical(labels)
    if ct.shape[:3] != labels.shape[:3] or not np.allclose(ct.affine, labels.affine, atol=1e-3):
        raise OverlayError(
            f"CT grid {ct.shape[:3]} and mask grid {labels.shape[:3]} differ in shape or "
            "affine: render the overlays from the CT the mask was computed on"
        )

    # Integer CT stays integer: each displayed plane is windowed on its own.
    hu = np.asanyarray(ct.dataobj)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.asarray(hu, dtype=np.float32)
    hu = hu.reshape(ct.shape[:3])
    label_array = np.asarray(labels.dataobj).astype(np.uint8, copy=False).reshape(labels.shape[:3])
    spacing = tuple(float(value) for value in ct.header.get_zooms()[:3])
    caption = _volume_caption(result or {})

    centres = {"liver": _liver_centre(label_array)}
    tumour_centre = _largest_tumour_centre(label_array)
    if tumour_centre is not None:
        centres["tumour"] = tumour_centre

    pictures = []
    for focus, centre in centres.items():
        for view in VIEWS:
            pictures.append(_render_view(hu, label_array, spacing, view, focus, centre, caption))
    return pictures


def write_overlays(
    ct: nib.Nifti1Image,
    labels: nib.Nifti1Image,
    out_dir: Path,
    result: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Render the pictures of :func:`render_overlays` and write them as PNG files.

    Returns
    -------
    dict
        Path of each written file by picture name (``overlay_liver_axial`` ...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written: dict[str, str] = {}
    for picture in render_overlays(ct, labels, result):
        path = out_dir / f"{picture.name}.png"
        write_atomically(path, _png_bytes(picture.image))
        written[picture.name] = str(path)
    logger.info("Wrote %d overlay pictures into %s", len(written), out_dir)
    return written


def write_series_overlays(
    series_dir: Path, mask_path: Path, out_dir: Path, result: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Read the CT series and its mask, then write the overlay pictures into ``out_dir``.

    Parameters
    ----------
    series_dir : Path
        Folder of the CT series the mask was computed on.
    mask_path : Path
        ``mask.nii.gz`` of the result.
    out_dir : Path
        Output folder of the result.
    result : Mapping, optional
        ``result.json`` content, for the caption.

    Returns
    -------
    dict
        Path of each written file by picture name.
    """
    from dicom_io.convert import series_to_nifti
    from dicom_io.series import load_series

    ct = series_to_nifti(load_series(Path(series_dir)))
    labels = nib.load(str(mask_path))
    return write_overlays(ct, labels, out_dir, result)


# Rendering -------------------------------------------------------------------------------


def display_plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """Cut one slice from a RAS array and orient it for display as ``(rows, columns)``.

    Every view reverses both in-plane axes and transposes them: for an axial slice the
    columns then run from patient right to left (decreasing x) and the rows from anterior to
    posterior (decreasing y), and likewise for the other views.
    """
    if view == "axial":
        plane = volume[:, :, index]
    elif view == "coronal":
        plane = volume[:, index, :]
    elif view == "sagittal":
        plane = volume[index, :, :]
    else:
        raise ValueError(f"Unknown view {view!r}: use one of {', '.join(VIEWS)}")
    return plane[::-1, ::-1].T


def display_spacing(spacing: tuple[float, float, float], view: str) -> tuple[float, float]:
    """Return the (row, column) pixel spacing in mm of :func:`display_plane` for ``view``."""
    x, y, z = spacing
    if view == "axial":
        return y, x
    if view == "coronal":
        return z, x
    return z, y


def _render_view(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    view: str,
    focus: str,
    centre: tuple[int, int, int],
    caption: str,
) -> OverlayPicture:
    axis = VIEWS.index(view)
    index = (2, 1, 0)[axis]
    slice_index = centre[index]

    ct_plane = display_plane(hu, view, slice_index)
    label_plane = display_plane(labels, view, slice_index)
    row_mm, column_mm = display_spacing(spacing, view)

    # Square pixels: the longer physical side becomes PICTURE_SIZE_PX pixels.
    height_mm = ct_plane.shape[0] * row_mm
    width_mm = ct_plane.shape[1] * column_mm
    mm_per_pixel = max(height_mm, width_mm) / PICTURE_SIZE_PX
    size = (max(1, round(width_mm / mm_per_pixel)), max(1, round(height_mm / mm_per_pixel)))

    grey = Image.fromarray(_window(ct_plane)).resize(size, Image.Resampling.BILINEAR)
    label_picture = np.asarray(Image.fromarray(label_plane).resize(size, Image.Resampling.NEAREST))

    rgb = np.stack([np.asarray(grey)] * 3, axis=-1)
    rgb[_outline(label_picture >= LIVER_LABEL)] = LIVER_RGB
    rgb[_outline(label_picture == TUMOUR_LABEL)] = TUMOUR_RGB

    slice_count = hu.shape[index]
    caption_lines = [
        f"{view} slice {slice_index + 1}/{slice_count} through the {focus} centre",
        f"W {WINDOW_WIDTH_HU:g} L {WINDOW_LEVEL_HU:g}, {mm_per_pixel:.2f} mm/pixel",
        caption,
    ]
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(line, font=font)) for line in caption_lines)

    # The canvas is widened for the caption when the slice is narrower than its text.
    canvas_width = max(size[0], text_width + 2 * CAPTION_MARGIN_PX)
    caption_height = len(caption_lines) * LINE_HEIGHT_PX + 2 * CAPTION_MARGIN_PX
    picture = Image.new("RGB", (canvas_width, size[1] + caption_height), (0, 0, 0))
    picture.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(picture)
    _draw_orientation(draw, font, view, size)
    for number, line in enumerate(caption_lines):
        position = (CAPTION_MARGIN_PX, size[1] + CAPTION_MARGIN_PX + number * LINE_HEIGHT_PX)
        draw.text(position, line, fill=TEXT_RGB, font=font)

    return OverlayPicture(
        name=f"overlay_{focus}_{view}",
        focus=focus,
        view=view,
        slice_index=int(slice_index),
        mm_per_pixel=mm_per_pixel,
        image_size=size,
        image=picture,
    )


def _window(hu: np.ndarray) -> np.ndarray:
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    scaled = (hu.astype(np.float32) - low) / WINDOW_WIDTH_HU * 255.0
    return np.ascontiguousarray(np.clip(scaled, 0, 255).astype(np.uint8))


def _outline(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    edge = mask & ~ndimage.binary_erosion(mask)
    return ndimage.binary_dilation(edge, iterations=OUTLINE_WIDTH_PX - 1) if OUTLINE_WIDTH_PX > 1 else edge


def _draw_orientation(
    draw: ImageDraw.ImageDraw, font: Any, view: str, size: tuple[int, int]
) -> None:
    left, right, top, bottom = ORIENTATION_LETTERS[view]
    width, height = size
    margin = 4
    draw.text((margin, height // 2 - FONT_SIZE_PX // 2), left, fill=TEXT_RGB, font=font)
    draw.text((width - margin - FONT_SIZE_PX, height // 2 - FONT_SIZE_PX // 2), right, fill=TEXT_RGB, font=font)
    draw.text((width // 2, margin), top, fill=TEXT_RGB, font=font)
    draw.text((width // 2, height - margin - FONT_SIZE_PX - 2), bottom, fill=TEXT_RGB, font=font)


def _font() -> Any:
    try:
        return ImageFont.load_default(size=FONT_SIZE_PX)
    except (TypeError, OSError):
        # Pillow built without FreeType has only the fixed bitmap font.
        return ImageFont.load_default()


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Return the index ranges of the set voxels of ``mask``, or None when none is set."""
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(other for other in range(3) if other != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _centre_in_box(mask: np.ndarray, box: tuple[slice, slice, slice]) -> tuple[int, int, int]:
    """Return the voxel nearest the centre of mass of ``mask`` within ``box``, on the whole grid.

    Working inside the box keeps SciPy's float64 work arrays to the box's size.
    """
    local = _rounded_centre(ndimage.center_of_mass(mask[box]), mask[box])
    return tuple(int(value) + part.start for value, part in zip(local, box))  # type: ignore[return-value]


def _liver_centre(labels: np.ndarray) -> tuple[int, int, int]:
    liver = labels >= LIVER_LABEL
    box = _bounding_box(liver)
    if box is None:
        return tuple(int(n) // 2 for n in labels.shape)  # type: ignore[return-value]
    return _centre_in_box(liver, box)


def _largest_tumour_centre(labels: np.ndarray) -> tuple[int, int, int] | None:
    tumours = labels == TUMOUR_LABEL
    box = _bounding_box(tumours)
    if box is None:
        return None
    components, count = ndimage.label(tumours[box], structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    largest = components == (int(np.argmax(sizes)) + 1)
    whole = (slice(0, largest.shape[0]), slice(0, largest.shape[1]), slice(0, largest.shape[2]))
    local = _centre_in_box(largest, whole)
    return tuple(int(value) + part.start for value, part in zip(local, box))  # type: ignore[return-value]


def _rounded_centre(centre: Any, mask: np.ndarray) -> tuple[int, int, int]:
    point = tuple(int(round(value)) for value in centre)
    if mask[point]:
        return point  # type: ignore[return-value]
    # A curved structure may miss its own centre of mass; take the nearest voxel inside it.
    coordinates = np.argwhere(mask)
    nearest = coordinates[np.argmin(((coordinates - np.array(point)) ** 2).sum(axis=1))]
    return tuple(int(value) for value in nearest)  # type: ignore[return-value]


def _volume_caption(result: Mapping[str, Any]) -> str:
    def number(key: str, unit: str) -> str:
        value = result.get(key)
        return f"{value:.2f} {unit}" if isinstance(value, (int, float)) else "n/a"

    return (
        f"liver {number('liver_volume_ml', 'mL')}, tumour {number('tumor_volume_ml', 'mL')}, "
        f"burden {number('tumor_burden_percent', '%')}, tumours {result.get('tumor_count', 'n/a')}"
    )


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
