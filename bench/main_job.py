"""Seconds per stage and peak memory of ``livernode segment`` on real and resampled real CT.

Inputs: the real 3 mm abdominal CT volume (NIfTI), the same volume written as a DICOM series,
and a 512 x 512 x 300 DICOM series resampled from it (0.8 mm pixels, 1.12 mm slices). Each
input is analysed in a fresh process so that peak memory belongs to that input alone.

Usage: python bench/main_job.py [--cache DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
TOTALSEG = REPO_ROOT.parent / "shared" / "data" / "totalseg-example"

#: The resampled series: 512 x 512 pixels of 0.8 mm (the CT's 366 x 303 mm centred in a 410 mm
#: field of view, air around it) and 300 slices over its 336 mm.
LARGE_PIXELS = 512
LARGE_PIXEL_MM = 0.8
LARGE_SLICES = 300
AIR_HU = -1024

logger = logging.getLogger("bench.main_job")


def resample_to_large(image: nib.Nifti1Image, slices: int = LARGE_SLICES) -> nib.Nifti1Image:
    """Resample ``image`` to 0.8 mm pixels and ``slices`` slices, padded with air to 512 x 512.

    The slices span the whole cranio-caudal extent of ``image``, so more slices are thinner.
    """
    sys.path.insert(0, str(REPO_ROOT))
    from pipeline.resample import resize_volume

    canonical = nib.as_closest_canonical(image)
    data = canonical.get_fdata(dtype=np.float32)
    zooms = np.array(canonical.header.get_zooms()[:3], dtype=float)
    extent = np.array(data.shape) * zooms
    shape = (
        int(round(extent[0] / LARGE_PIXEL_MM)),
        int(round(extent[1] / LARGE_PIXEL_MM)),
        slices,
    )
    resized = resize_volume(data, shape)
    # One new voxel spans `ratio` old voxels; voxel edges of both grids meet at the volume's edge.
    ratio = np.array(data.shape, dtype=float) / np.array(shape, dtype=float)
    affine = canonical.affine.copy()
    affine[:3, :3] = canonical.affine[:3, :3] * ratio
    affine[:3, 3] = (canonical.affine @ np.append((ratio - 1.0) / 2.0, 1.0))[:3]

    padded = np.full((LARGE_PIXELS, LARGE_PIXELS, slices), AIR_HU, dtype=np.int16)
    offset = [(LARGE_PIXELS - shape[0]) // 2, (LARGE_PIXELS - shape[1]) // 2]
    padded[offset[0] : offset[0] + shape[0], offset[1] : offset[1] + shape[1]] = np.rint(resized)
    affine[:3, 3] = (affine @ np.array([-offset[0], -offset[1], 0.0, 1.0]))[:3]
    return nib.Nifti1Image(padded, affine)


def run_segment(input_path: Path, out_dir: Path, config: Path) -> dict:
    """Run ``livernode segment`` in a fresh process and return its ``result.json``."""
    command = [
        sys.executable, "-c", "from node.cli import main; raise SystemExit(main())",
        "--config", str(config), "--log-level", "WARNING", "segment", str(input_path), "--out", str(out_dir),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    result = json.loads((out_dir / "result.json").read_text())
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/livernode-bench"),
                        help="folder for generated series and outputs (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/livernode-test-weights"),
                        help="weights cache folder (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not TOTALSEG.exists():
        print(f"reference data {TOTALSEG} is absent; nothing to measure", file=sys.stderr)
        return 1

    sys.path.insert(0, str(REPO_ROOT))
    from dicom_io.volume_writer import write_ct_series

    args.work.mkdir(parents=True, exist_ok=True)
    config = args.work / "livernode.toml"
    config.write_text(f'data_dir = "{args.work / "data"}"\nweights_cache_dir = "{args.cache}"\n')

    source = nib.load(str(TOTALSEG / "example_ct.nii.gz"))
    inputs = {"example_ct.nii.gz (122 x 101 x 112, 3 mm)": TOTALSEG / "example_ct.nii.gz"}

    series = args.work / "series-example"
    if not series.exists():
        write_ct_series(source, series)
    inputs["DICOM series of it (112 slices)"] = series

    large = args.work / "series-512x512x300"
    if not large.exists():
        write_ct_series(resample_to_large(source), large)
    inputs["DICOM 512 x 512 x 300 resampled from it"] = large

    rows = []
    for label, path in inputs.items():
        logger.info("Analysing %s", label)
        out_dir = args.work / ("out-" + path.name)
        result = run_segment(path, out_dir, config)
        rows.append((label, result))

    stages = ["conversion", "preprocessing", "liver_inference", "tumor_inference", "postprocessing",
              "measurements", "seg_encode", "sr_encode"]
    print(f"\nMachine: {platform.processor() or platform.machine()}, {platform.system()}, "
          f"python {platform.python_version()}, 2 torch threads; date {time.strftime('%Y-%m-%d')}\n")
    print("| input | " + " | ".join(stages) + " | total s | peak RSS MiB | liver mL | tumour mL |")
    print("|---" * (len(stages) + 5) + "|")
    for label, result in rows:
        seconds = result["stage_seconds"]
        cells = [f"{seconds.get(stage, 0.0):.1f}" for stage in stages]
        print(f"| {label} | " + " | ".join(cells)
              + f" | {result['total_seconds']:.1f} | {result['peak_rss_mb']:.0f}"
              + f" | {result['liver_volume_ml']:.1f} | {result['tumor_volume_ml']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
