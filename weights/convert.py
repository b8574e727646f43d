"""Conversion of the Keras 2.2 HDF5 weight files to PyTorch state dicts.

The HDF5 files of pyliverlesionseg 0.3 hold weights only (no model config), written by
``Model.save_weights``: the root attribute ``layer_names`` lists every layer in graph order and
each layer group lists its datasets in the attribute ``weight_names``. Only ``Conv3D`` layers
carry weights. Keras names them ``conv3d_1``, ``conv3d_2``, ... in creation order, which
:meth:`pipeline.networks.UNet3D.keras_conv_order` reproduces. Each kernel is stored as
``(kx, ky, kz, in, out)`` (TensorFlow, channels last) and becomes a PyTorch Conv3d weight
``(out, in, kx, ky, kz)``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np
import torch

from pipeline.networks import ARCHITECTURES, UNet3D
from weights.errors import WeightsIntegrityError
from weights.registry import ModelSpec

logger = logging.getLogger(__name__)

#: Keras layer names that carry convolution weights.
_CONV_LAYER_PATTERN = re.compile(r"conv3d_(\d+)")

#: Dataset names of a Keras Conv3D layer, in ``weight_names`` order.
_KERNEL_SUFFIX = "kernel:0"
_BIAS_SUFFIX = "bias:0"

#: Dataset holding the training voxel size (x, y, z) in mm in the pyliverlesionseg files.
_VOXEL_SIZE_DATASET = "header/voxel_size"

#: Permissions of files written to the weights cache (mkstemp creates them as 0600).
CACHE_FILE_MODE = 0o644

#: Keras kernel axes (kx, ky, kz, in, out) -> PyTorch (out, in, kx, ky, kz).
_KERAS_TO_TORCH_KERNEL_AXES = (4, 3, 0, 1, 2)


@dataclass(frozen=True)
class KerasConvWeights:
    """Kernel and bias of one Keras Conv3D layer, in Keras layout."""

    layer_name: str
    kernel: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class KerasWeightFile:
    """Content of a Keras weights-only HDF5 file.

    Attributes
    ----------
    convolutions : list of KerasConvWeights
        Convolution layers in ``layer_names`` order.
    voxel_size_mm : tuple of float or None
        Content of ``header/voxel_size``, or None when the file has no header.
    keras_version : str
        Keras version that wrote the file.
    """

    convolutions: list[KerasConvWeights]
    voxel_size_mm: tuple[float, ...] | None
    keras_version: str


def sha256_file(path: Path) -> str:
    """Return the lower-case hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_network(spec: ModelSpec) -> UNet3D:
    """Build the untrained PyTorch module for a registry entry.

    Raises
    ------
    KeyError
        If ``spec.architecture`` is not in ``pipeline.networks.ARCHITECTURES``.
    """
    try:
        factory = ARCHITECTURES[spec.architecture]
    except KeyError:
        raise KeyError(
            f"model {spec.name!r} names architecture {spec.architecture!r}, which is not one of "
            f"{sorted(ARCHITECTURES)}"
        ) from None
    return factory()


def _decode(name: bytes | str) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def read_keras_weights(source: Path | BinaryIO, label: str) -> KerasWeightFile:
    """Read the Conv3D weights and the header of a Keras weights-only HDF5 file.

    Parameters
    ----------
    source : Path or binary file object
        HDF5 file on disk or in memory.
    label : str
        Name of the file for error messages (e.g. the wheel member path).

    Returns
    -------
    KerasWeightFile

    Raises
    ------
    WeightsIntegrityError
        If the file is not a Keras weights file or a layer with weights is not a Conv3D layer
        with exactly a kernel and a bias.
    """
    try:
        handle = h5py.File(source, "r")
    except OSError as error:
        raise WeightsIntegrityError(f"{label} is not a readable HDF5 file: {error}") from error

    with handle:
        # Model.save() nests the weights under model_weights; save_weights() puts them at the root.
        group = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" not in group.attrs:
            raise WeightsIntegrityError(
                f"{label} has no 'layer_names' attribute, so it is not a Keras weights file"
            )
        keras_version = _decode(group.attrs.get("keras_version", b"unknown"))
        backend = _decode(group.attrs.get("backend", b"tensorflow"))
        if backend != "tensorflow":
            raise WeightsIntegrityError(
                f"{label} was written by the Keras backend {backend!r}; only 'tensorflow' "
                "(channels-last kernels) is supported"
            )

        convolutions = []
        for raw_name in group.attrs["layer_names"]:
            layer_name = _decode(raw_name)
            layer = group[layer_name]
            weight_names = [_decode(name) for name in layer.attrs.get("weight_names", [])]
            if not weight_names:
                continue

            if not _CONV_LAYER_PATTERN.fullmatch(layer_name):
                raise WeightsIntegrityError(
                    f"{label}: layer {layer_name!r} carries weights {weight_names} but only "
                    "Conv3D layers (conv3d_N) are expected"
                )
            expected = [f"{layer_name}/{_KERNEL_SUFFIX}", f"{layer_name}/{_BIAS_SUFFIX}"]
            if weight_names != expected:
                raise WeightsIntegrityError(
                    f"{label}: layer {layer_name!r} has weights {weight_names}, expected {expected}"
                )
            kernel = np.asarray(layer[expected[0]], dtype=np.float32)
            bias = np.asarray(layer[expected[1]], dtype=np.float32)
            convolutions.append(KerasConvWeights(layer_name, kernel, bias))

        voxel_size = None
        if _VOXEL_SIZE_DATASET in handle:
            voxel_size = tuple(float(v) for v in np.asarray(handle[_VOXEL_SIZE_DATASET]).ravel())

    return KerasWeightFile(convolutions, voxel_size, keras_version)


