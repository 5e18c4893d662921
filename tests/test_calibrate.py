"""medvit.calibrate: temperature / Platt / isotonic fits, CV choice of shrinkage, thresholds, JSON round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression

from medvit.errors import CheckpointError
from medvit.evaluate import calibration as calibrate
from medvit.evaluate import metrics
from medvit.evaluate.calibration import Calibration, fit_calibration, fit_temperature


def _synthetic(n: int, k: int, temperatures, bias=0.0, seed=0):
    """Labels drawn from sigmoid(true logit); the model's logits are the true logits times T (plus a bias)."""
    rng = np.random.default_rng(seed)
    true = rng.normal(-1.0, 2.0, size=(n, k))
    y = (rng.random((n, k)) < expit(true)).astype(np.float64)
    return true * np.asarray(temperatures) + bias, y


@pytest.fixture(scope="module")
def val_labels(dev_labels, dev_images):
    """Real NIH labels of the dev val split (51 patients) and their patient ids."""
    from medvit.data.datasets import label_matrix, load_labels
    from medvit.findings import NIH_FINDINGS

    df = load_labels(dev_labels, dev_images, check_files=False)
    val = df[df["split"] == "val"]
    return label_matrix(val, NIH_FINDINGS).astype(np.float64), val["patient_id"].to_numpy(), NIH_FINDINGS


def test_fit_temperature_recovers_a_known_temperature():
    z, y = _synthetic(20000, 1, [2.5], seed=1)
    assert fit_temperature(z[:, 0], y[:, 0]) == pytest.approx(2.5, rel=0.05)


def test_fit_temperature_multilabel_ignores_nan_and_softmax_pair():
    z, y = _synthetic(8000, 3, [0.5, 0.5, 0.5], seed=2)
    y[::3, 1] = np.nan
    assert fit_temperature(z, y) == pytest.approx(0.5, rel=0.05)
    # a zero-shot prompt pair [s_pos, s_neg]: softmax over the pair equals sigmoid of the difference
    rng = np.random.default_rng(3)
    s_neg = rng.normal(0, 1, 20000)
    s_pos = s_neg + 3.0 * rng.normal(0, 2, 20000)
    is_pos = rng.random(20000) < expit((s_pos - s_neg) / 3.0)
    t_pair = fit_temperature(np.stack([s_pos, s_neg], axis=1), np.where(is_pos, 0, 1))
    assert t_pair == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(s_pos - s_neg, is_pos.astype(float)) == pytest.approx(t_pair, rel=1e-3)


def test_isotonic_json_round_trip_reproduces_sklearn():
    z, y = _synthetic(600, 1, [1.7], seed=4)
    cal = fit_calibration(z, y, ["Effusion"], np.arange(600), method="isotonic")
    loaded = Calibration.from_json(cal.to_json())
    reference = IsotonicRegression(
        y_min=calibrate.ISOTONIC_EPS, y_max=1 - calibrate.ISOTONIC_EPS, out_of_bounds="clip"
    ).fit(z[:, 0], y[:, 0])
    z_new = np.concatenate([np.linspace(-15, 15, 301), z[:50, 0]])  # includes values outside the fitted range
    np.testing.assert_allclose(loaded.apply(z_new[:, None])[:, 0], reference.predict(z_new), atol=1e-12)
    assert json.loads(cal.to_json())["findings"]["Effusion"]["calibrator"] == "isotonic"


def test_platt_recovers_slope_and_intercept_and_round_trips():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 3, 20000)
    y = (rng.random(20000) < expit(0.5 * z - 1.0)).astype(float)
    cal = calibrate.fit_platt(z, y)
    assert cal.a == pytest.approx(0.5, rel=0.05) and cal.b == pytest.approx(-1.0, abs=0.07)
    full = fit_calibration(z[:2000, None], y[:2000, None], ["Mass"], np.arange(2000), method="platt")
    loaded = Calibration.from_json(full.to_json())
    np.testing.assert_allclose(loaded.apply(z[:100, None]), full.apply(z[:100, None]))


