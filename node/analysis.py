"""The analysis of one series or volume: conversion, networks, SEG and SR, ``result.json``.

``livernode segment`` and the worker both run :func:`segment`. The database is not touched here:
the worker records what this function returns.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from node import __version__
from node.config import Settings
from pipeline.analysis import AnalysisResult, analyse
from pipeline.inference import ModelHandle, bfloat16_supported
from pipeline.settings import AnalysisSettings

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str], None]

#: Peak memory of one forward pass per input voxel, in bytes: the default tiles measured 1.55 GiB
#: (liver, 189 x 162 x 162; 3.42 GiB before the networks kept activations channels-last and
#: convolved the expanding path's input in channel groups) and 1.18 GiB (lesion,
#: 180 x 172 x 86) above the loaded process with torch 2.13 on x86-64 and 2 threads, plus 10 %.
#: ``python -m bench.run_benchmarks`` reports them again.
#: NOTE: other builds and thread counts allocate differently; these are estimates.
PEAK_BYTES_PER_INPUT_VOXEL = {"liver": 370.0, "lesion": 525.0}

#: The same for the bfloat16 copies of the networks: 912 MiB (liver) and 788 MiB (lesion,
#: 164 x 188 x 94) measured the same way, plus 10 %.
PEAK_BYTES_PER_INPUT_VOXEL_BFLOAT16 = {"liver": 212.0, "lesion": 314.0}

ALGORITHM_NAME = "Liver Node liver and liver-tumour segmentation"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class SegmentError(RuntimeError):
    """Raised when an input cannot be analysed; the message names the value and the fix."""


def load_models(settings: Settings) -> tuple[ModelHandle, ModelHandle]:
    """Load the liver and lesion networks, fetching the weights on first use.

    Parameters
    ----------
    settings: Settings
        Service settings; ``weights_cache_dir`` locates the converted weights and
        ``analysis.precision`` selects the memory estimates of float32 or bfloat16 networks.

    Returns
    -------
    tuple[ModelHandle, ModelHandle]
        The liver and the lesion network.

    Raises
    ------
    weights.errors.WeightsUnavailableError
        If the weights are missing and cannot be fetched; the message names
        ``livernode weights fetch``.
    """
    from weights.load import load_model

    peak_bytes = (
        PEAK_BYTES_PER_INPUT_VOXEL_BFLOAT16
        if use_bfloat16(settings.analysis.precision)
        else PEAK_BYTES_PER_INPUT_VOXEL
    )
    handles = []
    for name in ("liver", "lesion"):
        loaded = load_model(name, Path(settings.weights_cache_dir))
        handles.append(
            ModelHandle(
                name=name,
                module=loaded.module,
                voxel_size_mm=tuple(loaded.spec.voxel_size_mm),
                input_size=tuple(loaded.spec.input_size),
                output_size=tuple(loaded.spec.output_size),
                sha256=loaded.sha256,
                peak_bytes_per_input_voxel=peak_bytes[name],
            )
        )
    return handles[0], handles[1]


def use_bfloat16(precision: str) -> bool:
    """Return whether the networks run as bfloat16 copies for ``analysis.precision``."""
    if precision == "auto":
        return bfloat16_supported()
    return precision == "bfloat16"


def algorithm_version(liver: ModelHandle, lesion: ModelHandle) -> str:
    """Return the algorithm version written into SEG and SR: software and weights' SHA-256."""
    return f"{__version__} liver:{liver.sha256[:12]} lesion:{lesion.sha256[:12]}"


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def _write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".result-", suffix=".json")
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        json.dump(content, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, path)


