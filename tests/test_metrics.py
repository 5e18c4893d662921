"""medvit.metrics: hand-computed ECE, null metrics with reasons, threshold statistics, patient-level bootstrap."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvit.evaluate import metrics


def test_ece_matches_hand_computed_example():
    # 15 bins of width 1/15: {0.02, 0.04} -> bin 0, {0.50, 0.52} -> bin 7, {0.98, 1.0} -> bin 14
    p = np.array([0.02, 0.04, 0.50, 0.52, 0.98, 1.00])
    y = np.array([0, 1, 1, 0, 1, 1])
    # |0.03 - 0.5| * 2/6 + |0.51 - 0.5| * 2/6 + |0.99 - 1.0| * 2/6
    assert metrics.ece(p, y) == pytest.approx((0.47 + 0.01 + 0.01) / 3, abs=1e-12)


def test_ece_uses_fifteen_equal_width_bins():
    # 0.62 and 0.68 share a bin when there are 10 bins, but not with 15 (edges at 0.6, 0.667, 0.733)
    p, y = np.array([0.62, 0.68]), np.array([0, 1])
    assert metrics.ece(p, y) == pytest.approx((0.62 + 0.32) / 2)
    assert metrics.ece(p, y, n_bins=10) == pytest.approx(0.15)


def test_ece_is_zero_for_perfectly_calibrated_bins_and_brier_nll_by_hand():
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert metrics.ece(p, y) == pytest.approx(0.0, abs=1e-12)
    assert metrics.brier(p, y) == pytest.approx(0.1875)  # every error is 0.25^2 or 0.75^2: (6*0.0625 + 2*0.5625)/8
    assert metrics.nll(p, y) == pytest.approx(-(6 * np.log(0.75) + 2 * np.log(0.25)) / 8)


def test_rank_metrics_are_null_with_a_reason_without_positives_or_negatives():
    p = np.array([0.1, 0.4, 0.3])
    assert metrics.auroc(p, np.zeros(3)) is None
    assert metrics.auprc(p, np.ones(3)) is None
    assert metrics.undefined_reason(np.zeros(3)) == "no positive labels among 3 labelled images"
    assert metrics.undefined_reason(np.ones(3)) == "no negative labels among 3 labelled images"
    assert metrics.auroc(p, np.array([0, 1, 0])) == pytest.approx(1.0)


def test_finding_metrics_without_positives_reports_null_and_keeps_calibration_metrics():
    p = np.array([0.1, 0.2, 0.05, 0.3])
    out = metrics.finding_metrics(p, p, np.array([0, 0, np.nan, 0]), threshold=0.25)
    assert out["auroc"] is None and out["auprc"] is None
    assert out["reason"] == "no positive labels among 3 labelled images"
    assert out["n_pos"] == 0 and out["n_labelled"] == 3  # the NaN label is left out
    assert out["sensitivity"] is None and out["specificity"] == pytest.approx(2 / 3)  # 0.3 >= 0.25 is a false flag
    assert out["ece"] == pytest.approx(np.mean([0.1, 0.2, 0.3]))


def test_threshold_stats_counts_flags_at_or_above_threshold():
    p = np.array([0.9, 0.6, 0.5, 0.4, 0.1])
    y = np.array([1, 0, 1, 1, 0])
    s = metrics.threshold_stats(p, y, 0.5)  # flagged: 0.9 (TP), 0.6 (FP), 0.5 (TP)
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 1, 1, 1)
    assert s["sensitivity"] == pytest.approx(2 / 3)
    assert s["specificity"] == pytest.approx(1 / 2)
    assert s["ppv"] == pytest.approx(2 / 3)
    assert s["npv"] == pytest.approx(1 / 2)


def test_patient_bootstrap_keeps_a_patients_images_together():
    groups = np.array(["A", "A", "B", "C", "C", "C", "D"])
    resamples = metrics.patient_bootstrap_indices(groups, n_boot=300, seed=1)
    sizes = {"A": 2, "B": 1, "C": 3, "D": 1}
    for idx in resamples:
        counts = Counter(idx.tolist())
        assert counts[0] == counts[1]  # patient A's two images are always drawn together
        assert counts[3] == counts[4] == counts[5]
        drawn = {"A": counts[0], "B": counts[2], "C": counts[3], "D": counts[6]}
        assert sum(drawn.values()) == 4  # four patients drawn with replacement
        assert len(idx) == sum(n * sizes[g] for g, n in drawn.items())
    assert any(Counter(idx.tolist())[0] == 2 for idx in resamples)  # with replacement: A sometimes drawn twice
    again = metrics.patient_bootstrap_indices(groups, n_boot=300, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(resamples, again, strict=True))


def test_bootstrap_ci_brackets_the_auroc_and_widens_with_fewer_patients():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(float)
    p = rng.normal(y, 1.0)
    point = roc_auc_score(y, p)
    per_image = metrics.patient_bootstrap_indices(np.arange(400), 500, seed=0)
    lo, hi = metrics.bootstrap_ci(metrics.fast_auroc, p, y, per_image)
    assert lo < point < hi and 0.05 < hi - lo < 0.2
    # the same images as 40 patients of 10 correlated images each: far fewer independent units, wider CI
    p_corr = np.repeat(p[:40], 10)
    y_corr = np.repeat(y[:40], 10)
    by_patient = metrics.patient_bootstrap_indices(np.repeat(np.arange(40), 10), 500, seed=0)
    by_image = metrics.patient_bootstrap_indices(np.arange(400), 500, seed=0)
    lo_p, hi_p = metrics.bootstrap_ci(metrics.fast_auroc, p_corr, y_corr, by_patient)
    lo_i, hi_i = metrics.bootstrap_ci(metrics.fast_auroc, p_corr, y_corr, by_image)
    assert hi_p - lo_p > 2 * (hi_i - lo_i)


def test_bootstrap_ci_is_none_with_too_few_positive_patients():
    p = np.random.default_rng(0).random(60)
    resamples = metrics.patient_bootstrap_indices(np.arange(60), 300, seed=0)
    one_pos = np.array([1.0] + [0.0] * 59)  # ~37% of resamples miss the only positive patient
    assert metrics.bootstrap_ci(metrics.fast_auroc, p, one_pos, resamples) is None
    five_pos = np.array([1.0] * 5 + [0.0] * 55)
    lo, hi = metrics.bootstrap_ci(metrics.fast_auroc, p, five_pos, resamples)
    assert 0 <= lo < hi <= 1


def test_finding_metrics_maps_shared_resamples_through_the_nan_mask():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200).astype(float)
    p = 1 / (1 + np.exp(-rng.normal(2 * y - 1, 1.0)))
    y_nan = y.copy()
    y_nan[::4] = np.nan
    resamples = metrics.patient_bootstrap_indices(np.arange(200), 200, seed=0)
    out = metrics.finding_metrics(p, p, y_nan, 0.5, resamples)
    keep = ~np.isnan(y_nan)
    assert out["auroc"] == pytest.approx(roc_auc_score(y[keep], p[keep]))
    lo, hi = out["auroc_ci"]
    assert lo < out["auroc"] < hi


def test_fast_bootstrap_auroc_and_auprc_equal_sklearn_including_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(4)
    for n in (5, 40, 300):
        y = rng.integers(0, 2, n).astype(float)
        y[0], y[1] = 0, 1
        p = np.round(rng.random(n), 1)  # many ties
        assert metrics.fast_auroc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert metrics.fast_auprc(p, y) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert metrics.fast_auroc(p, np.zeros(n)) is None and metrics.fast_auprc(p, np.ones(n)) is None
