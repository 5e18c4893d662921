"""Site recalibration on a simulated site: real dev images and labels, the real demo model, a real database.

The site has Effusion at 50% prevalence where the demo model was calibrated at 18%, so its calibration is off
there; recalibrating from the older reviews must lower the ECE on the newest ones, write a new version without
touching the old one, and `--activate` must roll back to exactly the earlier outputs.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _site import copy_demo_run, enriched_site, import_csv, reviews_csv

from medvit.cli import main
from medvit.data.dicom import read_image
from medvit.evaluate.calibration import Calibration, Platt, Temperature
from medvit.evaluate.site import fit_site_calibration
from medvit.evaluate.versions import active_name, list_versions, load_version, register_refit, save_version
from medvit.inference.predictor import Predictor
from medvit.review.audit import events
from medvit.review.store import ReviewStore
from medvit.runs import CALIBRATION


@pytest.fixture(scope="module")
def site(dev_data, tmp_path_factory):
    """The site's reviews (110 images x 14 findings, 12 h apart) in a SQLite database, scored by the demo model."""
    folder = tmp_path_factory.mktemp("site")
    frame = enriched_site(dev_data)
    url = f"sqlite:///{folder / 'reviews.sqlite3'}"
    import_csv(reviews_csv(frame, folder / "site.csv"), dev_data, copy_demo_run(folder / "scoring_run"), url)
    return frame, url


