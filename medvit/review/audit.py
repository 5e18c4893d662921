"""The audit trail of site mode: who signed in (or failed to), revealed identifiers, changed a calibration,
changed an account or edited a review, and when.

One small API so every writer (accounts, the app, `medvit calibrate --from-reviews`, review edits) records events
the same way: `record` appends a row to ``audit_events``, `events` reads them back newest first. Rows are never
updated or deleted by medvit. Details are JSON and must never hold a password or a patient identifier.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from medvit.errors import MedvitError
from medvit.review.tables import REVIEWER_MAX, AuditRow

_log = logging.getLogger(__name__)

Event = Literal[
    "signin_ok",
    "signin_failed",
    "account_added",
    "account_disabled",
    "reveal_identifiers",
    "calibration_change",
    "review_edit",
]
EVENTS: tuple[str, ...] = get_args(Event)
TARGET_MAX = 200


@dataclass(frozen=True)
class AuditEvent:
    """One audited event, as read back."""

    id: int
    at: datetime  # UTC, timezone-aware
    actor: str | None  # account name, "cli:<login>" for commands; None when unknown (a failed sign-in)
    event: str
    target: str | None  # account name, image UID, run or calibration version
    ok: bool
    detail: dict[str, Any] | None


def record(
    bind: Engine | Session,
    actor: str | None,
    event: Event,
    target: str | None = None,
    ok: bool = True,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit event.

    Given a `Session`, the row joins that session's transaction, so an account change and its audit row commit
    or fail together; given an `Engine`, the event is written in its own transaction.

    Raises:
        ValueError: `event` is not one of `EVENTS` or `detail` is not JSON (a programming error).
        MedvitError: the database refused the write.
    """
    if event not in EVENTS:
        raise ValueError(f"audit event {event!r} is not one of {', '.join(EVENTS)}")
    if detail is not None:
        json.dumps(detail, allow_nan=False)  # fail here, not halfway through a commit
    row = AuditRow(
        at=datetime.now(UTC),
        actor=None if actor is None else actor[:REVIEWER_MAX],
        event=event,
        target=None if target is None else target[:TARGET_MAX],
        ok=ok,
        detail=detail,
    )
    if isinstance(bind, Session):
        bind.add(row)
        return
    try:
        with Session(bind) as session, session.begin():
            session.add(row)
    except SQLAlchemyError as e:
        _log.exception("audit write failed")
        raise MedvitError(f"the audit event {event} was not recorded: the database refused the write") from e


def events(
    bind: Engine,
    *,
    event: Event | None = None,
    actor: str | None = None,
    target: str | None = None,
    limit: int | None = 1000,
) -> list[AuditEvent]:
    """Audit events newest first, optionally of one kind, by one actor or about one target."""
    query = select(AuditRow)
    if event is not None:
        query = query.where(AuditRow.event == event)
    if actor is not None:
        query = query.where(AuditRow.actor == actor)
    if target is not None:
        query = query.where(AuditRow.target == target)
    query = query.order_by(AuditRow.at.desc(), AuditRow.id.desc()).limit(limit)
    with Session(bind) as session:
        return [_to_event(r) for r in session.scalars(query)]


def _to_event(r: AuditRow) -> AuditEvent:
    at = r.at if r.at.tzinfo else r.at.replace(tzinfo=UTC)  # SQLite drops the timezone
    return AuditEvent(id=r.id, at=at, actor=r.actor, event=r.event, target=r.target, ok=r.ok, detail=r.detail)
