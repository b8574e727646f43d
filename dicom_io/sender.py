"""Sending DICOM files to a peer with a C-STORE SCU association."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import code_to_category

from dicom_io.errors import SendError

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000

# A presentation context carries one abstract syntax; an association carries at most 128.
MAX_PRESENTATION_CONTEXTS = 128


@dataclass(frozen=True)
class SendResult:
    """Outcome of the C-STORE request for one file.

    Attributes
    ----------
    path: pathlib.Path
        The file that was sent.
    sop_class_uid: str
        SOP Class UID of the instance.
    sop_instance_uid: str
        SOP Instance UID of the instance.
    status: int | None
        The C-STORE response status, or None when no response arrived or the request could not
        be sent.
    category: str
        pynetdicom's status category: "Success", "Warning", "Failure", "Cancel", "Pending" or
        "Unknown"; "Failure" also when no response arrived.
    message: str
        Details for a status other than success.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    status: int | None
    category: str
    message: str = ""

    @property
    def stored(self) -> bool:
        """True when the peer stored the instance (status category Success or Warning)."""
        return self.category in ("Success", "Warning")


@dataclass(frozen=True)
class _FileHeader:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _read_header(path: Path) -> _FileHeader:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    file_meta = dataset.file_meta
    sop_class_uid = str(dataset.get("SOPClassUID", "") or file_meta.get("MediaStorageSOPClassUID", ""))
    sop_instance_uid = str(dataset.get("SOPInstanceUID", "") or file_meta.get("MediaStorageSOPInstanceUID", ""))
    transfer_syntax_uid = str(file_meta.get("TransferSyntaxUID", ""))
    for keyword, value in (
        ("SOPClassUID", sop_class_uid),
        ("SOPInstanceUID", sop_instance_uid),
        ("TransferSyntaxUID", transfer_syntax_uid),
    ):
        if not value:
            raise ValueError(f"{path} has no {keyword}; it cannot be sent with C-STORE.")
    return _FileHeader(path, sop_class_uid, sop_instance_uid, transfer_syntax_uid)


def _requested_contexts(headers: Sequence[_FileHeader]) -> dict[str, list[str]]:
    """Map each SOP class to the transfer syntaxes of the files that use it."""
    contexts: dict[str, list[str]] = {}
    for header in headers:
        syntaxes = contexts.setdefault(header.sop_class_uid, [])
        if header.transfer_syntax_uid not in syntaxes:
            syntaxes.append(header.transfer_syntax_uid)
    return contexts


