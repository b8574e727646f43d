"""Run the original pyliverlesionseg 0.3 pipeline end to end on one DICOM CT series.

The ``run`` command runs in a throwaway TensorFlow environment (``/tmp/kerasenv``: tensorflow-cpu
2.21, tf-keras 2.21, pyliverlesionseg 0.3, pymirc 0.30.2, pydicom 2.4, pynetdicom 2.1), never in
the product's environment. It calls the package's documented entry point,
``pyliverlesionseg.predict_liver_lesion_seg.main`` with ``INPUT --seg_liver --seg_lesion
--save_nifti``, so the original DICOM reading (pymirc ``DicomVolume``), body cropping,
resampling, median filter, tiling, thresholds and post-processing all run unchanged with the
bundled trained models. The script only times the steps and copies the results:

- ``OUT/liver.nii.gz``, ``OUT/tumour.nii.gz`` (uint8 0/1) and ``OUT/labels.nii.gz`` (0
  background, 1 liver, 2 tumour, tumour written over liver as in ``mask.nii.gz`` of
  ``livernode segment``), all on the series' RAS grid.
- ``OUT/original_result.json``: seconds per step, peak RSS, volumes, the body crop the original
  chose and whether its liver mask touches the first or last slice.
- ``OUT/work/``: the original's own outputs (RTSTRUCT files, NIfTI files and
  ``CNN_processing.log``). The original writes them next to its input folder, so the script
  points it at a symbolic link to the series inside ``OUT/work``.

Workarounds, all inside this process (no installed file is changed):

- the package imports Keras 2.2 module paths. The shim of
  ``tests/keras_reference/make_reference.py`` maps them onto ``tf_keras``, and this script adds
  ``keras.Model``, ``keras.callbacks`` and ``keras.utils``. The instance normalisation keeps
  TensorFlow's float32 ``mean`` and ``std``, as the original ran (``--float64-normalisation``
  computes them in float64 instead).
- ``DeepVoxNet.predict`` iterates ``Node.inbound_layers``, which Keras 2.2 returned as a list
  and tf-keras returns as a single layer for single-input layers. The property is replaced by
  one that always returns a flat list.
- the original and pymirc pass boolean arrays to ``scipy.ndimage.find_objects``, which SciPy 1.17
  rejects ("'numpy.bool' object cannot be interpreted as an integer"). The name is replaced in
  those two modules by a function that casts a boolean array to uint8 first (True is label 1).
- pymirc 0.30.2 builds contours with ``matplotlib.patches.Polygon(xy, True)``, but matplotlib 3.11
  takes ``closed`` only as a keyword. The name is replaced in pymirc's contour module by a
  function that passes it as ``closed=``.
- the wheel declares Python 3.6, TensorFlow 1.12 and Keras 2.2.4, so it is installed with
  ``pip install --no-deps --ignore-requires-python pyliverlesionseg==0.3``. pydicom stays
  below 3 because the original calls ``pydicom.read_file``, which pydicom 3 removed.

The ``compare`` command needs only numpy and nibabel, so it also runs in the product's
environment. It computes Dice and volumes between these masks and ``mask.nii.gz`` of
``livernode segment``.

Usage:
    /tmp/kerasenv/bin/python bench/original_pipeline.py run SERIES_FOLDER OUT_FOLDER
    python bench/original_pipeline.py compare ORIGINAL_OUT OURS_OUT [--truth LABELS.nii.gz]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MAKE_REFERENCE = REPO_ROOT / "tests" / "keras_reference" / "make_reference.py"
DEFAULT_KERAS_PYTHON = Path("/tmp/kerasenv/bin/python")
#: Upper bound for one ``run`` in seconds. The 300-slice series took minutes on 2 CPU cores.
DEFAULT_TIMEOUT_S = 3600.0

RESULT_FILE = "original_result.json"
LIVER_FILE = "liver.nii.gz"
TUMOUR_FILE = "tumour.nii.gz"
LABELS_FILE = "labels.nii.gz"
OURS_MASK_FILE = "mask.nii.gz"
LIVER_LABEL = 1
TUMOUR_LABEL = 2
#: Largest difference between two affines, in mm, for which two masks share one grid.
AFFINE_TOLERANCE_MM = 1e-3
MM3_PER_ML = 1000.0

logger = logging.getLogger("bench.original_pipeline")


# Subprocess wrapper, for bench/run_benchmarks.py ---------------------------------------------------


def run_original(series_folder: Path, out: Path, python: Path = DEFAULT_KERAS_PYTHON,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Run the original pipeline on one series in the TensorFlow environment and return its result.

    Parameters
    ----------
    series_folder: pathlib.Path
        Folder of one CT series with ``*.dcm`` files, the only names the original reads. It is only read.
    out: pathlib.Path
        Output folder, created when missing.
    python: pathlib.Path, optional
        Interpreter of the TensorFlow environment.
    timeout_s: float, optional
        Wall-clock limit of the subprocess in seconds.

    Returns
    -------
    dict
        The content of ``out/original_result.json``.

    Raises
    ------
    FileNotFoundError
        When ``python`` does not exist.
    subprocess.CalledProcessError
        When the original pipeline fails. Its output is in ``out/original_pipeline.log``.
    subprocess.TimeoutExpired
        When the run takes longer than ``timeout_s``.
    """
    if not python.is_file():
        raise FileNotFoundError(
            f"TensorFlow interpreter {python} not found: create the environment described in this script's docstring"
        )

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "original_pipeline.log"
    command = [str(python), str(Path(__file__).resolve()), "run", str(series_folder), str(out)]
    logger.info("Starting the original pipeline on %s, log in %s", series_folder, log_path)
    with log_path.open("w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout_s)
    return json.loads((out / RESULT_FILE).read_text())


# Keras 2.2 and tf-keras compatibility, only in the TensorFlow environment -------------------------


def _install_shims(float64_normalisation: bool) -> list[str]:
    """Register the Keras 2.2 module names and the ``Node.inbound_layers`` fix, and return what was changed."""
    import tf_keras
    from tf_keras.src.engine import node as node_module

    spec = importlib.util.spec_from_file_location("make_reference", MAKE_REFERENCE)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot import the Keras 2.2 shim from {MAKE_REFERENCE}")
    reference = importlib.util.module_from_spec(spec)
    sys.modules["make_reference"] = reference
    spec.loader.exec_module(reference)
    reference.install_keras_shim()

    keras_module = sys.modules["keras"]
    keras_module.Model = tf_keras.Model
    keras_module.callbacks = tf_keras.callbacks
    keras_module.utils = tf_keras.utils
    sys.modules["keras.callbacks"] = tf_keras.callbacks
    sys.modules["keras.utils"] = tf_keras.utils
    changes = [
        "Keras 2.2 module paths mapped onto tf_keras (tests/keras_reference/make_reference.py shim, "
        "plus keras.Model, keras.callbacks, keras.utils)",
    ]

    if float64_normalisation:
        changes.append("instance normalisation mean/std computed in float64 (not as the original)")
    else:
        backend = sys.modules["keras.backend"]
        backend.mean = tf_keras.backend.mean
        backend.std = tf_keras.backend.std
        changes.append("instance normalisation mean/std in float32, as the original")

    import tensorflow as tf

    original_property = node_module.Node.inbound_layers

    def flat_inbound_layers(self: Any) -> list[Any]:
        return tf.nest.flatten(original_property.fget(self))

    node_module.Node.inbound_layers = property(flat_inbound_layers)
    changes.append("tf_keras Node.inbound_layers returns a flat list, as Keras 2.2 did")
    return changes


def _find_objects_accepting_bool(labels: np.ndarray, max_label: int = 0) -> list[Any]:
    """Call ``scipy.ndimage.find_objects``, casting a boolean array to uint8 as older SciPy did."""
    from scipy import ndimage

    array = np.asarray(labels)
    if array.dtype == bool:
        array = array.view(np.uint8)
    return ndimage.find_objects(array, max_label)


def _install_find_objects_fix() -> str:
    """Replace ``find_objects`` in the original's module and pymirc's RTSTRUCT module, and return what was changed."""
    import importlib

    for module_name in ("pyliverlesionseg.cnn_liver_lesion_seg_CT_MR_functions", "pymirc.fileio.labelvol_to_rtstruct"):
        module = importlib.import_module(module_name)
        module.find_objects = _find_objects_accepting_bool
    return "scipy.ndimage.find_objects casts boolean arrays to uint8 (SciPy 1.17 rejects them)"


def _polygon_accepting_positional_closed(xy: Any, closed: bool = True, **kwargs: Any) -> Any:
    """Build a ``matplotlib.patches.Polygon``, taking ``closed`` positionally as older matplotlib versions did."""
    from matplotlib.patches import Polygon

    return Polygon(xy, closed=closed, **kwargs)


def _install_polygon_fix() -> str:
    """Replace ``Polygon`` in pymirc's contour module and return what was changed."""
    import importlib

    module = importlib.import_module("pymirc.image_operations.binary_2d_image_to_contours")
    module.Polygon = _polygon_accepting_positional_closed
    return "matplotlib Polygon takes closed positionally in pymirc's contour module (matplotlib 3.11 takes it as a keyword only)"


# Step timing ---------------------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    """Return the peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StepClock:
    """Intervals of the original's functions, recorded by wrappers put into its module namespaces.

    The original runs liver and lesion steps in one function, so ``phase`` (``"liver"`` or
    ``"lesion"``) is set by the wrappers of its per-network functions and names the shared
    steps (sliding window, RTSTRUCT and NIfTI writing) that run in between.
    """

    def __init__(self) -> None:
        self.intervals: list[dict[str, Any]] = []
        self.phase = "liver"
        self.results: dict[str, Any] = {}

    def wrap(self, function: Callable[..., Any], label: str, phase: str | None = None,
             keep_result: bool = False) -> Callable[..., Any]:
        """Return ``function`` wrapped to record its interval under ``label``.

        A label containing ``{phase}`` is formatted with the phase at call time. ``phase`` sets the
        phase before the call, and ``keep_result`` stores the return value under the label.
        """

        def timed(*args: Any, **kwargs: Any) -> Any:
            if phase is not None:
                self.phase = phase
            name = label.format(phase=self.phase)
            started = time.perf_counter()
            result = function(*args, **kwargs)
            ended = time.perf_counter()
            self.intervals.append({"step": name, "start": started, "end": ended,
                                   "peak_rss_mib_after": round(_peak_rss_mib(), 1)})
            if keep_result:
                self.results[name] = result
            return result

        timed.__wrapped__ = function  # type: ignore[attr-defined]
        return timed

    def seconds(self, name: str) -> float:
        """Return the summed duration of all intervals called ``name`` (0 when it never ran)."""
        return sum(i["end"] - i["start"] for i in self.intervals if i["step"] == name)

    def first(self, name: str) -> dict[str, Any] | None:
        """Return the first interval called ``name``, or None."""
        return next((i for i in self.intervals if i["step"] == name), None)


def _steps_from_intervals(clock: StepClock, pipeline_start: float, pipeline_end: float) -> dict[str, float]:
    """Turn the recorded intervals into seconds per pipeline step.

    Steps that no wrapper covers (DICOM reading, resampling and normalisation) are the gaps between
    wrapped calls.
    """
    crop = clock.first("liver_crop")
    liver_predict = clock.first("liver_predict")
    liver_nifti = clock.first("liver_nifti")
    lesion_predict = clock.first("lesion_predict")
    if crop is None or liver_predict is None or liver_nifti is None or lesion_predict is None:
        raise RuntimeError(f"The original pipeline skipped a step: recorded {[i['step'] for i in clock.intervals]}")

    steps = {
        "dicom_reading": crop["start"] - pipeline_start,
        "liver_crop": clock.seconds("liver_crop"),
        "liver_preprocessing": liver_predict["start"] - crop["end"],
        "liver_model_setup": clock.seconds("liver_predict") - clock.seconds("liver_sliding_window"),
        "liver_inference": clock.seconds("liver_sliding_window"),
        "liver_postprocessing": clock.seconds("liver_postprocess"),
        "liver_outputs": clock.seconds("liver_rtstruct") + clock.seconds("liver_nifti"),
        "lesion_preprocessing": lesion_predict["start"] - liver_nifti["end"],
        "lesion_model_setup": clock.seconds("lesion_predict") - clock.seconds("lesion_sliding_window"),
        "lesion_inference": clock.seconds("lesion_sliding_window"),
        "lesion_postprocessing": clock.seconds("lesion_postprocess"),
        "lesion_outputs": clock.seconds("lesion_rtstruct") + clock.seconds("lesion_nifti"),
    }
    steps["other"] = (pipeline_end - pipeline_start) - sum(steps.values())
    return {name: round(value, 2) for name, value in steps.items()}


# The run command -----------------------------------------------------------------------------------


def _mask_summary(mask: np.ndarray, zooms: tuple[float, ...]) -> dict[str, Any]:
    """Return volume in mL, slice extent and whether the mask touches the first or last slice."""
    voxel_ml = float(np.prod(zooms[:3])) / MM3_PER_ML
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    return {
        "volume_ml": round(float(mask.sum()) * voxel_ml, 2),
        "first_slice": int(slices[0]) if slices.size else None,
        "last_slice": int(slices[-1]) if slices.size else None,
        "touches_first_slice": bool(mask[:, :, 0].any()),
        "touches_last_slice": bool(mask[:, :, -1].any()),
    }


def _load_ras_mask(path: Path) -> nib.Nifti1Image:
    """Load a mask the original wrote and reorder it to RAS (a no-op for its RAS affine)."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    return nib.Nifti1Image((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine)


def run_in_process(series_folder: Path, out: Path, float64_normalisation: bool = False,
                   threads: int | None = None) -> dict[str, Any]:
    """Run the original entry point on one series in this process and write masks and timings.

    Parameters
    ----------
    series_folder: pathlib.Path
        Folder of one CT series with ``*.dcm`` files. It is only read.
    out: pathlib.Path
        Output folder. Its ``work`` subfolder is deleted and recreated.
    float64_normalisation: bool, optional
        Compute the instance normalisation statistics in float64 (the original used float32).
    threads: int | None, optional
        TensorFlow intra-op threads. None keeps TensorFlow's default (all cores), as the original did.

    Returns
    -------
    dict
        The content written to ``out/original_result.json``.

    Raises
    ------
    FileNotFoundError
        When ``series_folder`` contains no ``*.dcm`` file.
    RuntimeError
        When the original pipeline wrote no liver or no lesion NIfTI file.
    """
    process_start = time.perf_counter()
    series_folder = series_folder.resolve()
    if not any(series_folder.glob("*.dcm")):
        raise FileNotFoundError(f"No *.dcm file in {series_folder}: the original reads only files named *.dcm")

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    workarounds = _install_shims(float64_normalisation)

    import pymirc
    import pymirc.fileio
    import pyliverlesionseg
    import pyliverlesionseg.cnn_liver_lesion_seg_CT_MR_functions as functions
    import pyliverlesionseg.general as general
    from pyliverlesionseg import predict_liver_lesion_seg

    workarounds.append(_install_find_objects_fix())
    workarounds.append(_install_polygon_fix())
    imports_seconds = time.perf_counter() - process_start

    # The original writes its outputs and log next to its input folder.
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    series_link = work / series_folder.name
    series_link.symlink_to(series_folder, target_is_directory=True)

    clock = StepClock()
    functions.crop_ct_image = clock.wrap(functions.crop_ct_image, "liver_crop", phase="liver", keep_result=True)
    functions.unet_liver_predict = clock.wrap(functions.unet_liver_predict, "liver_predict", phase="liver")
    functions.cnn_liver_pred_postprocess = clock.wrap(functions.cnn_liver_pred_postprocess, "liver_postprocess")
    functions.unet_lesion_predict = clock.wrap(functions.unet_lesion_predict, "lesion_predict", phase="lesion")
    functions.cnn_lesion_pred_postprocess = clock.wrap(functions.cnn_lesion_pred_postprocess, "lesion_postprocess")
    general.DeepVoxNet.predict = clock.wrap(general.DeepVoxNet.predict, "{phase}_sliding_window")
    pymirc.fileio.labelvol_to_rtstruct = clock.wrap(pymirc.fileio.labelvol_to_rtstruct, "{phase}_rtstruct")
    original_nib_save = nib.save
    nib.save = clock.wrap(nib.save, "{phase}_nifti")

    argv = sys.argv
    sys.argv = ["pyliverlesionseg_predict", str(series_link), "--seg_liver", "--seg_lesion", "--save_nifti"]
    logger.info("Running the original pipeline on %s (%s)", series_folder, " ".join(sys.argv[1:]))
    pipeline_start = time.perf_counter()
    try:
        predict_liver_lesion_seg.main()
    finally:
        pipeline_end = time.perf_counter()
        sys.argv = argv
        nib.save = original_nib_save
    logger.info("The original pipeline finished in %.1f s", pipeline_end - pipeline_start)

    liver_path = work / f"{series_folder.name}_cnn_pred_liver.nii.gz"
    tumour_path = work / f"{series_folder.name}_cnn_pred_liver_lesions.nii.gz"
    for path in (liver_path, tumour_path):
        if not path.is_file():
            raise RuntimeError(f"The original pipeline wrote no {path.name} into {work}: read {work / 'CNN_processing.log'}")

    liver = _load_ras_mask(liver_path)
    tumour = _load_ras_mask(tumour_path)
    if not np.allclose(liver.affine, tumour.affine, atol=AFFINE_TOLERANCE_MM) or liver.shape != tumour.shape:
        raise RuntimeError(f"Liver and lesion masks of the original lie on different grids: {liver.affine} {tumour.affine}")
    liver_mask = np.asarray(liver.dataobj, dtype=bool)
    tumour_mask = np.asarray(tumour.dataobj, dtype=bool)
    labels = np.zeros(liver.shape, dtype=np.uint8)
    labels[liver_mask] = LIVER_LABEL
    labels[tumour_mask] = TUMOUR_LABEL
    nib.save(liver, str(out / LIVER_FILE))
    nib.save(tumour, str(out / TUMOUR_FILE))
    nib.save(nib.Nifti1Image(labels, liver.affine), str(out / LABELS_FILE))

    zooms = liver.header.get_zooms()
    crop = clock.results["liver_crop"]
    result = {
        "tool": "pyliverlesionseg 0.3, predict_liver_lesion_seg --seg_liver --seg_lesion --save_nifti",
        "series_folder": str(series_folder),
        "shape": list(liver.shape),
        "voxel_size_mm": [round(float(z), 4) for z in zooms[:3]],
        "affine_ras": np.round(liver.affine, 4).tolist(),
        "versions": {
            "python": sys.version.split()[0],
            "tensorflow": tf.__version__,
            "pymirc": pymirc.__version__,
            "numpy": np.__version__,
        },
        "tensorflow_intra_op_threads": threads if threads is not None else "default",
        "cpu_count": os.cpu_count(),
        "workarounds": workarounds,
        "seconds": {
            "imports": round(imports_seconds, 2),
            **_steps_from_intervals(clock, pipeline_start, pipeline_end),
            "pipeline_total": round(pipeline_end - pipeline_start, 2),
        },
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "peak_rss_mib_after_step": {i["step"]: i["peak_rss_mib_after"] for i in clock.intervals},
        # The crop is in the original's LPS array order, which keeps the slice axis: [start, stop).
        # NOTE: the liver network receives only this crop, chosen by the original's crop_ct_image,
        # so liver outside its slice range is cut off.
        "body_crop_lps_voxels": [[int(s.start), int(s.stop)] for s in crop],
        "liver": _mask_summary(liver_mask, zooms),
        "tumour": _mask_summary(tumour_mask, zooms),
        "tumour_outside_liver_ml": round(float((tumour_mask & ~liver_mask).sum()) * float(np.prod(zooms[:3])) / MM3_PER_ML, 2),
        "outputs": {"liver": LIVER_FILE, "tumour": TUMOUR_FILE, "labels": LABELS_FILE, "original_outputs": "work"},
    }
    result["seconds"]["process_total"] = round(time.perf_counter() - process_start, 2)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


# The compare command -------------------------------------------------------------------------------


def dice(first: np.ndarray, second: np.ndarray) -> float | None:
    """Return the Dice coefficient of two boolean masks, or None when both are empty."""
    total = int(first.sum()) + int(second.sum())
    if total == 0:
        return None
    return 2.0 * float(np.logical_and(first, second).sum()) / total


def compare_masks(original_out: Path, ours_out: Path, truth: Path | None = None) -> dict[str, Any]:
    """Compare the original's masks with ``mask.nii.gz`` of ``livernode segment``.

    The liver is the whole liver in both: the original's liver mask, and labels 1 and 2 of ours.

    Parameters
    ----------
    original_out: pathlib.Path
        Output folder of the ``run`` command.
    ours_out: pathlib.Path
        Output folder of ``livernode segment``.
    truth: pathlib.Path | None, optional
        Reference labels (1 liver, 2 tumour) on the same grid, for a synthetic phantom.

    Returns
    -------
    dict
        Dice of liver and tumour, volumes in mL and slice extents of each mask.

    Raises
    ------
    ValueError
        When the masks do not share one grid (shape, or affine within 0.001 mm).
    """
    original = nib.load(str(original_out / LABELS_FILE))
    ours = nib.as_closest_canonical(nib.load(str(ours_out / OURS_MASK_FILE)))
    sources = {"original": original, "ours": ours}
    if truth is not None:
        sources["truth"] = nib.as_closest_canonical(nib.load(str(truth)))

    for name, image in sources.items():
        if image.shape != original.shape or not np.allclose(image.affine, original.affine, atol=AFFINE_TOLERANCE_MM):
            raise ValueError(
                f"Mask grids differ: {name} has shape {image.shape} and affine {image.affine.tolist()}, "
                f"the original {original.shape} and {original.affine.tolist()}. Resample one onto the other first"
            )

    zooms = original.header.get_zooms()
    labels = {name: np.asarray(image.dataobj).astype(np.uint8) for name, image in sources.items()}
    livers = {name: label >= LIVER_LABEL for name, label in labels.items()}
    tumours = {name: label == TUMOUR_LABEL for name, label in labels.items()}

    comparison: dict[str, Any] = {
        "liver_dice": dice(livers["original"], livers["ours"]),
        "tumour_dice": dice(tumours["original"], tumours["ours"]),
        "liver": {name: _mask_summary(mask, zooms) for name, mask in livers.items()},
        "tumour": {name: _mask_summary(mask, zooms) for name, mask in tumours.items()},
    }
    # Dice inside the original's body crop, where its liver network could find the liver.
    result_path = original_out / RESULT_FILE
    if result_path.is_file():
        crop_start, crop_stop = json.loads(result_path.read_text())["body_crop_lps_voxels"][2]
        inside = slice(crop_start, crop_stop)
        comparison["inside_original_crop"] = {
            "slices": [crop_start, crop_stop - 1],
            "liver_dice": dice(livers["original"][:, :, inside], livers["ours"][:, :, inside]),
            "tumour_dice": dice(tumours["original"][:, :, inside], tumours["ours"][:, :, inside]),
        }

    if truth is not None:
        comparison["dice_against_truth"] = {
            name: {"liver": dice(livers[name], livers["truth"]), "tumour": dice(tumours[name], tumours["truth"])}
            for name in ("original", "ours")
        }
    return comparison


# Command line --------------------------------------------------------------------------------------


def main() -> int:
    """Run the command given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the original pipeline (TensorFlow environment only)")
    run.add_argument("series", type=Path, help="folder of one CT series with *.dcm files (only read)")
    run.add_argument("out", type=Path, help="output folder for masks, original_result.json and work/")
    run.add_argument("--threads", type=int, default=None,
                     help="TensorFlow intra-op threads (default: TensorFlow's default, all cores)")
    run.add_argument("--float64-normalisation", action="store_true",
                     help="compute the instance normalisation mean/std in float64 (the original used float32)")

    compare = commands.add_parser("compare", help="Dice and volumes between the original's masks and ours")
    compare.add_argument("original", type=Path, help="output folder of the run command")
    compare.add_argument("ours", type=Path, help="output folder of livernode segment (mask.nii.gz)")
    compare.add_argument("--truth", type=Path, default=None,
                         help="reference labels on the same grid (1 liver, 2 tumour), for a phantom")
    compare.add_argument("--json", type=Path, default=None, help="also write the comparison to this file")

    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    if args.command == "run":
        args.out.mkdir(parents=True, exist_ok=True)
        result = run_in_process(args.series, args.out, args.float64_normalisation, args.threads)
    else:
        result = compare_masks(args.original, args.ours, args.truth)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
