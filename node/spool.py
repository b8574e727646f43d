"""On-disk spool of received instances.

Layout::

    <spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <spool>/conflicts/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.v<N>.dcm

Every file is written atomically: the bytes go to a temporary file in the target folder,
which is flushed and fsynced and then renamed over the final name, so a reader never sees a
partial file. A later instance with an already stored SOP Instance UID but different bytes
goes under ``conflicts/`` with a version number, so the series folder that the analysis
reads contains exactly one file per SOP Instance UID and no received file is lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: Characters a DICOM UID may contain (PS3.5 section 9.1): digits separated by periods.
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: Maximum length of a DICOM UID (PS3.5, value representation UI).
UID_MAX_LENGTH = 64

CONFLICTS_DIR_NAME = "conflicts"
INSTANCE_SUFFIX = ".dcm"


def sha256_hex(data: bytes) -> str:
    """Return the SHA-256 of ``data`` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def is_valid_uid(value: str) -> bool:
    """Return whether ``value`` is a syntactically valid DICOM UID."""
    return len(value) <= UID_MAX_LENGTH and UID_PATTERN.match(value) is not None


class Spool:
    """Folder tree holding every received instance.

    Parameters
    ----------
    root : Path
        Spool folder; created when missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """Return the folder of one series, which the analysis reads as its input.

        Raises
        ------
        ValueError
            When a UID is not a valid DICOM UID, which also keeps paths inside the spool.
        """
        _require_uid("StudyInstanceUID", study_uid)
        _require_uid("SeriesInstanceUID", series_uid)
        return self.root / study_uid / series_uid

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Return the spool path of one instance."""
        _require_uid("SOPInstanceUID", sop_uid)
        return self.series_dir(study_uid, series_uid) / f"{sop_uid}{INSTANCE_SUFFIX}"

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance, in DICOM file format, atomically to its spool path.

        An existing file of the same name is replaced.

        Parameters
        ----------
        study_uid, series_uid, sop_uid : str
            Study, Series and SOP Instance UIDs of the instance.
        data : bytes
            The complete file: preamble, file meta information and the data set encoded
            in the transfer syntax it was received in.

        Returns
        -------
        Path
            Path of the written file.

        Raises
        ------
        ValueError
            When a UID is invalid.
        OSError
            When the file cannot be written, for example because the disk is full.
        """
        path = self.instance_path(study_uid, series_uid, sop_uid)
        write_atomically(path, data)
        return path

    def store_conflict_version(
        self, study_uid: str, series_uid: str, sop_uid: str, data: bytes
    ) -> Path:
        """Keep a differing copy of an already stored instance under a versioned name.

        The first free name ``<sop>.v<N>.dcm`` with N = 2, 3, ... in the conflicts folder
        is used. When one of the existing versions already has the same bytes, its path is
        returned and nothing is written.

        Returns
        -------
        Path
            Path of the stored or already present version.
        """
        _require_uid("SOPInstanceUID", sop_uid)
        _require_uid("StudyInstanceUID", study_uid)
        _require_uid("SeriesInstanceUID", series_uid)
        folder = self.root / CONFLICTS_DIR_NAME / study_uid / series_uid
        digest = sha256_hex(data)

        version = 2
        while True:
            candidate = folder / f"{sop_uid}.v{version}{INSTANCE_SUFFIX}"
            if not candidate.exists():
                write_atomically(candidate, data)
                return candidate
            if sha256_hex(candidate.read_bytes()) == digest:
                return candidate
            version += 1


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` contains either nothing or all of it.

    The data is written to a temporary file in the same folder, fsynced and renamed over
    ``path`` with :func:`os.replace`; the folder is fsynced afterwards so the rename
    survives a power loss.

    Raises
    ------
    OSError
        When writing, syncing or renaming fails; the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)

    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise

    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        # Some platforms cannot open folders; the file itself is already synced.
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _require_uid(keyword: str, value: str) -> None:
    if not is_valid_uid(value):
        raise ValueError(
            f"{keyword} {value!r} is not a valid DICOM UID: expected up to {UID_MAX_LENGTH} "
            "characters of digits separated by periods"
        )
