"""Pieces of the training loop that are not the loop: data, precision, MixUp, validation metric, logs."""

from __future__ import annotations

import csv
import logging
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medvit.config import Config, MixupConfig
from medvit.errors import ConfigError, DatasetError

_log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _cpu_has_fast_bf16() -> bool:
    # Only AMX makes bf16 autocast pay off on CPU: with AVX512-BF16 alone, a DeiT-tiny train step
    # measured 1.5-3x slower than fp32 here (the casts cost more than the narrower matmuls save).
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32): bf16 on CPUs with AMX, bf16/fp16 AMP on CUDA."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if precision == "bf16" or _cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame


def split_frame(cfg: Config) -> pd.DataFrame:
    """The config's labels with the `split` column exactly as training uses it (train/val, and calib if any).

    Calibration and evaluation rebuild the run's held-out rows through this same function, so they can
    never see a different split (and patients) than training did.
    """
    from medvit.data.datasets import assign_splits, load_labels

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


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: MixupConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp / CutMix for multi-label targets: mix the label vectors with the same lambda as the pixels.

    timm's `Mixup` one-hot encodes class indices, which is wrong for multi-hot targets, so only its
    box helper is reused. An entry unknown (NaN) in either image stays NaN, i.e. masked in the loss.
    Uses numpy's global RNG, which is seeded and saved in the resume state.
    """
    from timm.data.mixup import cutmix_bbox_and_lam

    if not cfg.enabled or np.random.rand() >= cfg.prob:
        return x, y
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or np.random.rand() < cfg.switch_prob)
    lam = float(np.random.beta(cfg.cutmix_alpha, cfg.cutmix_alpha) if use_cutmix
                else np.random.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    x_flip, y_flip = x.flip(0), y.flip(0)
    if use_cutmix:
        (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(x.shape, lam, correct_lam=True)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x_flip[:, :, y0:y1, x0:x1]
    else:
        x = x * lam + x_flip * (1 - lam)
    return x, y * lam + y_flip * (1 - lam)


class MetricsLog:
    """metrics.csv (always, appended across resumes) and TensorBoard scalars (when enabled)."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.csv"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("log.tensorboard: true needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
