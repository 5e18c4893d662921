"""The clinician feedback database: who agreed or disagreed with which finding, on which image and model.

Reviews are an audit record, so each one is written in a single transaction together with exactly
what the reviewer saw (calibrated/raw probabilities and thresholds) and which weights produced it.
Images are identified by their DICOM SOP Instance UID, or by the SHA-256 of the file bytes for PNG/JPEG.
There are deliberately no columns for patient name, ID or birth date, and the API accepts none.

SQLite (a file under the user's data dir, WAL mode) is the default; any SQLAlchemy URL can be given
through ``MEDVIT_DB_URL`` (PostgreSQL is tested). The schema is versioned with Alembic
(``medvit/migrations``) and upgraded to head whenever a store is opened.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Engine,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from medvit.errors import MedvitError
from medvit.review.audit import record
from medvit.review.checks import (
    ShownFinding,
    UidKind,
    Verdict,
    check_hash,
    check_note,
    check_reviewer,
    check_text,
    check_uid,
    check_verdicts,
    shown_json,
)
from medvit.review.labels import verdict_label
from medvit.review.settings import DB_URL_ENV
from medvit.review.tables import NOTE_MAX, REVIEWER_MAX, AuditRow, ReviewEditRow, ReviewRow, UserRow, VerdictRow  # noqa: F401 - registers all tables

_log = logging.getLogger(__name__)


SQLITE_BUSY_TIMEOUT_MS = 30_000
CSV_COLUMNS = (
    "review_id", "created_at", "reviewer", "image_uid", "image_uid_kind", "model_name", "weights_sha256",
    "finding", "verdict", "prob", "threshold", "prob_raw", "note",
)  # fmt: skip

_MIGRATION_LOCK = 0x6D65_6476_6974  # "medvit": the advisory lock key serialising PostgreSQL migrations


@dataclass(frozen=True)
class ReviewEdit:
    """A review's state before one edit: who changed it, when, and what the verdicts and note were."""

    edited_at: datetime
    editor: str
    verdicts: dict[str, str]
    note: str


@dataclass(frozen=True)
class Review:
    """One stored review, as read back."""

    id: int
    created_at: datetime  # UTC, timezone-aware
    reviewer: str
    note: str
    image_uid: str
    image_uid_kind: str
    model_name: str
    weights_sha256: str
    shown: dict[str, ShownFinding]
    verdicts: dict[str, str]
    updated_at: datetime | None = None  # the last edit (None: never edited)
    edits: tuple[ReviewEdit, ...] = ()  # oldest first
    labels: dict[str, str | None] = field(default_factory=dict)  # verdicts as present / absent (None: uncertain)
    calibration_version: str | None = None  # the calibration in force when the reader saw the numbers


def default_db_url() -> str:
    """``$MEDVIT_DB_URL``, else a SQLite file in the per-user data dir (created on demand)."""
    url = os.environ.get(DB_URL_ENV, "").strip()
    if url:
        return url
    from platformdirs import user_data_dir

    folder = Path(user_data_dir("medvit"))
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'reviews.sqlite3'}"


def _configure_sqlite(engine: Engine) -> None:
    """WAL so the app's readers never block writers; busy timeout so concurrent writers wait instead of failing.

    pysqlite's own implicit BEGIN is disabled and replaced with BEGIN IMMEDIATE: each transaction takes the
    write lock up front (honouring busy_timeout), and DDL in migrations becomes transactional.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _enable_wal(cursor: Any) -> None:
    """Switch a fresh file to WAL (persistent), retrying while another process does the same.

    SQLite answers a journal-mode change that races another connection with "database is locked" at once,
    without consulting busy_timeout, so several app processes opening a new database together need the retry.
    """
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.05)


def migrate(engine: Engine, revision: str = "head", *, downgrade: bool = False) -> None:
    """Bring the schema to `revision` with Alembic (the packaged ``medvit/migrations`` scripts)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # app servers starting together must not both create the tables
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        (command.downgrade if downgrade else command.upgrade)(cfg, revision)


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


