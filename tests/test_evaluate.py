"""medvit.evaluate: metrics.json schema and content on real dev labels, plots, and the run-level commands."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvit.evaluate import pipeline
from medvit.evaluate import report as evaluate
from medvit.evaluate.calibration import Calibration, fit_calibration
from medvit.findings import NIH_FINDINGS


@pytest.fixture(scope="module")
def val_set(dev_labels, dev_images):
    """Real labels and patient ids of the dev val split, with synthetic logits that carry some signal."""
    from medvit.data.datasets import label_matrix, load_labels

    df = load_labels(dev_labels, dev_images, check_files=False)
    val = df[df["split"] == "val"]
    y = label_matrix(val, NIH_FINDINGS).astype(np.float64)
    rng = np.random.default_rng(0)
    z = 1.2 * rng.normal(0, 1, y.shape) + 1.5 * y + 1.0  # over-predicting, like a pos_weight-trained model
    return z, y, val["patient_id"].to_numpy()


def test_report_matches_the_schema_and_means_are_over_defined_findings(val_set):
    z, y, patients = val_set
    y = y.copy()
    y[:, NIH_FINDINGS.index("Hernia")] = 0  # no positives left: AUROC must be null with a reason
    cal = fit_calibration(z, y, NIH_FINDINGS, patients, method="platt")
    report = evaluate.build_report(z, y, NIH_FINDINGS, patients, cal, n_boot=100)
    report = json.loads(json.dumps(report, allow_nan=False))  # strict JSON, as written to disk
    jsonschema.validate(report, evaluate.METRICS_SCHEMA)

    assert report["n_images"] == 51 and report["n_patients"] == 51
    hernia = report["findings"]["Hernia"]
    assert hernia["auroc"] is None and hernia["auprc"] is None and hernia["auroc_ci"] is None
    assert hernia["reason"] == "no positive labels among 51 labelled images"
    assert isinstance(hernia["ece"], float) and hernia["n_pos"] == 0

    defined = [f for f in NIH_FINDINGS if f != "Hernia"]
    k = NIH_FINDINGS.index("Effusion")
    assert report["findings"]["Effusion"]["auroc"] == pytest.approx(roc_auc_score(y[:, k], z[:, k]))
    assert report["findings"]["Effusion"]["n_pos"] == 9
    assert report["mean_auroc"] == pytest.approx(np.mean([report["findings"][f]["auroc"] for f in defined]))
    assert report["mean_ece"] == pytest.approx(np.mean([report["findings"][f]["ece"] for f in defined]))
    assert report["n_findings_in_means"] == 13
    lo, hi = report["mean_auroc_ci"]
    assert lo < report["mean_auroc"] < hi
    # fitted and evaluated on the same images, Platt must improve calibration of the over-predicting logits
    assert report["mean_ece"] < report["mean_ece_uncalibrated"]


def test_schema_validator_rejects_missing_keys_and_wrong_types(val_set):
    z, y, patients = val_set
    report = evaluate.build_report(z, y, NIH_FINDINGS, patients, Calibration.identity(NIH_FINDINGS), n_boot=0)
    jsonschema.validate(report, evaluate.METRICS_SCHEMA)
    broken = json.loads(json.dumps(report))
    del broken["findings"]["Mass"]["ece_uncalibrated"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, evaluate.METRICS_SCHEMA)
    broken = json.loads(json.dumps(report))
    broken["n_images"] = "51"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, evaluate.METRICS_SCHEMA)


def test_unlabelled_findings_are_skipped_and_all_single_class_raises(val_set):
    from medvit.errors import DatasetError

    z, y, patients = val_set
    y = y.copy()
    y[:, 0] = np.nan  # e.g. a wide CSV without an Atelectasis column
    report = evaluate.build_report(z, y, NIH_FINDINGS, patients, Calibration.identity(NIH_FINDINGS), n_boot=0)
    assert "Atelectasis" not in report["findings"]
    assert "no labelled images" in report["skipped_findings"]["Atelectasis"]
    with pytest.raises(DatasetError, match="no finding has both positive and negative labels"):
        evaluate.build_report(z, np.zeros_like(y), NIH_FINDINGS, patients, Calibration.identity(NIH_FINDINGS))


def test_plots_are_written_for_every_labelled_finding(val_set, tmp_path):
    z, y, patients = val_set
    findings = NIH_FINDINGS[:3]
    cal = fit_calibration(z[:, :3], y[:, :3], findings, patients)
    written = evaluate.plot_curves(tmp_path, z[:, :3], y[:, :3], findings, cal)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in written)
    assert names == [
        "reliability/Atelectasis.png",
        "reliability/Cardiomegaly.png",
        "reliability/Effusion.png",
        "roc.png",
    ]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


@pytest.fixture(scope="module")
def served_env(tmp_path_factory):
    """The app would serve fp32 ONNX here ($MEDVIT_BACKEND, as a deployment sets it): a non-torch engine that is
    cheap to build, so calibrate/evaluate must measure it beside fp32. The ONNX export goes to a temp cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDVIT_BACKEND", "onnx")
        mp.setenv("MEDVIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def smoke_run(dev_subset_csv, dev_images, tmp_path_factory, served_env):
    """A real smoke run (tiny DeiT3) trained and calibrated through the CLI on 24 + 12 real dev images."""
    from medvit.cli import main

    root = Path(__file__).resolve().parents[1]
    run = tmp_path_factory.mktemp("smoke") / "run"
    overrides = ["--set", f"data.labels_csv={dev_subset_csv}", "--set", f"data.images_root={dev_images}"]
    assert main(["train", "-c", str(root / "configs" / "smoke.yaml"), *overrides, "--out", str(run)]) == 0
    assert main(["calibrate", "--run", str(run), "--method", "auto", "--n-boot", "100"]) == 0
    return run


def test_calibrate_writes_calibration_metrics_and_model_card(smoke_run):
    cal = Calibration.load(smoke_run / "calibration.json")
    config = json.loads((smoke_run / "config.json").read_text())
    cal.check_findings(config["findings"])
    assert cal.info["fitted_on"]["split"] == "val" and cal.info["fitted_on"]["n_images"] == 12  # no calib split
    assert cal.info["chosen"] in cal.info["selection"]["cv_nll_per_label"]

    report = json.loads((smoke_run / "metrics.json").read_text())
    jsonschema.validate(report, evaluate.METRICS_SCHEMA)
    assert report["evaluation"]["cross_validated"] is True
    for name, m in report["findings"].items():
        assert m["threshold"] == pytest.approx(cal.thresholds[cal.findings.index(name)])
        if m["n_pos"] > 0:  # the threshold reaches the 0.9 target sensitivity on the data it was fitted on
            assert m["sensitivity"] >= 0.9, name

    card = (smoke_run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm")
    for section in (
        "Not a diagnostic device",
        "## Intended use",
        "## Training data",
        "## Evaluation",
        "24 training images of 24 patients",
        "EMA weights",
        "Demonstration model",
        "| Effusion |",
        "### Served engine",
        "| onnx (served) |",
        "timm_backbone.safetensors",
    ):
        assert section in card, section


def test_metrics_report_the_served_engine_beside_fp32(smoke_run):
    """The engine the app serves (fp32 ONNX here) is measured on the same images as eager fp32."""
    report = json.loads((smoke_run / "metrics.json").read_text())
    assert report["served_engine"] == "onnx" and set(report["engines"]) == {"torch", "onnx"}
    fp32, served = report["engines"]["torch"], report["engines"]["onnx"]
    assert fp32["mean_auroc"] == pytest.approx(report["mean_auroc"])  # the same mean as the report's own
    assert fp32["mean_auroc_minus_fp32"] == 0 and fp32["max_abs_dp"] == 0 and fp32["flags_changed"] == 0
    assert 0 < served["max_abs_dp_uncalibrated"] < 1e-4  # a really different engine, yet fp32 ONNX agrees with torch
    assert served["max_abs_dp"] < 1e-3
    assert served["flags_changed"] == served["flags_changed_at_threshold"], "only ties at a threshold may flip"
    n_findings = len(json.loads((smoke_run / "config.json").read_text())["findings"])
    assert abs(served["mean_auroc_minus_fp32"]) < 1e-3 and served["n_outputs"] == 12 * n_findings


def test_timm_backbone_loads_strictly_into_timm_and_matches_the_run(smoke_run):
    """The card's `library_name: timm` is true: timm alone rebuilds the backbone from the run's files."""
    import timm
    import torch
    from safetensors.torch import load_file

    from medvit.runs import TIMM_BACKBONE, load_run

    model, info = load_run(smoke_run)
    backbone = timm.create_model(info.model_name, num_classes=0, **info.model_args["model_kwargs"])
    backbone.load_state_dict(load_file(smoke_run / TIMM_BACKBONE), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), model.backbone(x))


def test_card_claims_timm_only_with_the_backbone_file(smoke_run, tmp_path):
    import shutil

    from medvit.evaluate.modelcard import render_model_card
    from medvit.runs import TIMM_BACKBONE

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / TIMM_BACKBONE).unlink()
    card = render_model_card(run)
    assert card.startswith("---\n") and "library_name" not in card and TIMM_BACKBONE not in card