def test_platt_never_reverses_the_ranking():
    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    y = np.array([1, 1, 1, 0, 0, 0], dtype=float)  # anti-correlated on this tiny set
    cal = calibrate.fit_platt(z, y)
    assert cal.a == 0.0 and expit(cal.b) == pytest.approx(3.5 / 7)
    assert calibrate.fit_platt(z, np.zeros(6)).a == 0.0


@pytest.mark.parametrize(
    "method, bias",
    [("temperature", 0.0), ("platt", 1.5), ("isotonic", 1.5), ("auto", 1.5)],
)
def test_calibration_lowers_ece_on_held_out_miscalibrated_data(method, bias):
    # over-confident (T = 3); with bias, also over-predicting as class weighting (pos_weight) makes a model do
    z, y = _synthetic(4000, 2, [3.0, 3.0], bias=bias, seed=6)
    cal = fit_calibration(z[:2000], y[:2000], ["Atelectasis", "Mass"], np.arange(2000), method=method)
    probs = cal.apply(z[2000:])
    for k in range(2):
        before = metrics.ece(expit(z[2000:, k]), y[2000:, k])
        after = metrics.ece(probs[:, k], y[2000:, k])
        assert after < before / 2, (method, k, before, after)


def test_auto_prefers_a_calibrator_with_an_intercept_when_the_model_over_predicts():
    z, y = _synthetic(2000, 2, [3.0, 3.0], bias=1.5, seed=6)
    cal = fit_calibration(z, y, ["Atelectasis", "Mass"], np.arange(2000), method="auto")
    cv = cal.info["selection"]["cv_nll_per_label"]
    assert cal.method in ("platt", "isotonic")
    assert cv[cal.info["chosen"]] < cv["temperature/shared"] - 0.01  # a temperature cannot remove a bias


def test_shared_temperature_wins_cross_validation_on_a_small_calib_set():
    # 51 patients x 14 findings, all miscalibrated by the same T: per-finding fits only add variance
    z, y = _synthetic(51, 14, [2.0] * 14, seed=7)
    cal = fit_calibration(z, y, [f"f{i}" for i in range(14)], np.arange(51), method="temperature")
    cv = cal.info["selection"]["cv_nll_per_label"]
    assert cv["temperature/per_finding"] > min(cv["temperature/shared"], cv["temperature/shrink_16"])
    assert cal.info["chosen"] != "temperature/per_finding"
    temps = [c.temperature for c in cal.calibrators]
    assert np.std(np.log(temps)) < 0.3


def test_per_finding_temperatures_win_when_data_is_plentiful_and_findings_differ():
    z, y = _synthetic(3000, 3, [0.5, 1.0, 4.0], seed=8)
    cal = fit_calibration(z, y, ["a", "b", "c"], np.arange(3000), method="temperature")
    assert cal.info["chosen"] in ("temperature/per_finding", "temperature/shrink_1", "temperature/shrink_4")
    temps = [c.temperature for c in cal.calibrators]
    np.testing.assert_allclose(temps, [0.5, 1.0, 4.0], rtol=0.15)


def test_cross_validation_keeps_patients_together():
    # each patient contributes 6 identical images: if folds split patients, isotonic would see its test images
    # during fitting and its held-out NLL would look far better than with patients kept together
    z, y = _synthetic(60, 1, [1.0], seed=9)
    z_dup, y_dup, groups = np.repeat(z, 6, axis=0), np.repeat(y, 6, axis=0), np.repeat(np.arange(60), 6)
    grouped = calibrate.cross_validated_nll(z_dup, y_dup, groups, "isotonic")["isotonic"]
    leaky = calibrate.cross_validated_nll(z_dup, y_dup, np.arange(360), "isotonic")["isotonic"]
    assert leaky < 0.6 * grouped