def keras_to_state_dict(weights: KerasWeightFile, module: UNet3D, label: str) -> dict[str, torch.Tensor]:
    """Map Keras convolution weights onto ``module`` and return its complete state dict.

    The i-th Keras convolution (by number, ``conv3d_1`` first) goes to the i-th entry of
    ``module.keras_conv_order()``. Every kernel and bias shape is checked.

    Raises
    ------
    WeightsIntegrityError
        If the layer numbering has gaps, the number of convolutions differs or any shape does
        not match.
    """
    keras_layers = sorted(
        weights.convolutions,
        key=lambda layer: int(_CONV_LAYER_PATTERN.fullmatch(layer.layer_name).group(1)),
    )
    names = [layer.layer_name for layer in keras_layers]
    expected_names = [f"conv3d_{index}" for index in range(1, len(keras_layers) + 1)]
    if names != expected_names:
        raise WeightsIntegrityError(f"{label}: convolution layers are {names}, expected {expected_names}")

    targets = module.keras_conv_order()
    if len(keras_layers) != len(targets):
        raise WeightsIntegrityError(
            f"{label} has {len(keras_layers)} convolution layers but the PyTorch architecture "
            f"{type(module).__name__} has {len(targets)}; the file does not belong to this architecture"
        )

    state_dict: dict[str, torch.Tensor] = {}
    for layer, (prefix, conv) in zip(keras_layers, targets):
        if layer.kernel.ndim != 5:
            raise WeightsIntegrityError(
                f"{label}: {layer.layer_name} kernel has shape {layer.kernel.shape}, expected 5 axes "
                "(kx, ky, kz, in, out)"
            )
        kernel = np.ascontiguousarray(layer.kernel.transpose(_KERAS_TO_TORCH_KERNEL_AXES))
        for suffix, value, parameter in (
            ("weight", kernel, conv.weight),
            ("bias", layer.bias, conv.bias),
        ):
            if tuple(value.shape) != tuple(parameter.shape):
                raise WeightsIntegrityError(
                    f"{label}: {layer.layer_name} {suffix} has shape {tuple(value.shape)} after "
                    f"conversion, but {prefix}.{suffix} expects {tuple(parameter.shape)}"
                )
            state_dict[f"{prefix}.{suffix}"] = torch.from_numpy(np.array(value, dtype=np.float32))

    missing = set(module.state_dict()) - set(state_dict)
    if missing:
        raise WeightsIntegrityError(f"{label}: no Keras weights for {sorted(missing)}")
    return state_dict


def check_voxel_size(weights: KerasWeightFile, spec: ModelSpec, label: str) -> None:
    """Check that the HDF5 header's voxel size equals the registry's.

    Raises
    ------
    WeightsIntegrityError
        If the header is missing or differs from ``spec.voxel_size_mm``.
    """
    if weights.voxel_size_mm is None:
        raise WeightsIntegrityError(f"{label} has no {_VOXEL_SIZE_DATASET} dataset")
    if len(weights.voxel_size_mm) != 3 or not np.allclose(weights.voxel_size_mm, spec.voxel_size_mm):
        raise WeightsIntegrityError(
            f"{label}: {_VOXEL_SIZE_DATASET} is {weights.voxel_size_mm} mm but the registry entry "
            f"{spec.name!r} expects {spec.voxel_size_mm} mm"
        )


def convert_keras_hdf5(source: Path | bytes, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Read a Keras HDF5 weight file, check it against ``spec`` and return a state dict.

    Parameters
    ----------
    source : Path or bytes
        The HDF5 file on disk or its content.
    spec : ModelSpec
        Registry entry the file must match.

    Returns
    -------
    dict of str to torch.Tensor
        State dict for ``build_network(spec)``.

    Raises
    ------
    WeightsIntegrityError
        If the file is unreadable, has another layout or another voxel size.
    """
    label = spec.member if isinstance(source, bytes) else str(source)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    weights = read_keras_weights(stream, label)
    check_voxel_size(weights, spec, label)

    module = build_network(spec)
    state_dict = keras_to_state_dict(weights, module, label)
    module.load_state_dict(state_dict, strict=True)
    logger.info(
        "Converted %s (Keras %s, %d convolutions) for model %r",
        label,
        weights.keras_version,
        len(weights.convolutions),
        spec.name,
    )
    return state_dict


def save_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``state_dict`` to ``path`` atomically and return the file's SHA-256.

    The file is written to a temporary file in the same folder and moved into place with
    ``os.replace``, so readers never see a partial file. Load it with
    ``torch.load(path, weights_only=True)``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            torch.save(state_dict, stream)
            stream.flush()
            os.fsync(stream.fileno())
        digest = sha256_file(Path(temporary))
        os.chmod(temporary, CACHE_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return digest


def convert_file(hdf5_path: Path, spec: ModelSpec, out_path: Path) -> str:
    """Convert the Keras HDF5 file at ``hdf5_path`` to a ``.pt`` state dict at ``out_path``.

    Returns
    -------
    str
        SHA-256 of the written file.

    Raises
    ------
    WeightsIntegrityError
        If the HDF5 file does not match ``spec``; nothing is written then.
    """
    state_dict = convert_keras_hdf5(hdf5_path, spec)
    return save_state_dict(state_dict, out_path)
