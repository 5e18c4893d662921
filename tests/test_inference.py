"""Predictor: run resolution, the table contract, calibration, and refusal of unsuitable images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _inference_run import make_tiny_run
from scipy.special import expit, logit

from medvit import rundir
from medvit.data.dicom import read_image
from medvit.errors import CheckpointError, UnsupportedImageError
from medvit.findings import DEFAULT_FINDINGS
from medvit.inference import predictor as inference
from medvit.inference.predictor import TABLE_COLUMNS, Predictor


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDVIT_RUN", raising=False)
    monkeypatch.delenv("MEDVIT_BACKEND", raising=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny", dev_data)


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_dir(run, backend="torch")


def test_table_contract_on_a_real_dicom(predictor, cxr_dicom):
    pred = predictor.predict(read_image(cxr_dicom))
    t = pred.table
    assert tuple(t.columns) == TABLE_COLUMNS
    assert list(t["finding"]) == list(DEFAULT_FINDINGS)
    # the run's calibration is a temperature of 2 and a threshold of 0.45 (see _inference_run)
    np.testing.assert_allclose(t["prob"], expit(logit(t["prob_raw"]) / 2.0), atol=1e-9)
    assert (t["threshold"] == 0.45).all()
    assert (t["flag"] == (t["prob"] >= t["threshold"])).all()
    np.testing.assert_allclose(t["margin"], t["prob"] - t["threshold"])
    assert pred.calibrated and pred.backend == "torch" and len(pred.weights_sha256) == 64
    assert set(pred.timings_ms) == {"preprocess", "forward", "calibrate"}


def test_predict_many_matches_predict(predictor, cxr_dicom, dev_images):
    images = [read_image(cxr_dicom), *(read_image(p) for p in sorted(dev_images.iterdir())[:4])]
    many = predictor.predict_many(images, batch_size=2)
    assert len(many) == 5
    for image, pred in zip(images, many, strict=True):
        np.testing.assert_allclose(pred.table["prob"], predictor.predict(image).table["prob"], atol=1e-5)
    assert not np.allclose(many[1].table["prob"], many[2].table["prob"]), "different images, different outputs"


def test_lateral_and_non_chest_images_are_refused(predictor, cxr_dicom):
    image = read_image(cxr_dicom)
    lateral = dataclasses.replace(image, meta=dataclasses.replace(image.meta, view_position="LL"))
    with pytest.raises(UnsupportedImageError, match="lateral"):
        predictor.predict(lateral)
    skull = dataclasses.replace(image, meta=dataclasses.replace(image.meta, body_part="SKULL"))
    with pytest.raises(UnsupportedImageError, match="not a chest"):
        predictor.predict_many([image, skull])


def test_uncalibrated_run_says_so(tmp_path, cxr_dicom):
    run = make_tiny_run(tmp_path / "raw", calibrated=False)
    pred = Predictor.from_dir(run, backend="torch").predict(read_image(cxr_dicom))
    assert not pred.calibrated
    np.testing.assert_allclose(pred.table["prob"], pred.table["prob_raw"])
    assert (pred.table["threshold"] == 0.5).all()


def test_run_resolution_env_then_demo(run, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDVIT_RUN", str(run))
    assert rundir.resolve_run_dir() == run
    assert Predictor.from_dir(backend="torch").info.run_dir == run
    monkeypatch.delenv("MEDVIT_RUN")
    monkeypatch.setattr(rundir, "DEMO_RUN", tmp_path / "no-demo")
    with pytest.raises(CheckpointError, match="--run RUN_DIR"):
        rundir.resolve_run_dir()
    monkeypatch.setattr(rundir, "DEMO_RUN", run)
    assert rundir.resolve_run_dir() == run


def test_backend_from_environment(run, monkeypatch):
    monkeypatch.setenv("MEDVIT_BACKEND", "onnx")
    assert Predictor.from_dir(run).backend.name == "onnx"


def test_an_explicit_backend_is_checked_against_fp32_too(run, monkeypatch):
    monkeypatch.setattr(inference, "AUTO_TOLERANCE", 0.0)  # any drift at all now counts as wrong
    with pytest.raises(CheckpointError, match="differs from fp32"):
        Predictor.from_dir(run, backend="onnx-int8")
