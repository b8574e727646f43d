"""Writing of NIfTI volumes as single-frame CT DICOM series, and UID assignment for series.

:func:`write_ct_series` turns a NIfTI volume of Hounsfield units into one CT Image Storage file
per axial slice, with the geometry, rescale and identification attributes a CT scanner writes.
Benchmarks and ``livernode demo`` use it to send volumes to the node as DICOM.
:func:`assign_uids` copies a series whose UIDs were blanked by de-identification and fills them
deterministically, so the node can reference the instances from its SEG and SR.
"""

from __future__ import annotations

import datetime
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

# Stored values are unsigned 12-bit with a -1024 intercept, as many CT scanners store them,
# so HU -1024..3071 are representable.
RESCALE_INTERCEPT = -1024
RESCALE_SLOPE = 1
BITS_STORED = 12
MAX_STORED_VALUE = 2**BITS_STORED - 1

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _format_ds(value: float) -> str:
    """Format a decimal string value within the 16-character limit of DS."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _reorient_to_lps(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Reorder axes so that i runs to patient left, j to posterior and k to superior.

    A CT scanner writes axial slices with row cosine (1, 0, 0) and column cosine (0, 1, 0).
    """
    current = nib.orientations.io_orientation(image.affine)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    return image.as_reoriented(nib.orientations.ornt_transform(current, target))


def write_ct_series(
    image: nib.Nifti1Image,
    out_dir: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = "Doe^Jane",
    patient_id: str = "LN-TEST-0001",
    accession_number: str = "ACC0001",
    series_number: int = 3,
    transfer_syntax: str = ExplicitVRLittleEndian,
    shuffle_file_names: bool = False,
    reorient_to_lps: bool = True,
    slice_thickness_mm: float | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write a NIfTI volume of HU as an axial single-frame CT series.

    Parameters
    ----------
    image: nibabel.Nifti1Image
        Volume of Hounsfield units; the third array axis becomes the slice axis.
    out_dir: pathlib.Path
        Folder for the files; created when missing.
    study_uid, series_uid, frame_of_reference_uid: str | None, optional
        UIDs to use; new UIDs when None.
    patient_name, patient_id, accession_number: str, optional
        Patient and study identification.
    series_number: int, optional
        Series Number of the CT series.
    transfer_syntax: str, optional
        Transfer syntax UID. Compressed syntaxes are encoded with pydicom's encoders, which must
        be installed for that syntax (RLE Lossless needs none).
    shuffle_file_names: bool, optional
        Name files randomly, so that sorted file names do not follow slice order.
    reorient_to_lps: bool, optional
        Reorder the volume axes to the LPS layout a scanner writes before slicing.
    slice_thickness_mm: float | None, optional
        Slice Thickness; the slice spacing when None.
    seed: int, optional
        Seed of the file name shuffle.

    Returns
    -------
    list[pathlib.Path]
        The written files in slice order (InstanceNumber 1 first).

    Raises
    ------
    NotImplementedError
        When ``transfer_syntax`` is compressed and pydicom has no encoder for it here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if reorient_to_lps:
        image = _reorient_to_lps(image)

    hu = np.asarray(image.dataobj, dtype=np.float64)
    affine_lps = LPS_FROM_RAS @ image.affine
    column_step = affine_lps[:3, 0]
    row_step = affine_lps[:3, 1]
    slice_step = affine_lps[:3, 2]
    column_spacing = float(np.linalg.norm(column_step))
    row_spacing = float(np.linalg.norm(row_step))
    slice_spacing = float(np.linalg.norm(slice_step))
    row_cosine = column_step / column_spacing
    column_cosine = row_step / row_spacing
    normal = np.cross(row_cosine, column_cosine)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    now = datetime.datetime(2024, 5, 17, 9, 30, 0)
    n_columns, n_rows, n_slices = hu.shape
    logger.info(
        "Writing CT series %s (study %s): %d slices of %dx%d to %s",
        series_uid,
        study_uid,
        n_slices,
        n_columns,
        n_rows,
        out_dir,
    )

    names = [f"CT{index + 1:04d}.dcm" for index in range(n_slices)]
    if shuffle_file_names:
        generator = random.Random(seed)
        names = [f"{generator.getrandbits(64):016x}.dcm" for _ in range(n_slices)]

    paths = []
    for k in range(n_slices):
        position = affine_lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine_lps[:3, 3]
        stored = np.clip(np.rint(hu[:, :, k].T - RESCALE_INTERCEPT), 0, MAX_STORED_VALUE).astype(np.uint16)
        sop_instance_uid = generate_uid()

        dataset = Dataset()
        dataset.SpecificCharacterSet = "ISO_IR 100"
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.SOPClassUID = CT_IMAGE_STORAGE
        dataset.SOPInstanceUID = sop_instance_uid
        dataset.StudyDate = dataset.SeriesDate = dataset.AcquisitionDate = dataset.ContentDate = now.strftime("%Y%m%d")
        dataset.StudyTime = now.strftime("%H%M%S")
        dataset.SeriesTime = dataset.AcquisitionTime = dataset.ContentTime = (now + datetime.timedelta(minutes=2)).strftime("%H%M%S")
        dataset.AccessionNumber = accession_number
        dataset.Modality = "CT"
        dataset.Manufacturer = "Liver Node Test Scanner Co."
        dataset.InstitutionName = "Test Hospital"
        dataset.ReferringPhysicianName = "Smith^John"
        dataset.StationName = "CT01"
        dataset.StudyDescription = "CT ABDOMEN WITH CONTRAST"
        dataset.SeriesDescription = "Abdomen 1.0 portal venous"
        dataset.ManufacturerModelName = "Synthetic CT 64"
        dataset.PatientName = patient_name
        dataset.PatientID = patient_id
        dataset.PatientBirthDate = "19600101"
        dataset.PatientSex = "F"
        dataset.PatientAge = "064Y"
        dataset.BodyPartExamined = "ABDOMEN"
        dataset.SliceThickness = _format_ds(slice_thickness_mm if slice_thickness_mm is not None else slice_spacing)
        dataset.SpacingBetweenSlices = _format_ds(slice_spacing)
        dataset.KVP = "120"
        dataset.DeviceSerialNumber = "SYN0001"
        dataset.SoftwareVersions = "1.0"
        dataset.ProtocolName = "Abdomen portal venous"
        dataset.ReconstructionDiameter = _format_ds(max(n_rows * row_spacing, n_columns * column_spacing))
        dataset.GantryDetectorTilt = "0"
        dataset.TableHeight = "150"
        dataset.RotationDirection = "CW"
        dataset.ExposureTime = "500"
        dataset.XRayTubeCurrent = "250"
        dataset.Exposure = "125"
        dataset.ConvolutionKernel = "B30f"
        dataset.PatientPosition = "HFS"
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.StudyID = "1"
        dataset.SeriesNumber = series_number
        dataset.AcquisitionNumber = 1
        dataset.InstanceNumber = k + 1
        dataset.ImagePositionPatient = [_format_ds(value) for value in position]
        dataset.ImageOrientationPatient = [_format_ds(value) for value in (*row_cosine, *column_cosine)]
        dataset.FrameOfReferenceUID = frame_of_reference_uid
        dataset.PositionReferenceIndicator = ""
        dataset.SliceLocation = _format_ds(float(position @ normal))
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.Rows = n_rows
        dataset.Columns = n_columns
        dataset.PixelSpacing = [_format_ds(row_spacing), _format_ds(column_spacing)]
        dataset.BitsAllocated = 16
        dataset.BitsStored = BITS_STORED
        dataset.HighBit = BITS_STORED - 1
        dataset.PixelRepresentation = 0
        dataset.WindowCenter = "40"
        dataset.WindowWidth = "400"
        dataset.RescaleIntercept = str(RESCALE_INTERCEPT)
        dataset.RescaleSlope = str(RESCALE_SLOPE)
        dataset.RescaleType = "HU"

        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        dataset.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        syntax = UID(transfer_syntax)
        if syntax.is_compressed:
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            dataset.PixelData = stored.tobytes()
            dataset.compress(syntax, stored)
        else:
            dataset.file_meta.TransferSyntaxUID = syntax
            dataset.PixelData = stored.tobytes()

        path = out_dir / names[k]
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)

    logger.info("Wrote CT series %s: %d files", series_uid, len(paths))
    return paths


