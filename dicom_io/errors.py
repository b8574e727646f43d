"""Exceptions raised by the :mod:`dicom_io` package."""

from __future__ import annotations

from collections.abc import Sequence


class DicomIOError(Exception):
    """Base class of every error raised by :mod:`dicom_io`."""


class SeriesValidationError(DicomIOError):
    """A folder does not contain one valid, reconstructable CT series."""


class UnsupportedSOPClassError(SeriesValidationError):
    """The series uses a SOP class the node cannot read yet (for example Enhanced CT)."""


class ConversionError(DicomIOError):
    """A validated series could not be converted to a volume, or labels could not be mapped back."""


class MissingUIDError(DicomIOError):
    """The source series lacks UIDs that a derived DICOM object must reference.

    Parameters
    ----------
    attributes: Sequence[str]
        Keywords of the missing or empty attributes, for example ``["SOPInstanceUID"]``.
    purpose: str
        What could not be done without them, for example ``"write a DICOM SEG"``.
    """

    def __init__(self, attributes: Sequence[str], purpose: str) -> None:
        self.attributes = list(attributes)
        names = ", ".join(self.attributes)
        super().__init__(
            f"Cannot {purpose}: the source series has missing or empty {names}. "
            "Derived objects must reference the source instances by UID, so assign UIDs "
            "to the series (or have the sender keep them) and send it again."
        )


class SendError(DicomIOError):
    """A C-STORE association could not be established or ended abnormally.

    Parameters
    ----------
    message: str
        What failed, naming the peer and the reason.
    peer: str
        The peer as ``AE_TITLE@host:port``.
    results: Sequence[object], optional
        The :class:`dicom_io.sender.SendResult` items collected before the failure.
    """

    def __init__(self, message: str, *, peer: str, results: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.peer = peer
        self.results = list(results)
