"""Audit log: one :class:`~node.models.AuditEvent` row per event, also written to the log."""

from __future__ import annotations

import logging

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.db import session_scope
from node.models import AuditEvent

logger = logging.getLogger(__name__)


def add_audit_event(
    session: Session,
    kind: str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    job_id: int | None = None,
    calling_ae_title: str | None = None,
    message: str | None = None,
) -> AuditEvent:
    """Add an audit event to ``session``; it is stored when the session commits.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        Session whose transaction also contains the audited change.
    kind : str
        One of the :class:`~node.models.AuditKind` values.
    study_uid, series_uid, sop_uid : str, optional
        Study, Series and SOP Instance UIDs the event concerns.
    job_id : int, optional
        Job the event concerns.
    calling_ae_title : str, optional
        Calling AE title of the association the event came from.
    message : str, optional
        Human-readable detail, such as the reason of a failure. Never a patient name.

    Returns
    -------
    AuditEvent
        The new, not yet committed row.
    """
    audit_event = AuditEvent(
        kind=kind,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        job_id=job_id,
        calling_ae_title=calling_ae_title,
        message=message,
    )
    session.add(audit_event)

    logger.debug(
        "Audit %s: study %s, series %s, SOP instance %s, job %s, calling AE %s: %s",
        kind,
        study_uid,
        series_uid,
        sop_uid,
        job_id,
        calling_ae_title,
        message,
    )
    return audit_event


def record_audit_event(engine: Engine, kind: str, **details: object) -> None:
    """Store one audit event in its own transaction.

    Takes the keyword arguments of :func:`add_audit_event`.
    """
    with session_scope(engine) as session:
        add_audit_event(session, kind, **details)  # type: ignore[arg-type]


def list_audit_events(
    engine: Engine,
    *,
    kind: str | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
) -> list[AuditEvent]:
    """Return audit events in insertion order, optionally filtered by kind, series or job."""
    statement = select(AuditEvent).order_by(AuditEvent.id)
    if kind is not None:
        statement = statement.where(AuditEvent.kind == kind)
    if series_uid is not None:
        statement = statement.where(AuditEvent.series_instance_uid == series_uid)
    if job_id is not None:
        statement = statement.where(AuditEvent.job_id == job_id)

    with session_scope(engine) as session:
        return list(session.scalars(statement))
