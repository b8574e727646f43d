"""The node's C-STORE SCP: application entity, presentation contexts, timeouts and handlers.

Each received instance is validated, checked against the instances already received, and
written to the spool and fsynced before the SCP returns its C-STORE status, so an instance
acknowledged with 0x0000 is always on disk. Its ``instances`` row and ``received`` audit
event are committed in batches by :class:`node.ingest_recorder.IngestRecorder`. The SCP
sends its A-RELEASE response only after the rows of the association's instances are
committed, and at start it records every spool file that a crash left without a row.

C-STORE statuses returned (PS3.4 Annex B.2.3):

- ``0x0000`` Success, also for a resend of an already stored instance.
- ``0xA900`` Error, "Data Set does not match SOP Class": a Type 1 attribute the node needs
  (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) is missing, empty or not a valid UID,
  a CT Image Storage instance lacks ImagePositionPatient, ImageOrientationPatient or
  PixelSpacing (or has the wrong number of values), Modality of a CT instance is not CT, or
  SOPInstanceUID differs from the Affected SOP Instance UID of the request.
- ``0xC000`` Failure, "Cannot understand": the data set cannot be decoded.
- ``0xA700`` Refused, "Out of resources": the spool cannot be written or the database
  cannot be read.

A rejected instance does not end the association; the next C-STORE is handled as usual.
An association aborted by the peer or the network is logged and audited with the number of
instances stored and rejected on it, so an interrupted send can be found and repeated.

Besides CT the SCP stores the other objects a PACS sends with a CT study (secondary
captures, dose reports), so a whole-study send does not fail; the scheduler then skips
those series with an audited reason (see :mod:`node.selection`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field

from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    Verification,
    XRayRadiationDoseSRStorage,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from node.audit import record_audit_event
from node.config import Settings
from node.file_meta import encode_file_header
from node.ingest_recorder import IngestRecorder, InstanceRecord, descriptive_attributes, reconcile_spool
from node.models import AuditKind, Instance, utc_now
from node.spool import Spool, is_valid_uid

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: CT storage SOP classes; instances of them must be Modality CT.
CT_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)

#: Other objects of a CT study that the node stores, so that a whole-study send succeeds,
#: and never analyses.
COMPANION_SOP_CLASSES = (
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
)

#: Storage SOP classes the node accepts.
STORAGE_SOP_CLASSES = CT_SOP_CLASSES + COMPANION_SOP_CLASSES

#: Geometry attributes of a single-frame CT image and their value multiplicity.
REQUIRED_GEOMETRY = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}

#: Transfer syntaxes the node offers to accept, in order of preference, before the check
#: that pydicom can decode their pixel data in this environment.
CANDIDATE_TRANSFER_SYNTAXES = (
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEGLSLossless,
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
    dicom_uid.RLELossless,
)

#: UID attributes every instance must carry; they name the spool path and database rows.
REQUIRED_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

REQUIRED_MODALITY = "CT"

#: A-ASSOCIATE-RJ fields for "calling-AE-title-not-recognized" (PS3.8 9.3.4): result
#: rejected-permanent (1), source DICOM UL service-user (1), reason 3.
REJECT_RESULT_PERMANENT = 0x01
REJECT_SOURCE_SERVICE_USER = 0x01
REJECT_CALLING_AE_NOT_RECOGNISED = 0x03

#: Lookup of an already received instance by SOP Instance UID, run for every C-STORE. A
#: textual statement costs about a third of the equivalent ``select()`` (50 against 150
#: microseconds per call on SQLite, measured with timeit on a 2-core VM).
EXISTING_INSTANCE_QUERY = text(
    f"SELECT {Instance.sha256.key}, {Instance.spool_path.key} FROM {Instance.__tablename__} "
    f"WHERE {Instance.sop_instance_uid.key} = :sop_uid"
)

#: Seconds a released or aborted association waits for the rows of its instances to be
#: committed; longer waits happen only while the database is unreachable.
ASSOCIATION_FLUSH_TIMEOUT_S = 10.0


def supported_transfer_syntaxes() -> list[str]:
    """Return the candidate transfer syntaxes whose pixel data pydicom can decode here.

    Native (uncompressed) syntaxes are always available; compressed ones depend on the
    installed decoder plugins, such as pylibjpeg with its openjpeg and libjpeg plugins.
    """
    available: list[str] = []
    for transfer_syntax in CANDIDATE_TRANSFER_SYNTAXES:
        if not transfer_syntax.is_compressed:
            available.append(transfer_syntax)
            continue
        try:
            decoder = get_decoder(transfer_syntax)
        except NotImplementedError:
            logger.info("No pixel data decoder for %s; not offered", transfer_syntax.name)
            continue
        if decoder.is_available:
            available.append(transfer_syntax)
        else:
            logger.info("Decoder for %s has no plugin installed; not offered", transfer_syntax.name)
    return available


@dataclass(frozen=True)
class _InstanceAttributes:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    series_description: str | None
    geometry_problems: tuple[str, ...] = ()


@dataclass
class _AssociationTally:
    """Instances stored and rejected on one association, for the audit event of an abort."""

    stored: int = 0
    rejected: int = 0
    series_uids: set[str] = field(default_factory=set)


def normalise_ae_title(title: str) -> str:
    """Return an AE title without leading and trailing spaces, in upper case.

    Leading and trailing spaces of an AE title are not significant (PS3.5, value
    representation AE). Case is compared loosely because PACS configurations spell the
    same title in different case.
    """
    return title.strip().upper()


class StorageSCP:
    """C-STORE and C-ECHO SCP that spools received CT instances and records them.

    Parameters
    ----------
    settings : Settings
        Uses ``settings.scp`` and ``settings.spool_dir``.
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.

    Examples
    --------
    ::

        scp = StorageSCP(settings, engine)
        scp.start()
        ...
        scp.stop()
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.spool = Spool(settings.spool_dir)  # type: ignore[arg-type]
        self.ae = self._build_ae()
        self._server: ThreadedAssociationServer | None = None
        # Serialises spool-and-record steps so two associations cannot create the same
        # study or series row at once within this process.
        self._store_lock = threading.Lock()
        self._tallies: dict[int, _AssociationTally] = {}
        self.recorder = IngestRecorder(engine)

    @property
    def port(self) -> int:
        """TCP port the SCP listens on; differs from the setting when that is 0."""
        if self._server is None:
            raise RuntimeError("The SCP is not running: call start() first")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Record spool files left without a database row, then listen in background threads.

        Raises
        ------
        OSError
            When the address cannot be bound, for example because the port is in use.
        sqlalchemy.exc.SQLAlchemyError
            When the database cannot be read or written while recording left-over files.
        """
        scp = self.settings.scp
        reconcile_spool(self.engine, self.spool, utc_now())
        self.recorder.start()
        handlers = [
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_ACSE_RECV, self._handle_acse_received),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_aborted),
            (evt.EVT_REJECTED, self._handle_rejected),
        ]
        try:
            self._server = self.ae.start_server(
                (scp.host, scp.port), block=False, evt_handlers=handlers
            )
        except OSError as error:
            self.recorder.stop()
            logger.error("SCP %s cannot listen on %s:%d: %s", scp.ae_title, scp.host, scp.port, error)
            raise OSError(
                error.errno,
                f"the DICOM SCP cannot listen on {scp.host}:{scp.port} ({error.strerror}); stop the "
                "program using that port or set scp.port (LIVERNODE_PORT) to a free one",
            ) from error
        logger.info(
            "SCP %s listening on %s:%d (spool %s)",
            scp.ae_title,
            scp.host,
            self.port,
            self.spool.root,
        )

    def stop(self) -> None:
        """Stop listening, close open associations and commit the waiting database rows."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        self.recorder.stop()
        logger.info("SCP %s stopped", self.settings.scp.ae_title)

    def _build_ae(self) -> AE:
        scp = self.settings.scp
        ae = AE(ae_title=scp.ae_title)
        ae.acse_timeout = scp.acse_timeout_s
        ae.dimse_timeout = scp.dimse_timeout_s
        ae.network_timeout = scp.network_timeout_s
        ae.maximum_pdu_size = scp.max_pdu_bytes
        # Calling AE titles and peer addresses are checked together in _handle_requested.
        ae.require_calling_aet = []

        transfer_syntaxes = supported_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, transfer_syntaxes)
        ae.add_supported_context(Verification)

        logger.debug(
            "SCP contexts: %s with transfer syntaxes %s",
            ", ".join(sop_class.name for sop_class in STORAGE_SOP_CLASSES),
            ", ".join(dicom_uid.UID(ts).name for ts in transfer_syntaxes),
        )
        return ae

    # Association events ---------------------------------------------------------------

    def is_peer_allowed(self, calling_ae_title: str, address: str) -> bool:
        """Return whether a peer may associate, under ``scp.allowed_calling_ae_titles`` and
        ``scp.allowed_peers``.

        Parameters
        ----------
        calling_ae_title : str
            Calling AE title of the A-ASSOCIATE request.
        address : str
            IP address the request came from.

        Titles are compared with :func:`normalise_ae_title`: padding and case do not matter.
        """
        scp = self.settings.scp
        if not scp.allowed_calling_ae_titles and not scp.allowed_peers:
            return True
        title = normalise_ae_title(calling_ae_title)
        if title in (normalise_ae_title(allowed) for allowed in scp.allowed_calling_ae_titles):
            return True
        return any(
            normalise_ae_title(peer.ae_title) == title and peer.host.strip() == address
            for peer in scp.allowed_peers
        )

    def _handle_requested(self, event: Event) -> None:
        assoc = event.assoc
        requestor = assoc.requestor
        calling_ae = str(requestor.primitive.calling_ae_title or "").strip()
        address = str(requestor.address)
        if self.is_peer_allowed(calling_ae, address):
            return

        scp = self.settings.scp
        reason = (
            f"calling AE title {calling_ae!r} from {address} is not in "
            f"scp.allowed_calling_ae_titles ({', '.join(scp.allowed_calling_ae_titles) or 'none'})"
            " and matches no scp.allowed_peers entry "
            f"({', '.join(f'{p.ae_title}@{p.host}' for p in scp.allowed_peers) or 'none'}); "
            "rejected with reason calling-AE-title-not-recognized"
        )
        # Audit first, so the event is stored by the time the peer reads the rejection.
        self._record_rejection(calling_ae, address, requestor.port, reason)
        assoc.acse.send_reject(
            REJECT_RESULT_PERMANENT, REJECT_SOURCE_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED
        )
        assoc.kill()

    def _handle_accepted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        logger.info(
            "Association accepted from calling AE %s at %s:%s",
            requestor.ae_title,
            requestor.address,
            requestor.port,
        )

    def _handle_acse_received(self, event: Event) -> None:
        # pynetdicom sends the A-RELEASE response after this handler returns, so the peer receives
        # the release only once every instance it sent on the association has its row.
        primitive = event.primitive  # type: ignore[attr-defined]
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            self._flush_recorder(event)

    def _flush_recorder(self, event: Event) -> None:
        if self.recorder.flush(ASSOCIATION_FLUSH_TIMEOUT_S):
            return
        requestor = event.assoc.requestor
        logger.error(
            "Rows of the instances from calling AE %s at %s:%s were not committed within %g s; "
            "the recorder keeps retrying, and the spool files are recorded at the next start "
            "otherwise",
            requestor.ae_title,
            requestor.address,
            requestor.port,
            ASSOCIATION_FLUSH_TIMEOUT_S,
        )

    def _handle_released(self, event: Event) -> None:
        requestor = event.assoc.requestor
        self._tallies.pop(id(event.assoc), None)
        logger.info(
            "Association released by calling AE %s at %s:%s",
            requestor.ae_title,
            requestor.address,
            requestor.port,
        )

    def _handle_aborted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        self._flush_recorder(event)
        tally = self._tallies.pop(id(event.assoc), _AssociationTally())
        series = ", ".join(sorted(tally.series_uids)) or "none"
        message = (
            f"association from {requestor.address}:{requestor.port} aborted after "
            f"{tally.stored} stored and {tally.rejected} rejected instance(s) (series {series}); "
            "an instance in transfer at the abort was not stored and must be sent again"
        )
        logger.warning("Association with calling AE %s: %s", requestor.ae_title, message)
        try:
            record_audit_event(
                self.engine,
                AuditKind.ASSOCIATION_ABORTED,
                calling_ae_title=str(requestor.ae_title).strip()[:16],
                message=message,
            )
        except SQLAlchemyError:
            logger.exception("Could not record the aborted association in the audit log")

    def _handle_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling_ae = requestor.ae_title
        allowed = self.settings.scp.allowed_calling_ae_titles

        if allowed and calling_ae not in allowed:
            reason = (
                f"calling AE title {calling_ae!r} is not in scp.allowed_calling_ae_titles "
                f"({', '.join(allowed)}); rejected with reason calling-AE-title-not-recognized"
            )
        else:
            reason = "association rejected by the SCP (for example, too many associations)"

        self._record_rejection(calling_ae, str(requestor.address), requestor.port, reason)

    def _record_rejection(self, calling_ae: str, address: str, port: int, reason: str) -> None:
        """Log a rejected association and add its ``association_rejected`` audit event."""
        logger.warning("Association from %s:%s rejected: %s", address, port, reason)
        try:
            record_audit_event(
                self.engine,
                AuditKind.ASSOCIATION_REJECTED,
                calling_ae_title=calling_ae[:16],
                message=f"peer {address}:{port}: {reason}",
            )
        except SQLAlchemyError:
            logger.exception("Could not record the rejected association in the audit log")

    def _handle_echo(self, event: Event) -> int:
        logger.info("C-ECHO from calling AE %s", event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    # C-STORE --------------------------------------------------------------------------

    def _handle_store(self, event: Event) -> int:
        status, series_uid = self._store(event)
        tally = self._tallies.setdefault(id(event.assoc), _AssociationTally())
        if status == STATUS_SUCCESS:
            tally.stored += 1
            tally.series_uids.add(series_uid)
        else:
            tally.rejected += 1
        return status

    def _store(self, event: Event) -> tuple[int, str]:
        """Validate, spool and record one instance; return the status and the series UID."""
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        affected_sop_uid = str(event.request.AffectedSOPInstanceUID or "")

        try:
            dataset = event.dataset
            attributes = _read_attributes(dataset)
        except Exception as error:  # noqa: BLE001 - any decoding error of peer data
            message = f"data set cannot be decoded: {error.__class__.__name__}: {error}"
            logger.warning(
                "C-STORE of SOP instance %s from %s rejected (0x%04X): %s",
                affected_sop_uid,
                calling_ae,
                STATUS_CANNOT_UNDERSTAND,
                message,
            )
            self._audit_rejection(calling_ae, affected_sop_uid, None, None, message)
            return STATUS_CANNOT_UNDERSTAND, ""

        problem = _validate_attributes(attributes, affected_sop_uid)
        if problem is not None:
            logger.warning(
                "C-STORE of SOP instance %s from %s rejected (0x%04X): %s",
                affected_sop_uid,
                calling_ae,
                STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                problem,
            )
            self._audit_rejection(
                calling_ae,
                attributes.sop_uid or affected_sop_uid,
                attributes.study_uid,
                attributes.series_uid,
                problem,
            )
            return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, attributes.series_uid

        transfer_syntax_uid = str(event.context.transfer_syntax)
        request_sop_class_uid = str(event.request.AffectedSOPClassUID or attributes.sop_class_uid)
        header = encode_file_header(request_sop_class_uid, attributes.sop_uid, transfer_syntax_uid)

        try:
            with self._store_lock:
                self._spool_and_record(
                    event, attributes, header, transfer_syntax_uid, calling_ae
                )
        except (OSError, SQLAlchemyError) as error:
            logger.error(
                "C-STORE of SOP instance %s (series %s) from %s failed (0x%04X): %s",
                attributes.sop_uid,
                attributes.series_uid,
                calling_ae,
                STATUS_OUT_OF_RESOURCES,
                error,
            )
            # When the database itself is down this audit fails too; the log line above
            # then remains the only record.
            self._audit_rejection(
                calling_ae,
                attributes.sop_uid,
                attributes.study_uid,
                attributes.series_uid,
                f"out of resources (0x{STATUS_OUT_OF_RESOURCES:04X}): the instance was not stored "
                f"and must be sent again: {error.__class__.__name__}: {error}",
            )
            return STATUS_OUT_OF_RESOURCES, attributes.series_uid

        return STATUS_SUCCESS, attributes.series_uid

    def _spool_and_record(
        self,
        event: Event,
        attributes: _InstanceAttributes,
        header: bytes,
        transfer_syntax_uid: str,
        calling_ae: str,
    ) -> None:
        """Spool one validated instance and hand its record to the recorder.

        A resend with identical bytes is audited as a duplicate and not written again; one
        with different bytes is kept under ``conflicts/`` and audited. Both audit events
        are committed before the C-STORE response, as before batching.

        Raises
        ------
        OSError
            When the spool file cannot be written.
        sqlalchemy.exc.SQLAlchemyError
            When the database cannot be read, so the instance cannot be checked for a
            duplicate.
        """
        # The received data set is written as it arrived, without a copy of its bytes.
        with event.request.DataSet.getbuffer() as body:  # type: ignore[union-attr]
            digest_state = hashlib.sha256(header)
            digest_state.update(body)
            digest = digest_state.hexdigest()
            size_bytes = len(header) + len(body)
            uids = {
                "study_uid": attributes.study_uid,
                "series_uid": attributes.series_uid,
                "sop_uid": attributes.sop_uid,
            }

            existing = self._find_existing(attributes.sop_uid)
            if existing is not None and existing[0] == digest:
                record_audit_event(
                    self.engine,
                    AuditKind.DUPLICATE,
                    calling_ae_title=calling_ae,
                    message=f"identical resend of {existing[1]}; kept one copy",
                    **uids,
                )
                logger.info(
                    "SOP instance %s received again with identical content; kept one copy",
                    attributes.sop_uid,
                )
                return
            if existing is not None:
                version_path = self.spool.store_conflict_version(
                    attributes.study_uid, attributes.series_uid, attributes.sop_uid,
                    header + bytes(body),
                )
                message = (
                    f"SOP Instance UID already stored at {existing[1]} "
                    f"(SHA-256 {existing[0]}) with different content; the new copy "
                    f"(SHA-256 {digest}) is kept at {version_path} and not analysed"
                )
                record_audit_event(
                    self.engine, AuditKind.CONFLICT, calling_ae_title=calling_ae, message=message, **uids
                )
                logger.warning("SOP instance %s: %s", attributes.sop_uid, message)
                return

            path = self.spool.store_received(
                attributes.study_uid, attributes.series_uid, attributes.sop_uid, (header, body), digest
            )

        self.recorder.submit(
            InstanceRecord(
                study_uid=attributes.study_uid,
                series_uid=attributes.series_uid,
                sop_uid=attributes.sop_uid,
                sop_class_uid=attributes.sop_class_uid,
                modality=attributes.modality,
                patient_id=attributes.patient_id,
                accession_number=attributes.accession_number,
                study_date=attributes.study_date,
                series_description=attributes.series_description,
                transfer_syntax_uid=transfer_syntax_uid,
                spool_path=str(path),
                sha256=digest,
                size_bytes=size_bytes,
                calling_ae_title=calling_ae,
                received_at=utc_now(),
                audit_message=f"stored at {path} ({size_bytes} bytes, {transfer_syntax_uid})",
            )
        )
        logger.debug(
            "Stored SOP instance %s of series %s from %s",
            attributes.sop_uid,
            attributes.series_uid,
            calling_ae,
        )

    def _find_existing(self, sop_uid: str) -> tuple[str, str] | None:
        """Return ``(sha256, spool_path)`` of an already received instance, or None.

        Records waiting in the recorder count as received. Raises SQLAlchemyError when the
        database cannot be read.
        """
        pending = self.recorder.pending_record(sop_uid)
        if pending is not None:
            return pending.sha256, pending.spool_path
        with self.engine.connect() as connection:
            row = connection.execute(EXISTING_INSTANCE_QUERY, {"sop_uid": sop_uid}).first()
        return None if row is None else (row[0], row[1])

    def _audit_rejection(
        self,
        calling_ae: str,
        sop_uid: str | None,
        study_uid: str | None,
        series_uid: str | None,
        message: str,
    ) -> None:
        try:
            record_audit_event(
                self.engine,
                AuditKind.REJECTED,
                study_uid=_fit_uid(study_uid),
                series_uid=_fit_uid(series_uid),
                sop_uid=_fit_uid(sop_uid),
                calling_ae_title=calling_ae,
                message=message,
            )
        except SQLAlchemyError:
            logger.exception("Could not record the rejected instance in the audit log")


def _read_attributes(dataset: Dataset) -> _InstanceAttributes:
    def text(keyword: str) -> str:
        value = dataset.get(keyword)
        return "" if value is None else str(value).strip()

    return _InstanceAttributes(
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        sop_uid=text("SOPInstanceUID"),
        sop_class_uid=text("SOPClassUID"),
        **descriptive_attributes(dataset),  # type: ignore[arg-type]
        geometry_problems=_geometry_problems(dataset) if text("SOPClassUID") == CTImageStorage else (),
    )


def _geometry_problems(dataset: Dataset) -> tuple[str, ...]:
    """Describe missing or malformed geometry attributes of a single-frame CT image."""
    problems = []
    for keyword, multiplicity in REQUIRED_GEOMETRY.items():
        element = dataset.get(keyword)
        values = [] if element is None or element == "" else list(element)
        if not values:
            problems.append(f"{keyword} is missing or empty")
        elif len(values) != multiplicity:
            problems.append(f"{keyword} has {len(values)} values, {multiplicity} are required")
    return tuple(problems)


def _validate_attributes(attributes: _InstanceAttributes, affected_sop_uid: str) -> str | None:
    """Return why the instance cannot be accepted, or None when it can."""
    values = {
        "StudyInstanceUID": attributes.study_uid,
        "SeriesInstanceUID": attributes.series_uid,
        "SOPInstanceUID": attributes.sop_uid,
    }
    missing = [keyword for keyword in REQUIRED_UID_KEYWORDS if not values[keyword]]
    if missing:
        return f"missing or empty Type 1 attributes: {', '.join(missing)}"

    invalid = [keyword for keyword in REQUIRED_UID_KEYWORDS if not is_valid_uid(values[keyword])]
    if invalid:
        details = ", ".join(f"{keyword} {values[keyword]!r}" for keyword in invalid)
        return f"invalid UID (expected up to 64 digits and periods): {details}"

    if attributes.sop_class_uid in CT_SOP_CLASSES and attributes.modality != REQUIRED_MODALITY:
        return (
            f"Modality is {attributes.modality!r}, expected {REQUIRED_MODALITY!r} for "
            "CT Image Storage and Enhanced CT Image Storage"
        )

    if attributes.geometry_problems:
        return (
            "the CT image has no usable geometry: "
            + "; ".join(attributes.geometry_problems)
            + "; the volume cannot be reconstructed without it"
        )

    if affected_sop_uid and attributes.sop_uid != affected_sop_uid:
        return (
            f"SOPInstanceUID {attributes.sop_uid} differs from the Affected SOP Instance UID "
            f"{affected_sop_uid} of the C-STORE request"
        )
    return None


def _fit_uid(value: str | None) -> str | None:
    if not value:
        return None
    return value[:64]
