"""Finding instances at a DICOM peer with C-FIND (Study Root Query/Retrieve Information Model).

Used to confirm a delivery: after a C-STORE the node queries the destination, at IMAGE level
with the Study and Series Instance UIDs as unique keys, which SOP instances it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from dicom_io.errors import SendError

logger = logging.getLogger(__name__)

QUERY_LEVEL_IMAGE = "IMAGE"

#: C-FIND statuses of PS3.4 C.4.1.1.4: Pending (a match follows) and Success (no more).
STATUS_SUCCESS = 0x0000
STATUS_PENDING = (0xFF00, 0xFF01)


def find_instances(
    study_uid: str,
    series_uids: Iterable[str],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str = "LIVERNODE",
    timeout_s: float = 30,
) -> set[str]:
    """Return the SOP Instance UIDs a peer stores in the given series of one study.

    Sends one C-FIND request at IMAGE level per series over a single association, with
    the Study Root Query/Retrieve Information Model - FIND.

    Parameters
    ----------
    study_uid : str
        StudyInstanceUID (unique key of the STUDY level).
    series_uids : Iterable[str]
        SeriesInstanceUIDs (unique key of the SERIES level) to list.
    ae_title, host, port : str, str, int
        Called AE title and address of the peer.
    calling_ae_title : str, optional
        AE title of this node; the peer must allow it to query.
    timeout_s : float, optional
        ACSE, DIMSE and network timeout in seconds.

    Returns
    -------
    set of str
        SOP Instance UIDs matched in those series.

    Raises
    ------
    SendError
        When the association cannot be established, the peer does not accept the Study
        Root FIND SOP class, or a C-FIND ends with a Failure status.
    """
    peer = f"{ae_title}@{host}:{port}"
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)

    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise SendError(
            f"C-FIND association to {peer} was not established (refused, rejected or no "
            "Study Root Query/Retrieve FIND support); the delivery cannot be confirmed",
            peer=peer,
        )

    found: set[str] = set()
    try:
        for series_uid in series_uids:
            found |= _find_in_series(assoc, study_uid, series_uid, peer)
    finally:
        if assoc.is_established:
            assoc.release()
    logger.debug("C-FIND at %s matched %d instance(s) in study %s", peer, len(found), study_uid)
    return found


def _find_in_series(assoc: object, study_uid: str, series_uid: str, peer: str) -> set[str]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = QUERY_LEVEL_IMAGE
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = series_uid
    identifier.SOPInstanceUID = ""
    identifier.SOPClassUID = ""

    found: set[str] = set()
    responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)  # type: ignore[attr-defined]
    for status, match in responses:
        if status is None or "Status" not in status:
            raise SendError(
                f"C-FIND at {peer} for series {series_uid} got no response (timeout or abort)",
                peer=peer,
            )
        code = int(status.Status)
        if code in STATUS_PENDING:
            if match is not None and match.get("SOPInstanceUID"):
                found.add(str(match.SOPInstanceUID))
            continue
        if code != STATUS_SUCCESS:
            raise SendError(
                f"C-FIND at {peer} for series {series_uid} ended with status 0x{code:04X} "
                f"({code_to_category(code)})",
                peer=peer,
            )
    return found