def test_compare_engines_measures_each_engine_against_fp32(val_set):
    z, y, _ = val_set
    cal = Calibration.identity(NIH_FINDINGS)
    noisy = z + np.random.default_rng(1).normal(0, 2.0, z.shape)  # an engine that really changes the ranking
    out = evaluate.compare_engines({"torch": z, "bad": noisy}, y, cal)

    def mean_auroc(logits):
        return np.mean([roc_auc_score(y[m, k], logits[m, k]) for k in range(y.shape[1])
                        if len(set(y[(m := ~np.isnan(y[:, k])), k])) == 2])

    assert out["torch"]["mean_auroc"] == pytest.approx(mean_auroc(z))
    assert out["bad"]["mean_auroc"] == pytest.approx(mean_auroc(noisy))
    assert out["bad"]["mean_auroc_minus_fp32"] == pytest.approx(mean_auroc(noisy) - mean_auroc(z))
    assert out["bad"]["mean_auroc_minus_fp32"] < -0.02
    flips = int(np.sum((cal.apply(noisy) >= 0.5) != (cal.apply(z) >= 0.5)))
    assert out["bad"]["flags_changed"] == flips > 0 and out["bad"]["n_outputs"] == z.size
    assert out["bad"]["max_abs_dp"] == pytest.approx(np.max(np.abs(cal.apply(noisy) - cal.apply(z))))
    with pytest.raises(ValueError, match="logits"):
        evaluate.compare_engines({"torch": z, "short": z[:3]}, y, cal)


