"""The pixel baseline every model is reported against: PCA(30) of 32x32 thumbnails + one logistic regression
per finding (scikit-learn).

It sees only the global intensity layout of a downscaled radiograph, so a model that does not beat it on unseen
patients has learned nothing a thumbnail regression could not. `cross_validate_pixels` scores it on the same
patient-wise folds as `medvit train --folds`; `fit_predict_pixels` fits it on one labelled set and scores another
(e.g. all dev images -> a hold-out).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from medvit.data.datasets import label_matrix
from medvit.data.dicom import read_image
from medvit.evaluate.metrics import mean_auroc

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


def cross_validate_pixels(df: pd.DataFrame, findings: Sequence[str], folds: np.ndarray, seed: int = 0) -> dict:
    """The baseline on the given patient-wise folds: out-of-fold scores, each fold's and the pooled mean AUROC."""
    x, y = thumbnails(df), label_matrix(df, findings)
    scores = np.zeros_like(y, dtype=np.float64)
    for f in np.unique(folds):
        test = folds == f
        scores[test] = fit_predict_pixels(x[~test], y[~test], x[test], seed)
    per_fold = [mean_auroc(y[folds == f], scores[folds == f], findings)[0] for f in np.unique(folds)]
    pooled, per_finding = mean_auroc(y, scores, findings)
    _log.info("pixel baseline: CV mean AUROC %.3f +- %.3f over %d folds (pooled out-of-fold %.3f)",
              np.mean(per_fold), np.std(per_fold, ddof=1), len(per_fold), pooled)
    return {"scores": scores, "fold_mean_auroc": per_fold, "pooled_mean_auroc": pooled, "per_finding": per_finding}
