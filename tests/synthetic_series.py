"""Configurable synthetic CT series with a phantom of known physical volume, for tests.

:func:`write_synthetic_series` writes one single-frame CT series whose geometry, pixel
encoding, text attributes and oddities (removed slices, position jitter, mixed spacing,
localizers, duplicates, stray non-image objects, per-slice overrides) are set by a
:class:`SeriesSpec`. The phantom is evaluated at every pixel centre in patient coordinates
(LPS), so it sits at the same physical place whatever the slice geometry:

- air (-1000 HU) outside a body ellipse, soft tissue (40 HU) inside it;
- one "organ" ellipsoid of :data:`ORGAN_HU` whose volume is ``4/3 * pi * a * b * c``.

A threshold at :data:`ORGAN_THRESHOLD_HU` segments the organ exactly on the sampled grid. The
voxel count times the voxel volume then estimates the ellipsoid volume. Point sampling makes
this estimate differ from the true volume by 0.03 % on the default spec (1.5 mm pixels,
2.5 mm slices). The tests use :data:`VOLUME_TOLERANCE` for every spec they measure.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")

AIR_HU = -1000.0
BODY_HU = 40.0
ORGAN_HU = 200.0

#: HU that padding pixels (PixelPaddingValue) read as: air.
PADDING_HU = -1024.0

#: HU between soft tissue and the organ: voxels above it belong to the organ.
ORGAN_THRESHOLD_HU = 120.0

#: Relative tolerance of an organ volume measured by thresholding against the true ellipsoid.
VOLUME_TOLERANCE = 0.03


@dataclass(frozen=True)
class Phantom:
    """Body ellipse and organ ellipsoid in patient coordinates (LPS, mm)."""

    organ_centre_mm: tuple[float, float, float] = (10.0, 5.0, 0.0)
    organ_semi_axes_mm: tuple[float, float, float] = (30.0, 25.0, 35.0)
    body_semi_axes_mm: tuple[float, float] = (60.0, 45.0)

    @property
    def organ_volume_ml(self) -> float:
        """True organ volume in mL."""
        a, b, c = self.organ_semi_axes_mm
        return 4.0 / 3.0 * np.pi * a * b * c / 1000.0

    def hu_at(self, points_lps: np.ndarray) -> np.ndarray:
        """Return the HU at points of shape ``(..., 3)`` in LPS millimetres."""
        x, y = points_lps[..., 0], points_lps[..., 1]
        body_a, body_b = self.body_semi_axes_mm
        inside_body = (x / body_a) ** 2 + (y / body_b) ** 2 <= 1.0

        offsets = (points_lps - np.asarray(self.organ_centre_mm)) / np.asarray(self.organ_semi_axes_mm)
        inside_organ = (offsets**2).sum(axis=-1) <= 1.0

        hu = np.full(points_lps.shape[:-1], AIR_HU, dtype=np.float64)
        hu[inside_body] = BODY_HU
        hu[inside_organ] = ORGAN_HU
        return hu


@dataclass
class SeriesSpec:
    """Geometry, encoding and content of one synthetic CT series.

    Attributes
    ----------
    rows, columns: int
        Matrix size of each slice.
    pixel_spacing_mm: tuple[float, float]
        PixelSpacing (row spacing, column spacing).
    slice_count: int
        Slices on the nominal grid before ``removed_slices`` are taken out.
    slice_spacing_mm: float
        Nominal step between slice positions along the slice normal.
    slice_steps_mm: Sequence[float] | None
        Explicit steps between consecutive slices (``slice_count - 1`` values) for mixed
        spacing; overrides ``slice_spacing_mm``.
    first_position_mm: float
        Position of the first slice along the slice normal, measured from the patient origin.
    row_cosine, column_cosine: tuple[float, float, float]
        ImageOrientationPatient; the defaults give axial slices.
    removed_slices: Sequence[int]
        Indices of nominal slices not written (a missing slice mid-series).
    position_jitter_mm: float
        Maximum random offset of each slice along the normal (uniform, seeded).
    slice_thickness_mm: float | None
        SliceThickness; the nominal spacing when None.
    bits_stored: int
        12 or 16; BitsAllocated is always 16.
    pixel_representation: int
        0 unsigned, 1 two's complement.
    rescale_slope, rescale_intercept: float
        Modality LUT; stored value = (HU - intercept) / slope, rounded.
    pixel_padding_value: int | None
        Stored value written outside the reconstruction circle and set as PixelPaddingValue.
    transfer_syntax: str
        Transfer syntax UID; compressed syntaxes use pydicom's encoders.
    specific_character_set: str | Sequence[str]
        SpecificCharacterSet; text attributes are encoded with it.
    patient_name, study_description, series_description, institution_name: str
        Text attributes, for character set tests.
    modality: str
        Modality of every slice.
    image_type: Sequence[str]
        ImageType of every slice.
    localizer_count: int
        Extra LOCALIZER images (coronal, in the same series) written next to the slices.
    duplicate_slices: Sequence[int]
        Indices (after removal) of slices written a second time under another file name.
    stray_objects: bool
        Also write a Basic Text SR and a file that is not DICOM into the folder.
    overrides: Mapping[int, Mapping[str, Any]]
        Per-slice attribute overrides by slice index (after removal); ``None`` deletes.
    shuffle_file_names: bool
        Name files randomly, so sorted names do not follow slice order.
    seed: int
        Seed of the jitter and the file name shuffle.
    phantom: Phantom
        What is imaged.
    """

    rows: int = 64
    columns: int = 64
    pixel_spacing_mm: tuple[float, float] = (1.5, 1.5)
    slice_count: int = 40
    slice_spacing_mm: float = 2.5
    slice_steps_mm: Sequence[float] | None = None
    first_position_mm: float = -48.75
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    removed_slices: Sequence[int] = ()
    position_jitter_mm: float = 0.0
    slice_thickness_mm: float | None = None
    bits_stored: int = 16
    pixel_representation: int = 1
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    pixel_padding_value: int | None = None
    transfer_syntax: str = ExplicitVRLittleEndian
    specific_character_set: str | Sequence[str] = "ISO_IR 100"
    patient_name: str = "Synthetic^Phantom"
    study_description: str = "CT ABDOMEN"
    series_description: str = "Abdomen axial"
    institution_name: str = "Test Hospital"
    modality: str = "CT"
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    localizer_count: int = 0
    duplicate_slices: Sequence[int] = ()
    stray_objects: bool = False
    overrides: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    shuffle_file_names: bool = True
    seed: int = 0
    phantom: Phantom = field(default_factory=Phantom)


@dataclass
class SyntheticSeries:
    """What :func:`write_synthetic_series` wrote.

    Attributes
    ----------
    folder: pathlib.Path
        The series folder.
    slice_files: list[pathlib.Path]
        The CT slice files in ascending position along the normal (no localizers, duplicates
        or stray objects).
    positions_mm: numpy.ndarray
        Position of each slice along the slice normal, same order.
    hu: list[numpy.ndarray]
        The phantom HU of each slice as ``(rows, columns)``, same order, before encoding.
    study_uid, series_uid: str
        UIDs of the series.
    spec: SeriesSpec
        The spec used.
    """

    folder: Path
    slice_files: list[Path]
    positions_mm: np.ndarray
    hu: list[np.ndarray]
    study_uid: str
    series_uid: str
    spec: SeriesSpec

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit slice normal in LPS."""
        normal = np.cross(self.spec.row_cosine, self.spec.column_cosine)
        return normal / np.linalg.norm(normal)


