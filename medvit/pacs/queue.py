"""The PACS scoring queue: the `pacs_instances` rows (`medvit.review.scoring`) as work for `medvit watch`.

Rows are the work queue and the audit trail at once. A watcher claims a small batch of pending (or failed,
retryable) rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` inside the transaction that scores them, so several
watchers on one PostgreSQL database never take the same row and a crash rolls the claim back: nothing is lost.
SQLite has no row locks; there each transaction takes the database write lock (BEGIN IMMEDIATE), i.e. one writer.
Only UIDs are stored, never patient attributes.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Select, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from medvit.pacs.client import InstanceRef
from medvit.review.scoring import STATUSES, PacsInstanceRow


def enqueue(session: Session, refs: list[InstanceRef]) -> int:
    """Insert a pending row for each instance not seen before (concurrent watchers may insert the same ones).

    Returns the number of new rows.
    """
    if not refs:
        return 0
    now = datetime.now(UTC)
    rows = [dict(sop_instance_uid=r.sop_uid, study_instance_uid=r.study_uid, series_instance_uid=r.series_uid,
                 modality=r.modality[:16], status="pending", attempts=0, discovered_at=now, updated_at=now)
            for r in refs]
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(PacsInstanceRow).values(rows).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
    return int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


def claim_batch(session: Session, max_attempts: int, skip: set[int], limit: int) -> list[PacsInstanceRow]:
    """Lock up to `limit` pending or retryable failed rows for this transaction, oldest first; rows other
    watchers hold are skipped.

    `skip`: rows this watcher already tried in the current pass (a failure is retried on a later pass).
    """
    return list(session.scalars(_claimable(max_attempts, skip, limit).with_for_update(skip_locked=True)))


def peek_batch(session: Session, max_attempts: int, skip: set[int], limit: int) -> list[PacsInstanceRow]:
    """The rows `claim_batch` would take next, without locking them: what is worth retrieving ahead of the claim
    (another watcher may claim some first; the claim decides)."""
    return list(session.scalars(_claimable(max_attempts, skip, limit)))


def _claimable(max_attempts: int, skip: set[int], limit: int) -> Select[PacsInstanceRow]:
    query = (
        select(PacsInstanceRow)
        .where((PacsInstanceRow.status == "pending")
               | ((PacsInstanceRow.status == "failed") & (PacsInstanceRow.attempts < max_attempts)))
        .order_by(PacsInstanceRow.id)
        .limit(limit)
    )
    return query.where(PacsInstanceRow.id.not_in(skip)) if skip else query


def status_counts(session: Session) -> dict[str, int]:
    """{status: rows}, every status present (0 when none)."""
    counts = dict(session.execute(select(PacsInstanceRow.status, func.count()).group_by(PacsInstanceRow.status)).all())
    return {s: int(counts.get(s, 0)) for s in STATUSES}
