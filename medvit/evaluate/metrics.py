"""Per-finding classification and calibration metrics, with patient-level bootstrap confidence intervals.

Pure numpy/scikit-learn on one finding at a time: `probs` and `labels` are 1-D arrays of the same length, labels
are 0/1 with NaN meaning "unknown" (those images are left out of that finding). Metrics that need both classes
(AUROC, AUPRC, sensitivity, ...) return `None` together with a reason instead of raising, so one finding without
positives never stops an evaluation.

Bootstrap CIs resample *patients*, not images: several images of one patient are correlated, and resampling them
independently makes intervals too narrow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_log = logging.getLogger(__name__)

N_BINS = 15
_EPS = 1e-7
PROB_DECIMALS = 3  # probabilities and thresholds are shown, and compared, at this many decimals

MetricFn = Callable[[np.ndarray, np.ndarray], "float | None"]


def known(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of labelled (non-NaN) entries."""
    return ~np.isnan(np.asarray(labels, dtype=np.float64))


def undefined_reason(labels: np.ndarray) -> str | None:
    """Why rank metrics are undefined for these (already masked) labels, or None when both classes are present."""
    y = np.asarray(labels)
    n_pos = int((y == 1).sum())
    if y.size == 0:
        return "no labelled images"
    if n_pos == 0:
        return f"no positive labels among {y.size} labelled images"
    if n_pos == y.size:
        return f"no negative labels among {y.size} labelled images"
    return None


def auroc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve, or None when only one class is present."""
    from sklearn.metrics import roc_auc_score  # here, not at import: the review app's start-up needs none of it

    if undefined_reason(labels) is not None:
        return None
    return float(roc_auc_score(labels, probs))


def mean_auroc(labels: np.ndarray, scores: np.ndarray, findings: Sequence[str]) -> tuple[float, dict[str, float]]:
    """Mean AUROC over findings with both classes among the known labels (NaN when none has), and each value."""
    per: dict[str, float] = {}
    for j, name in enumerate(findings):
        m = known(labels[:, j])
        value = auroc(scores[m, j], labels[m, j])
        if value is not None:
            per[name] = value
    return (float(np.mean(list(per.values()))) if per else math.nan), per


def auprc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Average precision (area under the precision-recall curve), or None when only one class is present."""
    from sklearn.metrics import average_precision_score

    if undefined_reason(labels) is not None:
        return None
    return float(average_precision_score(labels, probs))


