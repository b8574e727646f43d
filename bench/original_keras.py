"""Run the original pyliverlesionseg 0.3 Keras networks on tiles saved by the benchmark.

This script runs in a throwaway TensorFlow environment (``tensorflow-cpu`` and ``tf-keras``, see
``tests/keras_reference/README.md``), never in the product's environment. It builds each network
with the original ``create_unet_like_model`` from the wheel, loads the trained HDF5 weights,
runs every saved input tile and writes the output tiles and the seconds spent per tile.

The instance normalisation uses TensorFlow's float32 ``K.mean``/``K.std``, as the original
pipeline did, unless ``--float64-normalisation`` is given (the reference fixtures' setting).

Usage: /tmp/kerasenv/bin/python bench/original_keras.py TILES.npz OUT.npz [--wheel DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MAKE_REFERENCE = REPO_ROOT / "tests" / "keras_reference" / "make_reference.py"
DEFAULT_WHEEL = Path("/tmp/wheel/x")

logger = logging.getLogger("bench.original_keras")


def _load_reference_module() -> object:
    """Import ``tests/keras_reference/make_reference.py`` by path (it holds the Keras 2.2 shim)."""
    spec = importlib.util.spec_from_file_location("make_reference", MAKE_REFERENCE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {MAKE_REFERENCE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_reference"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    """Run the saved tiles through the Keras networks and save outputs and timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiles", type=Path, help=".npz written by bench/run_benchmarks.py")
    parser.add_argument("out", type=Path, help=".npz to write the Keras output tiles into")
    parser.add_argument("--wheel", type=Path, default=DEFAULT_WHEEL, help="extracted wheel or .whl")
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    parser.add_argument("--float64-normalisation", action="store_true",
                        help="compute K.mean/K.std in float64 (the reference fixtures' setting)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    reference = _load_reference_module()
    if not args.float64_normalisation:
        reference.NORMALISATION_DTYPE = "float32"
        reference._float64_mean = lambda x, axis=None, keepdims=False: tf.reduce_mean(x, axis=axis, keepdims=keepdims)
        reference._float64_std = lambda x, axis=None, keepdims=False: tf.math.reduce_std(x, axis=axis, keepdims=keepdims)

    saved = np.load(args.tiles)
    outputs: dict[str, np.ndarray] = {}
    timings: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        wheel_root = reference.resolve_wheel_root(args.wheel, Path(scratch))
        builder = reference.load_builder(wheel_root)
        models: dict[tuple[str, tuple[int, ...]], object] = {}
        for key in sorted(k for k in saved.files if k.endswith("_input")):
            name = key.split("_")[0]
            output_size = tuple(int(v) for v in saved[key.replace("_input", "_output_size")])
            if (name, output_size) not in models:
                model, conv_layers, _ = reference.build_model(name, builder, list(output_size))
                h5_path = wheel_root / reference.TRAINED_MODELS_DIR / reference.MODEL_WEIGHTS[name]
                reference.load_and_check_weights(model, conv_layers, h5_path)
                models[(name, output_size)] = model
                # One untimed call builds the graph, as a long-running server would have done.
                model.predict(np.zeros((1, *model.input_shape[1:4], 1), np.float32), verbose=0)
            model = models[(name, output_size)]
            tile = saved[key]
            started = time.perf_counter()
            outputs[key.replace("_input", "_keras")] = reference.predict(model, tile)
            timings.setdefault(name, []).append(round(time.perf_counter() - started, 2))
            logger.info("%s: %s -> %s in %.1f s", key, tile.shape, output_size, timings[name][-1])

    np.savez(args.out, **outputs, timings=np.str_(json.dumps(timings)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
