"""Logging configuration of the ``livernode`` command: one stderr handler."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Third-party loggers that are verbose at INFO; they log at WARNING unless the level is DEBUG.
QUIET_LOGGERS = ("pynetdicom", "apscheduler")


def configure_logging(level: str = "INFO") -> None:
    """Send log records of ``level`` and above to stderr with time, level and logger name.

    Parameters
    ----------
    level : str
        One of DEBUG, INFO, WARNING, ERROR, CRITICAL (case-insensitive).

    Raises
    ------
    ValueError
        When ``level`` is not one of those names.
    """
    name = level.upper()
    if name not in LOG_LEVELS:
        raise ValueError(f"Invalid log level {level!r}: use one of {', '.join(LOG_LEVELS)}")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))

    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(name)

    third_party_level = logging.DEBUG if name == "DEBUG" else logging.WARNING
    for logger_name in QUIET_LOGGERS:
        logging.getLogger(logger_name).setLevel(third_party_level)
