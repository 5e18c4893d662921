"""The labelled reviews of one model as a table: what site recalibration and monitoring read from the database.

One row per (review, finding) of the reviews made with one set of weights, oldest first. `label` is 1.0 for
present, 0.0 for absent and NaN for uncertain (a missing label, never a negative). Reviews stored before
migration 0003 have no label column value; theirs is derived from the verdict and the flag that was shown
(`medvit.review.labels`), exactly as the app does for new reviews.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from medvit.review.checks import ShownFinding
from medvit.review.labels import verdict_label
from medvit.review.tables import ReviewRow, VerdictRow

COLUMNS = (
    "review_id", "created_at", "reviewer", "image_uid", "finding", "verdict", "label", "prob", "threshold",
    "prob_raw", "calibration_version", "source",
)  # fmt: skip
_LABEL_VALUE = {"present": 1.0, "absent": 0.0}


def _label(verdict: str, label: str | None, shown: dict[str, Any]) -> float:
    if label is None and verdict != "uncertain":  # stored before labels existed
        label = verdict_label(verdict, ShownFinding(**shown).flagged)
    return _LABEL_VALUE.get(label, math.nan) if label is not None else math.nan


def labelled_reviews(engine: Engine, weights_sha256: str | None) -> pd.DataFrame:
    """Every verdict on reviews of these weights (None: of any model; uncertain ones too, label NaN), oldest first.

    `created_at` is a timezone-aware UTC pandas timestamp; `prob_raw` is NaN where the review did not keep it.
    """
    query = (
        select(ReviewRow.id, ReviewRow.created_at, ReviewRow.reviewer, ReviewRow.image_uid, ReviewRow.shown,
               ReviewRow.calibration_version, ReviewRow.source, VerdictRow.finding, VerdictRow.verdict,
               VerdictRow.label)
        .join(VerdictRow, VerdictRow.review_id == ReviewRow.id)
        .order_by(ReviewRow.created_at, ReviewRow.id, VerdictRow.finding)
    )  # fmt: skip
    if weights_sha256 is not None:
        query = query.where(ReviewRow.weights_sha256 == weights_sha256.lower())
    rows: list[dict[str, Any]] = []
    with Session(engine) as session:
        for rid, created, reviewer, uid, shown, version, source, finding, verdict, label in session.execute(query):
            s = shown.get(finding) or {}
            prob, threshold = float(s.get("prob", math.nan)), float(s.get("threshold", math.nan))
            raw = s.get("prob_raw")
            rows.append({
                "review_id": rid, "created_at": created, "reviewer": reviewer, "image_uid": uid, "finding": finding,
                "verdict": verdict, "label": _label(verdict, label, s), "prob": prob,
                "threshold": threshold, "prob_raw": math.nan if raw is None else float(raw),
                "calibration_version": version, "source": source,
            })  # fmt: skip
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)  # SQLite returns naive UTC datetimes
    return df