@pytest.mark.parametrize("target", [0.9, 0.8, 1.0])
def test_threshold_hits_target_sensitivity_on_real_val_labels(val_labels, target):
    y, patients, findings = val_labels
    rng = np.random.default_rng(10)
    z = rng.normal(0, 1, y.shape) + 1.5 * np.nan_to_num(y)
    cal = fit_calibration(z, y, findings, patients, method="temperature", target_sensitivity=target)
    probs = cal.apply(z)
    for k, name in enumerate(findings):
        pos = probs[y[:, k] == 1, k]
        sens = np.mean(pos >= cal.thresholds[k])
        assert sens >= target, name
        assert np.mean(pos > cal.thresholds[k]) < target, name  # the highest threshold that reaches the target
    hernia = findings.index("Hernia")  # one positive in the val split
    assert int((y[:, hernia] == 1).sum()) == 1
    assert cal.thresholds[hernia] == pytest.approx(probs[y[:, hernia] == 1, hernia][0])


def test_youden_and_f1_thresholds_are_optimal_on_the_fitted_data():
    rng = np.random.default_rng(11)
    y = (rng.random(300) < 0.3).astype(float)
    p = expit(rng.normal(2 * y - 1, 1.2))
    candidates = np.unique(p)

    def youden(t):
        return np.mean(p[y == 1] >= t) + np.mean(p[y == 0] < t) - 1

    def f1(t):
        tp, fp, fn = np.sum((p >= t) & (y == 1)), np.sum((p >= t) & (y == 0)), np.sum((p < t) & (y == 1))
        return 2 * tp / (2 * tp + fp + fn)

    t_y, _ = calibrate.choose_threshold(p, y, "youden")
    t_f, _ = calibrate.choose_threshold(p, y, "f1")
    assert youden(t_y) == pytest.approx(max(youden(t) for t in candidates))
    assert f1(t_f) == pytest.approx(max(f1(t) for t in candidates))


def test_threshold_without_positives_falls_back_with_a_note():
    t, note = calibrate.choose_threshold(np.array([0.1, 0.2]), np.array([0.0, 0.0]))
    assert t == 0.5 and "no positive" in note


def test_save_is_atomic_and_load_checks_findings(tmp_path):
    z, y = _synthetic(200, 2, [2.0, 2.0], seed=12)
    cal = fit_calibration(z, y, ["Effusion", "Mass"], np.arange(200))
    path = tmp_path / "calibration.json"
    cal.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temp file left behind
    loaded = Calibration.load(path)
    np.testing.assert_allclose(loaded.apply(z), cal.apply(z))
    np.testing.assert_allclose(loaded.thresholds, cal.thresholds)
    assert loaded.info["findings"]["Mass"]["n_pos"] == int(y[:, 1].sum())
    loaded.check_findings(["Effusion", "Mass"])
    with pytest.raises(CheckpointError, match="re-run `medvit calibrate"):
        loaded.check_findings(["Mass", "Effusion"])
    with pytest.raises(CheckpointError, match="not found"):
        Calibration.load(tmp_path / "missing.json")
    path.write_text('{"findings": {"Mass": {"calibrator": "pickle"}}}')
    with pytest.raises(CheckpointError):
        Calibration.load(path)


def test_identity_is_the_plain_sigmoid():
    cal = Calibration.identity(["Effusion", "Mass"])
    z = np.array([[-2.0, 0.0], [1.0, 3.0]])
    np.testing.assert_allclose(cal.apply(z), expit(z))
    assert cal.flags(cal.apply(z)).tolist() == [[False, True], [True, True]]


