"""Build Keras reference outputs of the two pyliverlesionseg 0.3 networks.

The script builds the original networks by running the original
``create_unet_like_model`` (``pyliverlesionseg/architectures/unet_generalized.py``
from the wheel) on top of tf-keras, loads the trained HDF5 weights, runs a few
small inputs and stores input and output as ``.npz`` fixtures. The PyTorch port
is then tested against these fixtures in ``tests/test_port_faithfulness.py``.

It needs a throwaway environment with ``tensorflow-cpu`` and ``tf-keras``
(see ``tests/keras_reference/README.md``); it is never imported by the product
or by the test suite.

The original code imports Keras 2.2 module paths (``keras.layers.convolutional``
and so on). A compatibility shim registers those names in ``sys.modules`` and
maps them onto ``tf_keras``. The shim's backend computes the ``mean`` and
``std`` used by the instance normalisation ``Lambda`` layers in float64,
because float32 reductions over millions of voxels drift by about 1e-3
relative and move the output probabilities by up to 0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import re
import sys
import tempfile
import types
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WHEEL = Path("/tmp/wheel/pyliverlesionseg-0.3-py3-none-any.whl")
DEFAULT_FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "keras_reference"
DEFAULT_CT_PATH = REPO_ROOT.parent / "shared" / "data" / "totalseg-example" / "example_ct.nii.gz"
DEFAULT_SEG_PATH = REPO_ROOT.parent / "shared" / "data" / "totalseg-example" / "example_seg.nii.gz"

BUILDER_MEMBER = "pyliverlesionseg/architectures/unet_generalized.py"
TRAINED_MODELS_DIR = "pyliverlesionseg/trained_models"

LIVER_WEIGHTS = "model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_dice_loss_val_binary_dice_mean.hdf5"
LESION_WEIGHTS = "model_unet_ct_mr_lesion_seg_resize_1mm_1mm_3mm_20220207_dice_loss_val_binary_dice_mean.hdf5"

# Default tile sizes of the original pipeline ("segment_size" in
# cnn_liver_lesion_seg_CT_MR_functions.py) and the input sizes they imply.
LIVER_DEFAULT_OUTPUT = (163, 136, 136)
LIVER_DEFAULT_INPUT = (189, 162, 162)
LESION_DEFAULT_OUTPUT = (92, 84, 42)
LESION_DEFAULT_INPUT = (180, 172, 86)

# Label of the liver in the TotalSegmentator segmentation next to the example CT.
TOTALSEG_LIVER_LABEL = 5

# CT intensity normalisation of the original pipeline: clip(HU / 1000, -0.2, 0.2) * 2.5.
CT_HU_SCALE = 1000.0
CT_CLIP = 0.2
CT_GAIN = 2.5

QUANTISATION_STEPS = 1024.0

SEED = 20240601
NORMALISATION_DTYPE = "float64"

# Keras 2.2 default layer name prefixes by tf_keras class name, used to compare
# the built model with the layer names stored in the HDF5 weight files.
KERAS_NAME_PREFIX = {
    "InputLayer": "input",
    "MaxPooling3D": "max_pooling3d",
    "AveragePooling3D": "average_pooling3d",
    "Conv3D": "conv3d",
    "Lambda": "lambda",
    "LeakyReLU": "leaky_re_lu",
    "Cropping3D": "cropping3d",
    "Add": "add",
    "Concatenate": "concatenate",
    "UpSampling3D": "up_sampling3d",
    "Multiply": "multiply",
}

# Layers present in the HDF5 files but absent from a model built with
# mask_output=False: the training-time mask input and the multiplication by it.
MASK_ONLY_LAYERS = Counter({"input": 1, "multiply": 1})


def build_liver_model(builder: Callable[..., Any], output_size: list[int]) -> Any:
    """Build the liver network with the arguments of the original liver predictor.

    The string arguments are literals on purpose: the original code compares them
    with ``is``, which only works for interned strings.
    """
    return builder(
        number_input_features=1,
        subsample_factors_per_pathway=[(1, 1, 1), (3, 3, 3), (9, 9, 9), (27, 27, 27)],
        kernel_sizes_per_pathway=[
            [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
            [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
            [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
            [[(3, 3, 3), (3, 3, 3)], []],
        ],
        number_features_per_pathway=[
            [[20, 40], [40, 20]],
            [[40, 80], [80, 40]],
            [[80, 160], [160, 80]],
            [[160, 160], []],
        ],
        output_size=output_size,
        padding="same",
        upsampling="linear",
        mask_output=False,
        l2_reg=1e-5,
    )


def build_lesion_model(builder: Callable[..., Any], output_size: list[int]) -> Any:
    """Build the lesion network with the arguments of the original lesion predictor."""
    return builder(
        number_input_features=1,
        subsample_factors_per_pathway=[(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)],
        kernel_sizes_per_pathway=[
            [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
            [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
            [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
            [[(3, 3, 1), (3, 3, 3)], []],
        ],
        number_features_per_pathway=[
            [[20, 40], [40, 20]],
            [[40, 80], [80, 40]],
            [[80, 160], [160, 80]],
            [[160, 160], []],
        ],
        output_size=output_size,
        padding="valid",
        upsampling="copy",
        mask_output=False,
        residual_connections=True,
        l2_reg=1e-5,
    )


MODEL_BUILDERS: dict[str, Callable[[Callable[..., Any], list[int]], Any]] = {
    "liver": build_liver_model,
    "lesion": build_lesion_model,
}
MODEL_WEIGHTS = {"liver": LIVER_WEIGHTS, "lesion": LESION_WEIGHTS}
MODEL_DEFAULT_TILES = {
    "liver": (LIVER_DEFAULT_INPUT, LIVER_DEFAULT_OUTPUT),
    "lesion": (LESION_DEFAULT_INPUT, LESION_DEFAULT_OUTPUT),
}


# ---------------------------------------------------------------------------
# Keras 2.2 compatibility shim
# ---------------------------------------------------------------------------


def _as_int_tuple(value: Any) -> Any:
    """Convert a numpy size argument (the original passes float arrays) to ints."""
    if isinstance(value, np.ndarray) or (
        isinstance(value, (list, tuple)) and any(isinstance(v, np.generic) for v in value)
    ):
        as_float = np.asarray(value, dtype=np.float64)
        if not np.all(as_float == np.round(as_float)):
            raise ValueError(f"Layer size argument {value!r} is not integral.")
        return tuple(int(v) for v in as_float)
    if isinstance(value, np.generic):
        return int(value)
    return value


def _wrap_layer(layer_class: type, registry: list[Any] | None = None) -> Callable[..., Any]:
    """Return a factory that converts numpy size arguments before building the layer."""

    def factory(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_as_int_tuple(a) for a in args)
        kwargs = {k: _as_int_tuple(v) for k, v in kwargs.items()}
        layer = layer_class(*args, **kwargs)
        if registry is not None:
            registry.append(layer)
        return layer

    factory.__name__ = layer_class.__name__
    return factory


def _float64_mean(x: tf.Tensor, axis: Any = None, keepdims: bool = False) -> tf.Tensor:
    """Mean of ``x`` computed in float64 and cast back to the dtype of ``x``."""
    result = tf.reduce_mean(tf.cast(x, tf.float64), axis=axis, keepdims=keepdims)
    return tf.cast(result, x.dtype)


def _float64_std(x: tf.Tensor, axis: Any = None, keepdims: bool = False) -> tf.Tensor:
    """Population standard deviation (as Keras 2.2 ``K.std``) computed in float64."""
    x64 = tf.cast(x, tf.float64)
    mean = tf.reduce_mean(x64, axis=axis, keepdims=True)
    variance = tf.reduce_mean(tf.square(x64 - mean), axis=axis, keepdims=keepdims)
    return tf.cast(tf.sqrt(variance), x.dtype)


def install_keras_shim() -> list[Any]:
    """Register Keras 2.2 module names in ``sys.modules``, mapped onto ``tf_keras``.

    Returns
    -------
    list
        The ``Conv3D`` layers in the order the builder creates them. Keras 2.2
        numbered layers in creation order (``conv3d_1``, ``conv3d_2``, ...), so
        this order identifies the weights of each layer in the HDF5 file.
    """
    created_conv_layers: list[Any] = []
    layers = tf_keras.layers

    keras_module = types.ModuleType("keras")
    keras_module.__path__ = []  # marks it as a package so submodule imports resolve

    layers_module = types.ModuleType("keras.layers")
    layers_module.__path__ = []
    for name in ("Input", "Dropout", "Concatenate", "Multiply", "Add", "Reshape", "Lambda"):
        setattr(layers_module, name, getattr(layers, name))
    layers_module.MaxPooling3D = _wrap_layer(layers.MaxPooling3D)
    layers_module.AveragePooling3D = _wrap_layer(layers.AveragePooling3D)

    convolutional = types.ModuleType("keras.layers.convolutional")
    convolutional.Conv3D = _wrap_layer(layers.Conv3D, created_conv_layers)
    convolutional.UpSampling3D = _wrap_layer(layers.UpSampling3D)
    convolutional.Cropping3D = _wrap_layer(layers.Cropping3D)

    advanced_activations = types.ModuleType("keras.layers.advanced_activations")
    advanced_activations.LeakyReLU = layers.LeakyReLU
    advanced_activations.PReLU = layers.PReLU

    normalization = types.ModuleType("keras.layers.normalization")
    normalization.BatchNormalization = layers.BatchNormalization

    backend = types.ModuleType("keras.backend")
    for name in dir(tf_keras.backend):
        if not name.startswith("__"):
            setattr(backend, name, getattr(tf_keras.backend, name))
    backend.mean = _float64_mean
    backend.std = _float64_std

    layers_module.convolutional = convolutional
    layers_module.advanced_activations = advanced_activations
    layers_module.normalization = normalization
    keras_module.layers = layers_module
    keras_module.models = tf_keras.models
    keras_module.regularizers = tf_keras.regularizers
    keras_module.backend = backend

    sys.modules.update(
        {
            "keras": keras_module,
            "keras.models": tf_keras.models,
            "keras.layers": layers_module,
            "keras.layers.convolutional": convolutional,
            "keras.layers.advanced_activations": advanced_activations,
            "keras.layers.normalization": normalization,
            "keras.regularizers": tf_keras.regularizers,
            "keras.backend": backend,
        }
    )
    return created_conv_layers


# ---------------------------------------------------------------------------
# Wheel access and model building
# ---------------------------------------------------------------------------


def resolve_wheel_root(wheel: Path, scratch: Path) -> Path:
    """Return a folder that contains the extracted wheel, extracting a ``.whl`` file into ``scratch``."""
    if wheel.is_dir():
        root = wheel
    elif wheel.is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(scratch)
        root = scratch
    else:
        raise FileNotFoundError(f"Wheel {wheel} not found: pass the .whl file or its extracted folder with --wheel.")

    if not (root / BUILDER_MEMBER).is_file():
        raise FileNotFoundError(f"{root} does not contain {BUILDER_MEMBER}: is it the pyliverlesionseg 0.3 wheel?")
    return root


def load_builder(wheel_root: Path) -> Callable[..., Any]:
    """Import ``create_unet_like_model`` from the wheel by file path.

    The package ``__init__`` is skipped because it imports dependencies
    (pymirc and others) that the reference does not need.
    """
    path = wheel_root / BUILDER_MEMBER
    spec = importlib.util.spec_from_file_location("pyliverlesionseg_unet_generalized", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot import {path}.")
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stderr(io.StringIO()):  # SyntaxWarning for `is "lrelu"` comparisons
        spec.loader.exec_module(module)
    return module.create_unet_like_model


def possible_sizes(name: str, builder: Callable[..., Any]) -> tuple[list[list[int]], list[list[int]]]:
    """Return the (input, output) sizes per axis that the builder accepts.

    The builder prints them and raises ``ValueError`` for an impossible output
    size, so a zero output size is requested and the printed lists are parsed.
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            MODEL_BUILDERS[name](builder, [0, 0, 0])
        except ValueError:
            pass
        else:
            raise RuntimeError("The builder accepted an output size of zero.")

    text = printed.getvalue()
    output_part = text.split("possible output sizes:")[1].split("possible input sizes")[0]
    input_part = text.split("possible input sizes")[1]

    def parse(part: str) -> list[list[int]]:
        lists = re.findall(r"[xyz]: \[(.*?)\]\n", part + "\n")
        return [[int(v) for v in re.findall(r"(?<![\w.])(\d+)(?![\w.])", re.sub(r"np\.\w+\(", "", s))] for s in lists]

    return parse(input_part), parse(output_part)


