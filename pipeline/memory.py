"""Resident memory of this process: the current value and the peak over a block of work."""

from __future__ import annotations

import logging
import os
import resource
import threading
from types import TracebackType

logger = logging.getLogger(__name__)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"

#: Interval between two readings of the resident memory, in seconds.
SAMPLE_INTERVAL_S = 0.05


def current_rss_mb() -> float:
    """Return the resident memory of this process now, in MiB.

    Reads ``/proc/self/statm``; where it does not exist, returns the peak so far instead.
    """
    try:
        with open(_STATM, encoding="ascii") as stream:
            resident_pages = int(stream.read().split()[1])
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return resident_pages * _PAGE_SIZE / 2**20


class PeakRssSampler:
    """Context manager that records the peak resident memory while its block runs.

    A background thread reads the resident memory every :data:`SAMPLE_INTERVAL_S`, so a peak
    shorter than that may be missed; the process-wide peak (``ru_maxrss``) covers the whole
    life of a long-running worker and cannot answer for one analysis.
    """

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def __enter__(self) -> PeakRssSampler:
        self.peak_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())
