"""Writing and reading of the TID 1500 Measurement Report with the liver measurements.

The report is a Comprehensive 3D SR with two Volumetric ROI measurement groups (TID 1411):

- group "Liver": references SEG segment 1, finding type SCT Liver, and holds the liver volume;
- group "Liver tumor": references SEG segment 2, finding type SCT Neoplasm with finding site
  SCT Liver, and holds the total tumour volume and the tumour burden.

Free-text comments (for example analysis warnings) are TEXT items with concept name DCM 121106
"Comment" in the liver group, with relationship CONTAINS.

The tumour burden sits in the tumour group because it describes the tumour segment (its volume
as a percentage of the liver volume). A tumour-free case still gets the tumour group with
0 mL and 0 %, so readers always find all three numbers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_io import codes
from dicom_io.errors import MissingUIDError
from dicom_io.seg_writer import (
    LIVER_SEGMENT_NUMBER,
    PERSON_NAME_WARNING_PATTERN,
    TUMOR_SEGMENT_NUMBER,
    save_atomically,
    specific_character_set_of,
    with_type2_source_attributes,
)
from dicom_io.series import CTSeries

logger = logging.getLogger(__name__)

LIVER_TRACKING_IDENTIFIER = "Liver"
TUMOR_TRACKING_IDENTIFIER = "Liver tumor"
SR_SERIES_DESCRIPTION = "Liver volumetry report"
MEASUREMENT_KEYS = ("liver_volume_ml", "tumor_volume_ml", "tumor_burden_percent")



@dataclass(frozen=True)
class Measurements:
    """Volumetric results of one analysis.

    Attributes
    ----------
    liver_volume_ml: float
        Volume of the liver segment in mL.
    tumor_volume_ml: float
        Total volume of the tumour segment in mL.
    tumor_burden_percent: float
        Tumour volume as a percentage of the liver volume.
    """

    liver_volume_ml: float
    tumor_volume_ml: float
    tumor_burden_percent: float

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> "Measurements":
        """Build measurements from a mapping with the keys of :data:`MEASUREMENT_KEYS`."""
        missing = [key for key in MEASUREMENT_KEYS if key not in values]
        if missing:
            raise KeyError(f"Measurements are missing the key(s) {missing}; expected {list(MEASUREMENT_KEYS)}.")
        return cls(**{key: float(values[key]) for key in MEASUREMENT_KEYS})

    def as_dict(self) -> dict[str, float]:
        """Return the measurements keyed by :data:`MEASUREMENT_KEYS`."""
        return {key: float(getattr(self, key)) for key in MEASUREMENT_KEYS}


def _referenced_segment(seg: Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """Reference one segment of a SEG, also when the SEG omitted all its (empty) frames."""
    try:
        return hd.sr.ReferencedSegment.from_segmentation(seg, segment_number)
    except ValueError:
        source_series_uid = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        )


def _tracking_uid(seg: Dataset, segment_number: int) -> str:
    """Derive a stable tracking UID for one segment of one SEG instance."""
    return generate_uid(entropy_srcs=[str(seg.SOPInstanceUID), str(segment_number)])


def _measurement_groups(
    seg: Dataset,
    values: Measurements,
    algorithm: hd.sr.AlgorithmIdentification,
    comments: Sequence[str],
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    liver_volume = hd.sr.Measurement(
        name=codes.VOLUME,
        value=values.liver_volume_ml,
        unit=codes.UNIT_MILLILITER,
        algorithm_id=algorithm,
    )
    liver_group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(seg, LIVER_SEGMENT_NUMBER),
            identifier=LIVER_TRACKING_IDENTIFIER,
        ),
        referenced_segment=_referenced_segment(seg, LIVER_SEGMENT_NUMBER),
        finding_type=codes.LIVER,
        algorithm_id=algorithm,
        measurements=[liver_volume],
    )
    # NOTE: highdicom 0.28 builds no free-text item for TID 1411, so the comments are appended
    # to the group's content sequence directly. highdicom reads such reports back unchanged.
    for comment in comments:
        liver_group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=comment,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )

    tumor_volume = hd.sr.Measurement(
        name=codes.VOLUME,
        value=values.tumor_volume_ml,
        unit=codes.UNIT_MILLILITER,
        algorithm_id=algorithm,
    )
    tumor_burden = hd.sr.Measurement(
        name=codes.TUMOR_BURDEN,
        value=values.tumor_burden_percent,
        unit=codes.UNIT_PERCENT,
        algorithm_id=algorithm,
    )
    tumor_group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(seg, TUMOR_SEGMENT_NUMBER),
            identifier=TUMOR_TRACKING_IDENTIFIER,
        ),
        referenced_segment=_referenced_segment(seg, TUMOR_SEGMENT_NUMBER),
        finding_type=codes.NEOPLASM,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LIVER)],
        algorithm_id=algorithm,
        measurements=[tumor_volume, tumor_burden],
    )
    return [liver_group, tumor_group]


def write_sr(
    series: CTSeries,
    seg: Dataset,
    measurements: Measurements | Mapping[str, float],
    out_path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9902,
    instance_number: int = 1,
    comments: Sequence[str] = (),
    manufacturer: str = "Liver Node",
    device_uid: str | None = None,
    series_description: str = SR_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Write a Comprehensive 3D SR holding a TID 1500 Measurement Report.

    Parameters
    ----------
    series: CTSeries
        The source CT series; its instances are recorded as evidence.
    seg: pydicom.dataset.Dataset
        The SEG written by :func:`dicom_io.seg_writer.write_seg` for the same series.
    measurements: Measurements | Mapping[str, float]
        Liver volume (mL), tumour volume (mL) and tumour burden (%).
    out_path: pathlib.Path
        Destination file; written atomically.
    algorithm_name: str
        Name of the algorithm that produced the measurements.
    algorithm_version: str
        Version of the algorithm, including the weights' SHA-256 prefix.
    series_number: int, optional
        Series Number of the SR series.
    instance_number: int, optional
        Instance Number of the SR instance.
    comments: Sequence[str], optional
        Free-text comments such as analysis warnings; each becomes one "Comment" TEXT item.
    manufacturer: str, optional
        Manufacturer of the device observer and of the SR.
    device_uid: str | None, optional
        Device Observer UID; by default derived from ``manufacturer`` and ``algorithm_name``,
        so that all reports of one node installation share it.
    series_description: str, optional
        Series Description of the SR series.
    series_instance_uid: str | None, optional
        Series Instance UID; a new UID when None.
    sop_instance_uid: str | None, optional
        SOP Instance UID; a new UID when None.

    Returns
    -------
    pydicom.dataset.Dataset
        The SR instance that was written.

    Raises
    ------
    MissingUIDError
        When the source series lacks UIDs that the SR must reference.
    KeyError
        When ``measurements`` is a mapping without one of the required keys.
    """
    missing = series.missing_uid_attributes()
    if missing:
        raise MissingUIDError(missing, "write a DICOM SR")
    if not isinstance(measurements, Measurements):
        measurements = Measurements.from_mapping(measurements)

    series_instance_uid = series_instance_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    logger.info(
        "Writing SR %s (series %s) for SEG %s of source series %s to %s",
        sop_instance_uid,
        series_instance_uid,
        seg.SOPInstanceUID,
        series.series_instance_uid,
        out_path,
    )

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid or generate_uid(entropy_srcs=[manufacturer, algorithm_name]),
        name=algorithm_name,
        manufacturer_name=manufacturer,
        model_name=algorithm_name,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE_OBSERVER_TYPE,
            observer_identifying_attributes=device,
        )
    )
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.PROCEDURE_CT_UNSPECIFIED_BODY_REGION,
        imaging_measurements=_measurement_groups(seg, measurements, algorithm, list(comments)),
    )

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING_PATTERN)
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*with_type2_source_attributes(series.datasets), seg],
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=series_description,
            coding_schemes=[codes.PRIVATE_CODING_SCHEME],
            specific_character_set=specific_character_set_of(series.datasets[0]),
        )

    save_atomically(sr, Path(out_path))
    logger.info("Wrote SR %s (%s)", sop_instance_uid, measurements.as_dict())
    return sr


