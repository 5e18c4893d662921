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

from medvit import metrics
from medvit.calibrate import Calibration, atomic_write_text
from medvit.errors import DatasetError

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
    means = []
    for idx in resamples:
        vals = [
            metrics.fast_auroc(probs[idx, k][m], labels[idx, k][m])
            for k in defined
            if (m := metrics.known(labels[idx, k])).any()
        ]
        vals = [v for v in vals if v is not None]
        if vals:
            means.append(float(np.mean(vals)))
    if len(means) < 0.9 * len(resamples) or not means:
        return None
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def build_report(
    logits: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    groups: Sequence | np.ndarray,
    calibration: Calibration,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The metrics.json content: per-finding metrics before/after calibration plus means over findings with a
    defined AUROC. Findings without any labelled image are listed under `skipped_findings` with a reason."""
    calibration.check_findings(findings)
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    raw = 1.0 / (1.0 + np.exp(-z))
    cal = calibration.apply(z)
    resamples = metrics.patient_bootstrap_indices(groups, n_boot, seed) if n_boot > 0 else []
    per: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for k, name in enumerate(findings):
        if not metrics.known(y[:, k]).any():
            skipped[name] = "no labelled images for this finding in the labels CSV"
            continue
        per[name] = metrics.finding_metrics(raw[:, k], cal[:, k], y[:, k], float(calibration.thresholds[k]), resamples)
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
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False))


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
    raw, cal = 1.0 / (1.0 + np.exp(-z)), calibration.apply(z)
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