def build_model(name: str, builder: Callable[..., Any], output_size: tuple[int, int, int]) -> tuple[Any, list[Any], str]:
    """Build one network and return the model, its Conv3D layers in creation order and the builder output."""
    tf_keras.backend.clear_session()
    conv_registry = install_keras_shim()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model = MODEL_BUILDERS[name](builder, list(output_size))
    return model, conv_registry, printed.getvalue()


def hdf5_layer_names(h5_path: Path) -> list[str]:
    """Return the layer names stored in a Keras 2.2 HDF5 weight file, in file order."""
    with h5py.File(h5_path, "r") as handle:
        group = handle["model_weights"] if "model_weights" in handle else handle
        return [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]]


def check_layer_classes(model: Any, h5_path: Path) -> Counter:
    """Check that the model has the same layers by class as the HDF5 file, less the mask layers.

    Raises
    ------
    RuntimeError
        If the counts differ, for example when the ``is "lrelu"`` checks of the
        original code failed and no LeakyReLU layers were built.
    """
    built = Counter(KERAS_NAME_PREFIX[type(layer).__name__] for layer in model.layers)
    stored = Counter()
    for layer_name in hdf5_layer_names(h5_path):
        prefix = "lambda" if layer_name == "main" else re.sub(r"_\d+$", "", layer_name)
        stored[prefix] += 1

    expected = stored - MASK_ONLY_LAYERS
    if built != expected:
        raise RuntimeError(f"Layer classes of the built model {dict(built)} differ from {h5_path.name}: {dict(expected)}.")
    if built["leaky_re_lu"] == 0:
        raise RuntimeError("The built model has no LeakyReLU layers.")
    return built


