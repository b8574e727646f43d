"""Reading and validation of one single-frame CT series from a folder of DICOM files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicom_io.errors import SeriesValidationError, UnsupportedSOPClassError
from dicom_io.pixel_reader import PixelDataLocation, read_header

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.2")
UNSUPPORTED_CT_SOP_CLASSES = (ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)

DEFAULT_MIN_SLICES = 3
DEFAULT_ORIENTATION_TOLERANCE = 1e-4
DEFAULT_PIXEL_SPACING_TOLERANCE_MM = 1e-3
DEFAULT_DUPLICATE_TOLERANCE_MM = 1e-2
DEFAULT_SPACING_TOLERANCE_MM = 0.05

#: Slice steps that differ from the median step by at most this fraction of it count as
#: position jitter: the slices stay on one grid, each off its grid position by that much.
JITTER_FRACTION = 0.2

#: A step between adjacent slices larger than this multiple of the median step is a gap that
#: interpolation would fill with invented anatomy, so the series is rejected. Smaller
#: irregularities (one missing slice, mixed spacing) are resampled onto a regular grid.
DEFAULT_MAX_GAP_FACTOR = 2.5

#: Instances whose orientation differs from the main stack are dropped with a warning when
#: they are at most this fraction of the slices; more of them means a mixed folder.
MAX_OFF_ORIENTATION_FRACTION = 0.1

# Attributes a derived SEG or SR must copy or reference, in DICOM tag order.
REFERENCE_UID_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
)

GEOMETRY_ATTRIBUTES = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


@dataclass
class CTSeries:
    """One validated single-frame CT series.

    Attributes
    ----------
    datasets: list[pydicom.dataset.Dataset]
        The CT instances sorted by ascending position along the slice normal (the cross product
        of the row and column direction cosines). They hold the headers only: Pixel Data is
        removed, so a series costs no pixel memory until :mod:`dicom_io.convert` decodes it from
        ``files``. Read a file with :func:`pydicom.dcmread` to get an instance's ``pixel_array``.
    files: list[pathlib.Path]
        The file of each dataset, in the same order.
    pixel_data_locations: list[PixelDataLocation | None]
        Where the Pixel Data value of each dataset lies in its file, in the same order; None
        where unknown, in which case the decoder lets pydicom find it.
    study_instance_uid: str
        Study Instance UID shared by the instances; empty when the files carry none.
    series_instance_uid: str
        Series Instance UID shared by the instances; empty when the files carry none.
    warnings: list[str]
        Findings that do not prevent conversion, such as non-uniform slice spacing.
    slice_spacing_mm: float
        Median distance between adjacent slice positions along the slice normal, in mm.
    slice_normal: numpy.ndarray
        Unit slice normal in the DICOM patient coordinate system (LPS).
    positions_mm: numpy.ndarray
        Position of each slice along the slice normal (ImagePositionPatient projected on
        ``slice_normal``), in mm, ascending and in the order of ``datasets``.
    """

    datasets: list[Dataset]
    files: list[Path]
    study_instance_uid: str
    series_instance_uid: str
    warnings: list[str] = field(default_factory=list)
    slice_spacing_mm: float = 0.0
    slice_normal: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    positions_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pixel_data_locations: list[PixelDataLocation | None] = field(default_factory=list)

    @property
    def is_uniform(self) -> bool:
        """Whether the slices can be placed on one regular grid without resampling.

        True when every slice step differs from the median step by at most
        :data:`DEFAULT_SPACING_TOLERANCE_MM` or by :data:`JITTER_FRACTION` of the median step
        (position jitter); each slice then keeps its own grid slice, off by at most that much.
        """
        if len(self.positions_mm) < 3:
            return True
        steps = np.diff(self.positions_mm)
        allowed = max(DEFAULT_SPACING_TOLERANCE_MM, JITTER_FRACTION * self.slice_spacing_mm)
        return bool(np.abs(steps - self.slice_spacing_mm).max() <= allowed)

    def missing_uid_attributes(self) -> list[str]:
        """Return the reference UID attributes that are missing or empty in any instance.

        A DICOM SEG or SR derived from the series must reference the study, the series, the
        frame of reference and every source instance by UID, so a caller must skip writing them
        when this list is not empty. The names are DICOM keywords in tag order.

        Returns
        -------
        list[str]
            Keywords from ``SOPClassUID``, ``SOPInstanceUID``, ``StudyInstanceUID``,
            ``SeriesInstanceUID`` and ``FrameOfReferenceUID``.
        """
        missing = []
        for keyword in REFERENCE_UID_ATTRIBUTES:
            if any(not str(dataset.get(keyword, "") or "").strip() for dataset in self.datasets):
                missing.append(keyword)
        return missing

    @property
    def rows(self) -> int:
        """Number of pixel rows of every instance."""
        return int(self.datasets[0].Rows)

    @property
    def columns(self) -> int:
        """Number of pixel columns of every instance."""
        return int(self.datasets[0].Columns)


def sop_class_of(dataset: Dataset) -> str:
    """Return the SOP Class UID of a dataset, falling back to the file meta information.

    Some de-identification tools blank SOPClassUID in the dataset but keep
    MediaStorageSOPClassUID in the file meta information, which still identifies the class.
    """
    sop_class_uid = str(dataset.get("SOPClassUID", "") or "").strip()
    if sop_class_uid:
        return sop_class_uid

    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None:
        return str(file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    return ""


def _read_candidates(folder: Path) -> tuple[list[tuple[Path, Dataset]], dict[Path, PixelDataLocation | None]]:
    """Read the header of every DICOM file below ``folder``, skipping files that are not DICOM.

    Returns the ``(path, dataset)`` pairs and the Pixel Data location of each path (None for a
    file without Pixel Data).
    """
    candidates = []
    locations: dict[Path, PixelDataLocation | None] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            dataset, location = read_header(path)
        except (InvalidDicomError, EOFError, OSError, ValueError) as error:
            logger.info("Ignoring %s: not a readable DICOM file (%s)", path, error)
            continue
        candidates.append((path, dataset))
        locations[path] = location
    return candidates, locations


def _is_localizer(dataset: Dataset) -> bool:
    image_type = dataset.get("ImageType", [])
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(value).upper() == "LOCALIZER" for value in image_type)


def _select_ct_images(
    candidates: list[tuple[Path, Dataset]],
    locations: dict[Path, PixelDataLocation | None],
    warnings: list[str],
) -> list[tuple[Path, Dataset]]:
    """Keep single-frame CT images; raise for Enhanced CT; log and drop everything else.

    A LOCALIZER image among the slices is dropped with a warning in ``warnings``.
    """
    selected = []
    for path, dataset in candidates:
        sop_class_uid = sop_class_of(dataset)
        sop_instance_uid = dataset.get("SOPInstanceUID", "")

        if sop_class_uid in UNSUPPORTED_CT_SOP_CLASSES:
            raise UnsupportedSOPClassError(
                f"{path} is a {UID(sop_class_uid).name} instance (SOPClassUID {sop_class_uid}). "
                "Multi-frame CT is not supported yet; send the series as single-frame "
                f"CT Image Storage ({CT_IMAGE_STORAGE}) instances."
            )
        if sop_class_uid != CT_IMAGE_STORAGE:
            reason = f"SOP class {UID(sop_class_uid).name}" if sop_class_uid else "no SOPClassUID"
            logger.info(
                "Ignoring %s (SOPInstanceUID %s): not a CT image (%s)", path, sop_instance_uid, reason
            )
            continue
        if _is_localizer(dataset):
            message = f"Dropped {path.name} (SOPInstanceUID {sop_instance_uid}): ImageType is LOCALIZER"
            logger.warning(message)
            warnings.append(message)
            continue
        if locations.get(path) is None:
            raise SeriesValidationError(
                f"{path} is a CT Image Storage instance without PixelData; the file is incomplete, "
                "send the series again."
            )
        selected.append((path, dataset))
    return selected


def _require_geometry(path: Path, dataset: Dataset) -> None:
    for keyword in GEOMETRY_ATTRIBUTES:
        value = dataset.get(keyword)
        if value is None or value == "" or (isinstance(value, Sequence) and len(value) == 0):
            raise SeriesValidationError(
                f"{path} has no {keyword}; the volume geometry cannot be reconstructed without it. "
                "Check that the sender transmits the original CT images, not secondary captures."
            )

    expected_lengths = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
    for keyword, length in expected_lengths.items():
        if len(dataset[keyword].value) != length:
            raise SeriesValidationError(
                f"{path} has {keyword} with {len(dataset[keyword].value)} values; "
                f"{length} are required."
            )


def _check_single_uid(items: list[tuple[Path, Dataset]], keyword: str) -> str:
    """Return the one non-empty value of ``keyword``, or "" when no instance carries one."""
    values: dict[str, Path] = {}
    for path, dataset in items:
        value = str(dataset.get(keyword, "") or "").strip()
        if value:
            values.setdefault(value, path)
    if len(values) > 1:
        listing = "; ".join(f"{value} (e.g. {path})" for value, path in values.items())
        raise SeriesValidationError(
            f"The folder mixes {len(values)} different {keyword} values: {listing}. "
            "Put each series in its own folder."
        )
    return next(iter(values), "")


def _drop_off_orientation(
    items: list[tuple[Path, Dataset]], orientation_tolerance: float, warnings: list[str]
) -> list[tuple[Path, Dataset]]:
    """Keep the largest group of slices sharing one orientation; drop a small rest with a warning.

    Raises
    ------
    SeriesValidationError
        When more than :data:`MAX_OFF_ORIENTATION_FRACTION` of the slices leave the main stack.
    """
    orientations = [np.asarray(dataset.ImageOrientationPatient, dtype=float) for _, dataset in items]
    groups: list[list[int]] = []
    for index, orientation in enumerate(orientations):
        for group in groups:
            if np.allclose(orientation, orientations[group[0]], atol=orientation_tolerance, rtol=0.0):
                group.append(index)
                break
        else:
            groups.append([index])
    if len(groups) == 1:
        return items

    main = max(groups, key=len)
    main_path = items[main[0]][0]
    dropped = [index for index in range(len(items)) if index not in set(main)]
    if len(dropped) > MAX_OFF_ORIENTATION_FRACTION * len(items):
        path = items[dropped[0]][0]
        raise SeriesValidationError(
            f"ImageOrientationPatient of {path} ({list(orientations[dropped[0]])}) differs from that "
            f"of {main_path} ({list(orientations[main[0]])}) by more than {orientation_tolerance}, "
            f"and {len(dropped)} of {len(items)} slices leave the main stack; a series must contain "
            "one stack of parallel slices."
        )
    for index in dropped:
        path, dataset = items[index]
        message = (
            f"Dropped {path.name} (SOPInstanceUID {dataset.get('SOPInstanceUID', '')}): "
            f"ImageOrientationPatient {list(orientations[index])} differs from the main stack "
            f"({list(orientations[main[0]])})"
        )
        logger.warning(message)
        warnings.append(message)
    return [items[index] for index in main]


def _check_shared_geometry(items: list[tuple[Path, Dataset]]) -> None:
    first_path, first = items[0]
    pixel_spacing = np.asarray(first.PixelSpacing, dtype=float)

    for path, dataset in items[1:]:
        for keyword in ("Rows", "Columns"):
            if int(dataset[keyword].value) != int(first[keyword].value):
                raise SeriesValidationError(
                    f"{keyword} of {path} is {dataset[keyword].value} but {first[keyword].value} "
                    f"in {first_path}; all slices of a series must have the same matrix size."
                )
        other_spacing = np.asarray(dataset.PixelSpacing, dtype=float)
        if not np.allclose(other_spacing, pixel_spacing, atol=DEFAULT_PIXEL_SPACING_TOLERANCE_MM, rtol=0.0):
            raise SeriesValidationError(
                f"PixelSpacing of {path} ({list(other_spacing)}) differs from that of {first_path} "
                f"({list(pixel_spacing)}); all slices of a series must have the same pixel spacing."
            )


def slice_normal_of(dataset: Dataset) -> np.ndarray:
    """Return the unit slice normal (row cosine x column cosine) of a dataset in LPS."""
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise SeriesValidationError(
            f"ImageOrientationPatient {list(orientation)} has parallel row and column direction "
            "cosines, so it defines no slice plane."
        )
    return normal / norm


def _remove_duplicates(
    items: list[tuple[Path, Dataset]],
    positions: np.ndarray,
    duplicate_tolerance_mm: float,
    warnings: list[str],
) -> tuple[list[tuple[Path, Dataset]], np.ndarray]:
    """Drop repeated copies of one instance and raise for distinct instances at one position.

    ``items`` and ``positions`` are sorted along the slice normal.
    """
    kept_items = [items[0]]
    kept_positions = [positions[0]]
    for (path, dataset), position in zip(items[1:], positions[1:]):
        previous_path, previous = kept_items[-1]
        if abs(position - kept_positions[-1]) > duplicate_tolerance_mm:
            kept_items.append((path, dataset))
            kept_positions.append(position)
            continue

        uid = str(dataset.get("SOPInstanceUID", "") or "")
        previous_uid = str(previous.get("SOPInstanceUID", "") or "")
        if uid and uid == previous_uid:
            message = f"Ignored {path}: it repeats SOPInstanceUID {uid} already read from {previous_path}"
            logger.warning(message)
            warnings.append(message)
            continue

        raise SeriesValidationError(
            f"{previous_path} and {path} are different instances at the same slice position "
            f"({position:.3f} mm along the slice normal). The folder probably mixes several "
            "reconstructions or acquisitions; send one series per folder."
        )
    return kept_items, np.asarray(kept_positions)


def _check_stacking(items: list[tuple[Path, Dataset]], normal: np.ndarray, warnings: list[str]) -> None:
    """Warn when the slice origins are not stacked along the normal (gantry tilt or shear)."""
    origins = np.asarray([np.asarray(d.ImagePositionPatient, dtype=float) for _, d in items])
    offsets = origins - origins[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    max_in_plane_mm = float(np.abs(in_plane).max())
    if max_in_plane_mm > 0.1:
        message = (
            f"Slice origins drift up to {max_in_plane_mm:.2f} mm within the slice plane "
            "(gantry tilt or sheared stack); the volume affine is sheared accordingly."
        )
        logger.warning(message)
        warnings.append(message)


def _check_spacing(
    positions: np.ndarray,
    spacing_tolerance_mm: float,
    max_gap_factor: float,
    warnings: list[str],
) -> float:
    """Return the median slice step; warn on irregular steps and raise on a gap too large."""
    steps = np.diff(positions)
    spacing = float(np.median(steps))
    largest = int(np.argmax(steps))
    if steps[largest] > max_gap_factor * spacing:
        raise SeriesValidationError(
            f"The series has a gap of {steps[largest]:.2f} mm between the slices at "
            f"{positions[largest]:.2f} mm and {positions[largest + 1]:.2f} mm along the slice "
            f"normal, more than {max_gap_factor:g} times the median spacing of {spacing:.2f} mm. "
            "Slices are missing: send the complete series."
        )

    deviation = float(np.abs(steps - spacing).max())
    if deviation > spacing_tolerance_mm:
        message = (
            f"Slice spacing is not uniform: steps range from {steps.min():.3f} to {steps.max():.3f} mm "
            f"(median {spacing:.3f} mm, largest step between {positions[largest]:.2f} and "
            f"{positions[largest + 1]:.2f} mm). Steps more than {JITTER_FRACTION:.0%} off the median "
            "are resampled onto a regular grid, and the masks are mapped back to the source slices."
        )
        logger.warning(message)
        warnings.append(message)
    return spacing


def load_series(
    folder: Path,
    *,
    min_slices: int = DEFAULT_MIN_SLICES,
    orientation_tolerance: float = DEFAULT_ORIENTATION_TOLERANCE,
    duplicate_tolerance_mm: float = DEFAULT_DUPLICATE_TOLERANCE_MM,
    spacing_tolerance_mm: float = DEFAULT_SPACING_TOLERANCE_MM,
    max_gap_factor: float = DEFAULT_MAX_GAP_FACTOR,
) -> CTSeries:
    """Read, filter, validate and sort one single-frame CT series.

    Parameters
    ----------
    folder: pathlib.Path
        Folder searched recursively. Files that are not DICOM and DICOM objects that are not CT
        images (SR, SEG, presentation states, localizers) are ignored with a log message.
    min_slices: int, optional
        Minimum number of CT slices required.
    orientation_tolerance: float, optional
        Maximum absolute difference between the direction cosines of two slices.
    duplicate_tolerance_mm: float, optional
        Two slices closer than this along the slice normal occupy the same position.
    spacing_tolerance_mm: float, optional
        Maximum deviation of a slice step from the median step before a warning is recorded
        (and the conversion resamples the volume onto a regular grid).
    max_gap_factor: float, optional
        Largest allowed slice step as a multiple of the median step.

    Returns
    -------
    CTSeries
        The validated series, sorted by ascending position along the slice normal.

    Raises
    ------
    SeriesValidationError
        When the folder contains no CT series, mixes series, lacks geometry attributes, contains
        two different slices at one position, has more than a few slices of another
        orientation, has a gap larger than ``max_gap_factor`` times the median slice step or
        has fewer than ``min_slices`` slices.
    UnsupportedSOPClassError
        When the folder contains Enhanced CT or Legacy Converted Enhanced CT instances.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesValidationError(f"Series folder {folder} does not exist or is not a folder.")
    logger.info("Loading CT series from %s", folder)

    warnings: list[str] = []
    candidates, locations = _read_candidates(folder)
    items = _select_ct_images(candidates, locations, warnings)
    if not items:
        raise SeriesValidationError(
            f"{folder} contains no CT Image Storage instances (SOP Class UID 1.2.840.10008.5.1.4.1.1.2); "
            "give the folder that holds the DICOM files of one CT series"
        )

    study_instance_uid = _check_single_uid(items, "StudyInstanceUID")
    series_instance_uid = _check_single_uid(items, "SeriesInstanceUID")
    for path, dataset in items:
        _require_geometry(path, dataset)
    items = _drop_off_orientation(items, orientation_tolerance, warnings)
    _check_shared_geometry(items)

    normal = slice_normal_of(items[0][1])
    positions = np.asarray([np.asarray(d.ImagePositionPatient, dtype=float) @ normal for _, d in items])
    order = np.argsort(positions, kind="stable")
    items = [items[i] for i in order]
    positions = positions[order]

    items, positions = _remove_duplicates(items, positions, duplicate_tolerance_mm, warnings)
    if len(items) < min_slices:
        raise SeriesValidationError(
            f"{folder} contains {len(items)} CT slice(s) at distinct positions; at least "
            f"{min_slices} are required to build a volume."
        )

    _check_stacking(items, normal, warnings)
    spacing = _check_spacing(positions, spacing_tolerance_mm, max_gap_factor, warnings)

    series = CTSeries(
        datasets=[dataset for _, dataset in items],
        files=[path for path, _ in items],
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        warnings=warnings,
        slice_spacing_mm=spacing,
        slice_normal=normal,
        positions_mm=positions,
        pixel_data_locations=[locations[path] for path, _ in items],
    )
    logger.info(
        "Loaded CT series %s (study %s): %d slices, %dx%d, slice spacing %.3f mm",
        series_instance_uid or "<no SeriesInstanceUID>",
        study_instance_uid or "<no StudyInstanceUID>",
        len(series.datasets),
        series.rows,
        series.columns,
        spacing,
    )
    return series
