"""Header-only reading of CT instances and decoding of one instance's stored pixel values.

:func:`read_header` parses a file up to and including the Pixel Data element header but leaves
the pixel values on disk, so a series of 1000 slices costs its headers in memory, not its 500
MB of pixel data. :func:`read_stored_frame` later reads the values of one instance, either
straight from the file into a caller's buffer (uncompressed little endian 16-bit data) or
through pydicom's pixel data decoders (compressed transfer syntaxes and everything else).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array as decode_pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

logger = logging.getLogger(__name__)

#: Tag of (7FE0,0010) Pixel Data.
PIXEL_DATA_TAG = 0x7FE00010

#: Values longer than this many bytes stay on disk while the header is parsed; pydicom reads
#: them only when the element is accessed. Pixel Data is always longer in a CT image.
HEADER_DEFER_SIZE_BYTES = 1024

#: Transfer syntaxes whose Pixel Data value is the little endian stored values as they are,
#: so they can be read straight into an array.
NATIVE_LITTLE_ENDIAN_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})

#: Value of an undefined length in a data element header (encapsulated Pixel Data).
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class PixelDataLocation:
    """Location of the Pixel Data value of one instance in its file.

    Attributes
    ----------
    offset: int
        Byte offset of the first value byte from the start of the file.
    length: int
        Value length in bytes; :data:`UNDEFINED_LENGTH` for encapsulated (compressed) data.
    """

    offset: int
    length: int

    @property
    def is_encapsulated(self) -> bool:
        """Whether the value is a sequence of fragments (compressed transfer syntax)."""
        return self.length == UNDEFINED_LENGTH


def read_header(path: Path) -> tuple[Dataset, PixelDataLocation | None]:
    """Read one DICOM file without keeping its pixel data.

    The dataset keeps every other element. Pixel Data is removed from it, so nothing that
    iterates the dataset later (copies for derived objects, for example) can load it again.

    Parameters
    ----------
    path: pathlib.Path
        A DICOM Part 10 file.

    Returns
    -------
    tuple[pydicom.dataset.Dataset, PixelDataLocation | None]
        The dataset without Pixel Data and the location of its Pixel Data value, or None when
        the file has no Pixel Data element.

    Raises
    ------
    pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError
        When the file is not a readable DICOM file (raised by :func:`pydicom.dcmread`).
    """
    dataset = pydicom.dcmread(path, defer_size=HEADER_DEFER_SIZE_BYTES)
    if PIXEL_DATA_TAG not in dataset:
        return dataset, None

    # keep_deferred returns the raw element without reading a deferred value from the file.
    raw = dataset.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    location = PixelDataLocation(offset=int(raw.value_tell), length=int(raw.length))
    del dataset[PIXEL_DATA_TAG]
    return dataset, location


def stored_dtype_of(dataset: Dataset) -> np.dtype:
    """Return the array dtype pydicom gives the stored values of a 16-bit monochrome instance."""
    return np.dtype(np.int16 if int(dataset.get("PixelRepresentation", 0) or 0) == 1 else np.uint16)


def can_read_directly(dataset: Dataset, location: PixelDataLocation | None) -> bool:
    """Return whether :func:`read_stored_frame` can copy the stored values straight from the file.

    True for a single-frame, one-sample, 16-bit instance in Explicit or Implicit VR Little
    Endian whose Pixel Data length is exactly Rows x Columns x 2 bytes. Everything else goes
    through pydicom's decoders.
    """
    if location is None or location.is_encapsulated:
        return False

    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if transfer_syntax not in NATIVE_LITTLE_ENDIAN_SYNTAXES:
        return False

    if int(dataset.get("BitsAllocated", 0) or 0) != 16 or int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        return False
    if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
        return False
    return location.length == int(dataset.Rows) * int(dataset.Columns) * 2


def read_stored_frame(
    path: Path, dataset: Dataset, location: PixelDataLocation | None, out: np.ndarray | None = None
) -> np.ndarray:
    """Return the stored values of one instance as pydicom's ``pixel_array`` would give them.

    The values are signed or unsigned from PixelRepresentation, and bits above BitsStored are
    cleared (unsigned) or filled with the sign bit (signed), as pydicom 3 does for native data.

    Parameters
    ----------
    path: pathlib.Path
        The file of the instance.
    dataset: pydicom.dataset.Dataset
        Its header, from :func:`read_header`.
    location: PixelDataLocation | None
        Its Pixel Data location, from :func:`read_header`; None makes pydicom find it.
    out: numpy.ndarray, optional
        A C-contiguous ``(Rows, Columns)`` array of :func:`stored_dtype_of` ``(dataset)``. When
        the values can be read directly (:func:`can_read_directly`), they are read into it and
        it is returned. Otherwise a new array is returned and ``out`` is left unchanged.

    Returns
    -------
    numpy.ndarray
        A ``(Rows, Columns)`` integer array of stored values.

    Raises
    ------
    ValueError, OSError, RuntimeError, NotImplementedError
        When the file is shorter than its Pixel Data length or pydicom cannot decode it, for
        example when no plugin for its transfer syntax is installed.
    """
    if not can_read_directly(dataset, location):
        # pydicom reads only the elements it needs from the file, then decodes one frame.
        return decode_pixel_array(str(path))

    rows, columns = int(dataset.Rows), int(dataset.Columns)
    dtype = stored_dtype_of(dataset)
    if out is None or out.shape != (rows, columns) or out.dtype != dtype or not out.flags.c_contiguous:
        out = np.empty((rows, columns), dtype=dtype)

    with open(path, "rb", buffering=0) as handle:
        handle.seek(location.offset)
        count = handle.readinto(memoryview(out).cast("B"))
    if count != location.length:
        raise ValueError(
            f"{path} ends after {count} of the {location.length} bytes of its Pixel Data value; "
            "the file is truncated, send the instance again."
        )

    bits_stored = int(dataset.get("BitsStored", 16) or 16)
    if bits_stored < 16:
        # Left then right shift: arithmetic for int16 (sign extension), logical for uint16.
        shift = 16 - bits_stored
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)
    return out