def _first_measurement_value(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
    name: hd.sr.CodedConcept,
    expected_unit: hd.sr.CodedConcept,
) -> float:
    found = group.get_measurements(name=name)
    if not found:
        raise ValueError(
            f"Measurement group {group.tracking_identifier!r} has no {name.meaning!r} measurement."
        )
    measurement = found[0]
    if measurement.unit != expected_unit:
        raise ValueError(
            f"Measurement {name.meaning!r} of group {group.tracking_identifier!r} has unit "
            f"{measurement.unit.value!r}; expected {expected_unit.value!r}."
        )
    return float(measurement.value)


def read_sr_measurements(sr: Path | str | Dataset) -> dict[str, float]:
    """Read the liver measurements back from an SR written by :func:`write_sr`.

    Parameters
    ----------
    sr: pathlib.Path | str | pydicom.dataset.Dataset
        The SR file or dataset.

    Returns
    -------
    dict[str, float]
        ``liver_volume_ml``, ``tumor_volume_ml`` and ``tumor_burden_percent``.

    Raises
    ------
    ValueError
        When the report lacks the liver or tumour group, or one of the measurements.
    """
    dataset = sr if isinstance(sr, Dataset) else pydicom.dcmread(sr)
    document = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    report = document.content
    if not isinstance(report, hd.sr.MeasurementReport):
        report = hd.sr.MeasurementReport.from_sequence(dataset.ContentSequence)

    groups = report.get_volumetric_roi_measurement_groups()
    liver_groups = [group for group in groups if group.finding_type == codes.LIVER]
    tumor_groups = [group for group in groups if group.finding_type == codes.NEOPLASM]
    if not liver_groups or not tumor_groups:
        raise ValueError(
            f"SR {dataset.SOPInstanceUID} has {len(liver_groups)} liver and {len(tumor_groups)} "
            "tumour measurement groups; one of each is required."
        )

    return {
        "liver_volume_ml": _first_measurement_value(liver_groups[0], codes.VOLUME, codes.UNIT_MILLILITER),
        "tumor_volume_ml": _first_measurement_value(tumor_groups[0], codes.VOLUME, codes.UNIT_MILLILITER),
        "tumor_burden_percent": _first_measurement_value(tumor_groups[0], codes.TUMOR_BURDEN, codes.UNIT_PERCENT),
    }
