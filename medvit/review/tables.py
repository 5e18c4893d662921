"""The review database's tables (SQLAlchemy ORM), one owner for the schema that the Alembic migrations create.

Reviews and their per-finding verdicts, the edit history of a review, site accounts and the audit trail.
There are deliberately no columns for patient name, ID or birth date. The PACS queue table lives in
`medvit.review.scoring`; migrations are in ``medvit/review/migrations``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NOTE_MAX = 2000
REVIEWER_MAX = 120


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    """A site-mode account (migration 0003). Only an argon2/bcrypt hash of the password is stored."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('reviewer', 'admin')", name="ck_users_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(REVIEWER_MAX), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_signins: Mapped[int] = mapped_column(Integer, default=0)  # consecutive, reset by a good sign-in
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    """One audited event: sign-in (ok/failed), identifier reveal, calibration change, account change, review edit."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str | None] = mapped_column(String(REVIEWER_MAX), nullable=True)  # who did it (None: unknown)
    event: Mapped[str] = mapped_column(String(32), index=True)
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)  # account, image UID, run, version
    ok: Mapped[bool] = mapped_column(Boolean, default=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class ReviewRow(Base):
    __tablename__ = "reviews"
    __table_args__ = (CheckConstraint("image_uid_kind IN ('sop_instance_uid', 'sha256')", name="ck_reviews_uid_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    reviewer: Mapped[str] = mapped_column(String(REVIEWER_MAX))
    note: Mapped[str] = mapped_column(String(NOTE_MAX))
    image_uid: Mapped[str] = mapped_column(String(64), index=True)
    image_uid_kind: Mapped[str] = mapped_column(String(16))
    model_name: Mapped[str] = mapped_column(String(200))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    shown: Mapped[dict[str, Any]] = mapped_column(JSON)  # {finding: {"prob", "threshold", "prob_raw"}}
    # migration 0003: the signed-in account (None in local mode and for imports), the calibration in force,
    # the last edit, and where the review came from
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    calibration_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    source: Mapped[str] = mapped_column(String(16), default="app")  # "app" | "import"
    verdicts: Mapped[list[VerdictRow]] = relationship(
        back_populates="review", cascade="all, delete-orphan", order_by="VerdictRow.finding"
    )
    edits: Mapped[list[ReviewEditRow]] = relationship(
        back_populates="review", cascade="all, delete-orphan", order_by="ReviewEditRow.id"
    )


class VerdictRow(Base):
    __tablename__ = "review_verdicts"
    __table_args__ = (
        CheckConstraint("verdict IN ('agree', 'disagree', 'uncertain')", name="ck_review_verdicts_verdict"),
        CheckConstraint("label IS NULL OR label IN ('present', 'absent')", name="ck_review_verdicts_label"),
    )

    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id", ondelete="CASCADE"), primary_key=True)
    finding: Mapped[str] = mapped_column(String(64), primary_key=True)
    verdict: Mapped[str] = mapped_column(String(16))
    # migration 0003: the verdict as a label (present / absent; NULL = uncertain, a missing label, never negative)
    label: Mapped[str | None] = mapped_column(String(8), nullable=True)
    review: Mapped[ReviewRow] = relationship(back_populates="verdicts")


class ReviewEditRow(Base):
    """The state of a review before one edit, so that editing a saved review keeps its whole history."""

    __tablename__ = "review_edits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id", ondelete="CASCADE"), index=True)
    edited_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    editor: Mapped[str] = mapped_column(String(REVIEWER_MAX))
    verdicts: Mapped[dict[str, Any]] = mapped_column(JSON)  # the verdicts before this edit {finding: verdict}
    note: Mapped[str] = mapped_column(String(NOTE_MAX))  # the note before this edit
    review: Mapped[ReviewRow] = relationship(back_populates="edits")
