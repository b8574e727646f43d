"""Writing of the liver and liver-tumour DICOM Segmentation (SEG) for a CT series."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, UID, generate_uid

from dicom_io import codes
from dicom_io.errors import MissingUIDError
from dicom_io.series import CTSeries

logger = logging.getLogger(__name__)

LIVER_SEGMENT_NUMBER = 1
TUMOR_SEGMENT_NUMBER = 2
# write_seg passes the label frames to highdicom as a label map, so each label value must equal
# the number of its segment.
LIVER_LABEL = LIVER_SEGMENT_NUMBER
TUMOR_LABEL = TUMOR_SEGMENT_NUMBER
ALLOWED_LABELS = (0, LIVER_LABEL, TUMOR_LABEL)

LIVER_SEGMENT_LABEL = "Liver"
TUMOR_SEGMENT_LABEL = "Liver tumor"
SEG_CONTENT_LABEL = "LIVER_SEG"
SEG_SERIES_DESCRIPTION = "Liver and liver tumor segmentation"

#: Type 2 attributes of the Patient and General Study modules that highdicom 0.28 reads from
#: the first source image by attribute access, so it raises AttributeError when one is absent.
#: Type 2 attributes must be present but may be empty (PS3.5 section 7.4).
TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

# highdicom warns about single-component person names and quotes the name in the message;
# patient names must not reach the logs. NOTE: warnings.catch_warnings changes process-wide
# state, so a warning raised by another thread during the same interval may be dropped too.
PERSON_NAME_WARNING_PATTERN = ".*unlikely to represent the intended person name.*"


def segment_descriptions(algorithm_name: str, algorithm_version: str) -> list[hd.seg.SegmentDescription]:
    """Build the descriptions of segment 1 (liver) and segment 2 (liver tumour).

    Parameters
    ----------
    algorithm_name: str
        Name of the segmentation algorithm.
    algorithm_version: str
        Version of the algorithm, including the weights' SHA-256 prefix.

    Returns
    -------
    list[highdicom.seg.SegmentDescription]
        The two segment descriptions, in segment number order.
    """
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.ALGORITHM_FAMILY_ARTIFICIAL_INTELLIGENCE,
        version=algorithm_version,
    )
    liver = hd.seg.SegmentDescription(
        segment_number=LIVER_SEGMENT_NUMBER,
        segment_label=LIVER_SEGMENT_LABEL,
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=codes.LIVER,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    tumor = hd.seg.SegmentDescription(
        segment_number=TUMOR_SEGMENT_NUMBER,
        segment_label=TUMOR_SEGMENT_LABEL,
        segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        segmented_property_type=codes.NEOPLASM,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.LIVER],
    )
    return [liver, tumor]


def _validate_frames(series: CTSeries, frames: np.ndarray) -> np.ndarray:
    """Check the shape and label values of the label frames, and return them as a uint8 array.

    Valid input costs one max() and, for signed types, one min(). The unique values, which take
    far longer on a whole series, are computed only to name the invalid ones in the error.
    """
    frames = np.asarray(frames)
    expected_shape = (len(series.datasets), series.rows, series.columns)
    if frames.shape != expected_shape:
        raise ValueError(
            f"Label frames have shape {frames.shape}; the series needs {expected_shape} "
            "(instances, Rows, Columns). Map the label volume with labels_to_source_frames."
        )
    if frames.dtype.kind not in "biu":
        raise ValueError(
            f"Label frames have data type {frames.dtype}; an integer or boolean type is required."
        )
    if frames.size == 0:
        return frames.astype(np.uint8)

    highest = int(frames.max())
    lowest = int(frames.min()) if frames.dtype.kind == "i" else 0
    if lowest < 0 or highest > TUMOR_LABEL:
        unexpected = np.setdiff1d(np.unique(frames), ALLOWED_LABELS)
        raise ValueError(
            f"Label frames contain values {unexpected.tolist()}; only 0 (background), "
            f"{LIVER_LABEL} (liver) and {TUMOR_LABEL} (tumour) are allowed."
        )
    return frames.astype(np.uint8, copy=False)


def _count_labelled_pixels(frames: np.ndarray) -> tuple[int, int]:
    """Count the liver and the tumour pixels, looking only at the frames from the first to the last non-empty one."""
    non_empty = np.flatnonzero(frames.reshape(len(frames), -1).max(axis=1, initial=0))
    if non_empty.size == 0:
        return 0, 0

    labelled = frames[non_empty[0] : non_empty[-1] + 1]
    return int(np.count_nonzero(labelled == LIVER_LABEL)), int(np.count_nonzero(labelled == TUMOR_LABEL))


def with_type2_source_attributes(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Add missing Type 2 patient and study attributes, empty, to copies of source datasets.

    De-identified or minimal series often omit Type 2 patient and study attributes, such as
    PatientBirthDate. A dataset that lacks one is replaced by a shallow copy with the missing
    attributes added with empty values; the copy shares the data elements of the original,
    pixel data included. Datasets that lack nothing are returned as they are. The caller's
    datasets are never modified.

    Parameters
    ----------
    datasets: Sequence[pydicom.dataset.Dataset]
        Source instances, for example ``CTSeries.datasets``.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        One dataset per source instance, in the same order.
    """
    completed: list[Dataset] = []
    for dataset in datasets:
        missing = [keyword for keyword in TYPE2_SOURCE_ATTRIBUTES if keyword not in dataset]
        if not missing:
            completed.append(dataset)
            continue

        # Dataset(dataset) would share the element dictionary with the original, so the copy
        # gets a new dictionary holding the same data elements.
        copy = Dataset({element.tag: element for element in dataset})
        if hasattr(dataset, "file_meta"):
            copy.file_meta = dataset.file_meta
        for keyword in missing:
            setattr(copy, keyword, "")
        logger.debug(
            "Source instance %s lacks Type 2 attribute(s) %s; empty values used in the derived object",
            dataset.get("SOPInstanceUID", ""),
            ", ".join(missing),
        )
        completed.append(copy)
    return completed


