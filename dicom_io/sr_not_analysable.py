"""SR for a series that was received but could not be analysed reliably.

When the node decides that a series cannot give a trustworthy result (for example a field
of view too short to hold the liver), it still answers in the study: a Comprehensive 3D SR
with a TID 1500 Measurement Report whose one measurement group (TID 1501, finding "Liver")
contains no measurement, only a "Comment" TEXT item that states "not analysable" and why. No
SEG is written and no volume is reported, so nothing misleading reaches the PACS.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_io import codes
from dicom_io.errors import MissingUIDError
from dicom_io.seg_writer import (
    PERSON_NAME_WARNING_PATTERN,
    save_atomically,
    specific_character_set_of,
    with_type2_source_attributes,
)
from dicom_io.series import CTSeries

logger = logging.getLogger(__name__)

NOT_ANALYSABLE_PREFIX = "not analysable"
SR_SERIES_DESCRIPTION = "Liver volumetry report (not analysable)"


def write_not_analysable_sr(
    series: CTSeries,
    reason: str,
    out_path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9902,
    manufacturer: str = "Liver Node",
) -> Dataset:
    """Write an SR that reports the series as not analysable, with the reason and no values.

    Parameters
    ----------
    series: CTSeries
        The source CT series; its instances are recorded as evidence.
    reason: str
        Why the series is not analysable, for example ``"not analysable: coverage 40 mm ..."``.
    out_path: pathlib.Path
        Destination file; written atomically.
    algorithm_name, algorithm_version: str
        The algorithm that declined the series.
    series_number: int, optional
        Series Number of the SR series.
    manufacturer: str, optional
        Manufacturer of the device observer and of the SR.

    Returns
    -------
    pydicom.dataset.Dataset
        The SR instance that was written.

    Raises
    ------
    MissingUIDError
        When the source series lacks UIDs that the SR must reference.
    """
    missing = series.missing_uid_attributes()
    if missing:
        raise MissingUIDError(missing, "write a DICOM SR")

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[manufacturer, algorithm_name]),
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
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Liver"),
        finding_type=codes.LIVER,
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.COMMENT,
            value=f"{reason} (algorithm {algorithm_name} {algorithm_version})"[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.PROCEDURE_CT_UNSPECIFIED_BODY_REGION,
        imaging_measurements=[group],
    )

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING_PATTERN)
        sr = hd.sr.Comprehensive3DSR(
            evidence=with_type2_source_attributes(series.datasets),
            content=report,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=SR_SERIES_DESCRIPTION,
            specific_character_set=specific_character_set_of(series.datasets[0]),
        )

    save_atomically(sr, Path(out_path))
    logger.info("Wrote not-analysable SR %s for series %s: %s", sr.SOPInstanceUID, series.series_instance_uid, reason)
    return sr


def read_comments(sr: Path | str | Dataset) -> list[str]:
    """Return every "Comment" TEXT value anywhere in an SR's content tree."""
    dataset = sr if isinstance(sr, Dataset) else pydicom.dcmread(sr)
    found: list[str] = []

    def visit(items: list[Dataset]) -> None:
        for item in items:
            concept = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "TEXT" and concept and concept[0].CodeValue == codes.COMMENT.value:
                found.append(str(item.TextValue))
            visit(list(item.get("ContentSequence", [])))

    visit(list(dataset.get("ContentSequence", [])))
    return found
