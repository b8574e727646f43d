"""Sending DICOM files to a peer with a C-STORE SCU association."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import code_to_category

from dicom_io.errors import SendError

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000

# A presentation context carries one abstract syntax; an association carries at most 128.
MAX_PRESENTATION_CONTEXTS = 128

#: Uncompressed transfer syntaxes proposed for every SOP class besides the files' own, in
#: order of preference. Implicit VR Little Endian is the default every SCP must accept.
FALLBACK_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


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


def _requested_contexts(headers: Sequence[_FileHeader]) -> list[tuple[str, str]]:
    """Return the (SOP class, transfer syntax) pairs to propose, one presentation context each.

    Each SOP class is proposed with the transfer syntax of every file that uses it, plus the
    uncompressed :data:`FALLBACK_TRANSFER_SYNTAXES`. Separate contexts let the peer accept
    the stored syntax and a fallback independently. A file whose own syntax is not accepted
    is decoded and sent uncompressed.
    """
    contexts: list[tuple[str, str]] = []
    for header in headers:
        for syntax in (header.transfer_syntax_uid, *FALLBACK_TRANSFER_SYNTAXES):
            if (header.sop_class_uid, syntax) not in contexts:
                contexts.append((header.sop_class_uid, syntax))
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

    The association proposes, for each SOP class found in the files, one presentation context
    per transfer syntax those files are encoded in and one per uncompressed fallback syntax
    (Explicit and Implicit VR Little Endian). A file is sent as stored when the peer accepts
    its syntax; otherwise it is decoded and sent in an accepted uncompressed syntax.

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
        need more than 128 presentation contexts (about 40 SOP classes).
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
            f"The files need {len(contexts)} presentation contexts (SOP class and transfer "
            f"syntax pairs); one association supports at most {MAX_PRESENTATION_CONTEXTS}. "
            "Send them in several calls."
        )

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class_uid, transfer_syntax in contexts:
        ae.add_requested_context(sop_class_uid, transfer_syntax)

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


def _payload_for(assoc: Association, header: _FileHeader) -> Path | Dataset:
    """Return the file itself when its transfer syntax was accepted, else an uncompressed copy.

    Raises
    ------
    ValueError
        When the peer accepted neither the file's syntax nor an uncompressed one for its SOP
        class, or the pixel data cannot be decoded.
    """
    accepted = [
        str(context.transfer_syntax[0])
        for context in assoc.accepted_contexts
        if context.abstract_syntax == header.sop_class_uid
    ]
    if header.transfer_syntax_uid in accepted:
        return header.path

    fallback = next((syntax for syntax in FALLBACK_TRANSFER_SYNTAXES if syntax in accepted), None)
    if fallback is None:
        raise ValueError(
            f"the peer accepted no presentation context for {UID(header.sop_class_uid).name} "
            f"({header.sop_class_uid}) with transfer syntax {UID(header.transfer_syntax_uid).name} "
            "or an uncompressed syntax"
        )

    dataset = pydicom.dcmread(header.path)
    if UID(header.transfer_syntax_uid).is_compressed:
        try:
            # Keep the SOP Instance UID: pydicom 3 generates a new one by default.
            dataset.decompress(generate_instance_uid=False)
        except Exception as error:  # pixel data decoders raise many exception types
            raise ValueError(
                f"the peer does not accept {UID(header.transfer_syntax_uid).name} and the pixel "
                f"data could not be decoded for an uncompressed send ({type(error).__name__}: {error})"
            ) from error
    dataset.file_meta.TransferSyntaxUID = fallback
    dataset.set_original_encoding(fallback == ImplicitVRLittleEndian, True)
    logger.info(
        "Sending SOPInstanceUID %s as %s: the peer did not accept %s",
        header.sop_instance_uid,
        UID(fallback).name,
        UID(header.transfer_syntax_uid).name,
    )
    return dataset


def _send_one(assoc: Association, header: _FileHeader, peer: str) -> SendResult:
    logger.debug(
        "Sending SOPInstanceUID %s (SOP class %s) to %s", header.sop_instance_uid, header.sop_class_uid, peer
    )
    try:
        status_dataset = assoc.send_c_store(_payload_for(assoc, header))
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
        logger.debug("Stored SOPInstanceUID %s at %s", header.sop_instance_uid, peer)
    elif category == "Warning":
        logger.warning("SOPInstanceUID %s stored at %s with %s", header.sop_instance_uid, peer, message)
    else:
        logger.error("SOPInstanceUID %s not stored at %s: %s", header.sop_instance_uid, peer, message)
    return SendResult(header.path, header.sop_class_uid, header.sop_instance_uid, status, category, message)
