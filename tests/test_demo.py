"""Tests of the synthetic abdomen phantom and of ``livernode demo``.

The phantom tests are fast. The demo test runs the whole node with the real networks on the
phantom, and another test checks that the real networks find the phantom's liver. Both take
minutes on two CPU cores, so they are marked slow.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage
from scipy import ndimage

from dicom_io.phantom import (
    DEFAULT_PHANTOM_LESION_COUNT,
    DEFAULT_PHANTOM_VOLUMES_ML,
    DEFAULT_SHAPE,
    DEFAULT_SPACING_MM,
    LIVER_TISSUES,
    NOISE_SD_HU,
    TISSUE_HU,
    Tissue,
    abdomen_phantom_tissues,
    make_abdomen_phantom,
    phantom_volumes_ml,
)
from dicom_io.sr_writer import read_sr_measurements
from dicom_io.series import load_series
from node.config import load_settings
from node.demo import DEMO_MARKER, prepare_series, run_demo
from tests.conftest import TOTALSEG, dice, require_shared

#: Volumes are counted on a voxel grid, so they match the documented values to rounding.
VOLUME_TOLERANCE_ML = 0.05

#: Edges are blurred, so a tissue's mean HU is checked on its voxels one voxel away from its edge.
#: Bowel walls are 4 mm thick and lie next to gas, so their inner voxels still carry its blur.
THIN_TISSUES = (Tissue.BOWEL_WALL,)
MEAN_HU_TOLERANCE = 5.0


@pytest.fixture(scope="module")
def phantom() -> tuple[nib.Nifti1Image, np.ndarray]:
    return make_abdomen_phantom(), abdomen_phantom_tissues()


def test_phantom_grid_is_ras(phantom):
    image, tissues = phantom

    assert image.shape == DEFAULT_SHAPE
    assert tissues.shape == DEFAULT_SHAPE
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert np.allclose(image.header.get_zooms(), DEFAULT_SPACING_MM)
    assert image.get_data_dtype() == np.float32


@pytest.mark.parametrize(
    "tissue", [tissue for tissue in Tissue if tissue not in THIN_TISSUES], ids=lambda tissue: tissue.name
)
def test_phantom_hu_per_tissue(phantom, tissue):
    image, tissues = phantom
    hu = np.asarray(image.dataobj)
    values = hu[ndimage.binary_erosion(tissues == tissue)]

    assert values.size > 100
    assert np.mean(values) == pytest.approx(TISSUE_HU[tissue], abs=MEAN_HU_TOLERANCE)
    assert np.std(values) == pytest.approx(NOISE_SD_HU, rel=0.1)


def test_phantom_has_every_tissue(phantom):
    _, tissues = phantom

    assert set(np.unique(tissues).tolist()) == {int(tissue) for tissue in Tissue}


def test_phantom_contrast_of_liver(phantom):
    # Portal venous phase: lesions are 20-40 HU darker than the liver, which is brighter than
    # muscle, and its vessels are brighter still.
    contrast = TISSUE_HU[Tissue.LIVER] - TISSUE_HU[Tissue.LESION]

    assert 20.0 <= contrast <= 40.0
    assert TISSUE_HU[Tissue.LIVER] > TISSUE_HU[Tissue.MUSCLE]
    assert TISSUE_HU[Tissue.LIVER_VESSEL] > TISSUE_HU[Tissue.LIVER]


def test_phantom_documented_volumes(phantom):
    _, tissues = phantom

    volumes = phantom_volumes_ml(tissues, DEFAULT_SPACING_MM)

    for name, expected in DEFAULT_PHANTOM_VOLUMES_ML.items():
        assert volumes[name] == pytest.approx(expected, abs=VOLUME_TOLERANCE_ML), name
    assert 1200.0 <= volumes["liver_whole"] <= 1600.0


def test_phantom_lesions_inside_liver(phantom):
    _, tissues = phantom
    lesions = tissues == Tissue.LESION
    _, lesion_count = ndimage.label(lesions)
    # Every lesion voxel's neighbours are liver or lesion, so no lesion reaches the liver edge.
    neighbourhood = ndimage.binary_dilation(lesions, iterations=2)

    assert lesion_count == DEFAULT_PHANTOM_LESION_COUNT
    assert set(np.unique(tissues[neighbourhood])) == {Tissue.LIVER, Tissue.LESION}


def test_phantom_liver_in_right_upper_abdomen(phantom):
    image, tissues = phantom
    liver_voxels = np.argwhere(np.isin(tissues, [Tissue.LIVER, Tissue.LESION]))
    spine_voxels = np.argwhere(tissues == Tissue.BONE)
    liver_centre = nib.affines.apply_affine(image.affine, liver_voxels.mean(axis=0))
    spine_centre = nib.affines.apply_affine(image.affine, spine_voxels.mean(axis=0))

    # RAS: +x points to the patient's right and +y to anterior, so the liver has higher x and y.
    assert liver_centre[0] > 30.0
    assert liver_centre[1] > spine_centre[1]
    assert liver_centre[2] > 0.0


def test_phantom_liver_under_lung(phantom):
    _, tissues = phantom
    liver = np.isin(tissues, LIVER_TISSUES)
    liver_top = int(np.argwhere(liver)[:, 2].max())
    lung_bottom = int(np.argwhere(tissues == Tissue.LUNG)[:, 2].min())
    right_half = slice(DEFAULT_SHAPE[0] // 2, None)

    # The right lung base lies above the liver dome in the top slices, and the field of view
    # reaches from there to below both kidneys.
    assert np.any(tissues[right_half, :, liver_top + 1 :] == Tissue.LUNG)
    assert lung_bottom < liver_top
    kidney_slices = np.argwhere(np.isin(tissues, [Tissue.KIDNEY_CORTEX, Tissue.KIDNEY_MEDULLA]))[:, 2]
    assert kidney_slices.min() > 0
    assert np.any(tissues[:, :, -1] == Tissue.LUNG)


def test_phantom_lesions_darker_than_liver(phantom):
    image, tissues = phantom
    hu = np.asarray(image.dataobj)
    lesions = ndimage.binary_erosion(tissues == Tissue.LESION)
    liver = ndimage.binary_erosion(tissues == Tissue.LIVER)

    assert 20.0 <= np.mean(hu[liver]) - np.mean(hu[lesions]) <= 40.0


def test_phantom_same_seed_same_volume():
    first = np.asarray(make_abdomen_phantom(shape=(48, 48, 20), spacing_mm=(8.0, 8.0, 10.0), seed=3).dataobj)
    second = np.asarray(make_abdomen_phantom(shape=(48, 48, 20), spacing_mm=(8.0, 8.0, 10.0), seed=3).dataobj)
    other = np.asarray(make_abdomen_phantom(shape=(48, 48, 20), spacing_mm=(8.0, 8.0, 10.0), seed=4).dataobj)

    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_phantom_rejects_bad_spacing():
    with pytest.raises(ValueError, match="spacing"):
        make_abdomen_phantom(spacing_mm=(2.0, 0.0, 2.5))


def test_demo_refuses_foreign_folder(tmp_path, capsys):
    (tmp_path / "patient-data.txt").write_text("not a demo file\n", encoding="utf-8")
    args = argparse.Namespace(ct_folder=None, data_dir=tmp_path, timeout_s=60.0, settings=None)

    status = run_demo(args)

    assert status == 1
    assert "not a demo folder" in capsys.readouterr().err
    assert (tmp_path / "patient-data.txt").exists()
    assert not (tmp_path / DEMO_MARKER).exists()


def test_demo_missing_ct_folder(tmp_path, capsys):
    args = argparse.Namespace(
        ct_folder=tmp_path / "absent", data_dir=tmp_path / "demo", timeout_s=60.0, settings=None
    )

    status = run_demo(args)

    assert status == 1
    assert "absent not found" in capsys.readouterr().err


def test_demo_assigns_blank_uids(tmp_path, capsys):
    # The real slab's de-identification left Study, Series and SOP Instance UIDs empty.
    source = require_shared(TOTALSEG / "ct-dicom")

    files = prepare_series(source, tmp_path / "input")
    series = load_series(files[0].parent)

    assert len(files) == len(list(source.iterdir()))
    assert all(path.parent == tmp_path / "input" / "with-uids" for path in files)
    assert series.missing_uid_attributes() == []
    assert "assigning UIDs" in capsys.readouterr().err
    assert not str(pydicom.dcmread(sorted(source.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID)


def _printed_number(output: str, label: str) -> float:
    match = re.search(rf"^\s*{label}\s+(-?[0-9.]+)", output, flags=re.MULTILINE)
    assert match is not None, f"{label!r} not found in the demo output:\n{output}"
    return float(match.group(1))


@pytest.mark.slow
def test_demo_round_trip_on_phantom(tmp_path, capsys):
    demo_dir = tmp_path / "demo"
    args = argparse.Namespace(ct_folder=None, data_dir=demo_dir, timeout_s=1200.0, settings=load_settings())

    status = run_demo(args)
    output = capsys.readouterr().out

    assert status == 0
    received = sorted((demo_dir / "received").glob("*.dcm"))
    sop_classes = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID): path for path in received}
    assert set(sop_classes) == {SegmentationStorage, Comprehensive3DSRStorage}

    measurements = read_sr_measurements(sop_classes[Comprehensive3DSRStorage])
    assert _printed_number(output, "liver volume") == pytest.approx(measurements["liver_volume_ml"], abs=0.005)
    assert _printed_number(output, "tumour volume") == pytest.approx(measurements["tumor_volume_ml"], abs=0.005)
    assert _printed_number(output, "tumour burden") == pytest.approx(measurements["tumor_burden_percent"], abs=0.005)
    assert re.search(r"^\s*tumour count\s+\d+", output, flags=re.MULTILINE)
    assert "node liver_inference" in output
    assert " done " in output

    # The real liver network must recognise the phantom's liver, or the demo prints nonsense.
    masks = list((demo_dir / "output").rglob("mask.nii.gz"))
    assert len(masks) == 1
    found = np.asarray(nib.as_closest_canonical(nib.load(str(masks[0]))).dataobj) > 0
    truth = np.isin(abdomen_phantom_tissues(), LIVER_TISSUES)
    assert found.shape == truth.shape
    voxel_ml = float(np.prod(DEFAULT_SPACING_MM)) / 1000.0
    print(f"phantom liver Dice {dice(found, truth):.3f}, {found.sum() * voxel_ml:.1f} mL found")
    assert dice(found, truth) >= 0.85
    assert found.sum() * voxel_ml == pytest.approx(DEFAULT_PHANTOM_VOLUMES_ML["liver_whole"], rel=0.2)
