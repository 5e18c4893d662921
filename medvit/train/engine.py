"""Pieces of the training loop that are not the loop: data, precision, MixUp, validation metric, logs."""

from __future__ import annotations

import csv
import logging
import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvit.config import MixupConfig
from medvit.errors import ConfigError
from medvit.runs import METRICS_CSV

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
        self.path = run_dir / METRICS_CSV
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