def test_evaluate_cli_writes_schema_valid_metrics_and_plots(smoke_run, dev_subset_csv, dev_images, tmp_path, capsys):
    from medvit.cli import main

    out = tmp_path / "eval"
    args = ["--run", str(smoke_run), "--images", str(dev_images), "--split", "val", "--n-boot", "100"]
    assert main(["evaluate", *args, "--labels", str(dev_subset_csv), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "metrics.json").read_text())
    jsonschema.validate(report, evaluate.METRICS_SCHEMA)
    assert printed["served_engine"] == report["served_engine"] == "onnx" and set(report["engines"]) == {"torch", "onnx"}
    assert printed["mean_auroc"] == report["mean_auroc"] and report["n_images"] == 12
    assert report["evaluation"]["calibration_in_sample"] is True  # same split the calibrators were fitted on
    defined = [m["auroc"] for m in report["findings"].values() if m["auroc"] is not None]
    assert report["mean_auroc"] == pytest.approx(np.mean(defined))
    assert (out / "roc.png").is_file() and len(list((out / "reliability").glob("*.png"))) == 14

    # the same images in the wide format (one column per finding) give the same metrics
    import pandas as pd

    nih = pd.read_csv(dev_subset_csv)
    wide = pd.DataFrame({"Path": nih["Image Index"], "Patient ID": nih["Patient ID"], "split": nih["split"]})
    for finding in NIH_FINDINGS:
        wide[finding] = nih["Finding Labels"].str.split("|").apply(lambda labels, f=finding: float(f in labels))
    wide.to_csv(tmp_path / "wide.csv", index=False)
    assert (
        main(["evaluate", *args, "--labels", str(tmp_path / "wide.csv"), "--out", str(tmp_path / "w"), "--no-plots"])
        == 0
    )
    again = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert again["mean_auroc"] == pytest.approx(report["mean_auroc"])
    for key in ("auroc", "auprc", "ece", "ece_uncalibrated", "brier", "n_pos", "threshold", "sensitivity"):
        assert again["findings"]["Effusion"][key] == pytest.approx(report["findings"]["Effusion"][key]), key

    assert (
        main(
            ["evaluate", *args[:-4], "--split", "calib", "--labels", str(dev_subset_csv), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "no rows with split 'calib'" in capsys.readouterr().err
    unknown = ["--labels", str(dev_subset_csv), "--out", str(tmp_path / "y"), "--engine", "tpu"]
    assert main(["evaluate", *args, *unknown]) == 2
    assert "--engine tpu: unknown engine" in capsys.readouterr().err and not (tmp_path / "y").exists()


@pytest.mark.parametrize("policy, expected", [("column", "val"), ("assign", "calib")])
def test_run_split_frame_rebuilds_the_runs_held_out_split(dev_labels, dev_images, tmp_path, policy, expected):
    from types import SimpleNamespace

    import pandas as pd

    if policy == "assign":  # a CSV without a split column, so training assigned train/val/calib itself
        pd.read_csv(dev_labels).drop(columns=["split"]).to_csv(tmp_path / "labels.csv", index=False)
        dev_labels = tmp_path / "labels.csv"
    split = {"policy": policy, "val": 0.15, "calib": 0.2, "seed": 3, "train_name": "train", "val_name": "val"}
    data = {"labels_csv": str(dev_labels), "images_root": str(dev_images), "split": split}
    info = SimpleNamespace(config={"data": data}, findings=NIH_FINDINGS, run_dir=Path("run"), model_args={})
    df, name = pipeline.run_split_frame(info)
    assert name == expected and set(df["split"]) == {expected}
    if policy == "column":
        assert len(df) == 51
    else:  # the same seeded patient-wise assignment as training: 20% of the 337 patients
        from medvit.data.datasets import assign_splits, load_labels

        full = assign_splits(load_labels(dev_labels, dev_images), seed=3, val=0.15, calib=0.2)
        assert sorted(df["image_id"]) == sorted(full.loc[full["split"] == "calib", "image_id"])
        assert len(df) == round(337 * 0.2)
    info.config["data"]["labels_csv"] = "/nonexistent/labels.csv"
    from medvit.errors import DatasetError

    with pytest.raises(DatasetError, match="--data-root DIR .* or --labels CSV --images DIR"):
        pipeline.run_split_frame(info)


def test_collect_logits_runs_in_order_without_grad_and_restores_training_mode():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)
            self.seen_grad = []

        def forward(self, x):
            self.seen_grad.append(torch.is_grad_enabled())
            return self.fc(x.flatten(1))

    x = torch.randn(10, 1, 2, 2)
    y = torch.tensor([[1.0, float("nan")]] * 10)
    model = Tiny().train()
    logits, labels = pipeline.collect_logits(model, list(zip(x, y, strict=True)), batch_size=4)
    assert logits.shape == (10, 2) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, model.fc(x.flatten(1)).detach().numpy(), rtol=1e-6)
    assert np.isnan(labels[:, 1]).all() and (labels[:, 0] == 1).all()
    assert model.seen_grad == [False, False, False] and model.training


def test_run_split_frame_never_overlaps_the_training_split(dev_labels, dev_images, smoke_run):
    """With policy 'assign' on a CSV that has its own split column, training re-draws the split; the
    calibration rows must come from that re-drawn split, never from the CSV's column."""
    from medvit.config import Config
    from medvit.data.splits import load_splits
    from medvit.runs import load_run

    _, info = load_run(smoke_run)
    cfg = info.config | {"data": info.config["data"] | {
        "labels_csv": str(dev_labels), "images_root": str(dev_images),
        "split": {"policy": "assign", "val": 0.15, "calib": 0.2, "seed": 3}}}
    info.config.clear()
    info.config.update(cfg)
    calib, name = pipeline.run_split_frame(info)
    train = load_splits(Config.model_validate(cfg)).train
    assert name == "calib" and len(calib) == round(337 * 0.2)
    assert not set(calib["patient_id"]) & set(train["patient_id"])
