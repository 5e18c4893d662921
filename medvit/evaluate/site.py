"""Site recalibration: per-finding calibrators refitted on a site's reviews, shrunk toward the calibration in use.

A model's calibration does not carry over between sites (prevalence, scanners, readers), and clinicians' reviews
are labels from the site itself. Per finding, with `n` labelled reviews that kept the model's raw output:

* **Shrinkage (a prior of `k` pseudo-reviews).** The new calibrator is a Platt map p = sigmoid(a z + b) on the
  raw logit z, fitted by weighted logistic regression on the reviews *plus* pseudo-reviews drawn from the current
  calibration g0: at every review's logit z_i, a positive with weight (k/n) g0(z_i) and a negative with weight
  (k/n) (1 - g0(z_i)). Together they weigh `k` reviews, so the reviews get weight n / (n + k): with k = 50,
  20 reviews move the fit less than a third of the way from the current calibration, 500 reviews about 90%.
  The prior lives at the site's own logits, so it says "what the current calibration predicts for these
  cases", and a finding whose reviews are all one class still gets a sensible fit.
* **Threshold.** Re-chosen with the run's rule (target sensitivity by default) on the new probabilities of the
  same weighted reviews + pseudo-reviews, so a threshold moves with the evidence, not with one positive case.
* **Time split.** Per finding, the newest `test_fraction` of its labelled reviews are held out; the calibrator
  is fitted on the older ones (and that is the calibration written), and ECE and AUROC before (the current
  calibration) and after are reported on the held-out newest reviews.

Findings with fewer than `min_reviews` labelled reviews keep their current calibrator and threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_curve, roc_curve

from medvit.errors import DatasetError
from medvit.evaluate import metrics
from medvit.evaluate.calibration import Calibration
from medvit.evaluate.calibrators import Calibrator, Platt

PRIOR_STRENGTH = 50.0  # pseudo-reviews of the current calibration per finding
MIN_REVIEWS = 30  # labelled reviews a finding needs to be recalibrated
TEST_FRACTION = 0.3  # newest share of each finding's reviews held out for the before/after report
_P_EPS = 1e-6  # raw probabilities are clipped to [eps, 1 - eps] before the logit


@dataclass(frozen=True)
class SiteFit:
    """The new calibration and, per finding, what went into it and how it did on the newest reviews."""

    calibration: Calibration
    report: dict[str, Any]


def _weighted_threshold(p: np.ndarray, y: np.ndarray, w: np.ndarray, rule: str, target: float) -> float:
    """`choose_threshold` with sample weights (flag when prob >= threshold)."""
    if rule == "f1":
        prec, rec, thr = precision_recall_curve(y, p, sample_weight=w)
        f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        return float(thr[int(np.argmax(f1))])
    fpr, tpr, thr = roc_curve(y, p, sample_weight=w, drop_intermediate=False)
    if rule == "youden":
        return float(thr[int(np.argmax(tpr[1:] - fpr[1:])) + 1])
    # sensitivity: the highest threshold that reaches the target (thr[0] is +inf and flags nothing)
    return float(thr[int(np.argmax(tpr >= target - 1e-12))])


def _fit_one(
    z: np.ndarray, y: np.ndarray, prior: Calibrator, prior_threshold: float, strength: float, rule: str, target: float
) -> tuple[Platt, float]:
    """Platt map and threshold for one finding from its reviews (z, y) and `strength` pseudo-reviews of `prior`."""
    g0 = prior.apply(z)
    n = len(z)
    x = np.concatenate([z, z, z]).reshape(-1, 1)
    target_y = np.concatenate([y, np.ones(n), np.zeros(n)]).astype(int)
    w = np.concatenate([np.ones(n), strength / n * g0, strength / n * (1.0 - g0)])
    pos_w = float(np.sum(w[target_y == 1]))
    prevalence = float(logit(np.clip(pos_w / np.sum(w), _P_EPS, 1 - _P_EPS)))
    if pos_w == 0 or pos_w == np.sum(w):  # one class and no prior: only the prevalence, the old threshold
        return Platt(0.0, prevalence), prior_threshold
    lr = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000).fit(x, target_y, sample_weight=w)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    cal = Platt(a, b) if a > 0 else Platt(0.0, prevalence)  # never reverse the model's ranking
    return cal, _weighted_threshold(cal.apply(x[:, 0]), target_y, w, rule, target)


def _split(g: pd.DataFrame, test_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    g = g.sort_values(["created_at", "review_id"], kind="stable")
    n_test = int(round(test_fraction * len(g)))
    return g.iloc[: len(g) - n_test], g.iloc[len(g) - n_test :]


def _scores(cal: Calibrator, z: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    p = cal.apply(z)
    return {"ece": metrics.ece(p, y) if len(y) else None, "auroc": metrics.auroc(p, y)}


def usable(reviews: pd.DataFrame) -> pd.DataFrame:
    """The reviews a calibrator can learn from: a present/absent label and the raw model output kept."""
    return reviews[reviews["label"].notna() & reviews["prob_raw"].notna()]


def check_enough(reviews: pd.DataFrame, findings: Sequence[str], min_reviews: int, *, every: bool) -> list[str]:
    """The findings (of `findings`, in order) with at least `min_reviews` usable reviews.

    Raises:
        DatasetError: "N labelled reviews of FINDING, at least M needed" when `every` finding must have enough and
            one has not, or when none has (naming the one closest to enough).
    """
    counts = usable(reviews)["finding"].value_counts()
    n = {f: int(counts.get(f, 0)) for f in findings}
    short = [f for f in findings if n[f] < min_reviews]
    if (every and short) or len(short) == len(findings):
        worst = short[0] if every else max(findings, key=lambda f: n[f])
        raise DatasetError(
            f"{n[worst]} labelled reviews of {worst}, at least {min_reviews} needed "
            "(present/absent verdicts of these weights' reviews that kept the raw model output)"
        )
    return [f for f in findings if f not in short]


def fit_site_calibration(
    current: Calibration,
    reviews: pd.DataFrame,
    *,
    findings: Sequence[str] | None = None,
    prior_strength: float = PRIOR_STRENGTH,
    min_reviews: int = MIN_REVIEWS,
    test_fraction: float = TEST_FRACTION,
) -> SiteFit:
    """Recalibrate `current` from reviews (columns finding, created_at, review_id, prob_raw, label 1/0/NaN).

    `findings`: the ones to recalibrate (default: every finding with at least `min_reviews` usable reviews);
    the others keep their calibrator and threshold.

    Raises:
        DatasetError: too few usable reviews (see `check_enough`).
    """
    if prior_strength < 0 or not 0 <= test_fraction < 1:
        raise ValueError("prior_strength must be >= 0 and test_fraction in [0, 1)")
    ready = check_enough(reviews, list(findings or current.findings), min_reviews, every=bool(findings))
    data = usable(reviews)
    rule = str(current.info.get("threshold_rule") or "sensitivity")
    target = float(current.info.get("target_sensitivity") or 0.9)
    cals, thresholds = list(current.calibrators), current.thresholds.copy()
    per: dict[str, Any] = {}
    for name in ready:
        k = current.findings.index(name)
        fit, test = _split(data[data["finding"] == name], test_fraction)
        z_fit = logit(np.clip(fit["prob_raw"].to_numpy(np.float64), _P_EPS, 1 - _P_EPS))
        y_fit = fit["label"].to_numpy(np.float64)
        cals[k], thresholds[k] = _fit_one(
            z_fit, y_fit, current.calibrators[k], float(current.thresholds[k]), prior_strength, rule, target
        )
        z_test = logit(np.clip(test["prob_raw"].to_numpy(np.float64), _P_EPS, 1 - _P_EPS))
        y_test = test["label"].to_numpy(np.float64)
        per[name] = {
            "n_fit": len(fit), "n_fit_pos": int(y_fit.sum()), "n_test": len(test), "n_test_pos": int(y_test.sum()),
            "review_weight": len(fit) / (len(fit) + prior_strength) if len(fit) + prior_strength else 1.0,
            "threshold_before": float(current.thresholds[k]), "threshold_after": float(thresholds[k]),
            "before": _scores(current.calibrators[k], z_test, y_test), "after": _scores(cals[k], z_test, y_test),
        }  # fmt: skip
    kept = [f for f in current.findings if f not in per]
    info = {
        **{key: v for key, v in current.info.items() if key not in ("findings", "selection", "chosen")},
        "chosen": "site/platt_shrunk",
        "threshold_rule": rule,
        "target_sensitivity": target if rule == "sensitivity" else None,
        "site": {"prior_strength": prior_strength, "test_fraction": test_fraction, "recalibrated": list(per),
                 "kept": kept},
        "findings": {f: ({"n_reviews_fit": per[f]["n_fit"]} if f in per else (current.info.get("findings") or {})
                         .get(f, {})) for f in current.findings},
    }  # fmt: skip
    method = "platt" if not kept else f"{current.method}+platt"
    new = Calibration(current.findings, tuple(cals), thresholds, method, info)
    return SiteFit(new, {"findings": per, "kept": kept, "mean": _means(per)})


def _means(per: dict[str, Any]) -> dict[str, float | None]:
    """Mean before/after ECE and AUROC over the recalibrated findings where each is defined."""
    out: dict[str, float | None] = {}
    for when in ("before", "after"):
        for key in ("ece", "auroc"):
            values = [v[when][key] for v in per.values() if v[when][key] is not None]
            out[f"{key}_{when}"] = float(np.mean(values)) if values else None
    return out