def slice_positions(spec: SeriesSpec) -> np.ndarray:
    """Return the positions along the slice normal of the slices ``spec`` writes."""
    if spec.slice_steps_mm is not None:
        steps = np.asarray(spec.slice_steps_mm, dtype=float)
        if len(steps) != spec.slice_count - 1:
            raise ValueError(f"slice_steps_mm needs {spec.slice_count - 1} values, got {len(steps)}")
        nominal = spec.first_position_mm + np.concatenate(([0.0], np.cumsum(steps)))
    else:
        nominal = spec.first_position_mm + spec.slice_spacing_mm * np.arange(spec.slice_count)

    if spec.position_jitter_mm:
        generator = np.random.default_rng(spec.seed)
        nominal = nominal + generator.uniform(-spec.position_jitter_mm, spec.position_jitter_mm, nominal.shape)

    keep = np.ones(spec.slice_count, dtype=bool)
    keep[list(spec.removed_slices)] = False
    return nominal[keep]


def _slice_origin(spec: SeriesSpec, position_mm: float) -> np.ndarray:
    """ImagePositionPatient of a slice centred on the normal axis through the patient origin."""
    row_cosine = np.asarray(spec.row_cosine, dtype=float)
    column_cosine = np.asarray(spec.column_cosine, dtype=float)
    normal = np.cross(row_cosine, column_cosine)
    normal /= np.linalg.norm(normal)
    row_spacing, column_spacing = spec.pixel_spacing_mm
    half_width = (spec.columns - 1) / 2.0 * column_spacing
    half_height = (spec.rows - 1) / 2.0 * row_spacing
    return position_mm * normal - half_width * row_cosine - half_height * column_cosine


