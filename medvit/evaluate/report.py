"""Evaluate a run on a labelled set: per-finding metrics before/after calibration, metrics.json and plots.

`build_report` is pure (logits + labels in, JSON-ready dict out) so it is tested without a model;
`evaluate_run` adds the model, data loading and file output around it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit

from medvit.errors import DatasetError
from medvit.evaluate import metrics
from medvit.evaluate.calibration import Calibration
from medvit.runs import METRICS

_log = logging.getLogger(__name__)

# The issue-3 contract for OUT_DIR/metrics.json (JSON Schema); extra keys are allowed and documented in
# docs/evaluation.md. Means are over findings with a defined AUROC.
_NUMBER = {"type": "number"}
METRICS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["n_images", "findings", "mean_auroc", "mean_ece", "mean_ece_uncalibrated"],
    "properties": {
        "n_images": {"type": "integer", "minimum": 1},
        "findings": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["auroc", "auprc", "ece", "ece_uncalibrated", "brier", "n_pos", "threshold"],
                "properties": {
                    "auroc": {"type": ["number", "null"]},
                    "auprc": {"type": ["number", "null"]},
                    "ece": _NUMBER,
                    "ece_uncalibrated": _NUMBER,
                    "brier": _NUMBER,
                    "n_pos": {"type": "integer", "minimum": 0},
                    "threshold": _NUMBER,
                },
            },
        },
        "mean_auroc": _NUMBER,
        "mean_ece": _NUMBER,
        "mean_ece_uncalibrated": _NUMBER,
    },
}


def collect_logits(
    model: Any, dataset: Any, batch_size: int = 32, num_workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` over a dataset of (image, labels) pairs; returns (N, K) float32 logits and labels (NaN kept)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for images, y in tqdm(loader, desc="evaluate", unit="batch", leave=False):
            logits.append(model(images).float().cpu().numpy())
            labels.append(y.numpy())
    model.train(was_training)
    return np.concatenate(logits).astype(np.float32), np.concatenate(labels).astype(np.float32)


def _mean_auroc_ci(
    probs: np.ndarray, labels: np.ndarray, defined: Sequence[int], resamples: Sequence[np.ndarray]
) -> tuple[float, float] | None:
    """Patient-bootstrap CI of the mean AUROC; a resample averages over the findings defined in it."""

    def mean_auroc(p: np.ndarray, y: np.ndarray) -> float | None:
        aurocs = []
        for k in defined:
            m = metrics.known(y[:, k])
            if m.any() and (v := metrics.fast_auroc(p[m, k], y[m, k])) is not None:
                aurocs.append(v)
        return float(np.mean(aurocs)) if aurocs else None

    return metrics.bootstrap_ci(mean_auroc, probs, labels, resamples)


def build_report(
    logits: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    groups: Sequence | np.ndarray,
    calibration: Calibration,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    probs_calibrated: np.ndarray | None = None,
) -> dict[str, Any]:
    """The metrics.json content: per-finding metrics before/after calibration plus means over findings with a
    defined AUROC. Findings without any labelled image are listed under `skipped_findings` with a reason.

    `probs_calibrated` replaces `calibration.apply(logits)` for ECE/Brier/NLL, e.g. with out-of-fold
    probabilities when the report is computed on the calibration set itself; threshold statistics always use
    `calibration.apply(logits)`, the scale the thresholds were chosen on.
    """
    calibration.check_findings(findings)
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    raw = expit(z)
    applied = calibration.apply(z)
    cal = applied if probs_calibrated is None else np.asarray(probs_calibrated, dtype=np.float64)
    resamples = metrics.patient_bootstrap_indices(groups, n_boot, seed) if n_boot > 0 else []
    per: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for k, name in enumerate(findings):
        if not metrics.known(y[:, k]).any():
            skipped[name] = "no labelled images for this finding in the labels CSV"
            continue
        per[name] = metrics.finding_metrics(
            raw[:, k], cal[:, k], y[:, k], float(calibration.thresholds[k]), resamples, probs_flag=applied[:, k]
        )
    defined = [k for k, name in enumerate(findings) if name in per and per[name]["auroc"] is not None]
    if not defined:
        raise DatasetError(
            f"no finding has both positive and negative labels among {len(z)} images, so AUROC (and the means "
            "over findings with an AUROC) is undefined; evaluate on a larger labelled set"
        )

    def mean(key: str) -> float:
        return float(np.mean([per[findings[k]][key] for k in defined]))

    report: dict[str, Any] = {
        "n_images": int(len(z)),
        "n_patients": int(len(np.unique(np.asarray(groups)))),
        "findings": per,
        "mean_auroc": mean("auroc"),
        "mean_ece": mean("ece"),
        "mean_ece_uncalibrated": mean("ece_uncalibrated"),
        "mean_auprc": mean("auprc"),
        "mean_brier": mean("brier"),
        "mean_brier_uncalibrated": mean("brier_uncalibrated"),
        "mean_nll": mean("nll"),
        "mean_nll_uncalibrated": mean("nll_uncalibrated"),
        "mean_auroc_ci": _mean_auroc_ci(raw, y, defined, resamples) if resamples else None,
        "n_findings_in_means": len(defined),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "unit": "patient", "level": 0.95},
        "calibration": {"method": calibration.method, "chosen": calibration.info.get("chosen")},
        "skipped_findings": skipped,
    }
    return report


def write_metrics(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write metrics.json atomically; NaN/inf are refused so the file is strict JSON."""
    from medvit._io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(report, indent=2, allow_nan=False).encode())


