"""The `pacs_instances` table of the review database: one row per CR/DX instance `medvit watch` has seen.

Each row holds the instance's UIDs (never patient attributes) and its scoring status: pending, scored (with
the SR's UID), refused (with the reason) or failed (with the attempt count). The queue logic that claims
rows lives in `medvit.pacs.queue`; the schema is created by migration 0002.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from sqlalchemy import CheckConstraint, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from medvit.review.tables import Base

Status = Literal["pending", "scored", "refused", "failed"]
STATUSES: tuple[str, ...] = get_args(Status)
REASON_MAX = 500


class PacsInstanceRow(Base):
    __tablename__ = "pacs_instances"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'scored', 'refused', 'failed')", name="ck_pacs_instances_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(REASON_MAX), nullable=True)  # refused / failed: why
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # failed scorings so far
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(120), nullable=True)  # which watcher last handled it
    discovered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
