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
import math
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

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
from medvit.review.tables import NOTE_MAX, REVIEWER_MAX, AuditRow, ReviewEditRow, ReviewRow, UserRow, VerdictRow  # noqa: F401 - registers all tables

_log = logging.getLogger(__name__)

Verdict = Literal["agree", "disagree", "uncertain"]
VERDICTS: tuple[str, ...] = get_args(Verdict)
UidKind = Literal["sop_instance_uid", "sha256"]
UID_KINDS: tuple[str, ...] = get_args(UidKind)

DB_URL_ENV = "MEDVIT_DB_URL"
SQLITE_BUSY_TIMEOUT_MS = 30_000
CSV_COLUMNS = (
    "review_id", "created_at", "reviewer", "image_uid", "image_uid_kind", "model_name", "weights_sha256",
    "finding", "verdict", "prob", "threshold", "prob_raw", "note",
)  # fmt: skip

_MIGRATION_LOCK = 0x6D65_6476_6974  # "medvit": the advisory lock key serialising PostgreSQL migrations
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1: digits and dots, at most 64 chars
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class ShownFinding:
    """What the reviewer saw for one finding: calibrated probability, its threshold and the raw model output."""

    prob: float
    threshold: float
    prob_raw: float | None = None


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
    ) -> int:
        """Store one review in a single transaction and return its id.

        Raises:
            MedvitError: a field is missing, too long or malformed (the message names it).
        """
        row = ReviewRow(
            created_at=datetime.now(UTC),
            reviewer=_check_reviewer(reviewer),
            note=_check_note(note),
            image_uid=_check_uid(image_uid, image_uid_kind),
            image_uid_kind=image_uid_kind,
            model_name=_check_text("model name", model_name, 200),
            weights_sha256=_check_hash(weights_sha256),
            shown=_shown_json(shown),
            verdicts=[VerdictRow(finding=f, verdict=v) for f, v in _check_verdicts(verdicts, shown).items()],
        )
        try:
            with Session(self.engine) as session, session.begin():
                session.add(row)
                session.flush()
                review_id = row.id
        except SQLAlchemyError as e:
            _log.exception("review write failed")
            raise MedvitError(
                f"review not saved: the database {self.display_url} refused the write ({e.__class__.__name__}); "
                "nothing was stored, try again"
            ) from e
        _log.info("stored review %d on %s (%d verdicts)", review_id, image_uid, len(verdicts))
        return review_id

    def count(self) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.count()).select_from(ReviewRow)) or 0)

    def history(
        self, *, image_uid: str | None = None, reviewer: str | None = None, limit: int | None = 1000
    ) -> list[Review]:
        """Reviews newest first, optionally for one image and/or one reviewer."""
        query = select(ReviewRow).options(selectinload(ReviewRow.verdicts))
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


def _to_review(r: ReviewRow) -> Review:
    created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC)  # SQLite drops the tz
    return Review(
        id=r.id, created_at=created, reviewer=r.reviewer, note=r.note, image_uid=r.image_uid,
        image_uid_kind=r.image_uid_kind, model_name=r.model_name, weights_sha256=r.weights_sha256,
        shown={f: ShownFinding(**v) for f, v in r.shown.items()}, verdicts={v.finding: v.verdict for v in r.verdicts},
    )  # fmt: skip


def _check_text(what: str, value: str, max_len: int, *, required: bool = True) -> str:
    value = (value or "").strip()
    if required and not value:
        raise MedvitError(f"review not saved: {what} is empty")
    if len(value) > max_len:
        raise MedvitError(f"review not saved: {what} is {len(value)} characters long (at most {max_len})")
    return value


def _check_reviewer(reviewer: str) -> str:
    return _check_text("reviewer name", reviewer, REVIEWER_MAX)


def _check_note(note: str) -> str:
    return _check_text("note", note, NOTE_MAX, required=False)


def is_dicom_uid(uid: str) -> bool:
    """Whether `uid` can key a review as a DICOM UID (ASCII digits and dots, at most 64 characters)."""
    return len(uid) <= 64 and _DICOM_UID.fullmatch(uid) is not None


def _check_uid(uid: str, kind: str) -> str:
    """Only a DICOM UID or a SHA-256 hex digest is accepted, so nothing identifying can be stored as the key."""
    uid = (uid or "").strip()
    if kind == "sop_instance_uid":
        if not is_dicom_uid(uid):
            raise MedvitError(f"review not saved: {uid!r} is not a DICOM SOP Instance UID (digits and dots)")
    elif kind == "sha256":
        uid = uid.lower()
        if len(uid) != 64 or not _HEX.match(uid):
            raise MedvitError("review not saved: image hash must be a 64-character SHA-256 hex digest")
    else:
        raise MedvitError(f"review not saved: image_uid_kind {kind!r} is not one of {', '.join(UID_KINDS)}")
    return uid


def _check_hash(value: str) -> str:
    value = (value or "").strip().lower()
    if not 8 <= len(value) <= 64 or not _HEX.match(value):
        raise MedvitError("review not saved: weights hash must be a hex digest (8-64 characters)")
    return value


def _shown_json(shown: Mapping[str, ShownFinding]) -> dict[str, dict[str, float | None]]:
    if not shown:
        raise MedvitError("review not saved: no findings were shown")
    out: dict[str, dict[str, float | None]] = {}
    for finding, s in shown.items():
        values = {"prob": s.prob, "threshold": s.threshold, "prob_raw": s.prob_raw}
        for key, v in values.items():
            if v is None and key == "prob_raw":
                continue
            if v is None or not math.isfinite(float(v)) or not 0.0 <= float(v) <= 1.0:
                raise MedvitError(f"review not saved: {finding} {key}={v!r} is not a probability in [0, 1]")
        out[_check_text("finding name", finding, 64)] = {k: None if v is None else float(v) for k, v in values.items()}
    return out


def _check_verdicts(verdicts: Mapping[str, str], shown: Mapping[str, ShownFinding]) -> dict[str, str]:
    if not verdicts:
        raise MedvitError("review not saved: choose agree / disagree / uncertain for at least one finding")
    for finding, verdict in verdicts.items():
        if verdict not in VERDICTS:
            raise MedvitError(
                f"review not saved: verdict {verdict!r} for {finding} is not one of {', '.join(VERDICTS)}"
            )
        if finding not in shown:
            raise MedvitError(f"review not saved: {finding} was not among the findings shown")
    return dict(verdicts)
