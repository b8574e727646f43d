"""Versioning of SR documents: a new SR that replaces an earlier one references it.

When more instances of an already analysed series arrive, the node analyses the whole
series again and sends a new SR. The new SR lists the earlier SR in its
PredecessorDocumentsSequence (SR Document General Module, PS3.3 C.17.2), so a reader can
tell that it supersedes the earlier result instead of being a second, independent one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DocumentReference:
    """Identity of one stored SR document."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def from_file(cls, path: Path) -> DocumentReference:
        """Read the UIDs of the SR at ``path``.

        Raises
        ------
        pydicom.errors.InvalidDicomError, OSError, AttributeError
            When the file is not a DICOM file with the four UIDs.
        """
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        return cls(
            str(dataset.StudyInstanceUID),
            str(dataset.SeriesInstanceUID),
            str(dataset.SOPClassUID),
            str(dataset.SOPInstanceUID),
        )


def add_predecessor(sr_path: Path, predecessor: DocumentReference) -> None:
    """Add ``predecessor`` to the PredecessorDocumentsSequence of the SR at ``sr_path``.

    The file is rewritten in place, keeping its transfer syntax.

    Raises
    ------
    ValueError
        When the SR and its predecessor belong to different studies, or the predecessor is
        the SR itself.
    """
    dataset = pydicom.dcmread(sr_path)
    if str(dataset.StudyInstanceUID) != predecessor.study_instance_uid:
        raise ValueError(
            f"SR {dataset.SOPInstanceUID} is in study {dataset.StudyInstanceUID} but its "
            f"predecessor {predecessor.sop_instance_uid} is in study {predecessor.study_instance_uid}"
        )
    if str(dataset.SOPInstanceUID) == predecessor.sop_instance_uid:
        raise ValueError(f"SR {predecessor.sop_instance_uid} cannot be its own predecessor")

    sop_reference = Dataset()
    sop_reference.ReferencedSOPClassUID = predecessor.sop_class_uid
    sop_reference.ReferencedSOPInstanceUID = predecessor.sop_instance_uid
    series_reference = Dataset()
    series_reference.SeriesInstanceUID = predecessor.series_instance_uid
    series_reference.ReferencedSOPSequence = [sop_reference]
    study_reference = Dataset()
    study_reference.StudyInstanceUID = predecessor.study_instance_uid
    study_reference.ReferencedSeriesSequence = [series_reference]

    existing = list(dataset.get("PredecessorDocumentsSequence", []))
    dataset.PredecessorDocumentsSequence = [*existing, study_reference]
    dataset.save_as(sr_path, enforce_file_format=True)
    logger.info(
        "SR %s now references its predecessor SR %s", dataset.SOPInstanceUID, predecessor.sop_instance_uid
    )


def predecessor_uids(sr_path: Path) -> list[str]:
    """Return the SOP Instance UIDs listed in the PredecessorDocumentsSequence of an SR."""
    dataset = pydicom.dcmread(sr_path, stop_before_pixels=True)
    return [
        str(sop.ReferencedSOPInstanceUID)
        for study in dataset.get("PredecessorDocumentsSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", [])
    ]
