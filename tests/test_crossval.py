"""Patient-wise k-fold CV, out-of-fold calibration, the pixel baseline, and a fold ensemble served as one run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medvit.cli import main
from medvit.config import load_config
from medvit.data.datasets import XrayDataset
from medvit.data.splits import kfold_assign, split_frame
from medvit.data.transforms import build_transforms
from medvit.errors import DatasetError
from medvit.evaluate.baseline import evaluate_baseline
from medvit.evaluate.calibration import fit_calibration
from medvit.evaluate.oof import fold_calibrated_probs
from medvit.model.ensemble import Ensemble
from medvit.model.saliency import attention_rollout
from medvit.runs import CALIBRATION, CV_SUMMARY, FOLD_DIR, METRICS, OOF, load_run
from medvit.train.crossval import OutOfFold, fold_config

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
FINDINGS = ["Effusion", "Infiltration", "Atelectasis"]


def _frame(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """Several images per patient (1-3), labels drawn per patient, as the fold split sees them."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        labels = rng.random(len(FINDINGS)) < [0.3, 0.2, 0.05]
        for j in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "image_id": f"{p:05d}_{j:03d}.png",
                    "patient_id": str(p),
                    **{f: float(v) for f, v in zip(FINDINGS, labels, strict=True)},
                }
            )
    return pd.DataFrame(rows)


def test_kfold_is_patient_disjoint_and_deterministic() -> None:
    df = _frame()
    fold = kfold_assign(df, FINDINGS, folds=5, seed=0)
    assert set(fold) == set(range(5))
    assert (df.assign(fold=fold).groupby("patient_id")["fold"].nunique() == 1).all()  # a patient in one fold
    assert np.array_equal(fold, kfold_assign(df, FINDINGS, folds=5, seed=0))
    shuffled = df.sample(frac=1, random_state=1)  # row order of the CSV does not matter
    assert np.array_equal(kfold_assign(shuffled, FINDINGS, folds=5, seed=0), fold[shuffled.index.to_numpy()])
    assert not np.array_equal(fold, kfold_assign(df, FINDINGS, folds=5, seed=1))
    patients_per_fold = df.assign(fold=fold).groupby("fold")["patient_id"].nunique()
    assert patients_per_fold.max() - patients_per_fold.min() <= 3
    rare = df.assign(fold=fold).groupby("fold")["Atelectasis"].sum()  # the rare finding is spread out
    assert (rare > 0).sum() >= min(5, int(df.groupby("patient_id")["Atelectasis"].first().sum()))
    with pytest.raises(DatasetError, match="at least 10 patients"):
        kfold_assign(df[df["patient_id"].astype(int) < 4], FINDINGS, folds=10, seed=0)


def test_kfold_split_policy_holds_each_fold_out_once(dev_labels: Path, dev_images: Path) -> None:
    cfg = load_config(SMOKE, [f"data.labels_csv={dev_labels}", f"data.images_root={dev_images}"])
    vals = []
    for i in range(3):
        df = split_frame(fold_config(cfg, 3, i))
        val, train = set(df.loc[df["split"] == "val", "patient_id"]), set(df.loc[df["split"] == "train", "patient_id"])
        assert val and train and not val & train and len(val | train) == df["patient_id"].nunique()
        vals.append(val)
    assert set.union(*vals) == set(df["patient_id"]) and sum(map(len, vals)) == df["patient_id"].nunique()