def _pixel_points(spec: SeriesSpec, origin: np.ndarray) -> np.ndarray:
    row_spacing, column_spacing = spec.pixel_spacing_mm
    rows = np.arange(spec.rows, dtype=float)[:, None, None]
    columns = np.arange(spec.columns, dtype=float)[None, :, None]
    return (
        origin
        + columns * column_spacing * np.asarray(spec.row_cosine, dtype=float)
        + rows * row_spacing * np.asarray(spec.column_cosine, dtype=float)
    )


def encode_hu(hu: np.ndarray, spec: SeriesSpec) -> np.ndarray:
    """Return the stored pixel values for ``hu`` under the encoding of ``spec``.

    Raises
    ------
    ValueError
        When a HU value is not representable with the bits stored and pixel representation.
    """
    stored = np.rint((hu - spec.rescale_intercept) / spec.rescale_slope)
    if spec.pixel_representation:
        low, high = -(2 ** (spec.bits_stored - 1)), 2 ** (spec.bits_stored - 1) - 1
        dtype = np.int16
    else:
        low, high = 0, 2**spec.bits_stored - 1
        dtype = np.uint16
    if stored.min() < low or stored.max() > high:
        raise ValueError(
            f"stored values {stored.min():.0f}..{stored.max():.0f} do not fit {spec.bits_stored} bits "
            f"with PixelRepresentation {spec.pixel_representation}"
        )
    return stored.astype(dtype)


def _base_dataset(spec: SeriesSpec, study_uid: str, series_uid: str, frame_uid: str) -> Dataset:
    now = datetime.datetime(2024, 5, 17, 9, 30, 0)
    ds = Dataset()
    ds.SpecificCharacterSet = spec.specific_character_set
    ds.ImageType = list(spec.image_type)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "SYNACC1"
    ds.Modality = spec.modality
    ds.Manufacturer = "Synthetic Phantom Works"
    ds.InstitutionName = spec.institution_name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient_name
    ds.PatientID = "SYN-PHANTOM-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [f"{value:.6f}" for value in (*spec.row_cosine, *spec.column_cosine)]
    thickness = spec.slice_thickness_mm if spec.slice_thickness_mm is not None else spec.slice_spacing_mm
    ds.SliceThickness = f"{thickness:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [f"{value:g}" for value in spec.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = spec.pixel_representation
    ds.RescaleIntercept = f"{spec.rescale_intercept:g}"
    ds.RescaleSlope = f"{spec.rescale_slope:g}"
    ds.RescaleType = "HU"
    if spec.pixel_padding_value is not None:
        ds.PixelPaddingValue = spec.pixel_padding_value
    return ds