def fast_auroc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """AUROC by the Mann-Whitney rank sum (ties get average ranks, as in sklearn): the same value as
    `roc_auc_score` without its input validation, which dominates the cost of thousands of bootstrap calls."""
    pos = labels == 1
    n_pos = int(pos.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(probs)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fast_auprc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Average precision as sklearn defines it (sum over distinct thresholds of recall step x precision)."""
    n_pos = int((labels == 1).sum())
    if n_pos == 0 or n_pos == labels.size:
        return None
    order = np.argsort(-probs, kind="mergesort")
    p, y = probs[order], labels[order] == 1
    last = np.r_[np.flatnonzero(np.diff(p)), p.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_step * precision))


@dataclass(frozen=True)
class Reliability:
    """Equal-width reliability bins: per bin the image count, mean predicted probability and observed frequency."""

    edges: np.ndarray  # (n_bins + 1,)
    counts: np.ndarray  # (n_bins,) int
    mean_prob: np.ndarray  # (n_bins,) NaN for empty bins
    frac_pos: np.ndarray  # (n_bins,) NaN for empty bins


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> Reliability:
    """Bin predictions into `n_bins` equal-width bins on [0, 1] (the last bin includes 1.0)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(idx, weights=p, minlength=n_bins) / counts
        frac_pos = np.bincount(idx, weights=y, minlength=n_bins) / counts
    return Reliability(edges, counts, mean_prob, frac_pos)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error of P(finding) with equal-width bins: sum_b n_b/N * |mean p_b - positive rate_b|.

    This is the binary (per-finding) ECE on the predicted probability of the finding, not the top-label
    confidence used for multi-class models.
    """
    if len(probs) == 0:
        raise ValueError("ECE needs at least one labelled prediction")
    r = reliability(probs, labels, n_bins)
    filled = r.counts > 0
    gaps = np.abs(r.mean_prob[filled] - r.frac_pos[filled])
    return float(np.sum(r.counts[filled] * gaps) / r.counts.sum())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error between probability and 0/1 outcome."""
    p = np.asarray(probs, dtype=np.float64)
    return float(np.mean((p - np.asarray(labels, dtype=np.float64)) ** 2))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy (natural log); probabilities are clipped to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None


def flagged(probs: np.ndarray | float, thresholds: np.ndarray | float) -> np.ndarray:
    """`probs >= thresholds` compared at the `PROB_DECIMALS` everyone reads them at: a probability shown equal to
    its threshold is flagged, for every finding, in every table (the one flag rule of medvit)."""
    p = np.round(np.asarray(probs, dtype=np.float64), PROB_DECIMALS)
    return p >= np.round(np.asarray(thresholds, dtype=np.float64), PROB_DECIMALS)


def threshold_stats(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Confusion counts and sensitivity / specificity / PPV / NPV when flagging `probs >= threshold` (`flagged`).

    A ratio whose denominator is zero (e.g. sensitivity without positives) is None.
    """
    flag = flagged(probs, threshold)
    y = np.asarray(labels) == 1
    tp, fp = int(np.sum(flag & y)), int(np.sum(flag & ~y))
    fn, tn = int(np.sum(~flag & y)), int(np.sum(~flag & ~y))
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def patient_bootstrap_indices(groups: Sequence | np.ndarray, n_boot: int, seed: int = 0) -> list[np.ndarray]:
    """Image indices of `n_boot` bootstrap resamples that draw whole patients with replacement.

    All images of a drawn patient enter together (twice if the patient is drawn twice). The same resamples are
    meant to be reused for every finding, so per-finding and mean CIs come from the same patient draws.
    """
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    rng = np.random.default_rng(seed)
    n_groups = len(members)
    # int32 halves the memory of 1000 resamples of a large test set
    members = [m.astype(np.int32) for m in members]
    return [np.concatenate([members[g] for g in rng.integers(0, n_groups, n_groups)]) for _ in range(n_boot)]


def bootstrap_ci(
    metric: MetricFn,
    probs: np.ndarray,
    labels: np.ndarray,
    resamples: Sequence[np.ndarray],
    alpha: float = 0.05,
) -> tuple[float, float] | None:
    """Percentile (1 - alpha) CI of `metric` over patient resamples; resamples where it is undefined are skipped.

    Returns None when more than 10% of the resamples are undefined: that happens with fewer than about three
    positive (or negative) patients, too few for an interval, and skipping many resamples would bias it.
    """
    values = []
    for idx in resamples:
        v = metric(probs[idx], labels[idx])
        if v is not None:
            values.append(v)
    if not resamples or len(values) < 0.9 * len(resamples):
        return None
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def finding_metrics(
    probs_raw: np.ndarray,
    probs_cal: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    resamples: Sequence[np.ndarray] = (),
    probs_flag: np.ndarray | None = None,
) -> dict[str, object]:
    """All metrics of one finding, before (raw) and after (calibrated) calibration, NaN labels left out.

    AUROC/AUPRC and their CIs use the raw model output (the model's ranking, which temperature and Platt scaling
    do not change); ECE/Brier/NLL are reported for both; threshold statistics use the calibrated probabilities,
    as the threshold is stored on that scale (`probs_flag` overrides them, e.g. in-sample probabilities when
    `probs_cal` are out-of-fold). `resamples` are image indices from `patient_bootstrap_indices`.
    """
    mask = known(labels)
    y, p_raw, p_cal = np.asarray(labels)[mask], np.asarray(probs_raw)[mask], np.asarray(probs_cal)[mask]
    if y.size == 0:
        raise ValueError("finding_metrics needs at least one labelled image; skip findings without labels")
    # remap the shared (all-image) resamples to positions in the masked arrays
    position = np.cumsum(mask) - 1
    masked_resamples = [position[idx[mask[idx]]] for idx in resamples]
    out: dict[str, object] = {
        "auroc": auroc(p_raw, y),
        "auprc": auprc(p_raw, y),
        "auroc_ci": bootstrap_ci(fast_auroc, p_raw, y, masked_resamples) if masked_resamples else None,
        "auprc_ci": bootstrap_ci(fast_auprc, p_raw, y, masked_resamples) if masked_resamples else None,
        "ece": ece(p_cal, y),
        "ece_uncalibrated": ece(p_raw, y),
        "brier": brier(p_cal, y),
        "brier_uncalibrated": brier(p_raw, y),
        "nll": nll(p_cal, y),
        "nll_uncalibrated": nll(p_raw, y),
        "n_pos": int((y == 1).sum()),
        "n_neg": int((y == 0).sum()),
        "n_labelled": int(y.size),
        "threshold": float(threshold),
        **threshold_stats(p_cal if probs_flag is None else np.asarray(probs_flag)[mask], y, threshold),
    }
    reason = undefined_reason(y)
    if reason is not None:
        out["reason"] = reason
    return out
