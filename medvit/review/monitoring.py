"""How the model is doing at this site, per finding, judged against its reviewers; and whether it is drifting.

Computed from `labelled_reviews` (the reviews of one model's weights):

* review count and agreement rate (agree / (agree + disagree); uncertain verdicts are left out);
* a reliability diagram of the probabilities shown against the reviewers' labels, and its ECE;
* AUROC of the raw model output against the labels, with a bootstrap CI that resamples images (several reviews
  of one image are correlated, like several images of one patient in `medvit.evaluate.metrics`);
* a weekly trend (reviews, agreement, mean probability shown, positive rate).

Drift: over the most recent `recent` labelled reviews of a finding, agreement below, or ECE above, a bound set
from the run's metrics.json (what its model card reports). Agreement is the accuracy at the threshold with the
reviewer as reference, so the bound is the card's accuracy minus 0.05 and a 95% binomial margin for that many
reviews. ECE of even perfectly calibrated outputs is positive on a small sample, so the bound is the card's ECE
plus the 95th percentile of the ECE that outputs calibrated by construction (labels drawn from the shown
probabilities) reach on the same recent reviews.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medvit.evaluate import metrics

RECENT = 50  # labelled reviews per finding in the drift window
MIN_RECENT = 20  # fewer labelled reviews than this are not judged for drift
AGREEMENT_SLACK = 0.05
N_NULL = 200  # simulations for the ECE bound's sampling margin


@dataclass(frozen=True)
class Bounds:
    """Drift bounds for one finding's recent reviews, and the model-card values they come from."""

    min_agreement: float | None
    max_ece: float | None
    card_accuracy: float | None
    card_ece: float | None


@dataclass(frozen=True)
class FindingMonitor:
    """One finding's monitoring numbers (None where the reviews cannot define them, e.g. one class only)."""

    finding: str
    n_reviews: int  # verdicts, uncertain included
    n_labelled: int  # present or absent
    agreement: float | None
    ece: float | None
    reliability: metrics.Reliability | None
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    weekly: pd.DataFrame
    n_recent: int = 0
    recent_agreement: float | None = None
    recent_ece: float | None = None
    bounds: Bounds | None = None
    drift: list[str] = field(default_factory=list)  # one sentence per bound crossed

    def row(self) -> dict[str, Any]:
        """The summary-table row of this finding."""
        ci = f"{self.auroc_ci[0]:.2f}-{self.auroc_ci[1]:.2f}" if self.auroc_ci else None
        return {
            "finding": self.finding,
            "reviews": self.n_reviews,
            "labelled": self.n_labelled,
            "agreement": self.agreement,
            "AUROC": self.auroc,
            "AUROC 95% CI": ci,
            "ECE": self.ece,
            "recent agreement": self.recent_agreement,
            "recent ECE": self.recent_ece,
            "drift": "; ".join(self.drift) or None,
        }


def _agreement(verdicts: pd.Series) -> float | None:
    decided = verdicts[verdicts != "uncertain"]
    return float((decided == "agree").mean()) if len(decided) else None


def weekly_trend(reviews: pd.DataFrame) -> pd.DataFrame:
    """Per calendar week (starting Monday, UTC): reviews, labelled reviews, agreement, mean prob, positive rate."""
    if reviews.empty:
        return pd.DataFrame(columns=["week", "reviews", "labelled", "agreement", "mean_prob", "positive_rate"])
    week = reviews["created_at"].dt.tz_convert("UTC").dt.tz_localize(None).dt.to_period("W-SUN").dt.start_time
    out = []
    for start, g in reviews.groupby(week, sort=True):
        known = g[g["label"].notna()]
        out.append(
            {
                "week": start,
                "reviews": len(g),
                "labelled": len(known),
                "agreement": _agreement(g["verdict"]),
                "mean_prob": float(g["prob"].mean()),
                "positive_rate": float(known["label"].mean()) if len(known) else None,
            }
        )
    return pd.DataFrame(out)


