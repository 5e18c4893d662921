"""The image-level out-of-distribution check (issue 11): non-chest radiographs without body-part tags are warned
about in `medvit predict`, the Prediction and the SR, on every engine; and the check separates the dev chests
from non-chest images made from pydicom-data (the test fails if that separation collapses)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from _inference_run import make_tiny_run
from _nonchest import nonchest_crs, write_nonchest
from conftest import testdata as dicom_path
from sklearn.metrics import roc_auc_score

from medvit.cli import main
from medvit.data.datasets import XrayDataset, load_labels
from medvit.data.dicom import read_image
from medvit.data.transforms import build_transforms
from medvit.evaluate.ood import OodStats, collect_features, fit_ood, load_ood, model_features
from medvit.findings import DEFAULT_FINDINGS
from medvit.inference.predictor import Predictor, load_model
from medvit.pacs.sr import WARNING_MEANING, ResultProvenance, build_sr, sr_texts
from medvit.resources import DEMO_RUN
from medvit.runs import OOD

OOD_PREFIX = "warning: out of distribution"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDVIT_BACKEND", raising=False)
    monkeypatch.delenv("MEDVIT_RUN", raising=False)


def _untagged(path: str, out) -> str:
    """A copy of a DICOM without BodyPartExamined (what a PACS often sends)."""
    ds = pydicom.dcmread(path)
    del ds.BodyPartExamined
    ds.save_as(out, enforce_file_format=True)
    return str(out)


def test_ood_separates_dev_chests_from_nonchest_radiographs(tmp_path, dev_data):
    """Fitted here on the demo's training images (so a retrained demo is measured too), scored through read_image."""
    model, info = load_model(DEMO_RUN)
    df = load_labels(dev_data / "labels.csv", dev_data / "images", DEFAULT_FINDINGS)
    train = XrayDataset(
        df[df["split"] == "train"].reset_index(drop=True),
        info.findings,
        build_transforms(info.preprocessing, train=False),
    )
    stats = fit_ood(collect_features(model, train), info.weights_sha256)
    transform = build_transforms(info.preprocessing, train=False)

    def distances(paths) -> np.ndarray:
        x = np.stack([transform(read_image(p).pixels).numpy() for p in paths])
        return stats.distance(model_features(model, x))

    d_dev = distances(df.loc[df["split"] == "val", "path"])
    files = write_nonchest(tmp_path / "nonchest")
    d_other = distances(files)
    assert len(files) >= 30 and len(d_dev) == 51
    auroc = roc_auc_score(np.r_[np.zeros(len(d_dev)), np.ones(len(d_other))], np.r_[d_dev, d_other])
    passed, flagged = np.mean(d_dev <= stats.threshold), np.mean(d_other > stats.threshold)
    print(
        f"OOD: AUROC {auroc:.3f}; dev val passing {passed:.3f}, non-chest flagged {flagged:.3f} "
        f"({len(d_dev)} / {len(d_other)} images, threshold {stats.threshold:.1f})"
    )
    assert auroc >= 0.95
    assert passed >= 0.9 and flagged >= 0.8
    assert all(d > stats.threshold for f, d in zip(files, d_other, strict=True) if "RG3" in f.name)  # the real hand


def test_shipped_demo_has_ood_statistics_for_its_weights():
    _, info = load_model(DEMO_RUN)
    stats = load_ood(info)
    assert stats is not None, f"refit with `medvit calibrate --ood-only --run {DEMO_RUN}`"
    assert stats.n_images >= 200 and stats.quantile == 0.99 and stats.precision.shape == (len(stats.mean),) * 2


@pytest.mark.parametrize("backend", ["torch", "onnx-int8"])
def test_predict_warns_on_an_untagged_nonchest_cr_on_every_engine(tmp_path, capsys, backend):
    hand = next(ds for name, ds in nonchest_crs() if name.startswith("RG3"))
    hand.save_as(tmp_path / "hand.dcm", enforce_file_format=True)
    chest = _untagged(dicom_path("RG1_UNCI.dcm"), tmp_path / "chest.dcm")
    assert main(["predict", "--run", str(DEMO_RUN), "--backend", backend, str(tmp_path / "hand.dcm")]) == 0
    out = capsys.readouterr().out
    assert "Effusion" in out and out.count(OOD_PREFIX) == 1
    assert main(["predict", "--run", str(DEMO_RUN), "--backend", backend, chest]) == 0
    assert OOD_PREFIX not in capsys.readouterr().out
    # the tagged hand (BodyPartExamined EXTREMITY) is refused by its tags, not warned about
    assert main(["predict", "--run", str(DEMO_RUN), "--backend", backend, dicom_path("RG3_UNCI.dcm")]) == 2

    csv = tmp_path / "preds.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(DEMO_RUN),
                "--backend",
                backend,
                "--workers",
                "0",
                "--out",
                str(csv),
                str(tmp_path / "hand.dcm"),
                chest,
            ]
        )
        == 0
    )
    rows = pd.read_csv(csv).fillna("")
    warned = rows.groupby("file")["warning"].first()
    assert warned[str(tmp_path / "hand.dcm")].startswith("out of distribution") and warned[chest] == ""


def test_prediction_and_sr_carry_the_warning(tmp_path):
    predictor = Predictor.from_dir(DEMO_RUN, backend="torch")
    hand = next(ds for name, ds in nonchest_crs() if name.startswith("RG3"))
    hand.save_as(tmp_path / "hand.dcm", enforce_file_format=True)
    pred = predictor.predict(read_image(tmp_path / "hand.dcm", min_side=predictor.input_side))
    assert len(pred.warnings) == 1 and pred.warnings[0].startswith("out of distribution") and "ood" in pred.timings_ms
    tagged = read_image(dicom_path("RG1_UNCI.dcm"))
    assert predictor.predict(tagged).warnings == ()  # a CHEST tag is trusted: no feature pass
    sr = build_sr(hand, pred.table, ResultProvenance("demo", "0" * 64, "v1", "torch"), pred.warnings)
    assert sr_texts(sr)[WARNING_MEANING] == pred.warnings[0]
    assert WARNING_MEANING not in sr_texts(build_sr(hand, pred.table, ResultProvenance("demo", "0" * 64, "v1", "t")))


def test_calibrate_fits_the_statistics_and_stale_ones_are_ignored(tmp_path, dev_data, capsys, caplog):
    run = make_tiny_run(tmp_path / "run", dev_data)
    assert main(["calibrate", "--run", str(run), "--ood-only", "--batch-size", "64"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 286 and summary["ood_threshold"] > 0  # the dev training split
    predictor = Predictor.from_dir(run, backend="torch")
    assert predictor.ood is not None and predictor.ood.weights_sha256 == predictor.info.weights_sha256
    other = dataclasses.replace(predictor.ood, weights_sha256="f" * 64)
    other.save(run / OOD)
    assert OodStats.load(run / OOD).weights_sha256 == "f" * 64
    assert Predictor.from_dir(run, backend="torch").ood is None
    assert "fitted for other weights" in caplog.text
    (run / OOD).write_bytes(b"not safetensors")
    assert main(["predict", "--run", str(run), "--backend", "torch", dicom_path("RG1_UNCI.dcm")]) == 2
