"""Faithfulness of the PyTorch networks to the original Keras networks.

The fixtures in ``tests/fixtures/keras_reference`` hold inputs and the output
probabilities of the original pyliverlesionseg 0.3 Keras networks, computed by
``tests/keras_reference/make_reference.py`` with tf-keras. This test runs the
same inputs through the converted PyTorch networks and compares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from weights.errors import WeightsUnavailableError
from weights.fetch import fetch_weights
from weights.load import load_model

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "keras_reference"
FIXTURE_PATHS = sorted(FIXTURE_DIR.glob("*_case*.npz"))
WEIGHTS_CACHE_VARIABLE = "LIVERNODE_WEIGHTS_CACHE"

# Largest accepted absolute difference of the output probabilities. Both sides
# compute in float32 with different convolution algorithms, and the instance
# normalisation statistics are computed in float64 on the Keras side.
MAX_PROBABILITY_DIFFERENCE = 1e-4


@dataclass(frozen=True)
class ReferenceCase:
    """One stored Keras reference run."""

    model: str
    input: np.ndarray
    output: np.ndarray
    hdf5_sha256: str
    normalisation_dtype: str
    source: str


def read_case(path: Path) -> ReferenceCase:
    """Read one ``.npz`` fixture written by ``make_reference.py``."""
    with np.load(path, allow_pickle=False) as data:
        return ReferenceCase(
            model=str(data["model"]),
            input=np.asarray(data["input"]),
            output=np.asarray(data["output"]),
            hdf5_sha256=str(data["hdf5_sha256"]),
            normalisation_dtype=str(data["normalisation_dtype"]),
            source=str(data["source"]),
        )


def _fixture_params() -> list:
    if FIXTURE_PATHS:
        return [pytest.param(path, id=path.stem) for path in FIXTURE_PATHS]
    reason = (
        f"No Keras reference fixtures in {FIXTURE_DIR}: "
        "recreate them as described in tests/keras_reference/README.md"
    )
    return [pytest.param(None, id="no-fixtures", marks=pytest.mark.skip(reason=reason))]


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights cache with both converted networks, from LIVERNODE_WEIGHTS_CACHE or a temporary folder."""
    configured = os.environ.get(WEIGHTS_CACHE_VARIABLE)
    cache_dir = Path(configured) if configured else tmp_path_factory.mktemp("weights")
    try:
        fetch_weights(cache_dir)
    except WeightsUnavailableError as error:
        pytest.skip(f"Weights could not be fetched into {cache_dir} (is the package index reachable?): {error}")
    return cache_dir


@pytest.mark.parametrize("fixture_path", _fixture_params())
def test_fixture_is_consistent(fixture_path: Path) -> None:
    case = read_case(fixture_path)

    assert case.model in ("liver", "lesion")
    assert case.input.dtype == np.float32
    assert case.output.dtype == np.float32
    assert case.input.ndim == 3
    assert case.output.ndim == 3
    assert all(o <= i for o, i in zip(case.output.shape, case.input.shape))
    assert case.normalisation_dtype == "float64"
    assert np.all((case.output >= 0.0) & (case.output <= 1.0))
    assert np.all(np.abs(case.input) <= 0.5)


@pytest.mark.parametrize("fixture_path", _fixture_params())
def test_port_matches_keras(fixture_path: Path, weights_cache: Path) -> None:
    case = read_case(fixture_path)
    loaded = load_model(case.model, weights_cache)

    # The reference and the port must come from the same HDF5 file of the wheel.
    assert case.hdf5_sha256 == loaded.provenance["models"][case.model]["hdf5_sha256"]

    image = torch.from_numpy(case.input)[None, None]
    with torch.inference_mode():
        probabilities = loaded.module(image).numpy()

    assert probabilities.shape == (1, 1) + case.output.shape
    difference = float(np.abs(probabilities[0, 0].astype(np.float64) - case.output).max())
    print(
        f"\n{fixture_path.name}: {case.model}, input {case.input.shape} -> output {case.output.shape}, "
        f"max |p_torch - p_keras| = {difference:.2e} ({case.source})"
    )
    assert difference <= MAX_PROBABILITY_DIFFERENCE