def card_bounds(card_finding: dict[str, Any] | None, recent_probs: np.ndarray, seed: int = 0) -> Bounds:
    """Bounds for `recent_probs` (the probabilities shown on the recent labelled reviews) from one finding's
    metrics.json entry; a bound is None where the card has no value for it."""
    card_finding = card_finding or {}
    n = len(recent_probs)
    counts = [c for c in (card_finding.get(k) for k in ("tp", "tn", "fp", "fn")) if isinstance(c, int)]
    accuracy = (counts[0] + counts[1]) / sum(counts) if len(counts) == 4 and sum(counts) > 0 else None
    min_agreement = None
    if accuracy is not None and n:
        min_agreement = accuracy - AGREEMENT_SLACK - 1.96 * math.sqrt(accuracy * (1 - accuracy) / n)
    card_ece = card_finding.get("ece")
    max_ece = None
    if isinstance(card_ece, int | float) and n:
        rng = np.random.default_rng(seed)
        null = [metrics.ece(recent_probs, rng.random(n) < recent_probs) for _ in range(N_NULL)]
        max_ece = float(card_ece) + float(np.percentile(null, 95))
    return Bounds(min_agreement, max_ece, accuracy, float(card_ece) if isinstance(card_ece, int | float) else None)


def _auroc(known: pd.DataFrame, n_boot: int) -> tuple[float | None, tuple[float, float] | None]:
    scores = known["prob_raw"].where(known["prob_raw"].notna(), known["prob"]).to_numpy(dtype=np.float64)
    y = known["label"].to_numpy(dtype=np.float64)
    value = metrics.auroc(scores, y)
    if value is None or n_boot <= 0:
        return value, None
    resamples = metrics.patient_bootstrap_indices(known["image_uid"].to_numpy(), n_boot)
    return value, metrics.bootstrap_ci(metrics.fast_auroc, scores, y, resamples)


def monitor_finding(
    finding: str,
    reviews: pd.DataFrame,
    card_finding: dict[str, Any] | None = None,
    *,
    recent: int = RECENT,
    n_boot: int = 1000,
) -> FindingMonitor:
    """The numbers of one finding from its rows of `labelled_reviews` (oldest first)."""
    known = reviews[reviews["label"].notna()]
    y, p = known["label"].to_numpy(dtype=np.float64), known["prob"].to_numpy(dtype=np.float64)
    auroc, ci = _auroc(known, n_boot)
    last = known.tail(recent)
    mon = FindingMonitor(
        finding=finding, n_reviews=len(reviews), n_labelled=len(known), agreement=_agreement(reviews["verdict"]),
        ece=metrics.ece(p, y) if len(known) else None,
        reliability=metrics.reliability(p, y, n_bins=10) if len(known) else None,
        auroc=auroc, auroc_ci=ci, weekly=weekly_trend(reviews), n_recent=len(last),
        recent_agreement=_agreement(last["verdict"]),
        recent_ece=metrics.ece(last["prob"].to_numpy(), last["label"].to_numpy()) if len(last) else None,
    )  # fmt: skip
    if len(last) < MIN_RECENT:
        return mon
    bounds = card_bounds(card_finding, last["prob"].to_numpy(dtype=np.float64))
    drift = []
    if (
        bounds.min_agreement is not None
        and mon.recent_agreement is not None
        and mon.recent_agreement < bounds.min_agreement
    ):
        drift.append(
            f"agreement {mon.recent_agreement:.2f} over the last {len(last)} reviews is below "
            f"{bounds.min_agreement:.2f} (model card accuracy {bounds.card_accuracy:.2f})"
        )
    if bounds.max_ece is not None and mon.recent_ece is not None and mon.recent_ece > bounds.max_ece:
        drift.append(
            f"ECE {mon.recent_ece:.3f} over the last {len(last)} reviews is above {bounds.max_ece:.3f} "
            f"(model card ECE {bounds.card_ece:.3f})"
        )
    return FindingMonitor(**{**mon.__dict__, "bounds": bounds, "drift": drift})


def monitor(
    reviews: pd.DataFrame, card: dict[str, Any] | None = None, *, recent: int = RECENT, n_boot: int = 1000
) -> list[FindingMonitor]:
    """Per-finding monitoring of `labelled_reviews` output, in finding order of first appearance.

    `card`: the run's metrics.json (its "findings" entries set the drift bounds); None checks no drift.
    """
    per_card = (card or {}).get("findings", {})
    return [
        monitor_finding(
            f, reviews[reviews["finding"] == f], per_card.get(f) if card else None, recent=recent, n_boot=n_boot
        )
        for f in dict.fromkeys(reviews["finding"])
    ]