def send_files(
    paths: Sequence[Path],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str = "LIVERNODE",
    timeout_s: float = 30,
) -> list[SendResult]:
    """Send DICOM files to a Storage SCP over one association.

    The association requests one presentation context per SOP class found in the files, with
    the transfer syntaxes those files are encoded in, so files are sent as stored, without
    transcoding.

    Parameters
    ----------
    paths: Sequence[pathlib.Path]
        DICOM files in DICOM file format (with file meta information).
    ae_title: str
        Called AE title of the peer.
    host: str
        Host name or IP address of the peer.
    port: int
        TCP port of the peer.
    calling_ae_title: str, optional
        AE title of this node.
    timeout_s: float, optional
        ACSE, DIMSE and network timeout in seconds.

    Returns
    -------
    list[SendResult]
        One result per file, in the order of ``paths``. Check :attr:`SendResult.stored`.

    Raises
    ------
    SendError
        When the association is rejected, aborted, or cannot be established, or when it is
        aborted while files are being sent. ``SendError.results`` contains the results so far.
    ValueError
        When a file lacks SOPClassUID, SOPInstanceUID or TransferSyntaxUID, or when the files
        need more than 128 presentation contexts.
    """
    paths = [Path(path) for path in paths]
    peer = f"{ae_title}@{host}:{port}"
    if not paths:
        logger.info("No files to send to %s", peer)
        return []

    headers = [_read_header(path) for path in paths]
    contexts = _requested_contexts(headers)
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"The files use {len(contexts)} SOP classes; one association supports at most "
            f"{MAX_PRESENTATION_CONTEXTS} presentation contexts. Send them in several calls."
        )

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class_uid, transfer_syntaxes in contexts.items():
        ae.add_requested_context(sop_class_uid, transfer_syntaxes)

    # The A-ASSOCIATE response carries the rejection result, source and reason; pynetdicom
    # only logs them, so keep the primitive for the error message.
    responses: list[A_ASSOCIATE] = []
    connections: list[str] = []

    def keep_associate_response(event: evt.Event) -> None:
        if isinstance(event.primitive, A_ASSOCIATE) and event.primitive.result is not None:
            responses.append(event.primitive)

    def keep_connection(event: evt.Event) -> None:
        connections.append(str(event.address))

    logger.info("Opening association to %s to send %d file(s)", peer, len(paths))
    assoc = ae.associate(
        host,
        port,
        ae_title=ae_title,
        evt_handlers=[(evt.EVT_ACSE_RECV, keep_associate_response), (evt.EVT_CONN_OPEN, keep_connection)],
    )
    if not assoc.is_established:
        reason = _association_failure_reason(assoc, responses, connected=bool(connections))
        logger.error("Association to %s %s", peer, reason)
        raise SendError(
            f"Association to {peer} {reason}. Check the peer's host, port, AE title and "
            "accepted SOP classes.",
            peer=peer,
        )

    results: list[SendResult] = []
    try:
        for header in headers:
            results.append(_send_one(assoc, header, peer))
            if assoc.is_aborted or not assoc.is_established:
                raise SendError(
                    f"Association to {peer} was aborted after {len(results)} of {len(headers)} "
                    f"file(s); the last was SOPInstanceUID {header.sop_instance_uid}.",
                    peer=peer,
                    results=results,
                )
    finally:
        if assoc.is_established:
            assoc.release()

    stored = sum(result.stored for result in results)
    logger.info("Released association to %s: %d of %d file(s) stored", peer, stored, len(results))
    return results


def _association_failure_reason(assoc: Association, responses: list[A_ASSOCIATE], *, connected: bool) -> str:
    """Describe why an association was not established, for logs and SendError."""
    if not connected:
        return "could not connect (connection refused, host unreachable or connection timed out)"
    if assoc.is_rejected and responses:
        response = responses[-1]
        return f"was rejected ({response.result_str}, source {response.source_str}: {response.reason_str})"
    if assoc.is_rejected:
        return "was rejected"
    if responses and responses[-1].result == 0:
        return "was aborted because the peer accepted none of the presentation contexts"
    if assoc.is_aborted:
        return "was aborted by the peer or the network"
    return "was not established (no A-ASSOCIATE response before the timeout)"


def _send_one(assoc: Association, header: _FileHeader, peer: str) -> SendResult:
    logger.info(
        "Sending SOPInstanceUID %s (SOP class %s) to %s", header.sop_instance_uid, header.sop_class_uid, peer
    )
    try:
        status_dataset = assoc.send_c_store(header.path)
    except ValueError as error:
        # pynetdicom raises ValueError when no accepted context matches the file.
        logger.error("Could not send SOPInstanceUID %s to %s: %s", header.sop_instance_uid, peer, error)
        return SendResult(
            header.path, header.sop_class_uid, header.sop_instance_uid, None, "Failure", str(error)
        )

    if "Status" not in status_dataset:
        message = "no C-STORE response (connection timed out, was aborted or the response was invalid)"
        logger.error("SOPInstanceUID %s to %s: %s", header.sop_instance_uid, peer, message)
        return SendResult(header.path, header.sop_class_uid, header.sop_instance_uid, None, "Failure", message)

    status = int(status_dataset.Status)
    category = code_to_category(status)
    comment = str(status_dataset.get("ErrorComment", "") or "")
    message = "" if status == STATUS_SUCCESS else f"status 0x{status:04X} ({category}) {comment}".strip()
    if status == STATUS_SUCCESS:
        logger.info("Stored SOPInstanceUID %s at %s", header.sop_instance_uid, peer)
    elif category == "Warning":
        logger.warning("SOPInstanceUID %s stored at %s with %s", header.sop_instance_uid, peer, message)
    else:
        logger.error("SOPInstanceUID %s not stored at %s: %s", header.sop_instance_uid, peer, message)
    return SendResult(header.path, header.sop_class_uid, header.sop_instance_uid, status, category, message)
