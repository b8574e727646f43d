"""Logging configuration of the ``livernode`` command: one stderr handler."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Third-party loggers that are verbose at INFO; they log at WARNING unless the level is DEBUG.
QUIET_LOGGERS = ("pynetdicom", "apscheduler", "alembic", "highdicom")


class CurrentStderrHandler(logging.StreamHandler):
    """Stream handler that writes to ``sys.stderr`` as it is when a record is emitted.

    Test runners and daemon wrappers replace ``sys.stderr``; a handler bound to the stream
    of its creation time would then write to a closed file.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """Ignore the stream set by ``StreamHandler.__init__``."""


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

    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))

    # Replace only a handler installed by an earlier call, so that handlers of the embedding
    # program (pytest's log capture, for one) stay in place.
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, CurrentStderrHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(name)

    third_party_level = logging.DEBUG if name == "DEBUG" else logging.WARNING
    for logger_name in QUIET_LOGGERS:
        logging.getLogger(logger_name).setLevel(third_party_level)