def specific_character_set_of(dataset: Dataset) -> str | list[str]:
    """Return the Specific Character Set for an object derived from ``dataset``.

    Derived objects copy patient and study text from the source, so they keep its character set.
    A source without a value, or with an empty one as some scanners write, uses the default
    repertoire. "ISO_IR 192" (UTF-8) is returned then, because it encodes the default repertoire
    unchanged and highdicom 0.28 rejects an empty value.
    """
    value = dataset.get("SpecificCharacterSet")
    if value is None or value == "" or (isinstance(value, list | tuple) and not any(value)):
        return "ISO_IR 192"
    if isinstance(value, str):
        return value
    return [str(item) for item in value]


def save_atomically(dataset: Dataset, out_path: Path) -> None:
    """Write a dataset in DICOM file format to a temporary file, then move it onto ``out_path``.

    Readers never see a partly written file because :func:`os.replace` is atomic within one
    file system.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(descriptor)
    try:
        dataset.save_as(temporary_name, enforce_file_format=True)
        os.replace(temporary_name, out_path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def write_seg(
    series: CTSeries,
    frames: np.ndarray,
    out_path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9901,
    instance_number: int = 1,
    keep_empty_frames: bool = True,
    manufacturer: str = "Liver Node",
    manufacturer_model_name: str | None = None,
    software_versions: str | None = None,
    device_serial_number: str | None = None,
    series_description: str = SEG_SERIES_DESCRIPTION,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Write a BINARY DICOM SEG with segment 1 (liver) and segment 2 (liver tumour).

    Parameters
    ----------
    series: CTSeries
        The source series; every instance becomes a source image, in series order.
    frames: numpy.ndarray
        Label frames of shape ``(len(series.datasets), Rows, Columns)`` with values 0, 1 (liver)
        and 2 (tumour), as returned by :func:`dicom_io.convert.labels_to_source_frames`.
    out_path: pathlib.Path
        Destination file; written atomically.
    algorithm_name: str
        Algorithm name for the Segment Algorithm Name and Algorithm Identification Sequence.
    algorithm_version: str
        Algorithm version, including the weights' SHA-256 prefix.
    series_number: int, optional
        Series Number of the SEG series.
    instance_number: int, optional
        Instance Number of the SEG instance.
    keep_empty_frames: bool, optional
        Keep frames without any segmented pixel, so that every segment has one frame per source
        instance. When False, empty frames are omitted (smaller files).
    manufacturer: str, optional
        Manufacturer of the device that creates the SEG.
    manufacturer_model_name: str | None, optional
        Model name; defaults to ``algorithm_name``.
    software_versions: str | None, optional
        Software versions; defaults to ``algorithm_version``.
    device_serial_number: str | None, optional
        Device serial number; defaults to the host name of the machine running the node.
    series_description: str, optional
        Series Description of the SEG series.
    transfer_syntax_uid: str, optional
        Transfer syntax of the written file.
    series_instance_uid: str | None, optional
        Series Instance UID; a new UID when None.
    sop_instance_uid: str | None, optional
        SOP Instance UID; a new UID when None.

    Returns
    -------
    pydicom.dataset.Dataset
        The Segmentation instance that was written.

    Raises
    ------
    MissingUIDError
        When the source series lacks UIDs that the SEG must reference.
    ValueError
        When ``frames`` has the wrong shape or unexpected label values.
    """
    missing = series.missing_uid_attributes()
    if missing:
        raise MissingUIDError(missing, "write a DICOM SEG")
    frames = _validate_frames(series, frames)

    series_instance_uid = series_instance_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    logger.info(
        "Writing SEG %s (series %s) for source series %s to %s",
        sop_instance_uid,
        series_instance_uid,
        series.series_instance_uid,
        out_path,
    )

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING_PATTERN)
        segmentation = hd.seg.Segmentation(
            source_images=with_type2_source_attributes(series.datasets),
            # The label values are the segment numbers, so the frames go in as a label map.
            # highdicom 0.28 checks a label map with one max() and cuts each segment's binary
            # frame per plane. A 4D stack of binary masks is slower because highdicom sums it
            # over the segment axis to test for overlap. That took about 2 s for 300 frames of
            # 512 x 512 pixels (cProfile run of bench/seg_profile.py, 2 CPU cores).
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(algorithm_name, algorithm_version),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name or algorithm_name,
            software_versions=software_versions or algorithm_version,
            device_serial_number=device_serial_number or platform.node() or "unknown",
            content_label=SEG_CONTENT_LABEL,
            content_description=SEG_SERIES_DESCRIPTION,
            series_description=series_description,
            transfer_syntax_uid=UID(transfer_syntax_uid),
            omit_empty_frames=not keep_empty_frames,
            specific_character_set=specific_character_set_of(series.datasets[0]),
        )

    save_atomically(segmentation, Path(out_path))
    liver_pixels, tumor_pixels = _count_labelled_pixels(frames)
    logger.info(
        "Wrote SEG %s with %d frames (liver pixels %d, tumour pixels %d)",
        sop_instance_uid,
        int(segmentation.NumberOfFrames),
        liver_pixels,
        tumor_pixels,
    )
    return segmentation