def segment(
    input_path: Path,
    out_dir: Path,
    settings: Settings,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Analyse one CT series folder or NIfTI file and write the results into ``out_dir``.

    Writes ``mask.nii.gz`` (uint8 labels on the input grid), ``result.json`` and, for a DICOM
    series whose UIDs are present, ``seg.dcm`` and ``sr.dcm``.

    Parameters
    ----------
    input_path: Path
        A folder with one CT series, or a ``.nii``/``.nii.gz`` file in HU.
    out_dir: Path
        Output folder; created when missing.
    settings: Settings
        Service settings (analysis section and weights cache).
    progress: Callable[[str], None] | None
        Called with the name of each stage as it starts.

    Returns
    -------
    dict
        The content of ``result.json``.

    Raises
    ------
    SegmentError
        If the input is neither a folder nor a NIfTI file.
    dicom_io.errors.SeriesValidationError
        If the series is not a usable CT series.
    """
    input_path = Path(input_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    series = None

    def stage(name: str) -> None:
        if progress is not None:
            progress(name)

    logger.info("Analysis of %s started", input_path)
    start = time.perf_counter()
    if input_path.is_dir():
        from dicom_io.convert import series_to_nifti
        from dicom_io.series import load_series

        stage("conversion")
        series = load_series(input_path)
        image = series_to_nifti(series)
        seconds["conversion"] = round(time.perf_counter() - start, 3)
        logger.info(
            "Series %s converted: %s voxels", series.series_instance_uid or "(no UID)", image.shape
        )
    elif _is_nifti(input_path):
        stage("conversion")
        image = nib.load(str(input_path))
        seconds["conversion"] = round(time.perf_counter() - start, 3)
    else:
        raise SegmentError(
            f"input {input_path} is neither a folder of DICOM files nor a .nii/.nii.gz file; "
            "pass a series folder or a NIfTI volume"
        )

    stage("loading models")
    liver_model, lesion_model = load_models(settings)
    analysis_settings = AnalysisSettings(
        torch_threads=settings.analysis.torch_threads,
        memory_budget_mb=settings.analysis.memory_budget_mb,
        min_analysable_coverage_mm=settings.analysis.min_analysable_coverage_mm,
        bfloat16=use_bfloat16(settings.analysis.precision),
    )
    logger.info(
        "Networks run in %s (analysis.precision = %s)",
        "bfloat16" if analysis_settings.bfloat16 else "float32", settings.analysis.precision,
    )
    result: AnalysisResult = analyse(image, liver_model, lesion_model, analysis_settings, progress)
    seconds.update(result.stage_seconds)

    mask_path = out_dir / "mask.nii.gz"
    mask_image = nib.Nifti1Image(result.labels.astype(np.uint8), image.affine)
    mask_image.set_data_dtype(np.uint8)
    nib.save(mask_image, str(mask_path))

    outputs: dict[str, str | None] = {"mask": str(mask_path), "seg": None, "sr": None}
    warnings = list(result.warnings)
    if series is not None and result.not_analysable is not None:
        _write_not_analysable_sr(series, result.not_analysable, out_dir, liver_model, lesion_model, outputs, warnings)
    elif series is not None:
        _write_dicom_outputs(
            series, image, result, out_dir, settings, liver_model, lesion_model,
            seconds, outputs, warnings, stage,
        )

    measurements: dict[str, Any] = result.measurements.as_dict()
    if result.not_analysable is not None:
        # No volume of a series the networks did not analyse may reach a report.
        measurements = {key: None for key in measurements}
    content = {
        **measurements,
        "not_analysable": result.not_analysable,
        "coverage_mm": round(result.coverage_mm, 1),
        "warnings": warnings,
        "input": {
            "path": str(input_path),
            "kind": "dicom" if series is not None else "nifti",
            "shape": list(image.shape[:3]),
            "study_instance_uid": getattr(series, "study_instance_uid", None) or None,
            "series_instance_uid": getattr(series, "series_instance_uid", None) or None,
        },
        "models": {
            model.name: {"sha256": model.sha256, "voxel_size_mm": list(model.voxel_size_mm)}
            for model in (liver_model, lesion_model)
        },
        "software_version": __version__,
        "precision": "bfloat16" if analysis_settings.bfloat16 else "float32",
        "stage_seconds": seconds,
        "total_seconds": round(time.perf_counter() - start, 3),
        "peak_rss_mb": result.peak_rss_mb,
        "outputs": outputs,
    }
    _write_json_atomic(out_dir / "result.json", content)
    if result.not_analysable is not None:
        logger.warning("Analysis of %s finished: %s", input_path, result.not_analysable)
        return content
    logger.info(
        "Analysis of %s finished in %.1f s: liver %.1f mL, tumour %.1f mL",
        input_path, content["total_seconds"], content["liver_volume_ml"], content["tumor_volume_ml"],
    )
    return content


def _write_not_analysable_sr(
    series: Any,
    reason: str,
    out_dir: Path,
    liver_model: ModelHandle,
    lesion_model: ModelHandle,
    outputs: dict[str, str | None],
    warnings: list[str],
) -> None:
    """Write ``sr.dcm`` stating that the series is not analysable, or record why it is skipped."""
    from dicom_io.sr_not_analysable import write_not_analysable_sr

    missing = series.missing_uid_attributes()
    if missing:
        message = "SR not written: the source instances lack " + ", ".join(missing)
        logger.warning(message)
        warnings.append(message)
        return
    write_not_analysable_sr(
        series,
        reason,
        out_dir / "sr.dcm",
        algorithm_name=ALGORITHM_NAME,
        algorithm_version=algorithm_version(liver_model, lesion_model),
    )
    outputs["sr"] = str(out_dir / "sr.dcm")


def _write_dicom_outputs(
    series: Any,
    image: nib.Nifti1Image,
    result: AnalysisResult,
    out_dir: Path,
    settings: Settings,
    liver_model: ModelHandle,
    lesion_model: ModelHandle,
    seconds: dict[str, float],
    outputs: dict[str, str | None],
    warnings: list[str],
    stage: ProgressCallback,
) -> None:
    """Write ``seg.dcm`` and ``sr.dcm`` next to the mask, or record why they were skipped."""
    from dicom_io.convert import labels_to_source_frames
    from dicom_io.seg_writer import write_seg
    from dicom_io.sr_writer import write_sr

    missing = series.missing_uid_attributes()
    if missing:
        message = (
            "SEG and SR not written: the source instances lack "
            + ", ".join(missing)
            + "; assign UIDs to the series and run again"
        )
        logger.warning(message)
        warnings.append(message)
        return

    version = algorithm_version(liver_model, lesion_model)
    stage("seg_encode")
    started = time.perf_counter()
    frames = labels_to_source_frames(result.labels, image, series)
    seg = write_seg(
        series,
        frames,
        out_dir / "seg.dcm",
        algorithm_name=ALGORITHM_NAME,
        algorithm_version=version,
        keep_empty_frames=settings.analysis.keep_empty_frames,
    )
    seconds["seg_encode"] = round(time.perf_counter() - started, 3)
    outputs["seg"] = str(out_dir / "seg.dcm")

    stage("sr_encode")
    started = time.perf_counter()
    write_sr(
        series,
        seg,
        result.measurements.as_dict(),
        out_dir / "sr.dcm",
        algorithm_name=ALGORITHM_NAME,
        algorithm_version=version,
        comments=warnings,
    )
    seconds["sr_encode"] = round(time.perf_counter() - started, 3)
    outputs["sr"] = str(out_dir / "sr.dcm")
