"""The evaluation report: per-finding metrics before/after calibration, engine agreement, metrics.json and plots.

Everything here is pure (logits + labels in, JSON-ready dict or plots out), so it is tested without a model;
`medvit.evaluate.pipeline` adds the model, the served engine, data loading and the run folder around it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from medvit._io import atomic_write_bytes
from medvit.errors import DatasetError
from medvit.evaluate import metrics
from medvit.evaluate.calibration import Calibration

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


def _mean_auroc(probs: np.ndarray, labels: np.ndarray, findings: Sequence[int] | None = None) -> float | None:
    """Mean AUROC over `findings` (default: all columns) that have both classes among their labelled rows."""
    aurocs = []
    for k in range(labels.shape[1]) if findings is None else findings:
        m = metrics.known(labels[:, k])
        if m.any() and (v := metrics.fast_auroc(probs[m, k], labels[m, k])) is not None:
            aurocs.append(v)
    return float(np.mean(aurocs)) if aurocs else None


def _mean_auroc_ci(
    probs: np.ndarray, labels: np.ndarray, defined: Sequence[int], resamples: Sequence[np.ndarray]
) -> tuple[float, float] | None:
    """Patient-bootstrap CI of the mean AUROC; a resample averages over the findings defined in it."""
    return metrics.bootstrap_ci(lambda p, y: _mean_auroc(p, y, defined), probs, labels, resamples)


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


def compare_engines(
    logits: Mapping[str, np.ndarray], labels: np.ndarray, calibration: Calibration, reference: str = "torch"
) -> dict[str, dict[str, Any]]:
    """How far each inference engine's results are from the `reference` (eager fp32) on the same images.

    Per engine: mean AUROC (over findings with both classes), its difference to the reference, the largest
    |calibrated probability - reference| (what is shown; also before calibration, which can flatten a difference)
    and how many image x finding flags differ, so metrics.json says whether the served engine changes what a
    clinician sees. Flags of probabilities that sit on their threshold (within that drift; thresholds are chosen
    at observed probabilities, so ties are common) flip under any non-identical engine and are counted apart.
    """
    y = np.asarray(labels, dtype=np.float64)
    ref = np.asarray(logits[reference], dtype=np.float64)
    ref_auroc, ref_probs = _mean_auroc(expit(ref), y), calibration.apply(ref)
    out: dict[str, dict[str, Any]] = {}
    for name, z in logits.items():
        z = np.asarray(z, dtype=np.float64)
        if z.shape != ref.shape:
            raise ValueError(f"engine {name}: logits {z.shape} but {reference} gave {ref.shape}")
        auroc, probs = _mean_auroc(expit(z), y), calibration.apply(z)
        dp = float(np.max(np.abs(probs - ref_probs), initial=0.0))
        flipped = calibration.flags(probs) != calibration.flags(ref_probs)
        at_threshold = np.abs(ref_probs - np.asarray(calibration.thresholds)) <= dp  # a tie any drift can flip
        out[name] = {
            "mean_auroc": auroc,
            "mean_auroc_minus_fp32": None if auroc is None or ref_auroc is None else auroc - ref_auroc,
            "max_abs_dp": dp,
            "max_abs_dp_uncalibrated": float(np.max(np.abs(expit(z) - expit(ref)), initial=0.0)),
            "flags_changed": int(np.sum(flipped)),
            "flags_changed_at_threshold": int(np.sum(flipped & at_threshold)),
            "n_outputs": int(probs.size),
        }
    return out
