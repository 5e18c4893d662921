"""Train/val/calib splits of a config's labels: the one place a run's split is rebuilt (train, evaluate, calibrate)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from medvit.config import Config
from medvit.data.datasets import assign_splits, load_labels
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
    if d.split.policy == "assign":
        # Splits from official split files are kept (e.g. NIH's test list); a CSV 'split' column is re-drawn.
        df = assign_splits(df, seed=d.split.seed, val=d.split.val, calib=d.split.calib,
                           respect_existing=bool(d.split_files))
    elif "split" not in df.columns or df["split"].isna().all():
        raise DatasetError(f"{d.labels_csv} has no 'split' column; set data.split.policy: assign")
    return df


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
