"""On-disk spool of received instances.

Layout::

    <spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <spool>/conflicts/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.v<N>.dcm

Every file is written atomically: the bytes go to a temporary file in the target folder,
which is flushed and fsynced and then renamed over the final name, so a reader never sees a
partial file.

Received instances (:meth:`Spool.store_received`) skip the folder fsync after the rename,
which would cost a second journal commit per instance. Their temporary file is named
``.<SOPInstanceUID>.<SHA-256>.part`` instead, so a crash between the rename and the next
journal commit leaves a file whose content can be checked against its name:
:meth:`Spool.recover_received_files` renames such complete files into place at node start
and deletes partial ones, which were never acknowledged. A later instance with an already stored SOP Instance UID but different bytes
goes under ``conflicts/`` with a version number, so the series folder that the analysis
reads contains exactly one file per SOP Instance UID and no received file is lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: Characters a DICOM UID may contain (PS3.5 section 9.1): digits separated by periods.
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: Maximum length of a DICOM UID (PS3.5, value representation UI).
UID_MAX_LENGTH = 64

CONFLICTS_DIR_NAME = "conflicts"
INSTANCE_SUFFIX = ".dcm"
TEMPORARY_SUFFIX = ".part"

#: Name of the temporary file of a received instance: ``.<SOPInstanceUID>.<SHA-256>.part``.
RECEIVED_TEMPORARY_PATTERN = re.compile(r"^\.(?P<sop_uid>[0-9.]+)\.(?P<sha256>[0-9a-f]{64})\.part$")


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
        # Series folders known to exist with a synced entry in their parent, so that
        # store_received creates and syncs each folder once per process.
        self._ready_folders: set[Path] = set()

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

    def store_received(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        parts: Sequence[bytes | memoryview],
        sha256: str,
    ) -> Path:
        """Write one received instance to its spool path with a single fsync.

        The parts go to ``.<sop_uid>.<sha256>.part`` in the series folder, which is fsynced
        and then renamed to ``<sop_uid>.dcm``. The rename is not synced, so a crash before
        the next journal commit may keep the temporary name. :meth:`recover_received_files`
        then completes the rename at the next start, because the content matches the
        SHA-256 in the name.

        NOTE: this relies on the file system making a new file's directory entry durable
        with the file's own fsync, as journaling file systems such as ext4 and XFS do.

        Parameters
        ----------
        study_uid, series_uid, sop_uid : str
            Study, Series and SOP Instance UIDs of the instance.
        parts : sequence of bytes or memoryview
            The file in pieces, typically the encoded file header and the data set as
            received, written one after the other.
        sha256 : str
            SHA-256 of the concatenated parts, as 64 lowercase hex digits.

        Returns
        -------
        Path
            Path of the written file.

        Raises
        ------
        ValueError
            When a UID or the SHA-256 is invalid.
        OSError
            When the file cannot be written, for example because the disk is full.
        """
        path = self.instance_path(study_uid, series_uid, sop_uid)
        if len(sha256) != 64:
            raise ValueError(f"invalid SHA-256 {sha256!r}: expected 64 lowercase hex digits")
        folder = path.parent
        if folder not in self._ready_folders:
            _make_folders_durable(folder, self.root)
            self._ready_folders.add(folder)

        temporary = folder / f".{sop_uid}.{sha256}{TEMPORARY_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            descriptor = os.open(temporary, flags, 0o644)
        except FileNotFoundError:
            # The folder was removed after this process created it; create it again.
            logger.warning("Spool folder %s not found; creating it again", folder)
            self._ready_folders.discard(folder)
            _make_folders_durable(folder, self.root)
            self._ready_folders.add(folder)
            descriptor = os.open(temporary, flags, 0o644)
        try:
            try:
                _write_all(descriptor, parts)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return path

    def recover_received_files(self) -> tuple[list[Path], list[Path]]:
        """Finish or remove the temporary files of received instances left by a crash.

        A ``.<sop>.<sha256>.part`` file whose content has that SHA-256 was fsynced before
        its instance was acknowledged, so it is renamed to ``<sop>.dcm``. Any other
        temporary file in a series folder was never acknowledged and is deleted.

        Returns
        -------
        tuple of (list of Path, list of Path)
            Instance files completed from their temporary file, and temporary files deleted.
        """
        completed: list[Path] = []
        deleted: list[Path] = []
        for temporary in sorted(self.root.glob(f"*/*/.*{TEMPORARY_SUFFIX}")):
            match = RECEIVED_TEMPORARY_PATTERN.match(temporary.name)
            if match is not None and sha256_hex(temporary.read_bytes()) == match["sha256"]:
                final = temporary.parent / f"{match['sop_uid']}{INSTANCE_SUFFIX}"
                os.replace(temporary, final)
                _fsync_directory(temporary.parent)
                logger.warning(
                    "Completed the spool file of SOP instance %s from %s, left by a stop "
                    "between its fsync and its rename",
                    match["sop_uid"],
                    temporary.name,
                )
                completed.append(final)
                continue
            temporary.unlink()
            logger.warning(
                "Deleted the partial spool file %s because it was being written when the "
                "node stopped, so its instance was never acknowledged",
                temporary,
            )
            deleted.append(temporary)
        return completed, deleted

    def instance_files(self) -> Iterator[tuple[str, str, Path]]:
        """Yield ``(study_uid, series_uid, path)`` of every instance file in the spool.

        Conflicting versions under ``conflicts/`` and temporary files are left out.
        """
        for study_dir in sorted(self.root.iterdir()):
            if study_dir.name == CONFLICTS_DIR_NAME or not study_dir.is_dir():
                continue
            if not is_valid_uid(study_dir.name):
                continue
            for series_dir in sorted(study_dir.iterdir()):
                if not series_dir.is_dir() or not is_valid_uid(series_dir.name):
                    continue
                for path in sorted(series_dir.glob(f"*{INSTANCE_SUFFIX}")):
                    if not path.name.startswith(".") and is_valid_uid(path.stem):
                        yield study_dir.name, series_dir.name, path

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


def _write_all(descriptor: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write every byte of ``parts`` to ``descriptor``, continuing after short writes."""
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            written = os.write(descriptor, view)
            view = view[written:]


def _make_folders_durable(folder: Path, root: Path) -> None:
    """Create ``folder`` and its missing parents below ``root``, syncing each new entry."""
    missing = []
    current = folder
    while current != root and not current.is_dir():
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        _fsync_directory(created.parent)


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