def assign_uids(src_dir: Path, out_dir: Path, *, files: Sequence[Path] | None = None) -> list[Path]:
    """Copy a series and fill its blank UIDs deterministically.

    Study and Series Instance UIDs derive from the sorted file names of the series, each SOP
    Instance UID from its file name, so repeated calls give the same UIDs. A blank SOPClassUID
    is taken from MediaStorageSOPClassUID. Pixel data and transfer syntax stay unchanged.
    FrameOfReferenceUID is copied as it is and not filled.

    NOTE: the UIDs depend on file names only, so two series whose files have the same names
    get the same UIDs. Assign UIDs to one such series per node or PACS at a time.

    Parameters
    ----------
    src_dir: pathlib.Path
        Folder with the source files (not searched recursively).
    out_dir: pathlib.Path
        Destination folder; created when missing.
    files: Sequence[pathlib.Path] | None, optional
        Subset of files of ``src_dir`` to copy; all regular files when None.

    Returns
    -------
    list[pathlib.Path]
        The written files, in the order of the sorted source file names.
    """
    src_dir = Path(src_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(path) for path in files) if files is not None else sorted(p for p in src_dir.iterdir() if p.is_file())
    all_names = [path.name for path in sorted(p for p in src_dir.iterdir() if p.is_file())]

    study_uid = generate_uid(entropy_srcs=["study", *all_names])
    series_uid = generate_uid(entropy_srcs=["series", *all_names])

    logger.info(
        "Assigning UIDs to %d files of %s: study %s, series %s, copies in %s",
        len(sources),
        src_dir,
        study_uid,
        series_uid,
        out_dir,
    )
    written = []
    for source in sources:
        dataset = pydicom.dcmread(source)
        sop_instance_uid = generate_uid(entropy_srcs=["instance", source.name])
        if not str(dataset.get("SOPClassUID", "") or ""):
            dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = sop_instance_uid
        dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid

        target = out_dir / source.name
        dataset.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
