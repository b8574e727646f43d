"""Tests of the dicom_io package: series loading, conversion, SEG, SR and C-STORE sending.

Synthetic series come from ``tests.ct_writer``; real files are read in place from
``../shared/data`` and the tests that need them skip when that folder is absent. The sender
tests run a real pynetdicom Storage SCP on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage

from dicom_io import codes
from dicom_io.convert import labels_to_source_frames, native_affine_ras, series_to_nifti
from dicom_io.errors import MissingUIDError, SendError, SeriesValidationError, UnsupportedSOPClassError
from dicom_io.seg_writer import write_seg
from dicom_io.sender import send_files
from dicom_io.series import load_series
from dicom_io.sr_writer import Measurements, read_sr_measurements, write_sr
from tests.ct_writer import assign_uids, copy_series, write_ct_series

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TOTALSEG_DICOM = SHARED_DATA / "totalseg-example" / "ct-dicom"
TOTALSEG_SEG_NIFTI = SHARED_DATA / "totalseg-example" / "example_seg_dicom.nii.gz"
TOTALSEG_LIVER_LABEL = 5
DCMQI_DIR = SHARED_DATA / "dcmqi-ct-3slice"
TRANSFER_SYNTAX_DIR = SHARED_DATA / "transfer-syntaxes"
ENHANCED_CT_FILE = SHARED_DATA / "eCT_Supplemental.dcm"
EXPECTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
}

ALGORITHM_NAME = "LiverNode test"
ALGORITHM_VERSION = "0.1.0 weights sha256:0123abcd"

# Synthetic grid: 32 columns x 32 rows x 10 slices with anisotropic spacing.
SYNTHETIC_SHAPE = (32, 32, 10)
SYNTHETIC_SPACING = (0.7, 0.9, 2.5)
SYNTHETIC_ORIGIN = (-11.0, 20.5, -130.0)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (see ../shared/data/README.md)")
    return path


def synthetic_image(seed: int = 1, affine: np.ndarray | None = None) -> nib.Nifti1Image:
    """Random integer HU on a RAS grid (or on ``affine``), so every voxel is distinct."""
    generator = np.random.default_rng(seed)
    data = generator.integers(-1000, 2000, size=SYNTHETIC_SHAPE).astype(np.float32)
    if affine is None:
        affine = np.diag([*SYNTHETIC_SPACING, 1.0])
        affine[:3, 3] = SYNTHETIC_ORIGIN
    return nib.Nifti1Image(data, affine)


def las_descending_affine() -> np.ndarray:
    """A LAS grid whose slices run from superior to inferior."""
    affine = np.diag([-SYNTHETIC_SPACING[0], SYNTHETIC_SPACING[1], -SYNTHETIC_SPACING[2], 1.0])
    affine[:3, 3] = (40.0, -30.0, 100.0)
    return affine


@pytest.fixture
def synthetic_series_dir(tmp_path: Path) -> tuple[Path, nib.Nifti1Image]:
    image = synthetic_image()
    folder = tmp_path / "ct"
    write_ct_series(image, folder, shuffle_file_names=True)
    return folder, image


def pixel_ras(dataset: pydicom.Dataset, row: int, column: int) -> np.ndarray:
    """Patient position of one pixel centre, in RAS."""
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(value) for value in dataset.PixelSpacing)
    lps = (
        np.asarray(dataset.ImagePositionPatient, dtype=float)
        + column * column_spacing * orientation[:3]
        + row * row_spacing * orientation[3:]
    )
    return lps * np.array([-1.0, -1.0, 1.0])


def frame_source_uid(frame_item: pydicom.Dataset) -> str:
    return frame_item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID


def frame_position(frame_item: pydicom.Dataset) -> np.ndarray:
    return np.asarray(frame_item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)


# Series loading and validation


def test_load_series_sorts_shuffled_files(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    series = load_series(folder)

    instance_numbers = [int(dataset.InstanceNumber) for dataset in series.datasets]
    assert instance_numbers == list(range(1, SYNTHETIC_SHAPE[2] + 1))
    assert sorted(path.name for path in series.files) != [path.name for path in series.files]
    assert series.slice_spacing_mm == pytest.approx(SYNTHETIC_SPACING[2])
    assert series.warnings == []
    assert series.missing_uid_attributes() == []
    assert series.series_instance_uid == series.datasets[0].SeriesInstanceUID


def test_load_series_ignores_non_image_objects(synthetic_series_dir, tmp_path):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    frames = np.zeros((len(series.datasets), series.rows, series.columns), dtype=np.uint8)
    write_seg(series, frames, folder / "derived" / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    (folder / "notes.txt").write_text("not DICOM")

    reloaded = load_series(folder)

    assert len(reloaded.datasets) == SYNTHETIC_SHAPE[2]
    assert all(path.suffix == ".dcm" and path.parent == folder for path in reloaded.files)


def test_load_series_missing_position_names_attribute_and_file(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    victim = sorted(folder.iterdir())[3]
    dataset = pydicom.dcmread(victim)
    del dataset.ImagePositionPatient
    dataset.save_as(victim)

    with pytest.raises(SeriesValidationError) as raised:
        load_series(folder)

    assert "ImagePositionPatient" in str(raised.value)
    assert victim.name in str(raised.value)


def test_load_series_rejects_distinct_duplicate_position(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    source = sorted(folder.iterdir())[0]
    dataset = pydicom.dcmread(source)
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(folder / "copy.dcm")

    with pytest.raises(SeriesValidationError, match="same slice position"):
        load_series(folder)


def test_load_series_drops_repeated_instance(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    source = sorted(folder.iterdir())[0]
    shutil.copy(source, folder / "repeat.dcm")

    series = load_series(folder)

    assert len(series.datasets) == SYNTHETIC_SHAPE[2]
    assert any("repeats SOPInstanceUID" in warning for warning in series.warnings)


def test_load_series_minimum_slice_count(synthetic_series_dir):
    folder, _ = synthetic_series_dir

    with pytest.raises(SeriesValidationError, match="at least 11"):
        load_series(folder, min_slices=11)
    assert len(load_series(folder, min_slices=10).datasets) == 10


def test_load_series_rejects_mixed_series(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    victim = sorted(folder.iterdir())[2]
    dataset = pydicom.dcmread(victim)
    dataset.SeriesInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(victim)

    with pytest.raises(SeriesValidationError, match="SeriesInstanceUID"):
        load_series(folder)


def test_load_series_warns_on_gap(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    series.files[4].unlink()

    gapped = load_series(folder)

    assert len(gapped.datasets) == SYNTHETIC_SHAPE[2] - 1
    assert any("not uniform" in warning for warning in gapped.warnings)


def test_load_series_rejects_enhanced_ct(tmp_path):
    require(ENHANCED_CT_FILE)
    shutil.copy(ENHANCED_CT_FILE, tmp_path / "enhanced.dcm")

    with pytest.raises(UnsupportedSOPClassError, match="Enhanced CT"):
        load_series(tmp_path)


def test_load_series_rejects_folder_without_ct(tmp_path):
    (tmp_path / "readme.txt").write_text("no images")

    with pytest.raises(SeriesValidationError, match="no CT Image Storage"):
        load_series(tmp_path)


# Conversion


@pytest.mark.parametrize("affine", [None, las_descending_affine()], ids=["ras", "las-descending"])
def test_series_to_nifti_matches_source_volume(tmp_path, affine):
    image = synthetic_image(affine=affine)
    write_ct_series(image, tmp_path / "ct", shuffle_file_names=True)
    series = load_series(tmp_path / "ct")

    converted = series_to_nifti(series)
    expected = nib.as_closest_canonical(image)

    assert converted.shape == SYNTHETIC_SHAPE
    assert nib.aff2axcodes(converted.affine) == ("R", "A", "S")
    assert np.allclose(converted.affine, expected.affine, atol=1e-4)
    assert converted.get_data_dtype() == np.int16
    assert np.asarray(converted.dataobj).dtype == np.int16
    assert np.array_equal(converted.get_fdata(dtype=np.float32), expected.get_fdata(dtype=np.float32))


def test_nifti_affine_matches_pixel_positions(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    converted = series_to_nifti(series)
    volume = converted.get_fdata(dtype=np.float32)
    world_to_voxel = np.linalg.inv(converted.affine)

    for index in (0, 5, -1):
        # series.datasets hold headers only; the pixel data are read from the file.
        dataset = pydicom.dcmread(series.files[index])
        hu = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        for row, column in ((0, 0), (7, 21), (31, 30)):
            voxel = world_to_voxel @ np.append(pixel_ras(dataset, row, column), 1.0)
            index = np.rint(voxel[:3]).astype(int)
            assert np.allclose(voxel[:3], index, atol=1e-3)
            assert volume[tuple(index)] == hu[row, column]


def test_direct_conversion_equals_dicom2nifti(tmp_path):
    # Three slices: dicom2nifti 2.6 rejects them (TOO_FEW_SLICES), so the direct path runs.
    image = synthetic_image()
    three = nib.Nifti1Image(image.get_fdata()[:, :, :3].astype(np.float32), image.affine)
    write_ct_series(three, tmp_path / "three")
    write_ct_series(image, tmp_path / "ten")

    direct = series_to_nifti(load_series(tmp_path / "three"))
    converted = series_to_nifti(load_series(tmp_path / "ten"))

    assert direct.shape == (32, 32, 3)
    assert np.allclose(direct.affine, converted.affine, atol=1e-4)
    assert np.array_equal(direct.get_fdata(), converted.get_fdata()[:, :, :3])


def test_series_to_nifti_decodes_rle(tmp_path):
    image = synthetic_image(seed=5)
    write_ct_series(image, tmp_path / "rle", transfer_syntax=RLELossless)
    series = load_series(tmp_path / "rle")

    assert series.datasets[0].file_meta.TransferSyntaxUID == RLELossless
    converted = series_to_nifti(series)
    assert np.array_equal(converted.get_fdata(dtype=np.float32), image.get_fdata(dtype=np.float32))


@pytest.mark.parametrize("affine", [None, las_descending_affine()], ids=["ras", "las-descending"])
def test_labels_to_source_frames_round_trip(tmp_path, affine):
    image = synthetic_image(affine=affine)
    write_ct_series(image, tmp_path / "ct", shuffle_file_names=True)
    series = load_series(tmp_path / "ct")
    converted = series_to_nifti(series)
    labels = np.random.default_rng(3).integers(0, 3, size=converted.shape).astype(np.uint8)

    frames = labels_to_source_frames(labels, converted, series)

    assert frames.shape == (SYNTHETIC_SHAPE[2], series.rows, series.columns)
    assert frames.dtype == np.uint8
    native = nib.as_closest_canonical(nib.Nifti1Image(np.transpose(frames, (2, 1, 0)), native_affine_ras(series)))
    assert np.allclose(native.affine, converted.affine, atol=1e-4)
    assert np.array_equal(np.asarray(native.dataobj), labels)


def test_labelled_slice_lands_on_instance(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    converted = series_to_nifti(series)
    labels = np.zeros(converted.shape, dtype=np.uint8)
    labels[4:9, 10:20, 6] = 2
    slice_z = (converted.affine @ np.array([0, 0, 6, 1.0]))[2]

    frames = labels_to_source_frames(labels, converted, series)

    labelled = [k for k in range(len(frames)) if frames[k].any()]
    assert len(labelled) == 1
    dataset = series.datasets[labelled[0]]
    assert float(dataset.ImagePositionPatient[2]) == pytest.approx(slice_z)
    assert int(frames[labelled[0]].sum()) == 2 * 5 * 10
    # Voxel (i, j) in RAS becomes pixel (row, column) of an LPS-ordered slice: both axes flip.
    assert frames[labelled[0]][31 - 10, 31 - 4] == 2
    assert frames[labelled[0]][31 - 19, 31 - 8] == 2


def test_labels_to_source_frames_rejects_shape_mismatch(synthetic_series_dir):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    converted = series_to_nifti(series)

    with pytest.raises(Exception, match="does not match"):
        labels_to_source_frames(np.zeros((4, 4, 4), dtype=np.uint8), converted, series)


# Real data


def test_real_jpeg2000_slab_with_blank_uids():
    series = load_series(require(TOTALSEG_DICOM))

    assert series.datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert series.missing_uid_attributes() == ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
    assert series.study_instance_uid == ""
    assert series.series_instance_uid == ""

    converted = series_to_nifti(series)
    reference = nib.as_closest_canonical(nib.load(require(TOTALSEG_SEG_NIFTI)))

    assert converted.shape == (512, 512, 20)
    assert reference.shape == converted.shape
    assert np.allclose(converted.affine, reference.affine, atol=1e-3)
    hu = converted.get_fdata(dtype=np.float32)
    assert hu.min() == -1024.0
    assert 1000.0 < hu.max() < 3072.0

    liver = (np.asarray(reference.dataobj) == TOTALSEG_LIVER_LABEL).astype(np.uint8)
    frames = labels_to_source_frames(liver, converted, series)
    assert int(frames.sum()) == int(liver.sum())
    with pytest.raises(MissingUIDError) as raised:
        write_seg(series, frames, Path("unused.dcm"), algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    assert raised.value.attributes == ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


def test_real_slab_with_assigned_uids_gives_seg(tmp_path):
    written = assign_uids(require(TOTALSEG_DICOM), tmp_path / "ct")
    again = assign_uids(TOTALSEG_DICOM, tmp_path / "ct-again")
    assert [pydicom.dcmread(path).SOPInstanceUID for path in written] == [
        pydicom.dcmread(path).SOPInstanceUID for path in again
    ]

    series = load_series(tmp_path / "ct")
    assert series.missing_uid_attributes() == []
    assert series.datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"

    converted = series_to_nifti(series)
    reference = nib.as_closest_canonical(nib.load(require(TOTALSEG_SEG_NIFTI)))
    liver = (np.asarray(reference.dataobj) == TOTALSEG_LIVER_LABEL).astype(np.uint8)
    frames = labels_to_source_frames(liver, converted, series)
    seg = write_seg(series, frames, tmp_path / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)

    reread = hd.seg.segread(tmp_path / "seg.dcm")
    uids = [dataset.SOPInstanceUID for dataset in series.datasets]
    pixels = reread.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert seg.NumberOfFrames == 2 * len(uids)
    assert np.array_equal(pixels[..., 0], frames == 1)


def test_transfer_syntaxes_decode_identically():
    paths = [require(TRANSFER_SYNTAX_DIR) / f"{index}.dcm" for index in range(1, 10)]
    datasets = [pydicom.dcmread(path) for path in paths]
    syntaxes = {str(dataset.file_meta.TransferSyntaxUID) for dataset in datasets}
    reference = datasets[0].pixel_array

    # The two JPEG Lossless and the two JPEG-LS files differ in encoding parameters, not UID.
    assert syntaxes == EXPECTED_TRANSFER_SYNTAXES
    for path, dataset in zip(paths, datasets):
        assert np.array_equal(dataset.pixel_array, reference), f"{path.name} ({dataset.file_meta.TransferSyntaxUID})"


# DICOM SEG


def test_seg_matches_dcmqi_reference_frame_by_frame(tmp_path):
    require(DCMQI_DIR)
    copy_series(DCMQI_DIR, tmp_path / "ct")
    (tmp_path / "ct" / "liver_seg.nrrd").unlink()
    series = load_series(tmp_path / "ct")
    assert [path.name for path in series.files] == ["03.dcm", "02.dcm", "01.dcm"]

    reference = hd.seg.segread(DCMQI_DIR / "liver.dcm")
    uids = [dataset.SOPInstanceUID for dataset in series.datasets]
    mask = reference.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True
    )[..., 0]
    frames = mask.astype(np.uint8)

    written = write_seg(series, frames, tmp_path / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    ours = hd.seg.segread(tmp_path / "seg.dcm")

    ours_liver = {
        frame_source_uid(item): (index, frame_position(item))
        for index, item in enumerate(ours.PerFrameFunctionalGroupsSequence)
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
    }
    assert len(reference.PerFrameFunctionalGroupsSequence) == 3
    for reference_index, item in enumerate(reference.PerFrameFunctionalGroupsSequence):
        uid = frame_source_uid(item)
        assert uid in ours_liver
        our_index, our_position = ours_liver[uid]
        assert np.allclose(our_position, frame_position(item), atol=1e-3)
        assert np.array_equal(ours.pixel_array[our_index], reference.pixel_array[reference_index])

    referenced = {item.ReferencedSOPInstanceUID for item in written.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    expected = {item.ReferencedSOPInstanceUID for item in reference.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == expected


def test_seg_content_and_frame_references(synthetic_series_dir, tmp_path):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    converted = series_to_nifti(series)
    labels = np.zeros(converted.shape, dtype=np.uint8)
    labels[5:25, 5:25, 2:8] = 1
    labels[10:14, 10:14, 4:6] = 2
    frames = labels_to_source_frames(labels, converted, series)

    write_seg(series, frames, tmp_path / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    seg = hd.seg.segread(tmp_path / "seg.dcm")

    assert seg.SOPClassUID == SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == series.study_instance_uid
    assert seg.PatientID == series.datasets[0].PatientID
    assert seg.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    assert seg.NumberOfFrames == 2 * len(series.datasets)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_instance_uid

    liver, tumor = seg.SegmentSequence
    assert code_triplet(liver.SegmentedPropertyCategoryCodeSequence[0]) == ("123037004", "SCT", "Anatomical Structure")
    assert code_triplet(liver.SegmentedPropertyTypeCodeSequence[0]) == ("10200004", "SCT", "Liver")
    assert code_triplet(tumor.SegmentedPropertyCategoryCodeSequence[0]) == ("49755003", "SCT", "Morphologically Abnormal Structure")
    assert code_triplet(tumor.SegmentedPropertyTypeCodeSequence[0]) == ("108369006", "SCT", "Neoplasm")
    assert code_triplet(tumor.AnatomicRegionSequence[0]) == ("10200004", "SCT", "Liver")
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == ALGORITHM_VERSION
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.ALGORITHM_FAMILY_ARTIFICIAL_INTELLIGENCE.value

    positions = {dataset.SOPInstanceUID: np.asarray(dataset.ImagePositionPatient, dtype=float) for dataset in series.datasets}
    for item in seg.PerFrameFunctionalGroupsSequence:
        assert np.allclose(frame_position(item), positions[frame_source_uid(item)], atol=1e-4)

    uids = list(positions)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    assert np.array_equal(pixels[..., 0], frames == 1)
    assert np.array_equal(pixels[..., 1], frames == 2)


def code_triplet(item: pydicom.Dataset) -> tuple[str, str, str]:
    return (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)


def test_seg_source_without_type2_attributes(tmp_path):
    # De-identified series often omit Type 2 attributes; highdicom reads them from the source.
    folder = tmp_path / "ct"
    write_ct_series(synthetic_image(), folder)
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        del dataset.PatientBirthDate
        del dataset.PatientSex
        dataset.save_as(path, enforce_file_format=True)
    series = load_series(folder)
    frames = np.zeros((len(series.datasets), series.rows, series.columns), dtype=np.uint8)
    frames[2:5, 4:20, 4:20] = 1

    written = write_seg(series, frames, tmp_path / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    reread = pydicom.dcmread(tmp_path / "seg.dcm")

    assert written.PatientBirthDate == ""
    assert reread.PatientBirthDate == ""
    assert reread.PatientSex == ""
    assert reread.PatientID == series.datasets[0].PatientID
    assert reread.StudyInstanceUID == series.study_instance_uid
    assert all("PatientBirthDate" not in dataset for dataset in series.datasets)
    assert all("PatientSex" not in dataset for dataset in series.datasets)

    measurements = {"liver_volume_ml": 1.5, "tumor_volume_ml": 0.0, "tumor_burden_percent": 0.0}
    write_sr(series, written, measurements, tmp_path / "sr.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    assert pydicom.dcmread(tmp_path / "sr.dcm").PatientBirthDate == ""
    assert read_sr_measurements(tmp_path / "sr.dcm") == pytest.approx(measurements)


def test_seg_omits_empty_frames_on_request(synthetic_series_dir, tmp_path):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    frames = np.zeros((len(series.datasets), series.rows, series.columns), dtype=np.uint8)
    frames[3, 5:9, 5:9] = 1

    seg = write_seg(
        series, frames, tmp_path / "seg.dcm",
        algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION, keep_empty_frames=False,
    )

    assert seg.NumberOfFrames == 1
    assert frame_source_uid(seg.PerFrameFunctionalGroupsSequence[0]) == series.datasets[3].SOPInstanceUID


def test_seg_rejects_unknown_labels(synthetic_series_dir, tmp_path):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    frames = np.full((len(series.datasets), series.rows, series.columns), 3, dtype=np.uint8)

    with pytest.raises(ValueError, match=r"\[3\]"):
        write_seg(series, frames, tmp_path / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    assert not (tmp_path / "seg.dcm").exists()


# DICOM SR


@pytest.fixture
def series_and_seg(synthetic_series_dir, tmp_path):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    frames = np.zeros((len(series.datasets), series.rows, series.columns), dtype=np.uint8)
    frames[2:7, 4:28, 4:28] = 1
    frames[4, 10:14, 10:14] = 2
    seg = write_seg(series, frames, tmp_path / "seg.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    return series, seg


@pytest.mark.parametrize(
    "values",
    [
        {"liver_volume_ml": 1543.21, "tumor_volume_ml": 0.0, "tumor_burden_percent": 0.0},
        {"liver_volume_ml": 1620.5, "tumor_volume_ml": 87.25, "tumor_burden_percent": 5.384},
    ],
    ids=["tumour-free", "with-tumour"],
)
def test_sr_round_trip(series_and_seg, tmp_path, values):
    series, seg = series_and_seg

    sr = write_sr(series, seg, values, tmp_path / "sr.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)

    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert read_sr_measurements(tmp_path / "sr.dcm") == pytest.approx(values)
    assert read_sr_measurements(sr) == pytest.approx(values)
    reread = pydicom.dcmread(tmp_path / "sr.dcm")
    assert reread.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == codes.PRIVATE_CODING_SCHEME_DESIGNATOR
    assert reread.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert reread.StudyInstanceUID == series.study_instance_uid


def test_sr_keeps_comments(series_and_seg, tmp_path):
    series, seg = series_and_seg
    comments = ["Slice spacing is not uniform", "Liver touches the volume border"]

    write_sr(
        series, seg, Measurements(900.0, 0.0, 0.0), tmp_path / "sr.dcm",
        algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION, comments=comments,
    )
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    liver_group = report.get_volumetric_roi_measurement_groups()[0]
    texts = [
        item.TextValue
        for item in liver_group[0].ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == codes.COMMENT.value
    ]

    assert texts == comments
    assert read_sr_measurements(tmp_path / "sr.dcm") == {"liver_volume_ml": 900.0, "tumor_volume_ml": 0.0, "tumor_burden_percent": 0.0}


def test_sr_references_seg_segments(series_and_seg, tmp_path):
    series, seg = series_and_seg

    write_sr(series, seg, Measurements(1000.0, 10.0, 1.0), tmp_path / "sr.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    groups = report.get_volumetric_roi_measurement_groups()

    assert [group.finding_type for group in groups] == [codes.LIVER, codes.NEOPLASM]
    for group, segment_number in zip(groups, (1, 2)):
        segment = group.referenced_segment
        assert segment.referenced_segment_numbers == [segment_number]
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert groups[1].finding_sites[0].value == codes.LIVER


def test_sr_with_omitted_empty_tumour_segment(synthetic_series_dir, tmp_path):
    folder, _ = synthetic_series_dir
    series = load_series(folder)
    frames = np.zeros((len(series.datasets), series.rows, series.columns), dtype=np.uint8)
    frames[2:5, 4:20, 4:20] = 1
    seg = write_seg(
        series, frames, tmp_path / "seg.dcm",
        algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION, keep_empty_frames=False,
    )

    write_sr(series, seg, Measurements(200.0, 0.0, 0.0), tmp_path / "sr.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)

    assert read_sr_measurements(tmp_path / "sr.dcm") == {"liver_volume_ml": 200.0, "tumor_volume_ml": 0.0, "tumor_burden_percent": 0.0}


def test_sr_rejects_incomplete_mapping(series_and_seg, tmp_path):
    series, seg = series_and_seg

    with pytest.raises(KeyError, match="tumor_burden_percent"):
        write_sr(series, seg, {"liver_volume_ml": 1.0, "tumor_volume_ml": 0.0}, tmp_path / "sr.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)


def test_codes_match_pydicom_dictionary():
    for name, (ours, standard) in codes.STANDARD_CODES.items():
        assert (ours.value, ours.scheme_designator, ours.meaning) == (
            standard.value, standard.scheme_designator, standard.meaning
        ), name


def test_codes_newer_than_pydicom_dictionary():
    # Exception to the comparison above: the liver's segmented property category is SCT
    # 123037004 "Anatomical Structure", as in current editions of CID 7150, while pydicom 3.0's
    # older dictionary lists 91723000 for that meaning. When pydicom catches up, the value
    # matches and the code moves back to STANDARD_CODES.
    assert set(codes.CODES_NEWER_THAN_PYDICOM) == {"ANATOMICAL_STRUCTURE"}
    ours, standard, older_value = codes.CODES_NEWER_THAN_PYDICOM["ANATOMICAL_STRUCTURE"]
    assert (ours.value, ours.scheme_designator, ours.meaning) == ("123037004", "SCT", "Anatomical Structure")
    assert (standard.scheme_designator, standard.meaning) == (ours.scheme_designator, ours.meaning)
    assert standard.value in (older_value, ours.value)


# C-STORE sending


class StorageSCP:
    """A pynetdicom Storage SCP on 127.0.0.1 that keeps received datasets in memory."""

    def __init__(self, ae_title: str = "TESTSCP", *, require_called_aet: bool = False) -> None:
        self.received: dict[str, pydicom.Dataset] = {}
        self._lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = require_called_aet
        for sop_class in (SegmentationStorage, Comprehensive3DSRStorage):
            self.ae.add_supported_context(sop_class)
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = self.server.server_address[1]

    def _on_store(self, event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        with self._lock:
            self.received[dataset.SOPInstanceUID] = dataset
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def storage_scp():
    scp = StorageSCP()
    yield scp
    scp.stop()


def test_send_seg_and_sr(series_and_seg, tmp_path, storage_scp):
    series, seg = series_and_seg
    sr = write_sr(series, seg, Measurements(1500.0, 30.0, 2.0), tmp_path / "sr.dcm", algorithm_name=ALGORITHM_NAME, algorithm_version=ALGORITHM_VERSION)

    results = send_files(
        [tmp_path / "seg.dcm", tmp_path / "sr.dcm"], ae_title="TESTSCP", host="127.0.0.1", port=storage_scp.port
    )

    assert [result.status for result in results] == [0x0000, 0x0000]
    assert all(result.stored for result in results)
    assert set(storage_scp.received) == {seg.SOPInstanceUID, sr.SOPInstanceUID}
    received_seg = storage_scp.received[seg.SOPInstanceUID]
    assert received_seg.PixelData == pydicom.dcmread(tmp_path / "seg.dcm").PixelData
    assert read_sr_measurements(storage_scp.received[sr.SOPInstanceUID]) == {
        "liver_volume_ml": 1500.0, "tumor_volume_ml": 30.0, "tumor_burden_percent": 2.0
    }


def test_send_rejected_association_raises(series_and_seg, tmp_path):
    scp = StorageSCP("RIGHTAE", require_called_aet=True)
    try:
        with pytest.raises(SendError) as raised:
            send_files([tmp_path / "seg.dcm"], ae_title="WRONGAE", host="127.0.0.1", port=scp.port, timeout_s=10)
    finally:
        scp.stop()

    assert "WRONGAE@127.0.0.1" in str(raised.value)
    assert "Called AE title not recognised" in str(raised.value)
    assert raised.value.peer == f"WRONGAE@127.0.0.1:{scp.port}"


def test_send_to_closed_port_raises(series_and_seg, tmp_path):
    scp = StorageSCP()
    port = scp.port
    scp.stop()

    with pytest.raises(SendError, match="could not connect"):
        send_files([tmp_path / "seg.dcm"], ae_title="TESTSCP", host="127.0.0.1", port=port, timeout_s=5)


def test_send_unsupported_sop_class_raises(synthetic_series_dir):
    # The SCP accepts only SEG and SR, so a CT-only association has no accepted context.
    folder, _ = synthetic_series_dir
    scp = StorageSCP()
    try:
        with pytest.raises(SendError, match="accepted none of the presentation contexts"):
            send_files(sorted(folder.iterdir())[:1], ae_title="TESTSCP", host="127.0.0.1", port=scp.port, timeout_s=10)
    finally:
        scp.stop()
