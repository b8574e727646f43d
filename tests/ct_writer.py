"""CT series writers for tests.

The writers live in the product as :mod:`dicom_io.volume_writer`; this module re-exports them
for the existing tests and adds :func:`copy_series`, which only tests need.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dicom_io.volume_writer import (
    BITS_STORED,
    CT_IMAGE_STORAGE,
    LPS_FROM_RAS,
    MAX_STORED_VALUE,
    RESCALE_INTERCEPT,
    RESCALE_SLOPE,
    assign_uids,
    write_ct_series,
)

__all__ = [
    "BITS_STORED",
    "CT_IMAGE_STORAGE",
    "LPS_FROM_RAS",
    "MAX_STORED_VALUE",
    "RESCALE_INTERCEPT",
    "RESCALE_SLOPE",
    "assign_uids",
    "copy_series",
    "write_ct_series",
]


def copy_series(src_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the files of a series unchanged (for tests that must not write to shared data)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(path, out_dir / path.name)) for path in sorted(Path(src_dir).iterdir()) if path.is_file()]
