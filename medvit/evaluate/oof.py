"""Calibrate a fold ensemble on out-of-fold logits (`medvit train --folds K --ensemble`).

A fold ensemble has seen every dev image through some member, so no image is unseen by it. Each image's
out-of-fold (OOF) logit, from the one member that never saw it, is what an unseen patient looks like to a member:
the calibrators and thresholds are fitted on those, the calibration method is chosen by cross-validation over the
CV folds, and the calibrated metrics in metrics.json give every image a calibrator fitted on the *other* folds'
OOF logits only (no image's own fold). AUROC and thresholds are those of the OOF logits, i.e. of one member on
unseen patients; the ensemble's own figure needs a hold-out (`medvit evaluate`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvit._io import atomic_write_bytes
from medvit.evaluate.calibration import Calibration, cross_validated_probs, fit_calibration
from medvit.evaluate.modelcard import write_model_card
from medvit.evaluate.pipeline import AUTO, model_logits, refit_ood, served_engines
from medvit.evaluate.report import build_report, write_metrics
from medvit.runs import CALIBRATION, CARD_NOTES, METRICS, load_run

_log = logging.getLogger(__name__)


def fold_calibrated_probs(
    logits: np.ndarray, labels: np.ndarray, folds: np.ndarray, calibration: Calibration
) -> np.ndarray:
    """Calibrated probabilities where each image's calibrator was refitted without its own CV fold."""
    return cross_validated_probs(logits, labels, folds, calibration, n_folds=len(np.unique(folds)))


def calibrate_out_of_fold(
    run_dir: str | os.PathLike,
    frame: pd.DataFrame,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    method: str = "auto",
    threshold_rule: str = "sensitivity",
    target_sensitivity: float = 0.9,
    n_boot: int = 1000,
    notes: str | os.PathLike | None = None,
    engine: str = AUTO,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Fit calibration.json on OOF logits and write metrics.json (OOF, fold-wise calibrated) and the model card.

    `frame` has one row per image (image_id, patient_id, path, fold) in the order of `logits` and `labels`.
    The served-engine block compares the engine with eager fp32 on the same images: its probability and flag
    differences hold, but its AUROCs are in-sample for an ensemble and are left out.
    """
    run_dir = Path(run_dir)
    model, info = load_run(run_dir)
    folds, groups = frame["fold"].to_numpy(), frame["patient_id"].to_numpy()
    n_folds = len(np.unique(folds))
    cal = fit_calibration(
        logits,
        labels,
        info.findings,
        folds,
        method=method,
        threshold_rule=threshold_rule,
        target_sensitivity=target_sensitivity,
        n_folds=n_folds,
    )
    cal.info["fitted_on"].update({"labels": "out-of-fold logits", "split": None, "folds": n_folds})
    cal.save(run_dir / CALIBRATION)
    report = build_report(
        logits,
        labels,
        info.findings,
        groups,
        cal,
        n_boot=n_boot,
        probs_calibrated=fold_calibrated_probs(logits, labels, folds, cal),
    )
    report["evaluation"] = {
        "description": f"out-of-fold logits of {n_folds} patient-wise CV folds: each image scored by the fold model "
        "that never saw it; calibrated metrics use calibrators fitted on the other folds only, AUROC and thresholds "
        "are those of the out-of-fold logits",
        "labels": "out-of-fold",
        "split": None,
        "calibration_in_sample": False,
        "cross_validated": True,
    }
    report["run"] = {"dir": str(run_dir), "model": info.model_name, "weights_sha256": info.weights_sha256}
    fp32 = model_logits(model, info, frame, batch_size)[0]
    engines = served_engines(info, frame, fp32, labels, cal, engine, batch_size)
    for block in engines["engines"].values():  # in-sample for the ensemble: not a figure anyone should read
        block["mean_auroc"] = block["mean_auroc_minus_fp32"] = None
    report |= engines
    write_metrics(report, run_dir / METRICS)
    if notes is not None:
        atomic_write_bytes(run_dir / CARD_NOTES, Path(notes).read_bytes())
    refit_ood(model, info, batch_size)
    write_model_card(run_dir)
    _log.info(
        "out-of-fold calibration (%s): mean AUROC %.3f, mean ECE %.3f (uncalibrated %.3f)",
        cal.info["chosen"],
        report["mean_auroc"],
        report["mean_ece"],
        report["mean_ece_uncalibrated"],
    )
    return report