def test_platt_shared_slope_borrows_the_slope_and_keeps_per_finding_prevalence():
    rng = np.random.default_rng(13)
    z = rng.normal(0, 2, size=(6000, 3))
    y = (rng.random((6000, 3)) < expit(0.6 * z + np.array([-3.0, -1.0, 0.5]))).astype(float)
    y[:, 2] = 0.0  # a finding without positives in the calibration data
    cals = calibrate.fit_platt_shared_slope(z, y)
    assert cals[0].a == cals[1].a == cals[2].a == pytest.approx(0.6, rel=0.08)
    assert [c.b for c in cals[:2]] == pytest.approx([-3.0, -1.0], abs=0.12)
    assert cals[2].apply(z[:, 2]).mean() == pytest.approx(0.5 / 6001, rel=0.05)  # smoothed prevalence
    cal = fit_calibration(z[:1500], y[:1500], ["a", "b", "c"], np.arange(1500), method="platt")
    assert set(cal.info["selection"]["cv_nll_per_label"]) == {"platt", "platt/shared_slope"}
    loaded = Calibration.from_json(cal.to_json())
    oof = calibrate.cross_validated_probs(z[:1500], y[:1500], np.arange(1500), loaded)
    assert oof.shape == (1500, 3) and metrics.ece(oof[:, 0], y[:1500, 0]) < 0.03


def test_auto_calibration_meets_the_demo_ece_target_on_dev_like_data(dev_labels, dev_images, val_labels):
    """The demo setting: calibrate on the 51 real val labels, check on 300 unseen patients drawn at the train
    prevalences, for a weak (AUROC ~0.7) model that over-predicts as pos_weight training makes it do."""
    from medvit.data.datasets import label_matrix, load_labels
    from medvit.findings import NIH_FINDINGS

    df = load_labels(dev_labels, dev_images, check_files=False)
    prev = label_matrix(df[df["split"] == "train"], NIH_FINDINGS).mean(axis=0)
    y_val, patients, findings = val_labels
    for seed in range(3):
        rng = np.random.default_rng(seed)

        def model(y, rng=rng):
            return 1.3 * (0.8 * y + rng.normal(0, 1, y.shape)) + 0.2 * np.log((1 - prev) / prev)

        y_new = (rng.random((300, 14)) < prev).astype(float)
        z_val, z_new = model(y_val), model(y_new)
        cal = fit_calibration(z_val, y_val, findings, patients, method="auto")
        probs = cal.apply(z_new)
        defined = [k for k in range(14) if 0 < y_new[:, k].sum() < 300]
        after = np.mean([metrics.ece(probs[:, k], y_new[:, k]) for k in defined])
        before = np.mean([metrics.ece(expit(z_new[:, k]), y_new[:, k]) for k in defined])
        assert after <= 0.05 and after < before, (seed, cal.info["chosen"], before, after)


def test_calibration_accepts_lists_and_rejects_mismatched_lengths():
    cal = Calibration(["Effusion", "Mass"], [calibrate.Temperature(2.0)] * 2, [0.3, 0.4], "temperature")
    cal.check_findings(("Effusion", "Mass"))
    assert cal.flags(np.array([[0.3, 0.39]])).tolist() == [[True, False]]
    with pytest.raises(ValueError, match="one calibrator and one threshold per finding"):
        Calibration(["Effusion"], [calibrate.Temperature(2.0)] * 2, [0.3, 0.4], "temperature")


def test_calibrators_module_is_the_one_calibrate_re_exports():
    """The calibrators moved to medvit.calibrators; old imports from medvit.calibrate must keep working."""
    from medvit.evaluate import calibrators

    moved = {"Calibrator", "Temperature", "Platt", "Isotonic", "ISOTONIC_EPS", "fit_temperature", "fit_platt",
             "fit_platt_shared_slope", "fit_isotonic"}
    assert moved <= set(calibrate.__all__)
    assert all(getattr(calibrate, name) is getattr(calibrators, name) for name in moved)
    fitted = (calibrators.Temperature(2.0), calibrators.Platt(1.5, -0.5), calibrators.Isotonic((0.0, 1.0), (0.2, 0.9)))
    for cal in fitted:
        again = calibrators.calibrator_from_json({"calibrator": cal.kind, **cal.params()})
        assert again == cal and set(cal.params()) | {"calibrator"} <= calibrators.PARAM_KEYS
    with pytest.raises(CheckpointError, match="unknown calibrator 'beta'"):
        calibrators.calibrator_from_json({"calibrator": "beta"})
