"""dicom2nifti as an independent reference for :func:`dicom_io.convert.series_to_nifti`.

The node converts series with its own reader. This module runs dicom2nifti (2.6) on the same
files, so tests can check that both give the same HU and the same affine. dicom2nifti is
imported only when :func:`convert_with_dicom2nifti` runs, because importing it (it pulls in
scipy.ndimage) costs about 0.3 s.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pydicom

from dicom_io.errors import ConversionError
from dicom_io.series import CTSeries

logger = logging.getLogger(__name__)


def convert_with_dicom2nifti(series: CTSeries) -> nib.Nifti1Image:
    """Convert ``series`` with dicom2nifti and return a RAS+ float32 image of HU.

    The files of ``series`` are read again with their pixel data, in the order of
    ``series.datasets``. dicom2nifti 2.6 rescales PixelPaddingValue pixels like tissue, while
    :func:`dicom_io.convert.series_to_nifti` sets them to air, so the two agree only on series
    without padding.

    Parameters
    ----------
    series: CTSeries
        A series returned by :func:`dicom_io.series.load_series`.

    Returns
    -------
    nibabel.Nifti1Image
        dicom2nifti's volume reoriented with :func:`nibabel.as_closest_canonical`, as float32.

    Raises
    ------
    ConversionError
        When dicom2nifti rejects the series (for example fewer than 4 slices, or gaps).
    """
    import dicom2nifti.convert_dicom

    datasets = [pydicom.dcmread(path) for path in series.files]
    try:
        # reorient_nifti=False because dicom2nifti 2.6 writes the reoriented image to
        # output_file and fails when that is None; reorientation happens below with nibabel.
        result = dicom2nifti.convert_dicom.dicom_array_to_nifti(datasets, None, reorient_nifti=False)
    except Exception as error:  # dicom2nifti raises plain exceptions as well as its own
        logger.info(
            "dicom2nifti did not convert series %s (%s: %s)",
            series.series_instance_uid or "<no SeriesInstanceUID>",
            type(error).__name__,
            error,
        )
        raise ConversionError(
            f"dicom2nifti could not convert series {series.series_instance_uid or '<no UID>'} "
            f"({type(error).__name__}: {error})."
        ) from error

    canonical = nib.as_closest_canonical(result["NII"])
    return nib.Nifti1Image(np.asarray(canonical.dataobj, dtype=np.float32), canonical.affine)