def load_and_check_weights(model: Any, conv_layers: list[Any], h5_path: Path) -> int:
    """Load the HDF5 weights with ``model.load_weights`` and check every Conv3D layer.

    Each Conv3D layer created k-th by the builder must hold exactly the arrays
    stored under ``conv3d_{k+1}`` in the file.

    Returns
    -------
    int
        Number of Conv3D layers checked.
    """
    model.load_weights(str(h5_path))

    with h5py.File(h5_path, "r") as handle:
        group = handle["model_weights"] if "model_weights" in handle else handle
        conv_names = [n for n in hdf5_layer_names(h5_path) if n.startswith("conv3d_")]
        if len(conv_names) != len(conv_layers):
            raise RuntimeError(f"{h5_path.name} stores {len(conv_names)} Conv3D layers, the model has {len(conv_layers)}.")

        for index, layer in enumerate(conv_layers):
            stored_name = f"conv3d_{index + 1}"
            kernel = np.asarray(group[stored_name][f"{stored_name}/kernel:0"])
            bias = np.asarray(group[stored_name][f"{stored_name}/bias:0"])
            loaded_kernel, loaded_bias = layer.get_weights()
            if kernel.shape != loaded_kernel.shape or not np.array_equal(kernel, loaded_kernel):
                raise RuntimeError(f"Kernel of {layer.name} differs from {stored_name} in {h5_path.name}.")
            if not np.array_equal(bias, loaded_bias):
                raise RuntimeError(f"Bias of {layer.name} differs from {stored_name} in {h5_path.name}.")
    return len(conv_layers)


