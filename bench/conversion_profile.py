"""Compare the DICOM-to-volume conversion with ``dcm2niix`` on the benchmark series.

Each run starts a fresh Python process that imports :mod:`dicom_io`, calls
:func:`dicom_io.series.load_series` and :func:`dicom_io.convert.series_to_nifti` and prints the
seconds from before the imports to the end of the conversion, like ``conversion()`` in
``bench/run_benchmarks.py``. Right after it, ``dcm2niix -z n -b n`` converts the same series. Both
are repeated ``--runs`` times; the table gives medians, the ratio of the medians and the peak
resident set size (``ru_maxrss``) of each process.

Usage: python -m bench.conversion_profile [--sizes 100,300,600,1000] [--runs 3]
[--cache /tmp/livernode-bench] [--source-root DIR]

``--source-root`` imports ``dicom_io`` from another checkout, for example an older commit
extracted with ``git archive``, to measure before and after a change in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path("/tmp/livernode-bench")
DEFAULT_SIZES = (100, 300, 600, 1000)

CONVERSION_SCRIPT = """\
import time, json
start = time.perf_counter()
from pathlib import Path
from dicom_io.series import load_series
from dicom_io.convert import series_to_nifti
imported = time.perf_counter()
series = load_series(Path({folder!r}))
loaded = time.perf_counter()
image = series_to_nifti(series)
done = time.perf_counter()
print(json.dumps({{"seconds": done - start, "import_s": imported - start, "load_s": loaded - imported,
                  "convert_s": done - loaded, "dtype": str(image.get_data_dtype()),
                  "shape": list(image.shape)}}))
"""


def run_process(
    command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[float, float, str]:
    """Run ``command`` and return its wall seconds, its peak RSS in MiB and its standard output."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd, text=True
    )
    stdout = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:3]} failed with exit status {os.waitstatus_to_exitcode(status)}")
    return seconds, usage.ru_maxrss / 1024.0, stdout


def measure(folder: Path, runs: int, source_root: Path) -> dict[str, object]:
    """Run ours and dcm2niix back to back ``runs`` times on one series folder."""
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    script = CONVERSION_SCRIPT.format(folder=str(folder))
    ours_inner, ours_process, ours_rss, details = [], [], [], []
    theirs, theirs_rss = [], []
    for _ in range(runs):
        # The working directory comes first on sys.path of "python -c", so it selects dicom_io.
        seconds, rss, stdout = run_process([sys.executable, "-c", script], env=env, cwd=source_root)
        result = json.loads(stdout.strip().splitlines()[-1])
        ours_inner.append(result["seconds"])
        ours_process.append(seconds)
        ours_rss.append(rss)
        details.append(result)

        out = Path(tempfile.mkdtemp(prefix="dcm2niix-"))
        try:
            seconds, rss, _ = run_process(
                ["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), "-f", "volume", str(folder)]
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
        theirs.append(seconds)
        theirs_rss.append(rss)

    median_detail = {
        key: statistics.median(float(d[key]) for d in details) for key in ("import_s", "load_s", "convert_s")
    }
    return {
        "ours_s": statistics.median(ours_inner),
        "ours_process_s": statistics.median(ours_process),
        "ours_peak_rss_mib": statistics.median(ours_rss),
        "dcm2niix_s": statistics.median(theirs),
        "dcm2niix_peak_rss_mib": statistics.median(theirs_rss),
        "dtype": details[-1]["dtype"],
        **median_detail,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                        help="comma-separated slice counts of the benchmark series")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per size (median reported)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="folder with the series-512x512xN folders of bench/run_benchmarks.py")
    parser.add_argument("--source-root", type=Path, default=REPO_ROOT,
                        help="folder that contains the dicom_io package to measure")
    args = parser.parse_args()

    print("| slices | ours s (in process, incl. imports) | ours s (whole process) | imports s | load_series s "
          "| series_to_nifti s | dcm2niix s | ratio (in process / dcm2niix) | ratio (whole process) "
          "| ours peak RSS MiB | dcm2niix peak RSS MiB | dtype |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for size in (int(value) for value in args.sizes.split(",")):
        folder = args.cache / f"series-512x512x{size}"
        if not folder.is_dir():
            print(f"| {size} | missing: {folder} (run python -m bench.run_benchmarks once to create it) |")
            continue
        r = measure(folder, args.runs, args.source_root)
        print(
            f"| {size} | {r['ours_s']:.2f} | {r['ours_process_s']:.2f} | {r['import_s']:.2f} | {r['load_s']:.2f} "
            f"| {r['convert_s']:.2f} | {r['dcm2niix_s']:.2f} | {r['ours_s'] / r['dcm2niix_s']:.2f}x "
            f"| {r['ours_process_s'] / r['dcm2niix_s']:.2f}x | {r['ours_peak_rss_mib']:.0f} "
            f"| {r['dcm2niix_peak_rss_mib']:.0f} | {r['dtype']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