class ReviewStore:
    """Reads and writes reviews; safe to share between threads (one SQLAlchemy engine, one session per call)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_db_url()
        try:
            self.engine = create_engine(self.url, pool_pre_ping=True)
            if self.engine.dialect.name == "sqlite":
                _configure_sqlite(self.engine)
            migrate(self.engine)
        except (SQLAlchemyError, ImportError) as e:
            detail = (str(getattr(e, "orig", None) or e).strip().splitlines() or [""])[0]
            raise MedvitError(
                f"cannot open the review database {self.display_url}: {detail}. "
                f"Check {DB_URL_ENV} (a SQLAlchemy URL) and that the server is running."
            ) from e
        _log.info("review database: %s", self.display_url)

    @property
    def display_url(self) -> str:
        """The URL with any password masked, for messages and logs."""
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except SQLAlchemyError:
            return "<unparseable URL>"

    def close(self) -> None:
        self.engine.dispose()

    def _refused(self, e: SQLAlchemyError) -> MedvitError:
        """The one-line error for a write the database refused (nothing was stored: the transaction rolled back)."""
        return MedvitError(f"review not saved: the database {self.display_url} refused the write "
                           f"({e.__class__.__name__}); nothing was stored, try again")  # fmt: skip

    def add_review(
        self,
        *,
        reviewer: str,
        image_uid: str,
        image_uid_kind: UidKind,
        model_name: str,
        weights_sha256: str,
        shown: Mapping[str, ShownFinding],
        verdicts: Mapping[str, Verdict],
        note: str = "",
        user_id: int | None = None,
        calibration_version: str | None = None,
    ) -> int:
        """Store one review in a single transaction and return its id (`user_id`: the signed-in account;
        `calibration_version`: the calibration that produced the probabilities shown).

        Raises:
            MedvitError: a field is missing, too long or malformed (the message names it).
        """
        row = _review_row(reviewer=reviewer, image_uid=image_uid, image_uid_kind=image_uid_kind,
                          model_name=model_name, weights_sha256=weights_sha256, shown=shown, verdicts=verdicts,
                          note=note, user_id=user_id, calibration_version=calibration_version)  # fmt: skip
        try:
            with Session(self.engine) as session, session.begin():
                session.add(row)
                session.flush()
                review_id = row.id
        except SQLAlchemyError as e:
            _log.exception("review write failed")
            raise self._refused(e) from e
        _log.info("stored review %d on %s (%d verdicts)", review_id, image_uid, len(verdicts))
        return review_id

    def save_review(
        self,
        *,
        reviewer: str,
        image_uid: str,
        image_uid_kind: UidKind,
        model_name: str,
        weights_sha256: str,
        shown: Mapping[str, ShownFinding],
        verdicts: Mapping[str, Verdict],
        note: str = "",
        user_id: int | None = None,
        calibration_version: str | None = None,
    ) -> tuple[int, bool]:
        """The app's save: one review per image, reader and weights. Saving again edits that review, and the state
        before the edit is kept in `review_edits` (plus a `review_edit` audit event). Returns (id, edited).

        The reader is the account (`user_id`) when signed in, else the reviewer name.

        Raises:
            MedvitError: a field is missing, too long or malformed, or the database refused the write.
        """
        reviewer, note = check_reviewer(reviewer), check_note(note)
        uid, weights = check_uid(image_uid, image_uid_kind), check_hash(weights_sha256)
        stored_shown, checked = shown_json(shown), check_verdicts(verdicts, shown)
        query = select(ReviewRow).where(ReviewRow.image_uid == uid, ReviewRow.weights_sha256 == weights,
                                        ReviewRow.source == "app")  # fmt: skip
        if user_id is not None:
            query = query.where(ReviewRow.user_id == user_id)
        else:
            query = query.where(ReviewRow.user_id.is_(None), ReviewRow.reviewer == reviewer)
        query = query.order_by(ReviewRow.id).limit(1).with_for_update()
        try:
            with Session(self.engine) as session, session.begin():
                row = session.scalars(query.options(selectinload(ReviewRow.verdicts))).first()
                if row is None:
                    new = _review_row(reviewer=reviewer, image_uid=uid, image_uid_kind=image_uid_kind,
                                      model_name=model_name, weights_sha256=weights, shown=shown, verdicts=checked,
                                      note=note, user_id=user_id,
                                      calibration_version=calibration_version)  # fmt: skip
                    session.add(new)
                    session.flush()
                    _log.info("stored review %d on %s (%d verdicts)", new.id, uid, len(checked))
                    return new.id, False
                now = datetime.now(UTC)
                before = {v.finding: v.verdict for v in row.verdicts}
                row.edits.append(ReviewEditRow(edited_at=now, editor=reviewer, verdicts=before, note=row.note))
                row.verdicts = _verdict_rows(checked, shown)
                row.note, row.shown, row.updated_at, row.reviewer = note, stored_shown, now, reviewer
                row.calibration_version = calibration_version
                record(session, reviewer, "review_edit", target=uid,
                       detail={"review_id": row.id, "before": before, "after": dict(checked)})  # fmt: skip
                session.flush()
                review_id = row.id
        except SQLAlchemyError as e:
            _log.exception("review edit failed")
            raise self._refused(e) from e
        _log.info("edited review %d on %s (%d verdicts)", review_id, uid, len(checked))
        return review_id, True

    def reviewed_images(self, image_uids: list[str], reviewer: str | None = None) -> set[str]:
        """Which of `image_uids` have a review (by `reviewer` when given): the worklist's reviewed status."""
        if not image_uids:
            return set()
        query = select(ReviewRow.image_uid).where(ReviewRow.image_uid.in_(image_uids)).distinct()
        if reviewer:
            query = query.where(ReviewRow.reviewer == reviewer.strip())
        with Session(self.engine) as session:
            return set(session.scalars(query))

    def count(self) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.count()).select_from(ReviewRow)) or 0)

    def history(
        self, *, image_uid: str | None = None, reviewer: str | None = None, limit: int | None = 1000
    ) -> list[Review]:
        """Reviews newest first, optionally for one image and/or one reviewer."""
        query = select(ReviewRow).options(selectinload(ReviewRow.verdicts), selectinload(ReviewRow.edits))
        if image_uid is not None:
            query = query.where(ReviewRow.image_uid == image_uid)
        if reviewer is not None:
            query = query.where(ReviewRow.reviewer == reviewer)
        query = query.order_by(ReviewRow.created_at.desc(), ReviewRow.id.desc()).limit(limit)
        with Session(self.engine) as session:
            return [_to_review(r) for r in session.scalars(query)]

    def history_rows(self, **filters: Any) -> list[dict[str, Any]]:
        """`history` flattened to one dict per (review, finding verdict), keyed by `CSV_COLUMNS`."""
        rows = []
        for r in self.history(**filters):
            for finding, verdict in r.verdicts.items():
                s = r.shown[finding]
                rows.append(dict(
                    review_id=r.id, created_at=r.created_at.isoformat(), reviewer=r.reviewer, image_uid=r.image_uid,
                    image_uid_kind=r.image_uid_kind, model_name=r.model_name, weights_sha256=r.weights_sha256,
                    finding=finding, verdict=verdict, prob=s.prob, threshold=s.threshold, prob_raw=s.prob_raw,
                    note=r.note,
                ))  # fmt: skip
        return rows

    def export_csv(self, **filters: Any) -> str:
        """The flattened history as CSV text (for download buttons and audits)."""
        return rows_csv(self.history_rows(**filters))


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """`ReviewStore.history_rows` output as CSV text, for callers that already hold the rows."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _utc(at: datetime | None) -> datetime | None:
    return at if at is None or at.tzinfo else at.replace(tzinfo=UTC)  # SQLite drops the timezone


def _to_review(r: ReviewRow) -> Review:
    edits = tuple(ReviewEdit(_utc(e.edited_at), e.editor, dict(e.verdicts), e.note) for e in r.edits)  # type: ignore[arg-type]
    return Review(
        id=r.id, created_at=_utc(r.created_at), reviewer=r.reviewer, note=r.note,  # type: ignore[arg-type]
        image_uid=r.image_uid, image_uid_kind=r.image_uid_kind, model_name=r.model_name,
        weights_sha256=r.weights_sha256, shown={f: ShownFinding(**v) for f, v in r.shown.items()},
        verdicts={v.finding: v.verdict for v in r.verdicts}, updated_at=_utc(r.updated_at), edits=edits,
        labels={v.finding: v.label for v in r.verdicts}, calibration_version=r.calibration_version,
    )  # fmt: skip


def _review_row(*, reviewer: str, image_uid: str, image_uid_kind: str, model_name: str, weights_sha256: str,
                shown: Mapping[str, ShownFinding], verdicts: Mapping[str, str], note: str, user_id: int | None,
                calibration_version: str | None) -> ReviewRow:
    """A new, checked review row with its verdicts (not yet added to a session)."""
    return ReviewRow(
        created_at=datetime.now(UTC),
        reviewer=check_reviewer(reviewer),
        note=check_note(note),
        image_uid=check_uid(image_uid, image_uid_kind),
        image_uid_kind=image_uid_kind,
        model_name=check_text("model name", model_name, 200),
        weights_sha256=check_hash(weights_sha256),
        shown=shown_json(shown),
        verdicts=_verdict_rows(check_verdicts(verdicts, shown), shown),
        source="app",
        user_id=user_id,
        calibration_version=calibration_version,
    )


def _verdict_rows(verdicts: Mapping[str, str], shown: Mapping[str, ShownFinding]) -> list[VerdictRow]:
    """One row per verdict, with its label against the flag the reader saw (`medvit.review.labels`)."""
    return [VerdictRow(finding=f, verdict=v, label=verdict_label(v, shown[f].flagged)) for f, v in verdicts.items()]
