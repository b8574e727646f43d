"""Time our DICOM SEG encoding against dcmqi ``itkimage2segimage`` on the same mask and series.

Ours is ``labels_to_source_frames`` + ``write_seg``, timed in a fresh Python process after the
series, the converted image and the mask are loaded, as ``seg_encoding()`` in
``bench/run_benchmarks.py`` does. ``itkimage2segimage`` is timed as a whole process, so its
time also includes reading the series and the mask. Each run measures ours with empty frames
kept, ours with empty frames omitted and ``itkimage2segimage`` back to back. The table gives the
medians over the runs and the file sizes.

``--source-root`` times the ``dicom_io`` package of another checkout, for example an export of
an earlier commit made with ``git archive``, so that before and after are measured in one run.
``--profile`` prints the cProfile listing of one encoding per size instead.

Usage: python bench/seg_profile.py --mask 300=PATH [--mask 1000=PATH] [--runs 3]
       [--cache /tmp/livernode-bench] [--source-root DIR] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.run_benchmarks import DCMQI_METADATA, DEFAULT_DCMQI_BIN  # noqa: E402

DEFAULT_CACHE = Path("/tmp/livernode-bench")
DEFAULT_RUNS = 3
PROFILE_LINES = 40

# Runs in a fresh interpreter with the checkout to time first on sys.path. Arguments: source
# root, series folder, mask path, output path, "keep" or "omit", "time" or "profile".
ENCODE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import cProfile, json, pathlib, pstats, time
import nibabel as nib, numpy as np
from dicom_io.series import load_series
from dicom_io.convert import series_to_nifti, labels_to_source_frames
from dicom_io.seg_writer import write_seg

series = load_series(pathlib.Path(sys.argv[2]))
image = series_to_nifti(series)
labels = np.asarray(nib.load(sys.argv[3]).dataobj, dtype=np.uint8)
profiler = cProfile.Profile() if sys.argv[6] == "profile" else None
if profiler is not None:
    profiler.enable()
started = time.perf_counter()
frames = labels_to_source_frames(labels, image, series)
sampled = time.perf_counter()
seg = write_seg(series, frames, pathlib.Path(sys.argv[4]), algorithm_name="Liver Node",
                algorithm_version="bench", keep_empty_frames=sys.argv[5] == "keep")
finished = time.perf_counter()
if profiler is not None:
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(int(sys.argv[7]))
print(json.dumps({"seconds": finished - started, "frames_seconds": sampled - started,
                  "number_of_frames": int(seg.NumberOfFrames)}))
"""


def encode_ours(source_root: Path, series: Path, mask: Path, output: Path, keep_empty_frames: bool,
                profile: bool = False) -> dict[str, Any]:
    """Encode ``mask`` as a SEG of ``series`` in a fresh process; return its seconds and frame count.

    Raises
    ------
    subprocess.CalledProcessError
        When the encoding process fails; its standard error is attached.
    """
    command = [sys.executable, "-c", ENCODE_SCRIPT, str(source_root), str(series), str(mask), str(output),
               "keep" if keep_empty_frames else "omit", "profile" if profile else "time", str(PROFILE_LINES)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    if profile:
        print(completed.stderr)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["size_mib"] = output.stat().st_size / 2**20
    return result


def encode_dcmqi(dcmqi_bin: Path, series: Path, mask: Path, metadata: Path, output: Path) -> dict[str, Any]:
    """Run ``itkimage2segimage`` on ``mask`` and ``series``; return its wall seconds and file size.

    Raises
    ------
    subprocess.CalledProcessError
        When ``itkimage2segimage`` exits with a non-zero status.
    """
    started = time.perf_counter()
    subprocess.run([str(dcmqi_bin / "itkimage2segimage"), "--inputImageList", str(mask),
                    "--inputDICOMDirectory", str(series), "--outputDICOM", str(output),
                    "--inputMetadata", str(metadata)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    return {"seconds": time.perf_counter() - started, "size_mib": output.stat().st_size / 2**20}


def compare(slices: int, mask: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Measure ours (empty frames kept and omitted) and ``itkimage2segimage`` ``args.runs`` times."""
    series = args.cache / f"series-512x512x{slices}"
    metadata = work / "dcmqi-meta.json"
    metadata.write_text(json.dumps(DCMQI_METADATA))
    runs: dict[str, list[dict[str, Any]]] = {"keep": [], "omit": [], "dcmqi": []}
    for _ in range(args.runs):
        runs["keep"].append(encode_ours(args.source_root, series, mask, work / "ours-keep.dcm", True))
        runs["omit"].append(encode_ours(args.source_root, series, mask, work / "ours-omit.dcm", False))
        runs["dcmqi"].append(encode_dcmqi(args.dcmqi_bin, series, mask, metadata, work / "dcmqi.dcm"))

    summary: dict[str, Any] = {"slices": slices, "runs": args.runs}
    for name, results in runs.items():
        summary[name] = {
            "median_s": statistics.median(result["seconds"] for result in results),
            "all_s": [round(result["seconds"], 3) for result in results],
            "size_mib": results[-1]["size_mib"],
        }
        if "number_of_frames" in results[-1]:
            summary[name]["number_of_frames"] = results[-1]["number_of_frames"]
            summary[name]["frames_median_s"] = statistics.median(result["frames_seconds"] for result in results)
    for name in ("keep", "omit"):
        summary[name]["ratio_to_dcmqi"] = summary[name]["median_s"] / summary["dcmqi"]["median_s"]
    return summary


def parse_masks(values: list[str]) -> dict[int, Path]:
    """Parse ``SLICES=PATH`` options into a mapping from slice count to mask path."""
    masks: dict[int, Path] = {}
    for value in values:
        slices, separator, path = value.partition("=")
        if not separator or not slices.isdigit():
            raise SystemExit(f"--mask {value!r} is invalid; write SLICES=PATH, for example 300=/tmp/mask.nii.gz")
        masks[int(slices)] = Path(path)
    return masks


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or the profile) and print one JSON summary per size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask", action="append", required=True,
                        help="SLICES=PATH: the label mask (NIfTI on the converted series' grid) for series-512x512xSLICES")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per size; medians are reported")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder with the series-512x512xN series")
    parser.add_argument("--dcmqi-bin", type=Path, default=DEFAULT_DCMQI_BIN, help="folder with itkimage2segimage")
    parser.add_argument("--source-root", type=Path, default=REPO_ROOT, help="checkout whose dicom_io is timed")
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing of one encoding per size")
    args = parser.parse_args(argv)

    masks = parse_masks(args.mask)
    with tempfile.TemporaryDirectory(prefix="seg-profile-") as temporary:
        work = Path(temporary)
        for slices, mask in sorted(masks.items()):
            series = args.cache / f"series-512x512x{slices}"
            if args.profile:
                for keep in (True, False):
                    result = encode_ours(args.source_root, series, mask, work / "ours.dcm", keep, profile=True)
                    print(json.dumps({"slices": slices, "keep_empty_frames": keep, **result}))
                continue
            print(json.dumps(compare(slices, mask, args, work)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
