"""Series selection: which received series are axial CT image series worth analysing.

A PACS routing a whole CT study sends, next to the axial image series, localizers (scouts),
secondary captures, dose reports and coronal or sagittal reformats. :func:`select_series`
reads only the headers of one series folder and decides whether the series qualifies, or
names the reason it is skipped. The rules, in order:

1. the series contains CT Image Storage instances (Enhanced CT, secondary captures, dose
   reports and other SOP classes are skipped);
2. Modality is CT;
3. at least ``min_slices`` instances remain after dropping images whose ImageType contains
   LOCALIZER or whose third ImageType value is present and not in ``image_type_values``
   (a localizer series or an MPR series is skipped this way);
4. the slice normal of the most common orientation lies within
   ``orientation_tolerance_deg`` of the patient's feet-head axis (axial; oblique axial
   acquisitions and gantry tilt pass, coronal and sagittal reformats do not).

The same localizer and orientation rules drop single odd images inside an otherwise axial
series in :func:`dicom_io.series.load_series`, with a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicom_io.series import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, sop_class_of

logger = logging.getLogger(__name__)

LOCALIZER = "LOCALIZER"

#: Plain names of SOP classes often found in CT studies, used in skip reasons.
SOP_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.88.67": "radiation dose report",
    "1.2.840.10008.5.1.4.1.1.88.22": "enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "comprehensive SR",
    ENHANCED_CT_IMAGE_STORAGE: "Enhanced CT (multi-frame)",
}


@dataclass(frozen=True)
class SelectionRules:
    """Rules that decide which series are analysed.

    Attributes
    ----------
    min_slices: int
        Minimum number of qualifying CT images (default 3).
    image_type_values: Sequence[str]
        Accepted third values of ImageType (default ``("AXIAL",)``); images without a third
        value pass and the orientation rule decides.
    orientation_tolerance_deg: float
        Largest angle between the slice normal and the feet-head axis (default 30).
    """

    min_slices: int = 3
    image_type_values: Sequence[str] = ("AXIAL",)
    orientation_tolerance_deg: float = 30.0


@dataclass
class SelectionDecision:
    """Outcome of :func:`select_series`.

    Attributes
    ----------
    analyse: bool
        Whether the series qualifies.
    reason: str
        Why it is skipped, or a summary of what qualified.
    dropped: list[str]
        Images of a qualifying series that the rules leave out (localizers, other types).
    """

    analyse: bool
    reason: str
    dropped: list[str] = field(default_factory=list)


def _image_type(dataset: Dataset) -> list[str]:
    value = dataset.get("ImageType", [])
    if isinstance(value, str):
        value = [value]
    return [str(item).strip().upper() for item in value]


def _normal_angle_deg(dataset: Dataset) -> float | None:
    orientation = dataset.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    cosines = np.asarray(orientation, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return None
    return float(np.degrees(np.arccos(min(abs(normal[2]) / norm, 1.0))))


def _read_headers(folder: Path) -> list[tuple[Path, Dataset]]:
    headers = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
        except (InvalidDicomError, EOFError, OSError, ValueError) as error:
            logger.info("Selection ignores %s: not a readable DICOM file (%s)", path, error)
    return headers


def select_series(folder: Path, rules: SelectionRules | None = None) -> SelectionDecision:
    """Decide whether the series in ``folder`` is an axial CT image series to analyse.

    Parameters
    ----------
    folder: pathlib.Path
        Folder holding the instances of one series.
    rules: SelectionRules | None
        The rules; the defaults when None.

    Returns
    -------
    SelectionDecision
        ``analyse`` True with a summary, or False with the reason.
    """
    rules = rules or SelectionRules()
    headers = _read_headers(folder)
    if not headers:
        return SelectionDecision(False, "the series folder holds no readable DICOM instance")

    sop_classes = Counter(sop_class_of(dataset) for _, dataset in headers)
    ct_images = [(path, ds) for path, ds in headers if sop_class_of(ds) == CT_IMAGE_STORAGE]
    if not ct_images:
        sop_class, _ = sop_classes.most_common(1)[0]
        name = SOP_CLASS_NAMES.get(sop_class) or (UID(sop_class).name if sop_class else "no SOP class")
        reason = f"not a CT image series: {len(headers)} instance(s) of {name} ({sop_class or 'none'})"
        if sop_class == ENHANCED_CT_IMAGE_STORAGE:
            reason += "; multi-frame CT is not analysed, send the series as single-frame CT Image Storage"
        return SelectionDecision(False, reason)

    modalities = Counter(str(ds.get("Modality", "") or "").strip() for _, ds in ct_images)
    modality, _ = modalities.most_common(1)[0]
    if modality != "CT":
        return SelectionDecision(False, f"Modality is {modality!r}, not 'CT'")

    accepted_types = {value.strip().upper() for value in rules.image_type_values}
    qualifying: list[tuple[Path, Dataset]] = []
    dropped: list[str] = []
    type_counts: Counter[str] = Counter()
    for path, dataset in ct_images:
        image_type = _image_type(dataset)
        image_type_text = "\\".join(image_type) or "(none)"
        type_counts[image_type_text] += 1
        if LOCALIZER in image_type or (len(image_type) >= 3 and image_type[2] not in accepted_types):
            dropped.append(f"{path.name} (ImageType {image_type_text})")
            continue
        qualifying.append((path, dataset))

    if len(qualifying) < rules.min_slices:
        types = ", ".join(f"{name} x{count}" for name, count in type_counts.most_common())
        return SelectionDecision(
            False,
            f"{len(qualifying)} qualifying CT image(s), at least {rules.min_slices} required "
            f"(selection.min_slices); ImageType values found: {types}; accepted third values: "
            f"{', '.join(sorted(accepted_types))} (selection.image_type_values)",
        )

    angles = [_normal_angle_deg(ds) for _, ds in qualifying]
    known = [round(angle, 1) for angle in angles if angle is not None]
    if not known:
        return SelectionDecision(False, "no image carries a valid ImageOrientationPatient")
    angle, _ = Counter(known).most_common(1)[0]
    if angle > rules.orientation_tolerance_deg:
        return SelectionDecision(
            False,
            f"not an axial series: the slice normal is {angle:.1f} degrees from the feet-head axis, "
            f"more than selection.orientation_tolerance_deg = {rules.orientation_tolerance_deg:g}",
        )

    return SelectionDecision(
        True,
        f"{len(qualifying)} axial CT image(s), slice normal {angle:.1f} degrees from the feet-head axis",
        dropped,
    )
