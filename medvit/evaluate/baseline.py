"""The pixel baseline every model is reported against: PCA(30) of 32x32 thumbnails + one logistic regression
per finding (scikit-learn).

It sees only the global intensity layout of a downscaled radiograph, so a model that does not beat it on unseen
patients has learned nothing a thumbnail regression could not. `cross_validate_pixels` scores it on the same
patient-wise folds as `medvit train --folds`; `fit_predict_pixels` fits it on one labelled set and scores another
(e.g. all dev images -> a hold-out).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from medvit._io import write_json
from medvit.data.datasets import label_matrix, load_labels
from medvit.data.dicom import read_image
from medvit.data.splits import kfold_assign
from medvit.errors import ConfigError
from medvit.evaluate.metrics import mean_auroc
from medvit.findings import DEFAULT_FINDINGS

_log = logging.getLogger(__name__)

BASELINES = ("pixels",)
THUMBNAIL = 32
COMPONENTS = 30


def thumbnails(df: pd.DataFrame, size: int = THUMBNAIL) -> np.ndarray:
    """(N, size*size) float32 thumbnails of the frame's images, read by the app's own reader."""
    out = np.empty((len(df), size * size), dtype=np.float32)
    for i, path in enumerate(df["path"]):
        pixels = read_image(path).pixels
        out[i] = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA).ravel()
    return out


def fit_predict_pixels(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per-finding decision scores (N_test, K): PCA fitted on the training thumbnails, then one logistic regression
    per finding on its labelled training rows; a finding with one class in training gets a constant score."""
    pca = PCA(n_components=min(COMPONENTS, *x_train.shape), random_state=seed)
    f_train, f_test = pca.fit_transform(x_train), pca.transform(x_test)
    scores = np.zeros((len(x_test), y_train.shape[1]), dtype=np.float64)
    for k in range(y_train.shape[1]):
        m = ~np.isnan(y_train[:, k])
        if len(np.unique(y_train[m, k])) < 2:
            continue
        clf = LogisticRegression(max_iter=2000).fit(f_train[m], y_train[m, k])
        scores[:, k] = clf.decision_function(f_test)
    return scores


def cross_validate_pixels(
    df: pd.DataFrame, findings: Sequence[str], folds: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """The baseline on the given patient-wise folds: out-of-fold scores, each fold's and the pooled mean AUROC."""
    x, y = thumbnails(df), label_matrix(df, findings)
    scores = np.zeros_like(y, dtype=np.float64)
    for f in np.unique(folds):
        test = folds == f
        scores[test] = fit_predict_pixels(x[~test], y[~test], x[test], seed)
    per_fold = [mean_auroc(y[folds == f], scores[folds == f], findings)[0] for f in np.unique(folds)]
    pooled, per_finding = mean_auroc(y, scores, findings)
    _log.info(
        "pixel baseline: CV mean AUROC %.3f +- %.3f over %d folds (pooled out-of-fold %.3f)",
        np.mean(per_fold),
        np.std(per_fold, ddof=1),
        len(per_fold),
        pooled,
    )
    return {"scores": scores, "fold_mean_auroc": per_fold, "pooled_mean_auroc": pooled, "per_finding": per_finding}


BASELINE_JSON = "baseline.json"


def evaluate_baseline(
    name: str,
    labels_csv: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    folds: int = 5,
    seed: int = 0,
    fit_labels: str | os.PathLike | None = None,
    fit_images: str | os.PathLike | None = None,
    findings: Sequence[str] = DEFAULT_FINDINGS,
) -> dict[str, Any]:
    """`medvit evaluate --baseline pixels`: the baseline's mean AUROC on a labelled set, written to baseline.json.

    Without `fit_labels`: patient-wise `folds`-fold CV on the set, with the folds `medvit train --folds` draws for
    the same seed (`medvit.data.splits.kfold_assign`). With `fit_labels`/`fit_images`: fitted on all of that set
    and scored on this one (e.g. all dev images -> a hold-out of other patients).

    Raises:
        ConfigError: an unknown baseline, or `fit_labels` without `fit_images`. DatasetError: unusable labels.
    """
    if name not in BASELINES:
        raise ConfigError(f"--baseline {name}: unknown baseline; choose {', '.join(BASELINES)}")
    if (fit_labels is None) != (fit_images is None):
        raise ConfigError("--fit-labels and --fit-images go together")
    df = load_labels(labels_csv, images_dir, findings)
    y = label_matrix(df, findings)
    out: dict[str, Any] = {
        "baseline": name,
        "method": f"PCA({COMPONENTS}) of {THUMBNAIL}x{THUMBNAIL} thumbnails + one logistic regression per finding",
        "labels": str(labels_csv),
        "n_images": len(df),
        "n_patients": int(df["patient_id"].nunique()),
    }
    if fit_labels is not None and fit_images is not None:
        fit_df = load_labels(fit_labels, fit_images, findings)
        scores = fit_predict_pixels(thumbnails(fit_df), label_matrix(fit_df, findings), thumbnails(df), seed)
        mean, per = mean_auroc(y, scores, findings)
        out |= {"fitted_on": str(fit_labels), "fit_images": len(fit_df), "mean_auroc": mean, "auroc_per_finding": per}
    else:
        fold = kfold_assign(df, findings, folds=folds, seed=seed)
        cv = cross_validate_pixels(df, findings, fold, seed)
        out |= {
            "folds": folds,
            "seed": seed,
            "fold_mean_auroc": cv["fold_mean_auroc"],
            "cv_mean_auroc": float(np.mean(cv["fold_mean_auroc"])),
            "cv_sd_auroc": float(np.std(cv["fold_mean_auroc"], ddof=1)),
            "pooled_oof_mean_auroc": cv["pooled_mean_auroc"],
            "auroc_per_finding": cv["per_finding"],
        }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / BASELINE_JSON, out)
    return out