def predict(model: Any, volume: np.ndarray) -> np.ndarray:
    """Run the model on one (X, Y, Z) volume and return the (x, y, z) probabilities."""
    batch = volume[np.newaxis, ..., np.newaxis].astype(np.float32)
    output = model.predict(batch, batch_size=1, verbose=0)
    return np.asarray(output[0, ..., 0], dtype=np.float32)


LAYER_SETTINGS = ("kernel_size", "padding", "pool_size", "strides", "size", "cropping", "alpha")


def describe_layers(model: Any) -> str:
    """Return one line per layer: name, class, output shape, size settings and input layers.

    Unlike ``model.summary()`` this lists pool sizes, croppings and upsampling
    factors, which a port has to reproduce exactly.
    """
    lines = []
    for layer in model.layers:
        config = layer.get_config()
        settings = ", ".join(f"{key}={config[key]}" for key in LAYER_SETTINGS if key in config)
        inbound = [node_layer.name for node in layer._inbound_nodes for node_layer in tf.nest.flatten(node.inbound_layers)]
        shape = tuple(layer.output_shape[0] if isinstance(layer.output_shape, list) else layer.output_shape)[1:]
        lines.append(f"{layer.name:<22} {type(layer).__name__:<17} {str(shape):<22} {settings:<60} <- {', '.join(inbound)}")
    return "\n".join(lines)