def _calibrate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["calibrate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_recalibration_lowers_ece_on_the_newest_reviews(site, tmp_path, capsys):
    frame, url = site
    run = copy_demo_run(tmp_path / "run")
    v1_bytes = (run / CALIBRATION).read_bytes()
    code, out, err = _calibrate(capsys, "--run", str(run), "--from-reviews", "--db", url)
    assert code == 0, err
    result = json.loads(out)
    assert (result["version"], result["parent"], result["active"]) == ("v2", "v1", True)
    effusion = result["evaluation"]["findings"]["Effusion"]
    assert effusion["n_fit"] + effusion["n_test"] == len(frame) and effusion["n_test"] == round(0.3 * len(frame))
    assert effusion["after"]["ece"] < effusion["before"]["ece"] - 0.05, effusion
    assert effusion["review_weight"] == pytest.approx(effusion["n_fit"] / (effusion["n_fit"] + 50))

    # the version records where it came from; v1 is kept byte for byte
    v1, v2 = list_versions(run)
    assert (v1.name, v1.active, v2.name, v2.active) == ("v1", False, "v2", True)
    assert v1.path.read_bytes() == v1_bytes and (run / CALIBRATION).read_bytes() == v1_bytes
    reviews = v2.meta["reviews"]
    assert reviews["n_reviewers"] == 3 and reviews["per_finding"]["Effusion"]["n_present"] == len(frame) // 2
    assert pd.Timestamp(reviews["from"]) == pd.Timestamp("2024-01-01T08:00:00Z")
    assert pd.Timestamp(reviews["to"]) == pd.Timestamp("2024-01-01T08:00:00Z") + pd.Timedelta(hours=12 * 109)
    assert v2.meta["parent"] == "v1" and v2.meta["created_by"].startswith("cli") and v2.meta["created_at"]
    store = ReviewStore(url)
    try:
        audited = events(store.engine, event="calibration_change")
    finally:
        store.close()
    assert any(e.target == f"{run.name}:v2" and e.detail["parent"] == "v1" for e in audited)
    code, out, _ = _calibrate(capsys, "--run", str(run), "--versions")
    assert [json.loads(line)["version"] for line in out.splitlines()] == ["v1", "v2"]


def _tables(run: Path, images: list[Path], predictor: Predictor | None = None) -> tuple[str, list[pd.DataFrame]]:
    predictor = predictor or Predictor.from_dir(run, backend="torch")
    preds = predictor.predict_many([read_image(p) for p in images])
    assert {p.calibration_version for p in preds} == {predictor.calibration_version}
    return predictor.calibration_version, [p.table for p in preds]


def test_rollback_restores_the_earlier_outputs_exactly(site, dev_images, tmp_path, capsys):
    frame, url = site
    run = copy_demo_run(tmp_path / "run")
    images = [dev_images / name for name in frame["Image Index"][:4]]
    serving = Predictor.from_dir(run, backend="torch")  # a long-running app or PACS watcher
    before = _tables(run, images, serving)
    assert _calibrate(capsys, "--run", str(run), "--from-reviews", "--db", url)[0] == 0
    after = _tables(run, images)
    assert after[0] == "v2" and not np.allclose(after[1][0]["prob"], before[1][0]["prob"])
    followed = _tables(run, images, serving)  # follows the activation without a restart
    assert followed[0] == "v2"
    for new, same in zip(after[1], followed[1], strict=True):
        pd.testing.assert_frame_equal(new, same, check_exact=True)

    code, out, err = _calibrate(capsys, "--run", str(run), "--activate", "v1", "--db", url)
    assert code == 0, err
    assert json.loads(out) == {"active": "v1", "previous": "v2"}
    rolled_back = _tables(run, images)
    assert rolled_back[0] == "v1" and _tables(run, images, serving)[0] == "v1"
    for old, new in zip(before[1], rolled_back[1], strict=True):
        pd.testing.assert_frame_equal(old, new, check_exact=True)
    assert _calibrate(capsys, "--run", str(run), "--activate", "v2", "--db", url)[0] == 0  # and forward again
    for old, new in zip(after[1], _tables(run, images)[1], strict=True):
        pd.testing.assert_frame_equal(old, new, check_exact=True)

    assert main(["predict", "--run", str(run), "--backend", "torch", str(images[0])]) == 0
    assert "calibration v2" in capsys.readouterr().err
    code, _, err = _calibrate(capsys, "--run", str(run), "--activate", "v7", "--db", url)
    assert code == 2 and "calibration version 'v7' not found" in err and "v1, v2" in err


def test_too_few_reviews_are_refused(site, dev_data, tmp_path, capsys):
    frame, url = site
    run = copy_demo_run(tmp_path / "run")
    few = f"sqlite:///{tmp_path / 'few.sqlite3'}"
    import_csv(reviews_csv(frame.head(12), tmp_path / "few.csv", findings=("Effusion", "Mass")), dev_data, run, few)
    code, _, err = _calibrate(capsys, "--run", str(run), "--from-reviews", "--db", few)
    assert code == 2 and err.strip().count("\n") == 0
    assert "12 labelled reviews of Effusion, at least 30 needed" in err
    code, _, err = _calibrate(capsys, "--run", str(run), "--from-reviews", "--db", url, "--finding", "pleural effusion",
                              "--min-reviews", "500")  # fmt: skip
    assert code == 2 and f"{len(frame)} labelled reviews of Effusion, at least 500 needed" in err
    assert not (run / "calibrations").exists() and active_name(run) == "v1"


def test_no_activate_writes_a_version_but_keeps_the_active_one(site, tmp_path, capsys):
    _, url = site
    run = copy_demo_run(tmp_path / "run")
    code, out, err = _calibrate(capsys, "--run", str(run), "--from-reviews", "--db", url, "--no-activate",
                                "--finding", "Effusion")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["active"] is False and active_name(run) == "v1"
    v1, v2 = load_version(run, "v1"), load_version(run, "v2")
    k = v1.findings.index("Effusion")
    others = [i for i in range(len(v1.findings)) if i != k]
    assert v2.calibrators[k] != v1.calibrators[k]
    assert [v2.calibrators[i] for i in others] == [v1.calibrators[i] for i in others]  # kept as they were
    assert np.array_equal(v2.thresholds[others], v1.thresholds[others])


def test_versions_are_write_once_and_a_later_calibrate_becomes_a_version(tmp_path):
    run = copy_demo_run(tmp_path / "run")
    v1 = load_version(run, "v1")
    assert register_refit(run) == "v1"  # no versions yet: calibration.json simply is v1
    v2 = save_version(run, Calibration.identity(v1.findings), {"source": "test"}, activate=False)
    v2_bytes = (run / "calibrations" / "v2.json").read_bytes()
    refit = Calibration(v1.findings, tuple(Temperature(3.0) for _ in v1.findings), v1.thresholds, "temperature")
    refit.save(run / CALIBRATION)  # what `medvit calibrate` does
    assert register_refit(run) == "v3" and active_name(run) == "v3"
    assert (
        load_version(run, "v1").to_json() == v1.to_json()
        and (run / "calibrations" / "v2.json").read_bytes() == v2_bytes
    )
    assert list_versions(run)[2].meta["parent"] == "v1" and v2 == "v2"


def test_shrinkage_keeps_a_few_reviews_from_swinging_a_finding():
    """20 reviews that all say 'present' move the fit a little; 2000 of them move it most of the way."""
    current = Calibration(("Effusion",), (Platt(1.0, -1.5),), np.array([0.2]), "platt")
    rng = np.random.default_rng(0)

    def shifted(n: int) -> float:
        z = rng.normal(0, 1.5, n)
        reviews = pd.DataFrame(
            {
                "finding": "Effusion",
                "created_at": pd.date_range("2024-01-01", periods=n, freq="h"),
                "review_id": range(n),
                "prob_raw": 1 / (1 + np.exp(-z)),
                "label": (rng.random(n) < 1 / (1 + np.exp(-(z + 2.0)))).astype(float),
            }
        )
        fit = fit_site_calibration(current, reviews, min_reviews=10, test_fraction=0.0)
        return float(fit.calibration.apply(np.zeros((1, 1)))[0, 0])  # P(Effusion) at logit 0

    p0, truth = 1 / (1 + math.exp(1.5)), 1 / (1 + math.exp(-2.0))
    few, many = shifted(20), shifted(2000)
    assert p0 < few < p0 + 0.5 * (truth - p0)
    assert many > p0 + 0.8 * (truth - p0)


def test_evaluate_names_the_active_calibration_version(site, dev_labels, dev_images, tmp_path, capsys):
    from medvit.evaluate.pipeline import evaluate_run

    _, url = site
    run = copy_demo_run(tmp_path / "run")
    assert _calibrate(capsys, "--run", str(run), "--from-reviews", "--db", url)[0] == 0
    report = evaluate_run(run, dev_labels, dev_images, tmp_path / "eval", split="val", n_boot=0, plots=False,
                          engine="torch")  # fmt: skip
    assert report["calibration_version"] == "v2"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["calibration_version"] == "v2"


def test_concurrent_writers_get_distinct_versions(tmp_path):
    run = copy_demo_run(tmp_path / "run")
    v1 = load_version(run, "v1")
    cals = [Calibration(v1.findings, tuple(Temperature(1.0 + i) for _ in v1.findings), v1.thresholds, "temperature")
            for i in range(6)]  # fmt: skip
    names: list[str] = []
    threads = [threading.Thread(target=lambda c=c: names.append(save_version(run, c, {"source": "test"})))
               for c in cals]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names, key=lambda n: int(n[1:])) == [f"v{i}" for i in range(2, 8)]
    stored = {load_version(run, n).calibrators[0] for n in names}
    assert stored == {Temperature(1.0 + i) for i in range(6)}  # each file holds what one writer wrote
    assert load_version(run, "v1").to_json() == v1.to_json()
