"""Monitoring against reviewers: numbers recomputed from the stored reviews, drift bounds from the model card, and
the admin page through Streamlit's AppTest. Real dev images, the demo model, real SQLite databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _site import copy_demo_run, dev_frame, enriched_site, import_csv, reviews_csv
from sklearn.metrics import roc_auc_score
from streamlit.testing.v1 import AppTest

from medvit._io import sha256_file
from medvit.evaluate.pipeline import evaluate_run
from medvit.review.labelled import labelled_reviews
from medvit.review.monitoring import RECENT, monitor
from medvit.review.store import ReviewStore


@pytest.fixture(scope="module")
def run(dev_data, tmp_path_factory) -> Path:
    """The demo with its card recomputed on the dev val split as the demo scores it: the shipped card is out-of-fold,
    but two of the fold ensemble's three members trained on each dev image, so reviews of dev images (scored by the
    whole ensemble) would be compared with numbers of other predictions."""
    run = copy_demo_run(tmp_path_factory.mktemp("monitor") / "run")
    evaluate_run(run, dev_data / "labels.csv", dev_data / "images", run, split="val", n_boot=200, plots=False,
                 engine="torch")
    return run


def _db(dev_data: Path, run: Path, folder: Path, frame, **kw) -> str:
    url = f"sqlite:///{folder / 'reviews.sqlite3'}"
    import_csv(reviews_csv(frame, folder / "reviews.csv", **kw), dev_data, run, url)
    return url


@pytest.fixture(scope="module")
def val_db(dev_data, run, tmp_path_factory) -> str:
    """Reviews that repeat the labels of the split the demo model's card was computed on."""
    frame = dev_frame(dev_data).query("split == 'val'").reset_index(drop=True)
    return _db(dev_data, run, tmp_path_factory.mktemp("val"), frame)


@pytest.fixture(scope="module")
def site_db(dev_data, run, tmp_path_factory) -> str:
    """A site with Effusion at 50% prevalence (18% where the model was calibrated)."""
    return _db(dev_data, run, tmp_path_factory.mktemp("site"), enriched_site(dev_data))


def _monitor(url: str, run: Path, **kw):
    store = ReviewStore(url)
    try:
        reviews = labelled_reviews(store.engine, sha256_file(run / "model.safetensors"))
    finally:
        store.close()
    card = json.loads((run / "metrics.json").read_text())
    return reviews, {m.finding: m for m in monitor(reviews, card, **kw)}


def test_numbers_are_those_of_the_stored_reviews(val_db, run):
    reviews, mons = _monitor(val_db, run, n_boot=300)
    assert len(mons) == 14
    for finding, m in mons.items():
        rows = reviews[reviews["finding"] == finding]
        decided = rows[rows["verdict"] != "uncertain"]
        assert m.n_reviews == m.n_labelled == 51
        assert m.agreement == pytest.approx((decided["verdict"] == "agree").mean())
        if rows["label"].nunique() == 2:
            assert m.auroc == pytest.approx(roc_auc_score(rows["label"], rows["prob_raw"]))
            if m.auroc_ci is not None:
                assert m.auroc_ci[0] <= m.auroc <= m.auroc_ci[1]
        assert m.reliability is not None and int(m.reliability.counts.sum()) == 51
        assert int(m.weekly["reviews"].sum()) == 51 and len(m.weekly) >= 4  # 51 reviews 12 h apart: 26 days
        assert m.n_recent == RECENT


def test_no_drift_on_the_data_of_the_model_card(val_db, run):
    _, mons = _monitor(val_db, run, n_boot=0)
    assert {f: m.drift for f, m in mons.items() if m.drift} == {}
    assert all(m.bounds is not None and m.bounds.max_ece is not None for m in mons.values())


def test_a_site_with_another_prevalence_drifts_in_calibration(site_db, run):
    _, mons = _monitor(site_db, run, n_boot=0)
    effusion = mons["Effusion"]
    assert effusion.drift and "ECE" in effusion.drift[0] and effusion.recent_ece > effusion.bounds.max_ece
    assert not mons["Emphysema"].drift


def test_reviewers_disagreeing_more_than_the_card_allows_is_drift(dev_data, run, tmp_path):
    frame = dev_frame(dev_data).query("split == 'val'").reset_index(drop=True)
    url = _db(dev_data, run, tmp_path, frame, findings=("Emphysema",), flip=frozenset({"Emphysema"}))
    _, mons = _monitor(url, run, n_boot=0)
    m = mons["Emphysema"]
    # The fold-ensemble demo (issue 15) flags many images at its 90 %-sensitivity thresholds (card accuracy 0.55 on the
    # val split), so flipped labels lower agreement (0.44) but not below the card's bound; the flip is still drift,
    # caught by the ECE bound.
    assert m.drift and (m.recent_agreement < m.bounds.min_agreement or m.recent_ece > m.bounds.max_ece)


def _page(url: str, run_dir: str) -> None:
    from medvit.review.monitor_page import monitoring_page
    from medvit.review.store import ReviewStore

    monitoring_page(ReviewStore(url), run_dir)


def _app(url: str, run: Path) -> AppTest:
    return AppTest.from_function(_page, args=(url, str(run)), default_timeout=120).run()


def test_page_warns_about_drift_and_draws_each_finding(site_db, run):
    at = _app(site_db, run)
    assert not at.exception
    assert len(at.error) == 1 and "Drift" in at.error[0].value and "Effusion" in at.error[0].value
    assert len(at.dataframe[0].value) == 14
    choice = at.selectbox(key="monitor_finding")
    assert set(choice.options) >= {"Effusion", "Mass"}
    choice.select("Mass").run()
    assert not at.exception and "v1" in at.caption[0].value


def test_page_without_drift_or_reviews(val_db, run, tmp_path):
    at = _app(val_db, run)
    assert not at.exception and not at.error
    empty = _app(f"sqlite:///{tmp_path / 'empty.sqlite3'}", run)
    assert not empty.exception and "No reviews of this model yet" in empty.info[0].value