def summarise(model: Any) -> str:
    """Return ``model.summary()`` as text."""
    lines: list[str] = []
    model.summary(line_length=140, print_fn=lines.append)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def normalise_ct(hu: np.ndarray) -> np.ndarray:
    """Apply the CT normalisation of the original pipeline: clip(HU / 1000, -0.2, 0.2) * 2.5."""
    return (np.clip(hu / CT_HU_SCALE, -CT_CLIP, CT_CLIP) * CT_GAIN).astype(np.float32)


def quantise(volume: np.ndarray) -> np.ndarray:
    """Round to multiples of 1/1024 (0.4 HU after the CT normalisation) so that the fixtures compress well."""
    return (np.round(volume * QUANTISATION_STEPS) / QUANTISATION_STEPS).astype(np.float32)


def make_blob_phantom(shape: tuple[int, int, int], rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Make a smooth phantom of ellipsoids in the normalised CT range [-0.5, 0.5] plus noise.

    Background is fat-like (-0.25), one large ellipsoid is liver-like (+0.15)
    with a few darker and brighter blobs inside it.
    """
    grid = np.stack(np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij"), axis=-1)
    volume = np.full(shape, -0.25, dtype=np.float64)

    def ellipsoid(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
        distance = np.sqrt((((grid - centre) / radii) ** 2).sum(axis=-1))
        return 1.0 / (1.0 + np.exp((distance - 1.0) * 12.0))  # soft edge

    organ_centre = rng.uniform(-0.2, 0.2, 3)
    volume += 0.4 * ellipsoid(organ_centre, rng.uniform(0.5, 0.8, 3))
    for _ in range(4):
        contrast = rng.choice([-0.25, 0.2])
        volume += contrast * ellipsoid(organ_centre + rng.uniform(-0.4, 0.4, 3), rng.uniform(0.08, 0.25, 3))

    volume += rng.normal(0.0, noise_std, shape)
    return quantise(np.clip(volume, -0.5, 0.5))


def load_ct_crop(ct_path: Path, seg_path: Path, shape: tuple[int, int, int], zoom: tuple[int, int, int]) -> np.ndarray:
    """Crop the example CT around the liver, optionally upsample it linearly, and normalise it.

    Parameters
    ----------
    ct_path, seg_path
        The 3 mm RAS example CT (HU) and its TotalSegmentator labels.
    shape
        Crop size in output voxels.
    zoom
        Integer upsampling factor per axis (3 mm to 1 mm needs 3); 1 keeps 3 mm voxels.

    Returns
    -------
    numpy.ndarray
        Normalised float32 crop of ``shape``.
    """
    import nibabel as nib
    from scipy import ndimage

    image = nib.as_closest_canonical(nib.load(str(ct_path)))
    hu = np.asarray(image.get_fdata(dtype=np.float32))
    labels = np.asarray(nib.as_closest_canonical(nib.load(str(seg_path))).get_fdata(dtype=np.float32))
    centre = np.round(np.argwhere(labels == TOTALSEG_LIVER_LABEL).mean(axis=0)).astype(int)

    source_shape = [int(np.ceil(n / z)) + 2 for n, z in zip(shape, zoom)]
    start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, source_shape, hu.shape)]
    crop = hu[tuple(slice(a, a + s) for a, s in zip(start, source_shape))]
    if any(z != 1 for z in zoom):
        crop = ndimage.zoom(crop, zoom, order=1, grid_mode=False)
    offset = [(c - s) // 2 for c, s in zip(crop.shape, shape)]
    crop = crop[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    return quantise(normalise_ct(crop))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """Return the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_size_for(output_size: tuple[int, ...], sizes: tuple[list[list[int]], list[list[int]]]) -> tuple[int, int, int]:
    """Return the input size that the builder pairs with ``output_size``."""
    inputs, outputs = sizes
    return tuple(inputs[axis][outputs[axis].index(o)] for axis, o in enumerate(output_size))  # type: ignore[return-value]


def make_cases(name: str, sizes: tuple[list[list[int]], list[list[int]]], args: argparse.Namespace, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Define the fixture cases of one model: output size, input volume and a description."""
    inputs, outputs = sizes
    cases: list[dict[str, Any]] = []

    if name == "liver":
        # Smallest valid tile (27 voxels: one voxel per axis in the deepest pathway,
        # one output voxel), an anisotropic tile, and a CT crop with 3 mm voxels like the model.
        smallest = (outputs[0][0], outputs[1][0], outputs[2][0])
        anisotropic = (outputs[0][1], outputs[1][1], outputs[2][0])
        ct_output = (outputs[0][1], outputs[1][1], outputs[2][1])
        cases.append({"output_size": smallest, "input": make_blob_phantom(input_size_for(smallest, sizes), rng, 0.02), "source": "blob phantom, smallest valid tile"})
        cases.append({"output_size": anisotropic, "input": make_blob_phantom(input_size_for(anisotropic, sizes), rng, 0.02), "source": "blob phantom, anisotropic tile"})
        cases.append({"output_size": ct_output, "input": load_ct_crop(args.ct, args.seg, input_size_for(ct_output, sizes), (1, 1, 1)), "source": f"crop of {args.ct.name} around the liver, 3 mm voxels"})
    else:
        # The smallest valid tile as a CT crop upsampled to 1 x 1 x 3 mm like the model,
        # and a phantom with an output of about 10 voxels per axis.
        smallest = (outputs[0][0], outputs[1][0], outputs[2][0])
        medium = tuple(next(o for o in outputs[axis] if o >= 8) for axis in range(3))
        cases.append({"output_size": smallest, "input": load_ct_crop(args.ct, args.seg, input_size_for(smallest, sizes), (3, 3, 1)), "source": f"crop of {args.ct.name} around the liver, linearly upsampled to 1 x 1 x 3 mm"})
        cases.append({"output_size": medium, "input": make_blob_phantom(input_size_for(medium, sizes), rng, 0.02), "source": "blob phantom, medium tile"})
    return cases


def run_model(name: str, builder: Callable[..., Any], wheel_root: Path, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """Build, check and run one model, and write its fixtures."""
    h5_path = wheel_root / TRAINED_MODELS_DIR / MODEL_WEIGHTS[name]
    h5_sha256 = sha256_of(h5_path)
    sizes = possible_sizes(name, builder)
    print(f"[{name}] possible input sizes (x): {sizes[0][0][:12]} ...")
    print(f"[{name}] possible output sizes (x): {sizes[1][0][:12]} ...")

    for case_number, case in enumerate(make_cases(name, sizes, args, rng), start=1):
        model, conv_layers, _ = build_model(name, builder, case["output_size"])
        classes = check_layer_classes(model, h5_path)
        checked = load_and_check_weights(model, conv_layers, h5_path)
        volume = case["input"]
        if tuple(model.input_shape[1:4]) != volume.shape:
            raise RuntimeError(f"Input {volume.shape} does not fit the model input {model.input_shape}.")

        probabilities = predict(model, volume)
        print(f"[{name} case {case_number}] {case['source']}: input {volume.shape} -> output {probabilities.shape}, "
              f"p in [{probabilities.min():.4f}, {probabilities.max():.4f}], mean {probabilities.mean():.4f}; "
              f"{checked} Conv3D layers checked, layer classes {dict(classes)}")
        if case_number == 1:
            print(f"[{name}] model.summary() for the smallest case:\n{summarise(model)}")
        print(f"[{name} case {case_number}] layers:\n{describe_layers(model)}")

        target = args.out / f"{name}_case{case_number}.npz"
        np.savez_compressed(
            target,
            input=volume.astype(np.float32),
            output=probabilities,
            model=np.str_(name),
            source=np.str_(case["source"]),
            hdf5_file=np.str_(MODEL_WEIGHTS[name]),
            hdf5_sha256=np.str_(h5_sha256),
            tensorflow_version=np.str_(tf.__version__),
            tf_keras_version=np.str_(tf_keras.__version__),
            normalisation_dtype=np.str_(NORMALISATION_DTYPE),
            seed=np.int64(args.seed),
        )
        print(f"[{name} case {case_number}] wrote {target} ({target.stat().st_size / 1024:.0f} KiB)")

    if args.default_tiles:
        input_size, output_size = MODEL_DEFAULT_TILES[name]
        model, conv_layers, _ = build_model(name, builder, output_size)
        load_and_check_weights(model, conv_layers, h5_path)
        volume = make_blob_phantom(input_size, rng, 0.02)
        probabilities = predict(model, volume)
        if probabilities.shape != output_size:
            raise RuntimeError(f"Default tile of {name}: output {probabilities.shape}, expected {output_size}.")
        print(f"[{name} default tile] input {tuple(model.input_shape[1:4])} -> output {probabilities.shape} (not stored)")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, default=DEFAULT_WHEEL, help="pyliverlesionseg 0.3 wheel file or its extracted folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_FIXTURE_DIR, help="folder for the .npz fixtures")
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT_PATH, help="3 mm RAS example CT in HU (NIfTI)")
    parser.add_argument("--seg", type=Path, default=DEFAULT_SEG_PATH, help="TotalSegmentator labels of the example CT (NIfTI)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_BUILDERS), default=["liver", "lesion"], help="models to run")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the phantom generator")
    parser.add_argument("--no-default-tiles", dest="default_tiles", action="store_false", help="skip the check of the default tile sizes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the fixtures of the selected models."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}, numpy {np.__version__}, h5py {h5py.__version__}")

    with tempfile.TemporaryDirectory() as scratch:
        wheel_root = resolve_wheel_root(args.wheel, Path(scratch))
        install_keras_shim()
        builder = load_builder(wheel_root)
        for name in args.models:
            rng = np.random.default_rng([args.seed, sorted(MODEL_BUILDERS).index(name)])
            run_model(name, builder, wheel_root, args, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