def test_out_of_fold_calibration_uses_no_image_own_fold() -> None:
    rng = np.random.default_rng(0)
    n, k = 150, 3
    folds = np.repeat(np.arange(3), n // 3)
    labels = (rng.random((n, k)) < 0.3).astype(np.float64)
    logits = 1.5 * labels + rng.normal(size=(n, k))
    cal = fit_calibration(logits, labels, FINDINGS, folds, method="platt", n_folds=3)
    probs = fold_calibrated_probs(logits, labels, folds, cal)
    # Changing fold 0's labels must not change fold 0's calibrated probabilities (fitted on folds 1 and 2 only) ...
    flipped = labels.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    again = fold_calibrated_probs(logits, flipped, folds, cal)
    assert np.allclose(again[folds == 0], probs[folds == 0])
    # ... while it does change the others' (their calibrators saw fold 0).
    assert not np.allclose(again[folds != 0], probs[folds != 0])


def test_pixel_baseline_runs_on_a_tiny_set(dev_subset_csv: Path, dev_images: Path, tmp_path: Path) -> None:
    cv = evaluate_baseline("pixels", dev_subset_csv, dev_images, tmp_path / "cv", folds=3)
    assert len(cv["fold_mean_auroc"]) == 3 and 0 <= cv["cv_mean_auroc"] <= 1 and cv["cv_sd_auroc"] >= 0
    assert json.loads((tmp_path / "cv" / "baseline.json").read_text())["n_images"] == 36
    fitted = evaluate_baseline(
        "pixels", dev_subset_csv, dev_images, tmp_path / "fit", fit_labels=dev_subset_csv, fit_images=dev_images
    )
    assert fitted["mean_auroc"] > 0.8  # scored on its own training images: the regression fits them
    assert (
        main(
            [
                "evaluate",
                "--baseline",
                "pixels",
                "--run",
                "x",
                "--labels",
                str(dev_subset_csv),
                "--images",
                str(dev_images),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def fold_ensemble(dev_subset_csv: Path, dev_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`medvit train --folds 2 --ensemble` on 36 real images with the tiny smoke model (1 epoch per fold)."""
    out = tmp_path_factory.mktemp("cv") / "ens"
    code = main(
        [
            "train",
            "-c",
            str(SMOKE),
            "--set",
            f"data.labels_csv={dev_subset_csv}",
            "--set",
            f"data.images_root={dev_images}",
            "--set",
            "train.epochs=1",
            "--set",
            "train.num_threads=1",
            "--folds",
            "2",
            "--ensemble",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_cv_writes_out_of_fold_logits_of_models_that_never_saw_them(fold_ensemble: Path) -> None:
    oof = OutOfFold.read_csv(fold_ensemble / OOF)
    summary = json.loads((fold_ensemble / CV_SUMMARY).read_text())
    assert len(oof.frame) == summary["n_images"] == 36 and summary["folds"] == 2
    assert len(summary["fold_mean_auroc"]) == 2 and "baseline_pixels" in summary
    cfg = load_config(SMOKE, [])
    for i in range(2):
        model, info = load_run(fold_ensemble / FOLD_DIR.format(i))
        mine = oof.frame["fold"].to_numpy() == i
        data = info.config["data"]
        df = split_frame(
            fold_config(
                cfg.model_copy(
                    update={
                        "data": cfg.data.model_copy(
                            update={"labels_csv": Path(data["labels_csv"]), "images_root": Path(data["images_root"])}
                        )
                    }
                ),
                2,
                i,
            )
        )
        train_ids = set(df.loc[df["split"] == "train", "image_id"])
        assert not train_ids & set(oof.frame.loc[mine, "image_id"])  # no OOF image was in its model's training
        held = oof.frame.loc[mine, "image_id"].tolist()
        ds = XrayDataset(
            df.set_index("image_id").loc[held].reset_index(),
            info.findings,
            build_transforms(info.preprocessing, train=False),
        )
        with torch.inference_mode():  # and its logits are that fold model's
            logits = model(torch.stack([ds[j][0] for j in range(len(ds))])).numpy()
        assert np.allclose(logits, oof.logits[mine], atol=1e-4)


def test_ensemble_run_loads_exports_and_predicts_like_a_single_model(
    fold_ensemble: Path, dev_images: Path, tmp_path: Path
) -> None:
    model, info = load_run(fold_ensemble)
    assert isinstance(model, Ensemble) and len(model.members) == 2 and info.model_args["ensemble"] == 2
    members = [load_run(fold_ensemble / FOLD_DIR.format(i))[0] for i in range(2)]
    x = torch.randn(2, *info.preprocessing["input_size"])
    with torch.inference_mode():
        assert torch.allclose(model(x), (members[0](x) + members[1](x)) / 2, atol=1e-6)
    assert attention_rollout(model, x).shape == attention_rollout(members[0], x).shape
    assert (fold_ensemble / CALIBRATION).is_file()
    metrics = json.loads((fold_ensemble / METRICS).read_text())
    assert "out-of-fold" in metrics["evaluation"]["description"] and metrics["n_images"] == 36
    assert main(["export", "--run", str(fold_ensemble), "--format", "onnx"]) == 0
    image = sorted(dev_images.glob("*.png"))[0]
    outputs = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        assert main(["predict", "--run", str(fold_ensemble), "--backend", engine, str(image), "--out", str(out)]) == 0
        outputs[engine] = pd.read_csv(out)
    assert len(outputs["torch"]) == len(info.findings)
    for column in ("prob_raw", "prob"):
        assert np.allclose(outputs["torch"][column], outputs["onnx"][column], atol=1e-3)
