"""Honest findings: a constant calibration or a model card without skill means "not reported", never flagged;
one rounding decides every flag."""

from __future__ import annotations

import numpy as np
import pytest
from _inference_run import make_tiny_run
from conftest import testdata as dicom_path

from medvit._io import write_json
from medvit.data.dicom import read_image
from medvit.evaluate.calibration import Calibration
from medvit.evaluate.calibrators import Isotonic, Platt, Temperature
from medvit.evaluate.metrics import PROB_DECIMALS, flagged
from medvit.evaluate.reporting import FindingCard, constant_reason, read_card, skill_reason, unreported
from medvit.findings import DEFAULT_FINDINGS
from medvit.resources import DEMO_RUN
from medvit.runs import CALIBRATION


def test_every_shipped_constant_calibrator_is_not_reported():
    """A shipped run may carry a constant calibrator only if that finding is reported as "not reported"."""
    cal = Calibration.load(DEMO_RUN / CALIBRATION)
    card = read_card(DEMO_RUN)
    assert card is not None and card.mean_auroc is not None and card.n_images == 337  # out-of-fold, all dev images
    hidden = unreported(cal, card)
    constant = {f for f, c in zip(cal.findings, cal.calibrators, strict=True) if constant_reason(c)}
    assert constant <= hidden.keys()
    # The fold-ensemble demo (issue 15): Platt with a shared slope keeps every finding's ranking; the findings whose
    # out-of-fold AUROC shows no skill are not reported, those with skill stay reported.
    assert "no skill shown" in hidden["Mass"]
    assert "Infiltration" not in hidden and "Emphysema" not in hidden


def test_constant_calibrators_are_recognised():
    assert constant_reason(Platt(0.0, -1.5))
    assert constant_reason(Isotonic((-1.0, 2.0), (0.2, 0.2)))
    assert constant_reason(Platt(0.4, -2.0)) is None
    assert constant_reason(Isotonic((-1.0, 2.0), (0.1, 0.3))) is None
    assert constant_reason(Temperature(2.0)) is None


@pytest.mark.parametrize(
    ("card", "hidden"),
    [
        (FindingCard(auroc=0.55, auroc_ci=(0.3, 0.8)), True),  # no better than chance within its CI
        (FindingCard(auroc=0.58, auroc_ci=None), True),  # too few positives to tell
        (FindingCard(auroc=0.59, auroc_ci=(0.52, 0.66)), False),  # weak, but the CI excludes 0.5
        (FindingCard(auroc=0.75, auroc_ci=(0.45, 0.95)), False),  # above the no-skill line
        (FindingCard(auroc=None), True),  # one class in the evaluation data: no evidence at all
    ],
)
def test_skill_rule(card, hidden):
    assert bool(skill_reason(card)) is hidden


def test_one_rounding_decides_every_flag():
    # shown as 0.183 against 0.183: flagged, whichever side of the unrounded threshold the probability is
    assert flagged(0.18264, 0.18269) and flagged(0.18274, 0.18269)
    assert not flagged(0.1824, 0.18269)  # 0.182 < 0.183
    assert PROB_DECIMALS == 3
    probs, thr = np.array([0.1, 0.0996, 0.0994]), np.array([0.1, 0.1, 0.1])
    np.testing.assert_array_equal(Calibration.identity(["a", "b", "c"], 0.1).flags(probs), [True, True, False])
    np.testing.assert_array_equal(flagged(probs, thr), [True, True, False])


def test_predict_table_greys_out_what_it_must_not_report(tmp_path):
    from medvit.inference.predictor import Predictor

    run = make_tiny_run(tmp_path / "run")
    k = len(DEFAULT_FINDINGS)
    cals = [Platt(0.0, -1.5) if f == "Effusion" else Temperature(2.0) for f in DEFAULT_FINDINGS]
    # every threshold at 0: whatever the image, all reported findings are flagged and only the others are not
    Calibration(tuple(DEFAULT_FINDINGS), tuple(cals), np.zeros(k), "platt").save(run / CALIBRATION)
    card = {f: {"auroc": 0.9, "auroc_ci": [0.8, 0.97]} for f in DEFAULT_FINDINGS}
    card["Mass"] = {"auroc": 0.52, "auroc_ci": [0.3, 0.7]}
    write_json(run / "metrics.json", {"n_images": 10, "findings": card})
    table = Predictor.from_dir(run, backend="torch").predict(read_image(dicom_path("RG1_UNCI.dcm"))).table
    rows = table.set_index("finding")
    assert not rows.loc["Effusion", "reported"] and not rows.loc["Effusion", "flag"]
    assert "constant" in rows.loc["Effusion", "reason"]
    assert not rows.loc["Mass", "flag"] and "includes 0.5" in rows.loc["Mass", "reason"]
    others = rows.drop(index=["Effusion", "Mass"])
    assert others["reported"].all() and others["flag"].all() and (others["reason"] == "").all()
