"""DICOM File Meta Information of a received instance, encoded without pydicom.

The SCP writes each received data set to the spool exactly as it arrived, behind a preamble
and a File Meta Information group (PS3.10 section 7.1). Building that group with pydicom's
``FileMetaDataset`` and ``write_file_meta_info`` takes a few hundred microseconds per
instance, so this module encodes the seven elements directly. The bytes are identical to
what pynetdicom 3's ``Event.encoded_dataset()`` writes, so spool files and their SHA-256
do not change with the encoder.
"""

from __future__ import annotations

import logging
import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

logger = logging.getLogger(__name__)

#: 128-byte preamble and the "DICM" prefix that start every DICOM file (PS3.10 7.1).
PREAMBLE_AND_PREFIX = b"\x00" * 128 + b"DICM"

#: File Meta Information Version (0002,0001): version 1, as the two bytes 00H 01H.
FILE_META_INFORMATION_VERSION = b"\x00\x01"

FILE_META_GROUP = 0x0002
GROUP_LENGTH_ELEMENT = 0x0000
VERSION_ELEMENT = 0x0001
MEDIA_STORAGE_SOP_CLASS_ELEMENT = 0x0002
MEDIA_STORAGE_SOP_INSTANCE_ELEMENT = 0x0003
TRANSFER_SYNTAX_ELEMENT = 0x0010
IMPLEMENTATION_CLASS_ELEMENT = 0x0012
IMPLEMENTATION_VERSION_ELEMENT = 0x0013

#: Value representations whose explicit VR header has a 2-byte reserved field and a
#: 4-byte length (PS3.5 7.1.2); the group only uses OB of them.
LONG_LENGTH_VRS = (b"OB",)


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """Encode one group 0002 element in Explicit VR Little Endian."""
    if vr in LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", FILE_META_GROUP, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", FILE_META_GROUP, element, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    """Encode a UI value, padded with one NUL byte to an even length (PS3.5 6.2)."""
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def _text_value(text: str) -> bytes:
    """Encode an SH value, padded with one space to an even length (PS3.5 6.2)."""
    value = text.encode("ascii")
    return value + b" " if len(value) % 2 else value


def encode_file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Encode the preamble, prefix and File Meta Information of one instance.

    Parameters
    ----------
    sop_class_uid : str
        Media Storage SOP Class UID (0002,0002).
    sop_instance_uid : str
        Media Storage SOP Instance UID (0002,0003).
    transfer_syntax_uid : str
        Transfer Syntax UID (0002,0010) the data set that follows is encoded in.

    Returns
    -------
    bytes
        The start of a DICOM file; the encoded data set follows it unchanged.

    Raises
    ------
    UnicodeEncodeError
        When a UID contains non-ASCII characters; callers validate UIDs first.
    """
    elements = b"".join(
        (
            _element(VERSION_ELEMENT, b"OB", FILE_META_INFORMATION_VERSION),
            _element(MEDIA_STORAGE_SOP_CLASS_ELEMENT, b"UI", _uid_value(sop_class_uid)),
            _element(MEDIA_STORAGE_SOP_INSTANCE_ELEMENT, b"UI", _uid_value(sop_instance_uid)),
            _element(TRANSFER_SYNTAX_ELEMENT, b"UI", _uid_value(transfer_syntax_uid)),
            _element(IMPLEMENTATION_CLASS_ELEMENT, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
            _element(
                IMPLEMENTATION_VERSION_ELEMENT, b"SH", _text_value(PYNETDICOM_IMPLEMENTATION_VERSION)
            ),
        )
    )
    group_length = _element(GROUP_LENGTH_ELEMENT, b"UL", struct.pack("<I", len(elements)))
    return PREAMBLE_AND_PREFIX + group_length + elements