def _finish_and_save(ds: Dataset, stored: np.ndarray, transfer_syntax: str, path: Path) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    syntax = UID(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax.is_compressed else syntax
    ds.PixelData = stored.tobytes()
    if syntax.is_compressed:
        ds.compress(syntax, stored)
    ds.save_as(path, enforce_file_format=True)


def _apply_overrides(ds: Dataset, overrides: Mapping[str, Any]) -> None:
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def write_synthetic_series(folder: Path, spec: SeriesSpec | None = None) -> SyntheticSeries:
    """Write one synthetic CT series described by ``spec`` into ``folder``.

    Parameters
    ----------
    folder: pathlib.Path
        Target folder; created when missing.
    spec: SeriesSpec | None
        What to write; the defaults when None.

    Returns
    -------
    SyntheticSeries
        The files, their positions along the normal and the phantom HU of each slice.
    """
    spec = spec or SeriesSpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(spec.seed + 1)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    base = _base_dataset(spec, study_uid, series_uid, frame_uid)
    positions = slice_positions(spec)
    normal = np.cross(spec.row_cosine, spec.column_cosine)
    normal = normal / np.linalg.norm(normal)

    def file_name(index: int, prefix: str) -> str:
        if spec.shuffle_file_names:
            return f"{generator.integers(0, 2**62):016x}.dcm"
        return f"{prefix}{index + 1:04d}.dcm"

    slice_files: list[Path] = []
    slice_hu: list[np.ndarray] = []
    for index, position in enumerate(positions):
        origin = _slice_origin(spec, float(position))
        hu = spec.phantom.hu_at(_pixel_points(spec, origin))
        stored = encode_hu(hu, spec)
        if spec.pixel_padding_value is not None:
            # Pixels outside the reconstruction circle carry the padding value, as scanners write.
            radius = min(spec.rows, spec.columns) / 2.0
            rr, cc = np.mgrid[: spec.rows, : spec.columns]
            outside = (rr - (spec.rows - 1) / 2.0) ** 2 + (cc - (spec.columns - 1) / 2.0) ** 2 > radius**2
            stored[outside] = spec.pixel_padding_value
            hu = hu.copy()
            hu[outside] = PADDING_HU

        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{value:.4f}" for value in origin]
        ds.SliceLocation = f"{float(origin @ normal):.4f}"
        _apply_overrides(ds, spec.overrides.get(index, {}))

        path = folder / file_name(index, "CT")
        _finish_and_save(ds, stored, spec.transfer_syntax, path)
        slice_files.append(path)
        slice_hu.append(hu)

    for index in spec.duplicate_slices:
        copy_path = folder / f"dup-{index:04d}.dcm"
        copy_path.write_bytes(slice_files[index].read_bytes())

    for index in range(spec.localizer_count):
        _write_localizer(folder / file_name(index, "LOC"), base, spec, index)

    if spec.stray_objects:
        _write_text_sr(folder / "report.dcm", study_uid, series_uid)
        (folder / "DICOMDIR.txt").write_text("not a DICOM file\n", encoding="utf-8")

    logger.info(
        "Wrote synthetic CT series %s: %d slices, %d localizers, %d duplicates into %s",
        series_uid, len(slice_files), spec.localizer_count, len(spec.duplicate_slices), folder,
    )
    return SyntheticSeries(folder, slice_files, positions, slice_hu, study_uid, series_uid, spec)


def _write_localizer(path: Path, base: Dataset, spec: SeriesSpec, index: int) -> None:
    """A coronal LOCALIZER image in the same series, as some scanners send with the slices."""
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 900 + index
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.ImagePositionPatient = ["-48", "0", "100"]
    stored = encode_hu(np.full((spec.rows, spec.columns), BODY_HU), spec)
    _finish_and_save(ds, stored, ExplicitVRLittleEndian, path)


def _write_text_sr(path: Path, study_uid: str, series_uid: str) -> None:
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.save_as(path, enforce_file_format=True)


def threshold_volume_ml(image: nib.Nifti1Image, threshold_hu: float = ORGAN_THRESHOLD_HU) -> float:
    """Return the volume of voxels above ``threshold_hu`` in mL.

    Geometry tests use this threshold segmentation in place of the networks, so the measured
    volume depends only on the conversion path.
    """
    data = np.asarray(image.dataobj, dtype=np.float32)
    voxel_volume_mm3 = abs(float(np.linalg.det(image.affine[:3, :3])))
    return float((data > threshold_hu).sum()) * voxel_volume_mm3 / 1000.0
