"""Train/val/calib splits of a config's labels: the one place a run's split is rebuilt (train, evaluate, calibrate)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from medvit.config import Config
from medvit.data.datasets import assign_splits, label_matrix, load_labels
from medvit.errors import DatasetError

_log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame


def split_frame(cfg: Config) -> pd.DataFrame:
    """The config's labels with the `split` column exactly as training uses it (train/val, and calib if any).

    Calibration and evaluation rebuild the run's held-out rows through this same function, so they can
    never see a different split (and patients) than training did.
    """
    d = cfg.data
    df = load_labels(d.labels_csv, d.images_root, d.findings, uncertainty=d.uncertainty,
                     split_files={k: str(v) for k, v in d.split_files.items()} if d.split_files else None)
    if d.split.policy == "kfold":
        fold = kfold_assign(df, d.findings, folds=d.split.folds, seed=d.split.seed)
        df = df.assign(cv_fold=fold, split=np.where(fold == d.split.fold, d.split.val_name, d.split.train_name))
    elif d.split.policy == "assign":
        # Splits from official split files are kept (e.g. NIH's test list); a CSV 'split' column is re-drawn.
        df = assign_splits(df, seed=d.split.seed, val=d.split.val, calib=d.split.calib,
                           respect_existing=bool(d.split_files))
    elif "split" not in df.columns or df["split"].isna().all():
        raise DatasetError(f"{d.labels_csv} has no 'split' column; set data.split.policy: assign")
    return df


def kfold_assign(df: pd.DataFrame, findings: Sequence[str], *, folds: int, seed: int) -> np.ndarray:
    """The cross-validation fold (0..folds-1) of every row: patient-disjoint, seeded, and stratified by finding.

    A patient's stratum is its rarest positive finding (by count over all rows), or 'none': with a few hundred
    images, that keeps the few positives of rare findings spread over the folds. The folds depend only on the
    patients, their labels and `seed`, not on the row order of the CSV.
    """
    patients = df["patient_id"].astype(str).to_numpy()
    if len(np.unique(patients)) < folds:
        raise DatasetError(f"{folds} folds need at least {folds} patients; the labels have {len(np.unique(patients))}")
    y = np.nan_to_num(label_matrix(df, findings), nan=0.0) == 1
    rarity = np.where(y.sum(axis=0) > 0, y.sum(axis=0), np.inf)
    row_key = np.where(y.any(axis=1), np.argmin(np.where(y, rarity, np.inf), axis=1), -1)
    key = pd.Series(row_key).groupby(patients).transform("min").to_numpy()  # one stratum per patient
    order = np.lexsort((df["image_id"].astype(str).to_numpy(), patients))
    fold = np.empty(len(df), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only N members": expected for rare findings
        warnings.simplefilter("ignore", UserWarning)
        for i, (_, test) in enumerate(splitter.split(order, key[order], groups=patients[order])):
            fold[order[test]] = i
    return fold


def load_splits(cfg: Config) -> Splits:
    """Labels CSV -> patient-wise train/val frames, per the config's split policy."""
    d = cfg.data
    df = split_frame(cfg)
    train = df[df["split"] == d.split.train_name].reset_index(drop=True)
    val = df[df["split"] == d.split.val_name].reset_index(drop=True)
    if train.empty or val.empty:
        raise DatasetError(f"need both '{d.split.train_name}' and '{d.split.val_name}' rows in {d.labels_csv}; "
                           f"got {len(train)} and {len(val)}")
    overlap = set(train["patient_id"]) & set(val["patient_id"])
    if overlap:
        raise DatasetError(f"{len(overlap)} patient(s) are in both train and val, e.g. {sorted(overlap)[:3]}")
    return Splits(train=train, val=val)