def plot_curves(
    out_dir: str | os.PathLike,
    logits: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    calibration: Calibration,
) -> list[Path]:
    """ROC curves (one panel per finding) and per-finding reliability diagrams before/after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out = Path(out_dir)
    (out / "reliability").mkdir(parents=True, exist_ok=True)
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    raw, cal = expit(z), calibration.apply(z)
    written = []
    cols = 4
    rows = -(-len(findings) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (k, name) in zip(axes.flat, enumerate(findings), strict=False):
        m = metrics.known(y[:, k])
        auc = metrics.auroc(raw[m, k], y[m, k])
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        if auc is not None:
            fpr, tpr, _ = roc_curve(y[m, k], raw[m, k])
            ax.plot(fpr, tpr, c="C0")
        ax.set_title(f"{name}: " + (f"AUROC {auc:.3f}" if auc is not None else "AUROC n/a"), fontsize=9)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
    for ax in list(axes.flat)[len(findings) :]:
        ax.axis("off")
    fig.tight_layout()
    written.append(out / "roc.png")
    fig.savefig(written[-1], dpi=80)
    plt.close(fig)

    for k, name in enumerate(findings):
        m = metrics.known(y[:, k])
        if not m.any():
            continue
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect")
        for probs, label, color in ((raw, "before", "C1"), (cal, "after", "C0")):
            r = metrics.reliability(probs[m, k], y[m, k])
            filled = r.counts > 0
            ece = metrics.ece(probs[m, k], y[m, k])
            ax.plot(r.mean_prob[filled], r.frac_pos[filled], "o-", c=color, label=f"{label} (ECE {ece:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed frequency", title=name)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        written.append(out / "reliability" / f"{name}.png")
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written


# -------------------------------------------------------------------------------------------- orchestration


def labelled_frame(
    labels_csv: str | os.PathLike, images_dir: str | os.PathLike, findings: Sequence[str], split: str | None = None
) -> pd.DataFrame:
    """Rows of a labels CSV (NIH Data_Entry or wide format) to evaluate, optionally one split only."""
    from medvit.data.datasets import load_labels

    df = load_labels(labels_csv, images_dir, findings)
    if split is not None:
        available = sorted(df["split"].dropna().unique()) if "split" in df.columns else []
        df = df[df["split"] == split]
        if df.empty:
            raise DatasetError(f"no rows with split {split!r} in {labels_csv} (splits present: {available or 'none'})")
    return df.reset_index(drop=True)


def run_split_frame(info: Any, split: str | None = None) -> tuple[pd.DataFrame, str]:
    """The run's own held-out rows: `split`, else 'calib' when the run's split has one, else its val split.

    The split is rebuilt exactly as training did (the CSV's column, or the seeded patient-wise assignment).
    """
    from medvit.config import Config
    from medvit.data.splits import split_frame

    data = info.config.get("data")
    if not data:
        raise DatasetError(f"{info.run_dir}/config.json records no training data; pass --labels CSV --images DIR")
    csv, root = Path(data["labels_csv"]), Path(data["images_root"])
    if not csv.is_file() or not root.is_dir():
        raise DatasetError(
            f"the run's labels {csv} / images {root} are not found from {Path.cwd()}; pass --labels CSV --images DIR"
        )
    cfg = Config.model_validate(info.config)
    df = split_frame(cfg)
    if split is None:
        split = "calib" if (df["split"] == "calib").any() else cfg.data.split.val_name
    out = df[df["split"] == split].reset_index(drop=True)
    if out.empty:
        raise DatasetError(f"the run's data ({csv}) has no {split!r} rows to calibrate or evaluate on")
    return out, split


def model_logits(model: Any, info: Any, df: pd.DataFrame, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a run's model on the rows of `df`, with the run's own eval preprocessing."""
    from medvit.data.datasets import XrayDataset
    from medvit.data.transforms import build_transforms

    dataset = XrayDataset(df, info.findings, build_transforms(info.preprocessing, train=False))
    return collect_logits(model, dataset, batch_size)


def evaluate_run(
    run_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str | None = None,
    batch_size: int = 32,
    n_boot: int = 1000,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate a run on a labelled set; writes OUT_DIR/metrics.json (and plots) and returns the report."""
    from medvit.inference.predictor import load_calibration
    from medvit.runs import load_run

    model, info = load_run(run_dir)
    calibration = load_calibration(info)
    df = labelled_frame(labels_csv, images_dir, info.findings, split)
    logits, labels = model_logits(model, info, df, batch_size)
    report = build_report(logits, labels, info.findings, df["patient_id"].to_numpy(), calibration, n_boot=n_boot)
    fitted = calibration.info.get("fitted_on", {})
    in_sample = fitted.get("labels") == Path(labels_csv).name and fitted.get("split") == split and split is not None
    if in_sample:
        _log.warning("evaluating on the split the calibrators were fitted on: 'after' metrics are optimistic")
    report["evaluation"] = {
        "description": f"{Path(labels_csv).name}" + (f", split {split!r}" if split else ", all rows"),
        "labels": str(labels_csv),
        "split": split,
        "calibration_in_sample": in_sample,
    }
    report["run"] = {"dir": str(run_dir), "model": info.model_name, "weights_sha256": info.weights_sha256}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(report, out / METRICS)
    if plots:
        plot_curves(out, logits, labels, info.findings, calibration)
    _log.info(
        "mean AUROC %.3f, mean ECE %.3f (uncalibrated %.3f) on %d images -> %s",
        report["mean_auroc"],
        report["mean_ece"],
        report["mean_ece_uncalibrated"],
        report["n_images"],
        out / METRICS,
    )
    return report
