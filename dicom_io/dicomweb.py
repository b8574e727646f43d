"""Sending DICOM files with DICOMweb STOW-RS and finding them again with QIDO-RS.

The STOW-RS response is a data set (PS3.18 10.5.3) whose Referenced SOP Sequence lists the
stored instances and whose Failed SOP Sequence lists the refused ones. An instance counts as
stored only when the Referenced SOP Sequence names it and the Failed SOP Sequence does not,
whatever the HTTP status of the response.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_io.errors import SendError
from dicom_io.sender import SendResult

logger = logging.getLogger(__name__)

#: Status given to an instance that the STOW-RS response lists as stored without warning.
STATUS_SUCCESS = 0x0000

#: Status given when the response names the instance in neither sequence: 0x0110, "Processing
#: failure" among the general DIMSE statuses of PS3.7 Annex C.
STATUS_NOT_LISTED = 0x0110

#: DICOM JSON tag of SOPInstanceUID (0008,0018) in QIDO-RS results.
SOP_INSTANCE_UID_TAG = "00080018"

#: Media types of a STOW-RS response body that carries the status data set.
DICOM_JSON_MEDIA_TYPES = ("application/dicom+json", "application/json")


def make_client(url: str, *, username: str = "", password: str = "", timeout_s: float = 30) -> DICOMwebClient:
    """Create a DICOMweb client for the service root ``url``.

    Parameters
    ----------
    url : str
        Service root, such as ``http://127.0.0.1:8042/dicom-web``.
    username, password : str, optional
        HTTP basic authentication; no credentials are sent when ``username`` is empty.
    timeout_s : float, optional
        Seconds to wait for each HTTP response.

    Returns
    -------
    dicomweb_client.api.DICOMwebClient
        A client without its own HTTP retries; the caller decides when to try again.
    """
    session = requests.Session()
    if username:
        session.auth = (username, password)
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def stow_files(
    paths: Sequence[Path],
    *,
    url: str,
    username: str = "",
    password: str = "",
    timeout_s: float = 30,
) -> list[SendResult]:
    """Store DICOM files at a DICOMweb service with one STOW-RS request.

    Parameters
    ----------
    paths : Sequence[pathlib.Path]
        DICOM files of one study.
    url : str
        Service root of the destination.
    username, password : str, optional
        HTTP basic authentication.
    timeout_s : float, optional
        Seconds to wait for the response.

    Returns
    -------
    list[SendResult]
        One result per file, in the order of ``paths``; ``status`` is 0x0000 for a stored
        instance, the Warning Reason (0008,1196) or Failure Reason (0008,1197) of the
        response, or 0x0110 when the response does not name the instance.

    Raises
    ------
    SendError
        When the service cannot be reached, or answers without a DICOM JSON status data
        set (for example 401 Unauthorized or 404 Not Found); the message names the HTTP
        status and the URL.
    """
    paths = [Path(path) for path in paths]
    if not paths:
        logger.info("No files to store at %s", url)
        return []

    datasets = [pydicom.dcmread(path) for path in paths]
    study_uids = {str(dataset.StudyInstanceUID) for dataset in datasets}
    client = make_client(url, username=username, password=password, timeout_s=timeout_s)

    logger.info("STOW-RS of %d file(s) of study %s to %s", len(paths), ", ".join(study_uids), url)
    try:
        response_dataset = client.store_instances(datasets)
    except requests.HTTPError as error:
        # 409 Conflict and 4xx/5xx responses may still carry the status data set.
        response_dataset = _status_dataset_from_error(error, url)
    except requests.RequestException as error:
        raise SendError(
            f"STOW-RS to {url} failed: {error.__class__.__name__}: {error}. Check the URL, "
            "that the DICOMweb service runs and the credentials.",
            peer=url,
        ) from error

    return _results_from_response(paths, datasets, response_dataset, url)


def find_instances(
    study_uid: str,
    *,
    url: str,
    username: str = "",
    password: str = "",
    timeout_s: float = 30,
) -> set[str]:
    """Return the SOP Instance UIDs a DICOMweb service lists for a study (QIDO-RS).

    Parameters
    ----------
    study_uid : str
        StudyInstanceUID to search in.
    url, username, password, timeout_s
        As for :func:`stow_files`.

    Returns
    -------
    set of str
        SOP Instance UIDs of the study's instances; empty when the study is unknown.

    Raises
    ------
    SendError
        When the service cannot be reached or responds with an HTTP error.
    """
    client = make_client(url, username=username, password=password, timeout_s=timeout_s)
    try:
        matches = client.search_for_instances(
            study_instance_uid=study_uid, fields=["SOPInstanceUID"], get_remaining=True
        )
    except requests.RequestException as error:
        raise SendError(
            f"QIDO-RS search for the instances of study {study_uid} at {url} failed: "
            f"{error.__class__.__name__}: {error}",
            peer=url,
        ) from error

    found: set[str] = set()
    for match in matches:
        values = match.get(SOP_INSTANCE_UID_TAG, {}).get("Value") or []
        found.update(str(value) for value in values)
    logger.debug("QIDO-RS at %s lists %d instance(s) of study %s", url, len(found), study_uid)
    return found


def _status_dataset_from_error(error: requests.HTTPError, url: str) -> Dataset:
    response = error.response
    status_code = response.status_code if response is not None else "unknown"
    content_type = (response.headers.get("Content-Type", "") if response is not None else "").split(";")[0]
    if response is not None and response.content and content_type.strip() in DICOM_JSON_MEDIA_TYPES:
        try:
            return Dataset.from_json(response.json())
        except ValueError:
            pass
    raise SendError(
        f"STOW-RS to {url} returned HTTP {status_code} without a DICOM JSON status data set"
        f" ({content_type or 'no body'}). Check the URL, the credentials and that the "
        "service accepts the SOP classes sent.",
        peer=url,
    ) from error


def _results_from_response(
    paths: list[Path], datasets: list[Dataset], response: Dataset, url: str
) -> list[SendResult]:
    referenced: dict[str, int] = {}
    for item in response.get("ReferencedSOPSequence", []):
        warning = item.get("WarningReason")
        referenced[str(item.ReferencedSOPInstanceUID)] = int(warning) if warning is not None else STATUS_SUCCESS

    failed: dict[str, int] = {}
    for item in response.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        failed[str(item.ReferencedSOPInstanceUID)] = int(reason) if reason is not None else STATUS_NOT_LISTED

    results: list[SendResult] = []
    for path, dataset in zip(paths, datasets, strict=True):
        sop_uid = str(dataset.SOPInstanceUID)
        sop_class = str(dataset.SOPClassUID)
        if sop_uid in failed:
            status = failed[sop_uid]
            message = f"STOW-RS Failed SOP Sequence lists it with Failure Reason 0x{status:04X}"
            category = "Failure"
            logger.error("SOPInstanceUID %s not stored at %s: %s", sop_uid, url, message)
        elif sop_uid in referenced:
            status = referenced[sop_uid]
            category = "Success" if status == STATUS_SUCCESS else "Warning"
            message = "" if status == STATUS_SUCCESS else f"Warning Reason 0x{status:04X}"
            logger.info("Stored SOPInstanceUID %s at %s %s", sop_uid, url, message)
        else:
            status = STATUS_NOT_LISTED
            category = "Failure"
            message = "the STOW-RS response lists it in neither the Referenced nor the Failed SOP Sequence"
            logger.error("SOPInstanceUID %s at %s: %s", sop_uid, url, message)
        results.append(SendResult(path, sop_class, sop_uid, status, category, message))
    return results
